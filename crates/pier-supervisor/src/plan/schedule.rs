//! Where a new pod goes: every node's [`Usage`] (the resources its pods
//! reserve), the checks a node must pass for a replica set (constraints,
//! resources, max per node, affinity, spread), and [`schedule`], which picks
//! the node or says why none fits.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use pier_model::{Labels, Name, Node, ObjectKey, ReplicaSet, Resources, Snapshot};

/// What is placed on each node: all pods of every set, minus those being
/// deleted, plus those this plan creates.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub(crate) per_node: BTreeMap<Name, NodeUsage>,
}

/// One node's pods and requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub pods: u32,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    /// Pods per replica set `(namespace, name)` (for max per node, spread
    /// and affinity).
    pub sets: BTreeMap<ObjectKey, u32>,
}

impl NodeUsage {
    pub(super) fn of_set(&self, ns: &pier_model::Namespace, rs: &Name) -> u32 {
        self.sets
            .get(&(ns.clone(), rs.clone()))
            .copied()
            .unwrap_or(0)
    }
}

impl Usage {
    pub fn from_snapshot(snap: &Snapshot, deleted: &BTreeSet<ObjectKey>) -> Usage {
        let mut u = Usage::default();
        for (pk, p) in snap.pods.iter() {
            if deleted.contains(pk) {
                continue;
            }
            u.add(&p.node, &p.namespace, &p.replicaset, &p.template.resources);
        }
        u
    }

    pub(super) fn add(
        &mut self,
        node: &Name,
        ns: &pier_model::Namespace,
        rs: &Name,
        r: &Resources,
    ) {
        let e = self.per_node.entry(node.clone()).or_default();
        e.pods += 1;
        e.cpu_millis += r.cpu_millis as u64;
        e.memory_mb += r.memory_mb as u64;
        *e.sets.entry((ns.clone(), rs.clone())).or_default() += 1;
    }

    pub(super) fn sub(
        &mut self,
        node: &Name,
        ns: &pier_model::Namespace,
        rs: &Name,
        r: &Resources,
    ) {
        if let Some(e) = self.per_node.get_mut(node) {
            e.pods = e.pods.saturating_sub(1);
            e.cpu_millis = e.cpu_millis.saturating_sub(r.cpu_millis as u64);
            e.memory_mb = e.memory_mb.saturating_sub(r.memory_mb as u64);
            if let Some(n) = e.sets.get_mut(&(ns.clone(), rs.clone())) {
                *n = n.saturating_sub(1);
            }
        }
    }

    pub fn of(&self, node: &Name) -> NodeUsage {
        self.per_node.get(node).cloned().unwrap_or_default()
    }

    /// `node`'s usage without a copy (its sets map is as big as the sets
    /// placed there): the scheduler looks at every node per pod.
    fn get<'u>(&'u self, node: &Name, empty: &'u NodeUsage) -> &'u NodeUsage {
        self.per_node.get(node).unwrap_or(empty)
    }
}

/// Why a node was filtered out. Each names the rule, for the set's problem.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rejection {
    /// Lost to a store stall and not registered again (the reflector's
    /// hold): it may be dead, so nothing new goes there until it is back.
    Held,
    /// Its agent cannot reach its dockerd (`Node::runtime_down_since`).
    RuntimeDown,
    Selector,
    /// The constraint at this index fails.
    Constraint(usize),
    /// The node runs a pod of this set, which this set's anti-affinity
    /// names.
    AntiAffinity(Name),
    /// The node runs a pod of this set, whose anti-affinity names this set.
    AntiAffinityOf(Name),
    /// The node runs no pod of this set, which this set's affinity names.
    Affinity(Name),
    Pods,
    Cpu,
    Memory,
    MaxPerNode,
}

pub(crate) fn check(
    snap: &Snapshot,
    name: &Name,
    node: &Node,
    labels: &Labels,
    rs: &ReplicaSet,
    repellers: &BTreeSet<&Name>,
    u: &NodeUsage,
) -> Result<(), Rejection> {
    if snap.held_nodes.contains_key(name) {
        return Err(Rejection::Held);
    }
    if node.runtime_down_since.is_some() {
        return Err(Rejection::RuntimeDown);
    }
    let pl = &rs.placement;
    if !pl
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
        return Err(Rejection::Selector);
    }
    if let Some(i) = pl.constraints.iter().position(|c| !c.matches(name, labels)) {
        return Err(Rejection::Constraint(i));
    }
    // Anti-affinity, both ways: this set's rule, and the rule of every set
    // with a pod on the node that names this set (`repellers`). Looked up
    // by name, not by walking every set on the node; the first by name is
    // reported, this set's own rule first.
    let here = |o: &&Name| **o != rs.name && u.of_set(&rs.namespace, o) > 0;
    let mine = pl.anti_affinity.iter().filter(here).min();
    let theirs = repellers.iter().copied().filter(here).min();
    match (mine, theirs) {
        (Some(m), t) if t.is_none_or(|t| m <= t) => {
            return Err(Rejection::AntiAffinity(m.clone()));
        }
        (_, Some(t)) => return Err(Rejection::AntiAffinityOf(t.clone())),
        _ => {}
    }
    if let Some(a) = pl.affinity.iter().find(|a| u.of_set(&rs.namespace, a) == 0) {
        return Err(Rejection::Affinity(a.clone()));
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
    if let Some(max) = pl.max_per_node
        && u.of_set(&rs.namespace, &rs.name) + 1 > max
    {
        return Err(Rejection::MaxPerNode);
    }
    Ok(())
}

/// Picks a node for one more pod of `rs`: filter (in the snapshot, so its
/// lease is alive; not held; its dockerd reachable; selector; constraints; anti-affinity both ways;
/// affinity; capacity; `max_per_node`), then score (when spreading: fewest
/// pods of this set among the nodes with the same `spread_by` label value,
/// then on the node; then fewest pods in total, then name). The error says
/// which rule kept each node out.
pub fn schedule(snap: &Snapshot, rs: &ReplicaSet, usage: &Usage) -> Result<Name, String> {
    let (ns, me) = (&rs.namespace, &rs.name);
    let labels: BTreeMap<&Name, Labels> = snap
        .nodes
        .keys()
        .map(|n| (n, snap.node_labels(n)))
        .collect();
    // Pods of this set per value of the spread_by label (None: unlabelled).
    let mut per_value: BTreeMap<Option<&String>, u32> = BTreeMap::new();
    let empty = NodeUsage::default();
    if let Some(k) = &rs.placement.spread_by {
        for n in snap.nodes.keys() {
            *per_value.entry(labels[n].get(k)).or_default() += usage.get(n, &empty).of_set(ns, me);
        }
    }
    // The sets of this namespace whose anti-affinity names this one.
    let repellers: BTreeSet<&Name> = snap
        .replicasets
        .values()
        .filter(|o| o.namespace == *ns && o.placement.anti_affinity.contains(me))
        .map(|o| &o.name)
        .collect();
    let mut best: Option<((u32, u32, u32), &Name)> = None;
    let mut rejected: BTreeMap<Rejection, u32> = BTreeMap::new();
    for (name, node) in snap.nodes.iter() {
        let u = usage.get(name, &empty);
        match check(snap, name, node, &labels[name], rs, &repellers, u) {
            Ok(()) => {
                let score = if rs.placement.spread {
                    let by_value = match &rs.placement.spread_by {
                        Some(k) => per_value.get(&labels[name].get(k)).copied().unwrap_or(0),
                        None => 0,
                    };
                    (by_value, u.of_set(ns, me), u.pods)
                } else {
                    (0, 0, u.pods)
                };
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
    let n = snap.nodes.len();
    let mut why = format!(
        "{n} node{} ready but none fits:",
        if n == 1 { "" } else { "s" }
    );
    let mut first = true;
    for (r, n) in rejected {
        let what = match r {
            Rejection::Held => {
                "lost their lease in a store stall and have not registered again".into()
            }
            Rejection::RuntimeDown => "cannot reach their dockerd".into(),
            Rejection::Selector => {
                let sel: Vec<String> = rs
                    .placement
                    .node_selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("do not match node_selector {}", sel.join(","))
            }
            Rejection::Constraint(i) => format!("fail constraint {}", rs.placement.constraints[i]),
            Rejection::AntiAffinity(o) => {
                format!("run a pod of {o}, which this set's anti_affinity keeps away")
            }
            Rejection::AntiAffinityOf(o) => {
                format!("run a pod of {o}, whose anti_affinity keeps this set away")
            }
            Rejection::Affinity(o) => {
                format!("run no pod of {o}, which this set's affinity needs beside it")
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
