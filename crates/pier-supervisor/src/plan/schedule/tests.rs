//! The scheduler's ordered pick against the full scan it replaced, over
//! randomized clusters: node selectors, constraints, anti-affinity both
//! ways (the OAuth keyserver and its front end), affinity, capacity
//! limits, `max_per_node`, `spread_by`, runtime-down nodes, held nodes,
//! pods on nodes gone from the snapshot, and `pier label node` overlays.

use std::net::{IpAddr, Ipv4Addr};

use pier_model::{
    Constraint, ConstraintField, ConstraintOp, Placement, Pod, PodTemplate, Replicas,
};

use super::*;

/// The scheduler as it was before the ordered usage (session 10),
/// verbatim but for `repellers` (owned names, as `check` takes them now):
/// the oracle. It scores every node, with the node's labels copied and
/// every set walked, per pod.
fn schedule_before(snap: &Snapshot, rs: &ReplicaSet, usage: &Usage) -> Result<Name, String> {
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
    let repellers: BTreeSet<Name> = snap
        .replicasets
        .values()
        .filter(|o| o.namespace == *ns && o.placement.anti_affinity.contains(me))
        .map(|o| o.name.clone())
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

/// splitmix64: a seeded, reproducible stream (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn of<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

fn nm(s: &str) -> Name {
    Name::new(s).unwrap()
}

const SETS: [&str; 6] = ["keyserver", "frontend", "web", "db", "cache", "worker"];
const ZONES: [&str; 3] = ["a", "b", "c"];
/// Node names are drawn from a pool larger than the cluster: pods on a
/// name not in the snapshot stand for pods on a node that is gone.
const POOL: u64 = 24;

fn random_node(r: &mut Rng, name: &str) -> Node {
    let mut labels = Labels::new();
    if r.chance(70) {
        labels.insert("zone".into(), r.of(&ZONES).to_string());
    }
    if r.chance(50) {
        labels.insert("disk".into(), r.of(&["ssd", "hdd"]).to_string());
    }
    let capacity = Resources {
        pods: if r.chance(50) {
            0
        } else {
            1 + r.below(6) as u32
        },
        cpu_millis: if r.chance(60) {
            0
        } else {
            500 * (1 + r.below(6) as u32)
        },
        memory_mb: if r.chance(60) {
            0
        } else {
            256 * (1 + r.below(8) as u32)
        },
    };
    Node {
        name: nm(name),
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        mesh_port: 0,
        dns_addr: None,
        labels,
        capacity,
        version: String::new(),
        started_at: 0,
        refused: Vec::new(),
        runtime_down_since: r.chance(10).then_some(1),
    }
}

fn random_set(r: &mut Rng, name: &str, node_names: &[String]) -> ReplicaSet {
    let mut pl = Placement::default();
    if r.chance(20) {
        pl.node_selector
            .insert("zone".into(), r.of(&ZONES).to_string());
    }
    if r.chance(15) {
        pl.constraints
            .push(if r.chance(50) && !node_names.is_empty() {
                Constraint {
                    field: ConstraintField::Hostname,
                    op: ConstraintOp::Ne,
                    value: r.of(node_names).clone(),
                }
            } else {
                Constraint {
                    field: ConstraintField::Label("disk".into()),
                    op: if r.chance(50) {
                        ConstraintOp::Eq
                    } else {
                        ConstraintOp::Ne
                    },
                    value: "ssd".into(),
                }
            });
    }
    if r.chance(25) {
        pl.max_per_node = Some(1 + r.below(3) as u32);
    }
    pl.spread = r.chance(80);
    if r.chance(15) {
        pl.spread_by = Some("zone".into());
    }
    for o in SETS {
        // The OAuth example: the front end never beside the keyserver.
        let p = if (name, o) == ("frontend", "keyserver") {
            50
        } else {
            12
        };
        if o != name && r.chance(p) {
            pl.anti_affinity.push(nm(o));
        }
    }
    if r.chance(8) {
        pl.affinity.push(nm(r.of::<&str>(&SETS)));
    }
    ReplicaSet {
        name: nm(name),
        namespace: Namespace::default(),
        template: PodTemplate {
            image: "sim:1".into(),
            resources: Resources {
                cpu_millis: if r.chance(50) {
                    0
                } else {
                    100 * (1 + r.below(10) as u32)
                },
                memory_mb: if r.chance(50) {
                    0
                } else {
                    64 * (1 + r.below(8) as u32)
                },
                pods: 0,
            },
            ..Default::default()
        },
        replicas: Replicas::new(1 + r.below(8) as u32).unwrap(),
        placement: pl,
        min_replicas: None,
        max_replicas: None,
        sla: None,
        created_at: 0,
        update_config: Default::default(),
        rollback_config: Default::default(),
        revision: 0,
        history: Vec::new(),
    }
}

fn random_cluster(r: &mut Rng) -> Snapshot {
    let mut snap = Snapshot::default();
    for _ in 0..1 + r.below(12) {
        let name = format!("n{}", r.below(POOL));
        snap.nodes
            .insert(nm(&name), Arc::new(random_node(r, &name)));
        if r.chance(8) {
            Arc::make_mut(&mut snap.held_nodes).insert(nm(&name), 99_999);
        }
        if r.chance(10) {
            let mut o = NodeLabels::default();
            if r.chance(50) {
                o.labels
                    .insert("zone".into(), Some(r.of(&ZONES).to_string()));
            } else {
                o.labels.insert("disk".into(), None);
            }
            snap.node_labels.insert(nm(&name), Arc::new(o));
        }
    }
    let node_names: Vec<String> = snap.nodes.keys().map(|n| n.to_string()).collect();
    for s in SETS {
        if r.chance(70) {
            let rs = random_set(r, s, &node_names);
            snap.replicasets
                .insert((rs.namespace.clone(), rs.name.clone()), Arc::new(rs));
        }
    }
    for i in 0..r.below(30) {
        let set = *r.of(&SETS);
        let resources = snap
            .replicasets
            .get(&(Namespace::default(), nm(set)))
            .map(|rs| rs.template.resources)
            .unwrap_or_default();
        let p = Pod {
            name: nm(&format!("{set}-{i}")),
            namespace: Namespace::default(),
            replicaset: nm(set),
            node: nm(&format!("n{}", r.below(POOL))),
            template_hash: String::new(),
            template: PodTemplate {
                resources,
                ..Default::default()
            },
            created_at: 0,
        };
        snap.pods
            .insert((p.namespace.clone(), p.name.clone()), Arc::new(p));
    }
    snap
}

/// The usage's order and per-set nodes are what its per-node counts say.
fn assert_index_consistent(u: &Usage) {
    let by_load: BTreeSet<(u32, Name)> = u
        .per_node
        .iter()
        .map(|(n, e)| (e.pods, n.clone()))
        .collect();
    assert_eq!(u.by_load, by_load);
    let mut by_set: HashMap<ObjectKey, BTreeMap<Name, u32>> = HashMap::new();
    for (n, e) in &u.per_node {
        for (set, c) in e.sets.iter().filter(|(_, c)| **c > 0) {
            by_set.entry(set.clone()).or_default().insert(n.clone(), *c);
        }
    }
    assert_eq!(u.by_set, by_set);
}

/// Each set of each cluster places pods one after another on a usage
/// shared by the sets (as a batch of plans does), with a pod removed now
/// and then (a delete): at every step the scheduler, and its ordered pick
/// alone (not hidden by the scan behind it), choose what the old scan
/// chooses, and fail with its message.
#[test]
fn fast_schedule_matches_the_scan() {
    let mut r = Rng(20261207);
    let (mut placed, mut unplaced, mut picked) = (0u32, 0u32, 0u32);
    for case in 0..600 {
        let snap = random_cluster(&mut r);
        let mut usage = Usage::from_snapshot(&snap, &BTreeSet::new());
        assert_index_consistent(&usage);
        let sets: Vec<Arc<ReplicaSet>> = snap.replicasets.values().cloned().collect();
        for rs in &sets {
            for step in 0..1 + r.below(8) {
                let want = schedule_before(&snap, rs, &usage);
                let got = schedule(&snap, rs, &usage);
                assert_eq!(got, want, "case {case}, {} step {step}", rs.name);
                if !rs.placement.spread || rs.placement.spread_by.is_none() {
                    let fixed = usage.fixed_for(&snap).expect("built from this snapshot");
                    assert_eq!(
                        pick(&snap, rs, &usage, fixed),
                        want.clone().ok(),
                        "case {case}, {} step {step}",
                        rs.name
                    );
                    picked += 1;
                }
                match got {
                    Ok(n) => {
                        usage.add(&n, &rs.namespace, &rs.name, &rs.template.resources);
                        placed += 1;
                    }
                    Err(_) => {
                        unplaced += 1;
                        break;
                    }
                }
                if r.chance(25) {
                    // A delete: one pod of some set off some node.
                    let held: Vec<(Name, ObjectKey)> = usage
                        .per_node
                        .iter()
                        .flat_map(|(n, e)| {
                            e.sets
                                .iter()
                                .filter(|(_, c)| **c > 0)
                                .map(|(s, _)| (n.clone(), s.clone()))
                        })
                        .collect();
                    if !held.is_empty() {
                        let (n, (ns, set)) = r.of(&held).clone();
                        let res = snap
                            .replicasets
                            .get(&(ns.clone(), set.clone()))
                            .map(|rs| rs.template.resources)
                            .unwrap_or_default();
                        usage.sub(&n, &ns, &set, &res);
                    }
                }
            }
        }
        assert_index_consistent(&usage);
    }
    // Both outcomes, and the ordered pick, were exercised.
    assert!(
        placed > 2000 && unplaced > 300 && picked > 1500,
        "{placed} placed, {unplaced} unplaced, {picked} picked"
    );
}

/// A usage not built from the snapshot it is used with (a node joined, a
/// label changed, a set added since; or built by hand) is never trusted
/// for the order: the scheduler scans, and chooses what the old one did.
#[test]
fn a_usage_of_another_snapshot_is_scanned() {
    let mut r = Rng(7);
    for case in 0..300 {
        let before = random_cluster(&mut r);
        let usage = Usage::from_snapshot(&before, &BTreeSet::new());
        let mut after = before.clone();
        match case % 3 {
            0 => {
                let name = format!("n{}", POOL + r.below(4));
                after
                    .nodes
                    .insert(nm(&name), Arc::new(random_node(&mut r, &name)));
            }
            1 => {
                let name = format!("n{}", r.below(POOL));
                let mut o = NodeLabels::default();
                o.labels
                    .insert("zone".into(), Some(r.of(&ZONES).to_string()));
                after.node_labels.insert(nm(&name), Arc::new(o));
            }
            _ => {
                let names: Vec<String> = after.nodes.keys().map(|n| n.to_string()).collect();
                let set = *r.of(&SETS);
                let rs = random_set(&mut r, set, &names);
                after
                    .replicasets
                    .insert((rs.namespace.clone(), rs.name.clone()), Arc::new(rs));
            }
        }
        assert!(usage.fixed_for(&after).is_none(), "case {case}");
        let by_hand = Usage::default();
        for rs in after.replicasets.values() {
            assert_eq!(
                schedule(&after, rs, &usage),
                schedule_before(&after, rs, &usage),
                "case {case}"
            );
            assert_eq!(
                schedule(&after, rs, &by_hand),
                schedule_before(&after, rs, &by_hand),
                "case {case}"
            );
        }
    }
}
