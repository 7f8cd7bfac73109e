//! Where a new pod goes: every node's [`Usage`] (the resources its pods
//! reserve), the checks a node must pass for a replica set (constraints,
//! resources, max per node, affinity, spread), and [`schedule`], which picks
//! the node or says why none fits.
//!
//! **Cost.** Scoring every node for every pod made writing N pods on H
//! nodes cost N × H (each node's labels copied, and every set walked for
//! the anti-affinity rules that name this one, per pod): 70 % of the
//! leader's time at 1,000 nodes (issue 17). Now a [`Usage`] built from a
//! snapshot keeps, once per batch of plans, what only the snapshot decides
//! (each node's effective labels, and per set the sets whose anti-affinity
//! names it), and keeps as pods are added and removed the nodes ordered by
//! their pod count and, per set, the nodes that hold its pods. A set that
//! spreads by node (the default) or does not spread then takes the first
//! node that passes the checks in (pods, name) order, skipping the nodes
//! that already hold its pods, which it scores apart: O(log H + the nodes
//! skipped) per pod, instead of O(H). The choice is the one the full scan
//! ([`schedule_scan`]) makes, which is kept for `spread_by`, for a usage
//! not built from this snapshot, and for the message when no node fits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use pier_model::{
    Labels, Map, Name, Namespace, Node, NodeLabels, ObjectKey, ReplicaSet, Resources, Snapshot,
};

/// What is placed on each node: all pods of every set, minus those being
/// deleted, plus those this plan creates.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub(crate) per_node: BTreeMap<Name, NodeUsage>,
    /// Every node of `per_node` by (pods, name): the order in which the
    /// scheduler tries them.
    by_load: BTreeSet<(u32, Name)>,
    /// Per set, the nodes that hold its pods, and how many (never 0).
    by_set: HashMap<ObjectKey, BTreeMap<Name, u32>>,
    /// What the snapshot this usage was built from decides alone; `None`
    /// for a usage not built from a snapshot (then every call scans).
    fixed: Option<Arc<Fixed>>,
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
    pub(super) fn of_set(&self, ns: &Namespace, rs: &Name) -> u32 {
        self.sets
            .get(&(ns.clone(), rs.clone()))
            .copied()
            .unwrap_or(0)
    }
}

/// What only the snapshot decides for the scheduler, computed once for all
/// the pods placed on one snapshot (a batch of plans), not per pod.
#[derive(Debug)]
struct Fixed {
    /// The maps it was computed from, to know it is about a snapshot
    /// (compared by pointer, O(1): equal roots are equal maps).
    nodes: Map<Name, Arc<Node>>,
    node_labels: Map<Name, Arc<NodeLabels>>,
    replicasets: Map<ObjectKey, Arc<ReplicaSet>>,
    /// Each node's effective labels ([`Snapshot::node_labels`]).
    labels: BTreeMap<Name, Labels>,
    /// Per set `(namespace, name)`, the sets of its namespace whose
    /// anti-affinity names it.
    repellers: HashMap<ObjectKey, BTreeSet<Name>>,
}

impl Fixed {
    fn of(snap: &Snapshot) -> Fixed {
        let labels = snap
            .nodes
            .keys()
            .map(|n| (n.clone(), snap.node_labels(n)))
            .collect();
        let mut repellers: HashMap<ObjectKey, BTreeSet<Name>> = HashMap::new();
        for o in snap.replicasets.values() {
            for a in &o.placement.anti_affinity {
                repellers
                    .entry((o.namespace.clone(), a.clone()))
                    .or_default()
                    .insert(o.name.clone());
            }
        }
        Fixed {
            nodes: snap.nodes.clone(),
            node_labels: snap.node_labels.clone(),
            replicasets: snap.replicasets.clone(),
            labels,
            repellers,
        }
    }

    fn is_of(&self, snap: &Snapshot) -> bool {
        self.nodes.ptr_eq(&snap.nodes)
            && self.node_labels.ptr_eq(&snap.node_labels)
            && self.replicasets.ptr_eq(&snap.replicasets)
    }

    fn repellers_of(&self, rs: &ReplicaSet) -> Option<&BTreeSet<Name>> {
        self.repellers.get(&(rs.namespace.clone(), rs.name.clone()))
    }
}

impl Usage {
    pub fn from_snapshot(snap: &Snapshot, deleted: &BTreeSet<ObjectKey>) -> Usage {
        let mut per_node: BTreeMap<Name, NodeUsage> = snap
            .nodes
            .keys()
            .map(|n| (n.clone(), NodeUsage::default()))
            .collect();
        for (pk, p) in snap.pods.iter() {
            if deleted.contains(pk) {
                continue;
            }
            let e = match per_node.get_mut(&p.node) {
                Some(e) => e,
                None => per_node.entry(p.node.clone()).or_default(),
            };
            let r = &p.template.resources;
            e.pods += 1;
            e.cpu_millis += r.cpu_millis as u64;
            e.memory_mb += r.memory_mb as u64;
            *e.sets
                .entry((p.namespace.clone(), p.replicaset.clone()))
                .or_default() += 1;
        }
        let mut by_set: HashMap<ObjectKey, BTreeMap<Name, u32>> = HashMap::new();
        for (n, e) in &per_node {
            for (set, c) in &e.sets {
                by_set.entry(set.clone()).or_default().insert(n.clone(), *c);
            }
        }
        Usage {
            by_load: per_node.iter().map(|(n, e)| (e.pods, n.clone())).collect(),
            per_node,
            by_set,
            fixed: Some(Arc::new(Fixed::of(snap))),
        }
    }

    pub(super) fn add(&mut self, node: &Name, ns: &Namespace, rs: &Name, r: &Resources) {
        let by_load = &mut self.by_load;
        let e = self.per_node.entry(node.clone()).or_insert_with(|| {
            by_load.insert((0, node.clone()));
            NodeUsage::default()
        });
        by_load.remove(&(e.pods, node.clone()));
        e.pods += 1;
        by_load.insert((e.pods, node.clone()));
        e.cpu_millis += r.cpu_millis as u64;
        e.memory_mb += r.memory_mb as u64;
        let set = (ns.clone(), rs.clone());
        let c = e.sets.entry(set.clone()).or_default();
        *c += 1;
        self.by_set.entry(set).or_default().insert(node.clone(), *c);
    }

    pub(super) fn sub(&mut self, node: &Name, ns: &Namespace, rs: &Name, r: &Resources) {
        if let Some(e) = self.per_node.get_mut(node) {
            if e.pods > 0 {
                self.by_load.remove(&(e.pods, node.clone()));
                e.pods -= 1;
                self.by_load.insert((e.pods, node.clone()));
            }
            e.cpu_millis = e.cpu_millis.saturating_sub(r.cpu_millis as u64);
            e.memory_mb = e.memory_mb.saturating_sub(r.memory_mb as u64);
            let set = (ns.clone(), rs.clone());
            if let Some(n) = e.sets.get_mut(&set) {
                *n = n.saturating_sub(1);
                if let Some(m) = self.by_set.get_mut(&set) {
                    if *n == 0 {
                        m.remove(node);
                        if m.is_empty() {
                            self.by_set.remove(&set);
                        }
                    } else {
                        m.insert(node.clone(), *n);
                    }
                }
            }
        }
    }

    pub fn of(&self, node: &Name) -> NodeUsage {
        self.per_node.get(node).cloned().unwrap_or_default()
    }

    /// `node`'s usage without a copy (its sets map is as big as the sets
    /// placed there).
    fn get<'u>(&'u self, node: &Name, empty: &'u NodeUsage) -> &'u NodeUsage {
        self.per_node.get(node).unwrap_or(empty)
    }

    /// The snapshot-only part for `snap`: the one built with this usage
    /// when it is about `snap`.
    fn fixed_for(&self, snap: &Snapshot) -> Option<&Fixed> {
        self.fixed.as_deref().filter(|f| f.is_of(snap))
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
    repellers: &BTreeSet<Name>,
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
    let theirs = repellers.iter().filter(here).min();
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
///
/// With a `usage` built from `snap` ([`Usage::from_snapshot`], as the
/// plans build it) and no `spread_by`, the node comes from the ordered
/// usage ([`pick`]) without scoring every node; otherwise, and for the
/// error, every node is scored ([`schedule_scan`]). Both choose the same
/// node (the property test `fast_schedule_matches_the_scan`).
pub fn schedule(snap: &Snapshot, rs: &ReplicaSet, usage: &Usage) -> Result<Name, String> {
    let fresh;
    let fixed = match usage.fixed_for(snap) {
        Some(f) => {
            if (!rs.placement.spread || rs.placement.spread_by.is_none())
                && let Some(n) = pick(snap, rs, usage, f)
            {
                return Ok(n);
            }
            f
        }
        None => {
            fresh = Fixed::of(snap);
            &fresh
        }
    };
    schedule_scan(snap, rs, usage, fixed)
}

/// The node [`schedule_scan`] picks for a set that does not spread by a
/// label, from the usage's order, or `None` when no node fits. Every node
/// of `snap` is in `usage.by_load` (the usage was built from it).
/// - Without spreading, the score is the node's pods, then its name: the
///   first node in (pods, name) order that passes the checks.
/// - Spreading (by node), a node without a pod of the set scores (0, pods)
///   and beats every node with some: the first such node in (pods, name)
///   order that passes; when none does, the best of the few nodes that
///   hold the set's pods, by (its pods there, pods, name).
///
/// So a pod costs O(log H) plus the checks of the nodes skipped (those
/// that hold the set's pods, or fail a check), not the checks of all H.
fn pick(snap: &Snapshot, rs: &ReplicaSet, usage: &Usage, fixed: &Fixed) -> Option<Name> {
    let no_pods = BTreeMap::new();
    let mine = usage
        .by_set
        .get(&(rs.namespace.clone(), rs.name.clone()))
        .unwrap_or(&no_pods);
    let no_sets = BTreeSet::new();
    let repellers = fixed.repellers_of(rs).unwrap_or(&no_sets);
    let empty = NodeUsage::default();
    let fits = |name: &Name| -> Option<&NodeUsage> {
        let node = snap.nodes.get(name)?;
        let labels = fixed.labels.get(name)?;
        let u = usage.get(name, &empty);
        check(snap, name, node, labels, rs, repellers, u).ok()?;
        Some(u)
    };
    let spread = rs.placement.spread;
    for (_, name) in &usage.by_load {
        if spread && mine.contains_key(name) {
            continue;
        }
        if fits(name).is_some() {
            return Some(name.clone());
        }
    }
    if !spread {
        return None;
    }
    let mut best: Option<((u32, u32), &Name)> = None;
    for name in mine.keys() {
        if let Some(u) = fits(name) {
            let score = (u.of_set(&rs.namespace, &rs.name), u.pods);
            // Names in order: a strict `<` keeps the first.
            if best.as_ref().is_none_or(|(s, _)| score < *s) {
                best = Some((score, name));
            }
        }
    }
    best.map(|(_, n)| n.clone())
}

/// [`schedule`] by scoring every node of `snap`: the scheduler as it was
/// before the ordered usage, kept for `spread_by`, for a usage not built
/// from `snap`, and for the error (which counts every node's rejection).
fn schedule_scan(
    snap: &Snapshot,
    rs: &ReplicaSet,
    usage: &Usage,
    fixed: &Fixed,
) -> Result<Name, String> {
    let (ns, me) = (&rs.namespace, &rs.name);
    let labels = &fixed.labels;
    // Pods of this set per value of the spread_by label (None: unlabelled).
    let mut per_value: BTreeMap<Option<&String>, u32> = BTreeMap::new();
    let empty = NodeUsage::default();
    if let Some(k) = &rs.placement.spread_by {
        for n in snap.nodes.keys() {
            *per_value.entry(labels[n].get(k)).or_default() += usage.get(n, &empty).of_set(ns, me);
        }
    }
    let no_sets = BTreeSet::new();
    let repellers = fixed.repellers_of(rs).unwrap_or(&no_sets);
    let mut best: Option<((u32, u32, u32), &Name)> = None;
    let mut rejected: BTreeMap<Rejection, u32> = BTreeMap::new();
    for (name, node) in snap.nodes.iter() {
        let u = usage.get(name, &empty);
        match check(snap, name, node, &labels[name], rs, repellers, u) {
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

#[cfg(test)]
mod tests;
