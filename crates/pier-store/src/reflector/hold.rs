//! The hold: a node's keys that vanished because the *store* stalled stay in
//! the published snapshot until the node registers again.
//!
//! A lease expires when its holder cannot renew it for a TTL. When the
//! store itself stalls for longer than that (an etcd paused, restarted or
//! overloaded), every lease expires at the same moment it comes back, and
//! every node's endpoints would vanish from every snapshot at once, until
//! each agent has granted a new lease and written its keys again: a
//! cluster-wide blip of empty services. So the reflector tells the two
//! cases apart by what it saw itself:
//!
//! - A node's record went while this reflector's view of the store was
//!   **live for the whole window before** (a `HoldPolicy::window`, 2 lease
//!   TTLs): the store was serving and the node did not renew. It is dead
//!   or cut off: its keys leave the snapshot at once (fast removal, as
//!   before).
//! - It went while the view **was stale, or had been within the window**:
//!   the store may have been down for every node alike, so nobody can tell
//!   a dead node from a live one that could not renew. The node's record,
//!   its endpoints and its pod statuses are *held*: kept in the published
//!   snapshot as they were, until the node's record is written again (an
//!   agent writes its record last, after its endpoints and pod statuses,
//!   so at that moment its own keys have replaced the held ones and any
//!   held one it did not write again is really gone) or until
//!   `HoldPolicy::grace` (2 lease TTLs) has passed.
//!
//! The store is never written: this is only what readers are shown. The
//! functions here are pure (time is a parameter); the reflector's loop
//! calls them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pier_model::{Endpoint, EndpointKey, Name, Node, ObjectKey, PodStatus, Snapshot};

use crate::Ttl;

/// How long a node's keys are held, and how recent a stall must be for a
/// lost node to be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldPolicy {
    /// The longest a node is held without registering again.
    pub grace: Duration,
    /// A node lost within this long after this reflector last saw the
    /// store stale is held.
    pub window: Duration,
}

impl HoldPolicy {
    /// Both 2 TTLs. The window: a stall is seen as stale within about 3 s
    /// (a quiet watch's progress request unanswered for 2 s) or a TTL (a
    /// keepalive unanswered), and the lease deletions follow the store's
    /// return within its 0.5 s expiry loop; 2 TTLs covers both with room.
    /// The grace: an agent notices a lost lease at its next keepalive
    /// (TTL/3), grants a new one and rewrites its keys in well under a TTL.
    pub fn for_ttl(ttl: Ttl) -> HoldPolicy {
        HoldPolicy {
            grace: ttl.as_duration() * 2,
            window: ttl.as_duration() * 2,
        }
    }
}

/// One held node: what the snapshot showed of it before it went.
#[derive(Debug, Clone)]
struct Held {
    until_ms: u64,
    node: Arc<Node>,
    endpoints: Vec<(ObjectKey, EndpointKey, Arc<Endpoint>)>,
    statuses: Vec<(ObjectKey, Arc<PodStatus>)>,
}

/// The held nodes and the memory of the last stall.
#[derive(Debug, Clone)]
pub(crate) struct Holds {
    policy: Option<HoldPolicy>,
    /// Unix ms until which a lost node is held: the last time the view was
    /// seen stale plus the window.
    disrupted_until_ms: u64,
    held: BTreeMap<Name, Held>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Holds {
    /// `None`: never hold (nodes go when their keys go).
    pub(crate) fn new(policy: Option<HoldPolicy>) -> Holds {
        Holds {
            policy,
            disrupted_until_ms: 0,
            held: BTreeMap::new(),
        }
    }

    /// Records whether the view is stale at `now_ms`.
    pub(crate) fn saw(&mut self, stale: bool, now_ms: u64) {
        if let (true, Some(p)) = (stale, self.policy) {
            self.disrupted_until_ms = self
                .disrupted_until_ms
                .max(now_ms.saturating_add(ms(p.window)));
        }
    }

    /// Whether a node lost at `now_ms` is held.
    fn disrupted(&self, now_ms: u64) -> bool {
        self.policy.is_some() && now_ms <= self.disrupted_until_ms
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The earliest deadline of a held node.
    pub(crate) fn next_deadline_ms(&self) -> Option<u64> {
        self.held.values().map(|h| h.until_ms).min()
    }

    /// After the store's state went from `prev` to `next` (both as the
    /// store has them, without holds), with the view stale or not: holds
    /// the nodes that went while disrupted, and lets go of those that are
    /// back or past their grace. `true` if the held set changed.
    pub(crate) fn update(
        &mut self,
        prev: &Snapshot,
        next: &Snapshot,
        stale: bool,
        now_ms: u64,
    ) -> bool {
        self.saw(stale, now_ms);
        let mut changed = false;
        if !prev.nodes.ptr_eq(&next.nodes) {
            let disrupted = self.disrupted(now_ms);
            for (name, node) in prev.nodes.iter() {
                if next.nodes.contains_key(name) || self.held.contains_key(name) {
                    continue;
                }
                let Some(p) = self.policy.filter(|_| disrupted) else {
                    // Every node that leaves a published snapshot is
                    // logged, held or not (the e2e store stall test reads
                    // these lines to tell whether the node ever left).
                    tracing::info!(
                        node = %name,
                        "node's record is gone; its endpoints leave the snapshot now \
                         (the store was live, or holding is off)"
                    );
                    continue;
                };
                let h = capture(prev, name, node, now_ms.saturating_add(ms(p.grace)));
                tracing::warn!(
                    node = %name,
                    endpoints = h.endpoints.len(),
                    pod_statuses = h.statuses.len(),
                    grace_ms = ms(p.grace),
                    "node's lease expired while the store was unreachable from here; \
                     holding its endpoints until it registers again"
                );
                self.held.insert(name.clone(), h);
                changed = true;
            }
        }
        self.held.retain(|name, h| {
            if next.nodes.contains_key(name) {
                tracing::info!(node = %name, "held node registered again; its own keys replace the held ones");
                changed = true;
                false
            } else if now_ms >= h.until_ms {
                tracing::warn!(node = %name, "held node did not register again in time; its endpoints are removed");
                changed = true;
                false
            } else {
                true
            }
        });
        changed
    }

    /// What readers are shown: `truth` with every held node's record,
    /// endpoints and pod statuses laid under it (a key the store has again
    /// is the store's). `truth` as is (its `Arc`s shared) when nothing is
    /// held.
    pub(crate) fn view(&self, truth: &Snapshot) -> Snapshot {
        let mut v = truth.clone();
        if self.held.is_empty() {
            return v;
        }
        for (name, h) in &self.held {
            if !v.nodes.contains_key(name) {
                v.nodes.insert(name.clone(), h.node.clone());
            }
            for (skey, ekey, ep) in &h.endpoints {
                let has = v.endpoints.get(skey).is_some_and(|m| m.contains_key(ekey));
                if !has {
                    let map = v.endpoints.entry(skey.clone()).or_default();
                    Arc::make_mut(map).insert(ekey.clone(), ep.clone());
                }
            }
            for (pkey, st) in &h.statuses {
                if !v.pod_statuses.contains_key(pkey) {
                    v.pod_statuses.insert(pkey.clone(), st.clone());
                }
            }
        }
        v.held_nodes = Arc::new(
            self.held
                .iter()
                .map(|(n, h)| (n.clone(), h.until_ms))
                .collect(),
        );
        v
    }
}

/// `name`'s record, endpoints and pod statuses as `snap` has them.
fn capture(snap: &Snapshot, name: &Name, node: &Arc<Node>, until_ms: u64) -> Held {
    let mut endpoints = Vec::new();
    for (skey, map) in snap.endpoints.iter() {
        for (ekey, ep) in map.iter() {
            if ekey.0 == *name {
                endpoints.push((skey.clone(), ekey.clone(), ep.clone()));
            }
        }
    }
    let statuses = snap
        .pod_statuses
        .iter()
        .filter(|(_, s)| s.node.as_ref() == Some(name))
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    Held {
        until_ms,
        node: node.clone(),
        endpoints,
        statuses,
    }
}

#[cfg(test)]
mod tests;
