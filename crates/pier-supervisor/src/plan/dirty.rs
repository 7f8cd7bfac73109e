//! Which replica sets a snapshot change may concern ([`dirty`]), so that the
//! controller plans only those; [`all_sets`] for a full pass.

use std::collections::{BTreeMap, BTreeSet};

use pier_model::{DiffItem, ObjectKey, Snapshot};

/// Which replica sets a change from `old` to `new` may concern, with why.
/// Nodes changing concerns every set (placement, node loss). The
/// snapshots' maps are persistent and share what did not change, and
/// `Map::diff` skips the shared parts: this costs in proportion to the
/// change (plus every set when nodes changed), not to all pods.
pub fn dirty(old: &Snapshot, new: &Snapshot, out: &mut BTreeMap<ObjectKey, &'static str>) {
    let mut mark = |k: ObjectKey, why: &'static str| {
        out.entry(k).or_insert(why);
    };
    if !old.nodes.ptr_eq(&new.nodes) || !old.node_labels.ptr_eq(&new.node_labels) {
        for k in all_sets(new) {
            mark(k, "nodes changed");
        }
    }
    for d in old.rollouts.diff(&new.rollouts) {
        match d {
            DiffItem::Add(k, _) | DiffItem::Update { new: (k, _), .. } => {
                mark(k.clone(), "rollout changed")
            }
            DiffItem::Remove(..) => {}
        }
    }
    for d in old.replicasets.diff(&new.replicasets) {
        match d {
            DiffItem::Add(k, _) | DiffItem::Update { new: (k, _), .. } => {
                mark(k.clone(), "replicaset changed")
            }
            DiffItem::Remove(k, _) => mark(k.clone(), "replicaset deleted"),
        }
    }
    for d in old.pods.diff(&new.pods) {
        match d {
            DiffItem::Add(k, p) | DiffItem::Update { new: (k, p), .. } => {
                mark((k.0.clone(), p.replicaset.clone()), "pod changed")
            }
            DiffItem::Remove(k, p) => mark((k.0.clone(), p.replicaset.clone()), "pod deleted"),
        }
    }
    let set_of = |k: &ObjectKey| {
        new.pods
            .get(k)
            .or_else(|| old.pods.get(k))
            .map(|p| (k.0.clone(), p.replicaset.clone()))
    };
    for d in old.pod_statuses.diff(&new.pod_statuses) {
        let (k, why) = match d {
            DiffItem::Add(k, _) | DiffItem::Update { new: (k, _), .. } => (k, "pod status changed"),
            DiffItem::Remove(k, _) => (k, "pod status deleted"),
        };
        if let Some(s) = set_of(k) {
            mark(s, why);
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
