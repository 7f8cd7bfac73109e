//! Which replica sets a snapshot change may concern ([`dirty`]), so that the
//! controller plans only those; [`all_sets`] for a full pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pier_model::{ObjectKey, Snapshot};

/// Which replica sets a change from `old` to `new` may concern, with why.
/// Nodes changing concerns every set (placement, node loss).
pub fn dirty(old: &Snapshot, new: &Snapshot, out: &mut BTreeMap<ObjectKey, &'static str>) {
    let mut mark = |k: ObjectKey, why: &'static str| {
        out.entry(k).or_insert(why);
    };
    if !Arc::ptr_eq(&old.nodes, &new.nodes) || !Arc::ptr_eq(&old.node_labels, &new.node_labels) {
        for k in all_sets(new) {
            mark(k, "nodes changed");
        }
    }
    if !Arc::ptr_eq(&old.rollouts, &new.rollouts) {
        for (k, v) in new.rollouts.iter() {
            if old.rollouts.get(k).is_none_or(|o| !Arc::ptr_eq(o, v)) {
                mark(k.clone(), "rollout changed");
            }
        }
    }
    if !Arc::ptr_eq(&old.replicasets, &new.replicasets) {
        for (k, v) in new.replicasets.iter() {
            if old.replicasets.get(k).is_none_or(|o| !Arc::ptr_eq(o, v)) {
                mark(k.clone(), "replicaset changed");
            }
        }
        for k in old.replicasets.keys() {
            if !new.replicasets.contains_key(k) {
                mark(k.clone(), "replicaset deleted");
            }
        }
    }
    if !Arc::ptr_eq(&old.pods, &new.pods) {
        for (k, v) in new.pods.iter() {
            if old.pods.get(k).is_none_or(|o| !Arc::ptr_eq(o, v)) {
                mark((k.0.clone(), v.replicaset.clone()), "pod changed");
            }
        }
        for (k, v) in old.pods.iter() {
            if !new.pods.contains_key(k) {
                mark((k.0.clone(), v.replicaset.clone()), "pod deleted");
            }
        }
    }
    if !Arc::ptr_eq(&old.pod_statuses, &new.pod_statuses) {
        let set_of = |k: &ObjectKey| {
            new.pods
                .get(k)
                .or_else(|| old.pods.get(k))
                .map(|p| (k.0.clone(), p.replicaset.clone()))
        };
        for (k, v) in new.pod_statuses.iter() {
            if old.pod_statuses.get(k).is_none_or(|o| !Arc::ptr_eq(o, v))
                && let Some(s) = set_of(k)
            {
                mark(s, "pod status changed");
            }
        }
        for k in old.pod_statuses.keys() {
            if !new.pod_statuses.contains_key(k)
                && let Some(s) = set_of(k)
            {
                mark(s, "pod status deleted");
            }
        }
    }
}

/// Every replica set the supervisor must look at: those that exist, and
/// those that are gone but still have pods.
pub fn all_sets(snap: &Snapshot) -> BTreeSet<ObjectKey> {
    let mut s: BTreeSet<ObjectKey> = snap.replicasets.keys().cloned().collect();
    s.extend(snap.rollouts.keys().cloned());
    for ((ns, _), p) in snap.pods.iter() {
        s.insert((ns.clone(), p.replicaset.clone()));
    }
    s
}
