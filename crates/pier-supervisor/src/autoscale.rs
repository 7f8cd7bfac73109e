//! The autoscaler's decision, pure: from a replica set's measurement, its
//! SLA and the recent recommendations to the replica count it should have,
//! with the reason. No I/O; the loop is in `autoscaler.rs`.
//!
//! The rule is the HPA's:
//! - per target, `desired = ceil(measured / target)` for the sums (open
//!   connections, new connections/s: what the set must absorb, whatever
//!   its pods now), and `ceil(ready × p99 / target)` for the p99 first-byte
//!   time (it falls as pods are added; only ready pods served the traffic);
//!   a ratio of measurement to target within the tolerance of 1 keeps the
//!   current count; the largest of the targets' counts wins, within
//!   `[min, max]`;
//! - stabilization: a scale-down goes only as far as the highest
//!   recommendation of the scale-down window, and a scale-up only as far as
//!   the lowest of the scale-up window; at most `max_step` pods per step;
//! - missing or stale data (no service selects the set, a node's record is
//!   stale, the snapshot is stale, a new leader that has not yet watched a
//!   whole scale-down window), or pods not ready yet: never down.

use pier_model::Sla;
use pier_model::autoscale::Measurement;

/// One past recommendation: (unix ms, replicas).
pub type Recommendation = (u64, u32);

/// Everything the decision reads.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub now_ms: u64,
    /// The set's replica count now (`ReplicaSet.replicas`).
    pub current: u32,
    /// Its pods that run and passed their health check.
    pub ready: u32,
    pub min: u32,
    pub max: u32,
    pub sla: &'a Sla,
    /// `None`: no service selects the set's pods.
    pub measured: Option<&'a Measurement>,
    /// The snapshot is stale (the store unreachable).
    pub snapshot_stale: bool,
    /// Since when this leader has recommended for the set (unix ms).
    pub watching_since_ms: u64,
    /// Earlier recommendations, oldest first (older than both windows may
    /// be left out).
    pub history: &'a [Recommendation],
}

/// What [`decide`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// This round's recommendation, before stabilization: the caller keeps
    /// it in the history.
    pub recommendation: u32,
    /// The count to write (equal to `current` when nothing changes).
    pub desired: u32,
    /// Why, in a sentence for `describe`.
    pub reason: String,
}

/// The count one target asks for, and the words for it.
fn per_target(i: &Input<'_>, m: &Measurement) -> Vec<(u32, String)> {
    let tol = i.sla.tolerance_pct as f64 / 100.0;
    let ready = i.ready.max(1) as f64;
    let mut out = Vec::new();
    // A sum over the set: `ceil(sum / target)` pods absorb it.
    let mut sum = |what: &str, unit: &str, total: f64, target: Option<u32>| {
        let Some(t) = target.filter(|t| *t > 0) else {
            return;
        };
        let t = t as f64;
        let ratio = total / (t * ready);
        let want = if i.ready > 0 && (ratio - 1.0).abs() <= tol + 1e-9 {
            i.current
        } else {
            (total / t * (1.0 - 1e-9)).ceil() as u32
        };
        out.push((
            want,
            format!(
                "{what} {} over {} ready pod{} (target {} {unit} per pod) → {want}",
                trim(total),
                i.ready,
                if i.ready == 1 { "" } else { "s" },
                trim(t)
            ),
        ));
    };
    sum(
        "open connections",
        "connections",
        m.active as f64,
        i.sla.max_active_per_pod,
    );
    sum(
        "new connections/s",
        "/s",
        m.conn_rate,
        i.sla.max_conn_rate_per_pod,
    );
    if let Some(t) = i.sla.p99_first_byte_ms.filter(|t| *t > 0)
        && let Some(p99) = m.p99_first_byte_us
        && i.ready > 0
    {
        let ratio = p99 as f64 / (t as f64 * 1000.0);
        let want = if (ratio - 1.0).abs() <= tol + 1e-9 {
            i.current
        } else {
            (i.ready as f64 * ratio * (1.0 - 1e-9)).ceil() as u32
        };
        out.push((
            want,
            format!(
                "p99 first byte {} ms over {} samples with {} ready (target {t} ms) → {want}",
                trim(p99 as f64 / 1000.0),
                m.first_byte_samples,
                i.ready
            ),
        ));
    }
    out
}

fn trim(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

/// The decision for one round.
pub fn decide(i: &Input<'_>) -> Decision {
    let (min, max) = (i.min, i.max.max(i.min));
    let clamp = |n: u32| n.clamp(min, max);

    // What the data asks for, and whether it may go down.
    let mut hold_down: Option<String> = None;
    let (mut rec, mut why) = match i.measured {
        None => {
            hold_down = Some(
                "no measurements (no service selects the set's pods, or their stats could not be read)"
                    .into(),
            );
            (i.current, String::new())
        }
        Some(m) => {
            let t = per_target(i, m);
            match t.into_iter().max_by_key(|(n, _)| *n) {
                Some((n, w)) => (n, w),
                None => {
                    hold_down = Some("no measurement for any target yet".into());
                    (i.current, String::new())
                }
            }
        }
    };
    if let Some(m) = i.measured
        && !m.stale_nodes.is_empty()
    {
        let names: Vec<&str> = m.stale_nodes.iter().map(|n| n.as_str()).collect();
        hold_down = Some(format!("stale stats from {}", names.join(", ")));
    }
    if i.snapshot_stale {
        hold_down = Some("the store is unreachable (stale snapshot)".into());
    }
    if i.ready < i.current && hold_down.is_none() {
        hold_down = Some(format!(
            "{} of {} pods ready: waiting for the rest",
            i.ready, i.current
        ));
    }
    if hold_down.is_some() && rec < i.current {
        rec = i.current;
    }
    rec = clamp(rec);

    // Stabilization over the windows, this round included.
    let in_window = |w: u64| {
        i.history
            .iter()
            .filter(move |(at, _)| i.now_ms.saturating_sub(*at) < w)
            .map(|(_, n)| *n)
            .chain([rec])
    };
    let up_to = in_window(i.sla.scale_up_window_ms).min().unwrap_or(rec);
    let down_to = in_window(i.sla.scale_down_window_ms).max().unwrap_or(rec);
    let mut desired = i.current;
    if i.current < up_to {
        desired = up_to;
    } else if i.current > down_to {
        desired = down_to;
        if i.now_ms.saturating_sub(i.watching_since_ms) < i.sla.scale_down_window_ms {
            desired = i.current;
            hold_down.get_or_insert_with(|| {
                "this leader has not watched a whole scale-down window yet".into()
            });
        }
    }
    if i.sla.max_step > 0 {
        let s = i.sla.max_step;
        desired = desired.clamp(i.current.saturating_sub(s), i.current.saturating_add(s));
    }
    // Bounds win over everything: a set outside [min, max] moves in.
    let desired = clamp(desired);

    let reason = if desired == i.current {
        match (&hold_down, why.is_empty()) {
            (Some(h), _) if rec <= i.current => format!("hold: {h}"),
            _ if rec != i.current || up_to != down_to => {
                format!("hold: stabilizing ({why}; window asks {up_to}..{down_to})")
            }
            (_, false) => format!("hold: {why}"),
            (_, true) => "hold".into(),
        }
    } else {
        if why.is_empty() {
            why = "no measurement".into();
        }
        if i.current < min || i.current > max {
            format!("{} → {desired}: outside min {min}, max {max}", i.current)
        } else if desired > i.current {
            format!("up {} → {desired}: {why}", i.current)
        } else {
            format!(
                "down {} → {desired}: {why} (highest recommendation of the last {} s)",
                i.current,
                i.sla.scale_down_window_ms / 1000
            )
        }
    };
    Decision {
        recommendation: rec,
        desired,
        reason,
    }
}

#[cfg(test)]
mod tests;
