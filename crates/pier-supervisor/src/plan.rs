//! The pure part of the supervisor: from a snapshot and one replica set's
//! key, what to create and what to delete. No I/O, no clock, no randomness
//! (pod names and the time come in through [`PlanInput`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use pier_model::{
    Name, Node, ObjectKey, Pod, PodPhase, PodStatus, ReplicaSet, Resources, Snapshot,
};

/// Suffix length of a generated pod name: `<rs>-<5 random [a-z0-9]>`.
pub const POD_SUFFIX_LEN: usize = 5;

/// Why a pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// More pods than replicas.
    Surplus,
    /// Its PodStatus is Failed; a replacement is created in the same plan.
    Failed,
    /// Its node is gone from the snapshot (lease expired) for longer than the
    /// grace; a replacement is created in the same plan.
    NodeLost,
    /// Its replica set was deleted.
    Orphan,
}

impl std::fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeleteReason::Surplus => "surplus",
            DeleteReason::Failed => "failed",
            DeleteReason::NodeLost => "node lost",
            DeleteReason::Orphan => "replica set deleted",
        })
    }
}

/// One write the reconcile makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `pods/<ns>/<name>` if absent.
    Create(Box<Pod>),
    /// Delete `pods/<ns>/<name>`.
    Delete {
        pod: ObjectKey,
        node: Name,
        reason: DeleteReason,
    },
}

/// What the controller knows that the snapshot does not.
pub struct PlanInput<'a> {
    /// Unix milliseconds, stamped on new pods.
    pub now_ms: u64,
    /// Failed pods may be replaced now (the replica set's backoff elapsed).
    /// When false they are kept, and counted as replicas, so that a set
    /// whose image does not exist does not crash-loop.
    pub replace_failed: bool,
    /// Nodes absent from the snapshot for longer than the grace. Pods on a
    /// node that is absent but not in this set are kept (and counted).
    pub expired_nodes: &'a BTreeSet<Name>,
    /// Makes a fresh 5-character suffix; called until the name is unused.
    pub suffix: &'a mut (dyn FnMut() -> String + Send),
}

impl std::fmt::Debug for PlanInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanInput")
            .field("now_ms", &self.now_ms)
            .field("replace_failed", &self.replace_failed)
            .field("expired_nodes", &self.expired_nodes)
            .finish()
    }
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Replicas that no node can take now (the set stays short of its count).
    pub unscheduled: u32,
    /// Why they could not be placed, for a person.
    pub unschedulable: Option<String>,
    /// Failed pods replaced by this plan, with their status messages.
    pub failed_replaced: Vec<(Name, String)>,
    /// Failed pods kept because the backoff has not elapsed.
    pub failed_waiting: Vec<(Name, String)>,
    /// Pods kept although their node is absent (within the grace).
    pub waiting_on_absent_node: usize,
    /// The replica set exists.
    pub exists: bool,
}

impl Plan {
    pub fn creates(&self) -> impl Iterator<Item = &Pod> {
        self.actions.iter().filter_map(|a| match a {
            Action::Create(p) => Some(&**p),
            Action::Delete { .. } => None,
        })
    }
    pub fn deletes(&self) -> impl Iterator<Item = (&ObjectKey, DeleteReason)> {
        self.actions.iter().filter_map(|a| match a {
            Action::Delete { pod, reason, .. } => Some((pod, *reason)),
            Action::Create(_) => None,
        })
    }
}

/// How ready a pod is; surplus pods are deleted lowest class first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Readiness {
    Failed,
    NodeAbsent,
    Pending,
    RunningUnready,
    Ready,
}

fn readiness(status: Option<&PodStatus>) -> Readiness {
    match status {
        None => Readiness::Pending,
        Some(s) => match s.phase {
            PodPhase::Failed => Readiness::Failed,
            PodPhase::Pending => Readiness::Pending,
            PodPhase::Running if s.ready => Readiness::Ready,
            PodPhase::Running => Readiness::RunningUnready,
        },
    }
}

/// The pods of replica set `key` in the snapshot, by name (including those of
/// a deleted set).
pub fn pods_of<'a>(snap: &'a Snapshot, key: &ObjectKey) -> Vec<&'a Arc<Pod>> {
    snap.pods
        .iter()
        .filter(|((ns, _), p)| *ns == key.0 && p.replicaset == key.1)
        .map(|(_, p)| p)
        .collect()
}

/// Computes the writes that bring replica set `key` to its desired state in
/// `snap`. Level-triggered: it reads only the snapshot and `input`.
pub fn plan(snap: &Snapshot, key: &ObjectKey, input: &mut PlanInput<'_>) -> Plan {
    let mut out = Plan::default();
    let pods = pods_of(snap, key);
    let Some(rs) = snap.replicasets.get(key) else {
        for p in pods {
            out.actions.push(Action::Delete {
                pod: (p.namespace.clone(), p.name.clone()),
                node: p.node.clone(),
                reason: DeleteReason::Orphan,
            });
        }
        return out;
    };
    out.exists = true;

    // Classify the existing pods.
    let mut deleted: BTreeSet<ObjectKey> = BTreeSet::new();
    // (readiness, created_at, name) of the pods that count as replicas.
    let mut active: Vec<(Readiness, u64, &Arc<Pod>)> = Vec::new();
    for p in pods {
        let pk = (p.namespace.clone(), p.name.clone());
        let status = snap.pod_statuses.get(&pk).map(|s| &**s);
        if !snap.nodes.contains_key(&p.node) {
            if input.expired_nodes.contains(&p.node) {
                out.actions.push(Action::Delete {
                    pod: pk.clone(),
                    node: p.node.clone(),
                    reason: DeleteReason::NodeLost,
                });
                deleted.insert(pk);
            } else {
                out.waiting_on_absent_node += 1;
                active.push((Readiness::NodeAbsent, p.created_at, p));
            }
            continue;
        }
        let r = readiness(status);
        if r == Readiness::Failed {
            let msg = status.map(|s| s.message.clone()).unwrap_or_default();
            if input.replace_failed {
                out.actions.push(Action::Delete {
                    pod: pk.clone(),
                    node: p.node.clone(),
                    reason: DeleteReason::Failed,
                });
                deleted.insert(pk);
                out.failed_replaced.push((p.name.clone(), msg));
            } else {
                out.failed_waiting.push((p.name.clone(), msg));
                active.push((r, p.created_at, p));
            }
            continue;
        }
        active.push((r, p.created_at, p));
    }
    let want = rs.replicas.get() as usize;
    if active.len() > want {
        // Surplus: least ready first, then newest first, then by name.
        active.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(b.1.cmp(&a.1))
                .then(b.2.name.cmp(&a.2.name))
        });
        for (_, _, p) in active.iter().take(active.len() - want) {
            let pk = (p.namespace.clone(), p.name.clone());
            out.actions.push(Action::Delete {
                pod: pk.clone(),
                node: p.node.clone(),
                reason: DeleteReason::Surplus,
            });
            deleted.insert(pk);
        }
    } else if active.len() < want {
        let missing = want - active.len();
        let mut usage = Usage::from_snapshot(snap, key, &deleted);
        let mut taken: BTreeSet<Name> = BTreeSet::new();
        for i in 0..missing {
            match schedule(snap, rs, &usage) {
                Ok(node) => {
                    let name = pod_name(snap, &key.0, &key.1, &taken, input.suffix);
                    taken.insert(name.clone());
                    usage.add(&node, &rs.template.resources, true);
                    out.actions.push(Action::Create(Box::new(Pod {
                        name,
                        namespace: key.0.clone(),
                        replicaset: key.1.clone(),
                        node,
                        template_hash: rs.template.hash(),
                        template: rs.template.clone(),
                        created_at: input.now_ms,
                    })));
                }
                Err(why) => {
                    out.unscheduled = (missing - i) as u32;
                    out.unschedulable = Some(format!(
                        "cannot place {} of {} replicas: {why}",
                        missing - i,
                        want
                    ));
                    break;
                }
            }
        }
    }
    out
}

/// A fresh pod name `<rs>-<suffix>` that no pod in the namespace has.
fn pod_name(
    snap: &Snapshot,
    ns: &pier_model::Namespace,
    rs: &Name,
    taken: &BTreeSet<Name>,
    suffix: &mut (dyn FnMut() -> String + Send),
) -> Name {
    // 63 - 1 - 5: the longest prefix that keeps the name an RFC 1123 label.
    let mut base: &str = rs.as_str();
    if base.len() > 63 - 1 - POD_SUFFIX_LEN {
        base = base[..63 - 1 - POD_SUFFIX_LEN].trim_end_matches('-');
    }
    loop {
        let s = suffix();
        let Ok(name) = Name::new(&format!("{base}-{s}")) else {
            continue;
        };
        if !taken.contains(&name) && !snap.pods.contains_key(&(ns.clone(), name.clone())) {
            return name;
        }
    }
}

/// What is placed on each node: all pods of every set, minus those being
/// deleted, plus those this plan creates.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// node → (pods, sum of requests, pods of this replica set)
    per_node: BTreeMap<Name, NodeUsage>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub pods: u32,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub of_set: u32,
}

impl Usage {
    pub fn from_snapshot(snap: &Snapshot, key: &ObjectKey, deleted: &BTreeSet<ObjectKey>) -> Usage {
        let mut u = Usage::default();
        for (pk, p) in snap.pods.iter() {
            if deleted.contains(pk) {
                continue;
            }
            let mine = pk.0 == key.0 && p.replicaset == key.1;
            u.add(&p.node, &p.template.resources, mine);
        }
        u
    }

    fn add(&mut self, node: &Name, r: &Resources, mine: bool) {
        let e = self.per_node.entry(node.clone()).or_default();
        e.pods += 1;
        e.cpu_millis += r.cpu_millis as u64;
        e.memory_mb += r.memory_mb as u64;
        if mine {
            e.of_set += 1;
        }
    }

    pub fn of(&self, node: &Name) -> NodeUsage {
        self.per_node.get(node).copied().unwrap_or_default()
    }
}

/// Why a node was filtered out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rejection {
    Selector,
    Pods,
    Cpu,
    Memory,
    MaxPerNode,
}

fn check(node: &Node, rs: &ReplicaSet, u: NodeUsage) -> Result<(), Rejection> {
    let sel = &rs.placement.node_selector;
    if !sel.iter().all(|(k, v)| node.labels.get(k) == Some(v)) {
        return Err(Rejection::Selector);
    }
    let cap = node.capacity;
    let req = rs.template.resources;
    // 0 = unlimited, on capacity as on requests.
    if cap.pods != 0 && u.pods + 1 > cap.pods {
        return Err(Rejection::Pods);
    }
    if cap.cpu_millis != 0 && u.cpu_millis + req.cpu_millis as u64 > cap.cpu_millis as u64 {
        return Err(Rejection::Cpu);
    }
    if cap.memory_mb != 0 && u.memory_mb + req.memory_mb as u64 > cap.memory_mb as u64 {
        return Err(Rejection::Memory);
    }
    if let Some(max) = rs.placement.max_per_node
        && u.of_set + 1 > max
    {
        return Err(Rejection::MaxPerNode);
    }
    Ok(())
}

/// Picks a node for one more pod of `rs`: filter (in the snapshot, so its
/// lease is alive; selector; capacity; `max_per_node`), then score (fewest
/// pods of this set when spreading, then fewest pods in total, then name).
/// The error says why no node fits.
pub fn schedule(snap: &Snapshot, rs: &ReplicaSet, usage: &Usage) -> Result<Name, String> {
    let mut best: Option<((u32, u32), &Name)> = None;
    let mut rejected: BTreeMap<Rejection, u32> = BTreeMap::new();
    for (name, node) in snap.nodes.iter() {
        let u = usage.of(name);
        match check(node, rs, u) {
            Ok(()) => {
                let spread = if rs.placement.spread { u.of_set } else { 0 };
                let score = (spread, u.pods);
                // Nodes iterate in name order: a strict `<` keeps the first name.
                if best.as_ref().is_none_or(|(s, _)| score < *s) {
                    best = Some((score, name));
                }
            }
            Err(r) => *rejected.entry(r).or_default() += 1,
        }
    }
    if let Some((_, name)) = best {
        return Ok(name.clone());
    }
    if snap.nodes.is_empty() {
        return Err("no node is ready (no node registered, or every node's lease expired)".into());
    }
    let mut why = format!("{} nodes ready but none fits:", snap.nodes.len());
    let mut first = true;
    for (r, n) in rejected {
        let what = match r {
            Rejection::Selector => {
                let sel: Vec<String> = rs
                    .placement
                    .node_selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("do not match node_selector {}", sel.join(","))
            }
            Rejection::Pods => "are full (pod capacity)".into(),
            Rejection::Cpu => format!(
                "lack cpu ({} millis asked)",
                rs.template.resources.cpu_millis
            ),
            Rejection::Memory => {
                format!("lack memory ({} MB asked)", rs.template.resources.memory_mb)
            }
            Rejection::MaxPerNode => format!(
                "already hold max_per_node={} of this set",
                rs.placement.max_per_node.unwrap_or(0)
            ),
        };
        let _ = write!(why, "{} {n} {what}", if first { "" } else { ";" });
        first = false;
    }
    Err(why)
}

/// Which replica sets a change from `old` to `new` may concern, with why.
/// Nodes changing concerns every set (placement, node loss).
pub fn dirty(old: &Snapshot, new: &Snapshot, out: &mut BTreeMap<ObjectKey, &'static str>) {
    let mut mark = |k: ObjectKey, why: &'static str| {
        out.entry(k).or_insert(why);
    };
    if !Arc::ptr_eq(&old.nodes, &new.nodes) {
        for k in all_sets(new) {
            mark(k, "nodes changed");
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
    for ((ns, _), p) in snap.pods.iter() {
        s.insert((ns.clone(), p.replicaset.clone()));
    }
    s
}

#[cfg(test)]
mod tests;
