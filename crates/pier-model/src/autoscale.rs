//! What the autoscaler measures and decides: the sum of every node's
//! [`Stats`] for a replica set's services ([`measure`], pure, used by the
//! autoscaler and by the API's `describe rs`), and the record of its
//! decisions (`/pier/v1/autoscale/<ns>/<rs>`).

use serde::{Deserialize, Serialize};

use crate::Name;
use crate::objects::{ReplicaSet, STATS_REFRESH_MS, Service, Stats, labels};
use crate::sketch::Sketch;

/// A node's record counts as stale when its load is this much older than
/// the reader's clock: three refreshes missed (so a clock skew of up to
/// 20 s between nodes does not matter either).
pub const STATS_STALE_MS: u64 = 3 * STATS_REFRESH_MS;

/// A replica set's traffic summed over every node's proxy, for every
/// service that selects its pods.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Measurement {
    /// Open connections.
    pub active: u64,
    /// New connections per second: the sum of each node's last window.
    pub conn_rate: f64,
    /// The p99 time to first byte of every node's last window merged, µs;
    /// `None` when no window had a first byte.
    pub p99_first_byte_us: Option<u64>,
    /// First-byte samples behind that p99.
    pub first_byte_samples: u64,
    /// Nodes whose record was read.
    pub nodes: u32,
    /// Nodes whose record has load but is older than [`STATS_STALE_MS`].
    pub stale_nodes: Vec<Name>,
}

/// Sums `records` (node, stats) as of `now_ms`. A stale record with load
/// is still counted (its load is the last known) and named in
/// `stale_nodes`, so that the autoscaler will not scale down on it.
pub fn measure<'a>(
    records: impl IntoIterator<Item = (&'a Name, &'a Stats)>,
    now_ms: u64,
) -> Measurement {
    let mut m = Measurement::default();
    let mut fb = Sketch::default();
    for (node, s) in records {
        m.nodes += 1;
        m.active += s.active;
        m.conn_rate += s.conn_rate();
        fb.merge(&s.first_byte);
        if !s.is_idle() && now_ms.saturating_sub(s.at) > STATS_STALE_MS {
            m.stale_nodes.push(node.clone());
        }
    }
    m.first_byte_samples = fb.count();
    m.p99_first_byte_us = fb.quantile(0.99);
    m
}

/// Whether `svc` selects the pods of `rs`: same namespace, a selector, and
/// every selector label on the set's pods (`pier.replicaset`,
/// `pier.namespace`, or one of the template's labels). A selector on
/// per-pod labels (`pier.pod`, `pier.node`) does not select the set.
pub fn selects(svc: &Service, rs: &ReplicaSet) -> bool {
    svc.namespace == rs.namespace
        && !svc.selector.is_empty()
        && svc.selector.iter().all(|(k, v)| match k.as_str() {
            labels::REPLICASET => v == rs.name.as_str(),
            labels::NAMESPACE => v == rs.namespace.as_str(),
            labels::POD | labels::NODE | labels::TEMPLATE_HASH => false,
            _ => rs.template.labels.get(k) == Some(v),
        })
}

/// One decision of the autoscaler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleDecision {
    /// Unix milliseconds.
    pub at: u64,
    pub from: u32,
    pub to: u32,
    /// What it rests on, e.g. "active 16 for 1 ready pod, target 5 per pod".
    pub reason: String,
}

/// `/pier/v1/autoscale/<ns>/<rs>`: the autoscaler leader's last decisions
/// for a set (fenced; the only writer). Kept after a leader change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoscaleStatus {
    /// The last [`AutoscaleStatus::KEEP`], oldest first.
    pub decisions: Vec<ScaleDecision>,
    /// Decisions since the record was created.
    pub total: u64,
}

impl AutoscaleStatus {
    pub const KEEP: usize = 10;

    pub fn push(&mut self, d: ScaleDecision) {
        self.decisions.push(d);
        let n = self.decisions.len();
        if n > Self::KEEP {
            self.decisions.drain(..n - Self::KEEP);
        }
        self.total += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::{BUCKETS, bucket};

    fn fb(us: u64, n: u64) -> Sketch {
        let mut d = vec![0u64; BUCKETS];
        d[bucket(us)] = n;
        Sketch::from_counts(&d)
    }

    #[test]
    fn measure_sums_nodes_and_merges_sketches() {
        let (a, b) = (Name::new("a").unwrap(), Name::new("b").unwrap());
        let sa = Stats {
            active: 10,
            new_conns: 50,
            window_ms: 1000,
            first_byte: fb(1000, 100),
            at: 100_000,
            ..Default::default()
        };
        let sb = Stats {
            active: 6,
            new_conns: 25,
            window_ms: 500,
            first_byte: fb(80_000, 100),
            at: 100_000 - STATS_STALE_MS - 1,
            ..Default::default()
        };
        let m = measure([(&a, &sa), (&b, &sb)], 100_000);
        assert_eq!(m.active, 16);
        assert_eq!(m.conn_rate, 100.0);
        assert_eq!(m.first_byte_samples, 200);
        let p = m.p99_first_byte_us.unwrap();
        assert!((75_000..=85_000).contains(&p), "{p}");
        assert_eq!(m.stale_nodes, vec![b.clone()]);
        // An old record with no load is not stale: an idle node writes
        // nothing.
        let idle = Stats {
            at: 1,
            ..Default::default()
        };
        assert!(measure([(&b, &idle)], 100_000).stale_nodes.is_empty());
    }

    #[test]
    fn status_keeps_the_last_ten() {
        let mut s = AutoscaleStatus::default();
        for i in 0..15 {
            s.push(ScaleDecision {
                at: i,
                from: 1,
                to: 2,
                reason: String::new(),
            });
        }
        assert_eq!(s.decisions.len(), 10);
        assert_eq!(s.decisions[0].at, 5);
        assert_eq!(s.total, 15);
    }
}
