use super::*;

use std::net::{IpAddr, Ipv4Addr};

use pier_model::{Namespace, Node, Placement, PodTemplate, Replicas, Resources};

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn ns() -> Namespace {
    Namespace::default()
}

fn node(name: &str, labels: &[(&str, &str)], cap: Resources) -> Node {
    Node {
        name: n(name),
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        mesh_port: 0,
        dns_addr: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capacity: cap,
        version: String::new(),
        started_at: 0,
        refused: Vec::new(),
        runtime_down_since: None,
    }
}

fn rs(name: &str, replicas: u32) -> ReplicaSet {
    ReplicaSet {
        name: n(name),
        namespace: ns(),
        template: PodTemplate {
            image: "pier-test/httpd:latest".into(),
            ..Default::default()
        },
        replicas: Replicas::new(replicas).unwrap(),
        placement: Placement::default(),
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

fn pod(rs: &ReplicaSet, name: &str, node: &str, created_at: u64) -> Pod {
    Pod {
        name: n(name),
        namespace: ns(),
        replicaset: rs.name.clone(),
        node: n(node),
        template_hash: rs.template.hash(),
        template: rs.template.clone(),
        created_at,
    }
}

fn status(name: &str, phase: PodPhase, ready: bool, msg: &str) -> PodStatus {
    PodStatus {
        name: Some(n(name)),
        namespace: ns(),
        node: None,
        phase,
        ready,
        message: msg.into(),
        ..Default::default()
    }
}

#[derive(Default, Clone)]
struct World {
    snap: Snapshot,
}

impl World {
    fn node(mut self, nd: Node) -> Self {
        self.snap.nodes.insert(nd.name.clone(), Arc::new(nd));
        self
    }
    fn nodes(mut self, names: &[&str]) -> Self {
        for name in names {
            self = self.node(node(name, &[], Resources::default()));
        }
        self
    }
    fn rs(mut self, r: ReplicaSet) -> Self {
        self.snap
            .replicasets
            .insert((r.namespace.clone(), r.name.clone()), Arc::new(r));
        self
    }
    fn pod(mut self, p: Pod) -> Self {
        self.snap
            .pods
            .insert((p.namespace.clone(), p.name.clone()), Arc::new(p));
        self
    }
    fn status(mut self, s: PodStatus) -> Self {
        let k = (s.namespace.clone(), s.name.clone().unwrap());
        self.snap.pod_statuses.insert(k, Arc::new(s));
        self
    }
}

fn run_plan(snap: &Snapshot, name: &str, replace_failed: bool, expired: &[&str]) -> Plan {
    let expired: BTreeSet<Name> = expired.iter().map(|s| n(s)).collect();
    let mut i = 0u32;
    let mut suffix = move || {
        i += 1;
        format!("{i:05}")
    };
    let mut input = PlanInput {
        now_ms: 1000,
        replace_failed,
        expired_nodes: &expired,
        suffix: &mut suffix,
        index: None,
        usage: None,
        respread: Default::default(),
    };
    let scanned = plan(snap, &(ns(), n(name)), &mut input);
    // The same plan with the index (the controller's way).
    let ix = PodIndex::build(snap);
    let mut i = 0u32;
    let mut suffix = move || {
        i += 1;
        format!("{i:05}")
    };
    let mut input = PlanInput {
        now_ms: 1000,
        replace_failed,
        expired_nodes: &expired,
        suffix: &mut suffix,
        index: Some(&ix),
        usage: None,
        respread: Default::default(),
    };
    let indexed = plan(snap, &(ns(), n(name)), &mut input);
    assert_eq!(format!("{scanned:?}"), format!("{indexed:?}"));
    scanned
}

fn per_node(p: &Plan) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in p.creates() {
        *m.entry(c.node.to_string()).or_default() += 1;
    }
    m
}

fn deleted(p: &Plan) -> Vec<(String, DeleteReason)> {
    p.deletes().map(|(k, r)| (k.1.to_string(), r)).collect()
}

#[test]
fn scale_up_creates_named_pods_spread_across_nodes() {
    let w = World::default().nodes(&["a", "b", "c"]).rs(rs("web", 6));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(p.creates().count(), 6);
    assert_eq!(
        per_node(&p),
        BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)])
    );
    for c in p.creates() {
        let s = c.name.as_str();
        assert!(
            s.starts_with("web-") && s.len() == 4 + POD_SUFFIX_LEN,
            "{s}"
        );
        assert_eq!(
            c.template_hash,
            w.snap.replicasets.values().next().unwrap().template.hash()
        );
        assert_eq!(c.replicaset.as_str(), "web");
    }
    assert!(p.unschedulable.is_none());
}

#[test]
fn spread_counts_existing_pods_of_the_set_then_all_pods() {
    let web = rs("web", 3);
    let other = rs("other", 2);
    let w = World::default()
        .nodes(&["a", "b", "c"])
        .rs(web.clone())
        .rs(other.clone())
        .pod(pod(&web, "web-aaaaa", "a", 1))
        .pod(pod(&other, "other-aaaaa", "b", 1))
        .pod(pod(&other, "other-bbbbb", "b", 1));
    let p = run_plan(&w.snap, "web", true, &[]);
    // a has one of web: b and c have none; c has fewer pods in total, then b.
    assert_eq!(
        per_node(&p),
        BTreeMap::from([("b".into(), 1), ("c".into(), 1)])
    );
}

#[test]
fn scale_down_deletes_unready_and_newest_first() {
    let web = rs("web", 2);
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .pod(pod(&web, "web-ready", "a", 1))
        .status(status("web-ready", PodPhase::Running, true, ""))
        .pod(pod(&web, "web-ready2", "a", 5))
        .status(status("web-ready2", PodPhase::Running, true, ""))
        .pod(pod(&web, "web-unready", "a", 2))
        .status(status("web-unready", PodPhase::Running, false, ""))
        .pod(pod(&web, "web-pend-old", "a", 3))
        .pod(pod(&web, "web-pend-new", "a", 4));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(
        deleted(&p),
        vec![
            ("web-pend-new".into(), DeleteReason::Surplus),
            ("web-pend-old".into(), DeleteReason::Surplus),
            ("web-unready".into(), DeleteReason::Surplus),
        ]
    );
    assert_eq!(p.creates().count(), 0);

    // Among ready pods, the newest goes first.
    let web1 = rs("web", 1);
    let w = w.rs(web1);
    let p = run_plan(&w.snap, "web", true, &[]);
    let d: Vec<String> = deleted(&p).into_iter().map(|(n, _)| n).collect();
    assert_eq!(d.len(), 4);
    assert_eq!(d[3], "web-ready2");
}

/// A scale down keeps the pods left spread: among equally ready pods, it
/// takes one from the node holding the most of the set, even when the
/// newest pod is alone on its node (which the newest-first rule alone
/// would take, leaving both pods on one node).
#[test]
fn scale_down_takes_from_the_most_crowded_node() {
    let web = rs("web", 2);
    let w = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .pod(pod(&web, "web-a1", "a", 1))
        .status(status("web-a1", PodPhase::Running, true, ""))
        .pod(pod(&web, "web-a2", "a", 2))
        .status(status("web-a2", PodPhase::Running, true, ""))
        .pod(pod(&web, "web-b", "b", 3))
        .status(status("web-b", PodPhase::Running, true, ""));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(deleted(&p), vec![("web-a2".into(), DeleteReason::Surplus)]);

    // 5 on a, 1 on b, down to 2: one stays on each node.
    let web2 = rs("web", 2);
    let mut w = World::default().nodes(&["a", "b"]).rs(web2.clone());
    for i in 0..5u64 {
        let name = format!("web-a{i}");
        w = w
            .pod(pod(&web2, &name, "a", i))
            .status(status(&name, PodPhase::Running, true, ""));
    }
    w = w
        .pod(pod(&web2, "web-b", "b", 10))
        .status(status("web-b", PodPhase::Running, true, ""));
    let p = run_plan(&w.snap, "web", true, &[]);
    let d: BTreeSet<String> = deleted(&p).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        d,
        ["web-a1", "web-a2", "web-a3", "web-a4"]
            .map(String::from)
            .into()
    );

    // Readiness still comes first: an unready pod alone on its node goes
    // before a ready one on a crowded node.
    let web3 = rs("web", 2);
    let w = World::default()
        .nodes(&["a", "b"])
        .rs(web3.clone())
        .pod(pod(&web3, "web-a1", "a", 1))
        .status(status("web-a1", PodPhase::Running, true, ""))
        .pod(pod(&web3, "web-a2", "a", 2))
        .status(status("web-a2", PodPhase::Running, true, ""))
        .pod(pod(&web3, "web-b", "b", 3))
        .status(status("web-b", PodPhase::Running, false, ""));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(deleted(&p), vec![("web-b".into(), DeleteReason::Surplus)]);
}

#[test]
fn failed_pod_is_replaced_only_when_backoff_allows() {
    let web = rs("web", 2);
    let w = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .pod(pod(&web, "web-ok", "a", 1))
        .status(status("web-ok", PodPhase::Running, true, ""))
        .pod(pod(&web, "web-bad", "b", 1))
        .status(status(
            "web-bad",
            PodPhase::Failed,
            false,
            "image not found",
        ));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(deleted(&p), vec![("web-bad".into(), DeleteReason::Failed)]);
    assert_eq!(p.creates().count(), 1);
    assert_eq!(
        p.failed_replaced,
        vec![(n("web-bad"), "image not found".into())]
    );
    // The failed pod's slot is free again: the replacement goes to b.
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 1)]));

    let p = run_plan(&w.snap, "web", false, &[]);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.failed_waiting.len(), 1);
}

#[test]
fn deleted_pod_is_a_missing_replica() {
    let web = rs("web", 2);
    let w = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .pod(pod(&web, "web-ok", "a", 1));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 1)]));
    assert!(p.creates().all(|c| c.name.as_str() != "web-ok"));
}

#[test]
fn pods_on_a_lost_node_move_after_the_grace() {
    let web = rs("web", 2);
    let w = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .pod(pod(&web, "web-1", "a", 1))
        .pod(pod(&web, "web-2", "gone", 1));
    // Within the grace: kept and counted.
    let p = run_plan(&w.snap, "web", true, &[]);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.waiting_on_absent_node, 1);
    // After it: deleted and replaced on a live node.
    let p = run_plan(&w.snap, "web", true, &["gone"]);
    assert_eq!(deleted(&p), vec![("web-2".into(), DeleteReason::NodeLost)]);
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 1)]));
}

#[test]
fn nothing_new_goes_to_a_node_held_after_a_store_stall() {
    let web = rs("web", 2);
    let mut w = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .pod(pod(&web, "web-1", "a", 1));
    Arc::make_mut(&mut w.snap.held_nodes).insert(Name::new("b").unwrap(), 10_000);
    // b is fewer pods but held: the new replica goes to a; web-1 stays.
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("a".into(), 1)]));
    assert!(deleted(&p).is_empty());
    Arc::make_mut(&mut w.snap.held_nodes).insert(Name::new("a").unwrap(), 10_000);
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(p.creates().count(), 0);
    let why = p.unschedulable.unwrap();
    assert!(why.contains("2 lost their lease in a store stall"), "{why}");
}

#[test]
fn pods_of_a_deleted_set_are_deleted() {
    let web = rs("web", 2);
    let w = World::default()
        .nodes(&["a"])
        .pod(pod(&web, "web-1", "a", 1))
        .pod(pod(&web, "web-2", "a", 1))
        .pod(pod(&rs("other", 1), "other-1", "a", 1));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert!(!p.exists);
    assert_eq!(
        deleted(&p),
        vec![
            ("web-1".into(), DeleteReason::Orphan),
            ("web-2".into(), DeleteReason::Orphan)
        ]
    );
}

#[test]
fn node_selector_is_respected_and_explained() {
    let mut web = rs("web", 3);
    web.placement
        .node_selector
        .insert("disk".into(), "ssd".into());
    let w = World::default()
        .node(node("a", &[("disk", "ssd")], Resources::default()))
        .node(node("b", &[("disk", "hdd")], Resources::default()))
        .node(node("c", &[], Resources::default()))
        .rs(web.clone());
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("a".into(), 3)]));

    web.placement
        .node_selector
        .insert("zone".into(), "x".into());
    let w = w.rs(web);
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(p.creates().count(), 0);
    assert_eq!(p.unscheduled, 3);
    let why = p.unschedulable.unwrap();
    assert!(
        why.contains("cannot place 3 of 3") && why.contains("node_selector disk=ssd,zone=x"),
        "{why}"
    );
}

#[test]
fn capacity_is_respected() {
    let mut web = rs("web", 5);
    web.template.resources = Resources {
        cpu_millis: 500,
        memory_mb: 100,
        pods: 0,
    };
    let w = World::default()
        // Two pods by count.
        .node(node(
            "a",
            &[],
            Resources {
                pods: 2,
                ..Default::default()
            },
        ))
        // One by cpu (1000 millis, one 500 already used by another set).
        .node(node(
            "b",
            &[],
            Resources {
                cpu_millis: 1000,
                ..Default::default()
            },
        ))
        // One by memory.
        .node(node(
            "c",
            &[],
            Resources {
                memory_mb: 150,
                ..Default::default()
            },
        ))
        .rs(web.clone());
    let mut other = rs("other", 1);
    other.template.resources.cpu_millis = 500;
    let w = w.rs(other.clone()).pod(pod(&other, "other-1", "b", 1));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(
        per_node(&p),
        BTreeMap::from([("a".into(), 2), ("b".into(), 1), ("c".into(), 1)])
    );
    assert_eq!(p.unscheduled, 1);
    let why = p.unschedulable.unwrap();
    assert!(why.contains("cannot place 1 of 5"), "{why}");
    assert!(
        why.contains("full (pod capacity)")
            && why.contains("lack cpu")
            && why.contains("lack memory"),
        "{why}"
    );
}

#[test]
fn max_per_node_is_respected() {
    let mut web = rs("web", 4);
    web.placement.max_per_node = Some(1);
    let w = World::default().nodes(&["a", "b", "c"]).rs(web);
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(p.creates().count(), 3);
    assert_eq!(p.unscheduled, 1);
    assert!(p.unschedulable.unwrap().contains("max_per_node=1"));
}

#[test]
fn no_node_is_a_problem_not_a_panic() {
    let w = World::default().rs(rs("web", 2));
    let p = run_plan(&w.snap, "web", true, &[]);
    assert!(p.actions.is_empty());
    assert!(p.unschedulable.unwrap().contains("no node is ready"));
}

#[test]
fn long_set_names_still_make_valid_pod_names() {
    let long = format!("{}-x", "a".repeat(56));
    let w = World::default().nodes(&["a"]).rs(rs(&long, 1));
    let p = run_plan(&w.snap, &long, true, &[]);
    let c = p.creates().next().unwrap();
    assert!(c.name.as_str().len() <= 63);
    assert!(c.name.as_str().starts_with(&"a".repeat(56)));
}

#[test]
fn generated_names_never_collide_with_existing_pods() {
    let web = rs("web", 2);
    // The fake suffix yields 00001, 00002, …: 00001 is taken.
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .pod(pod(&web, "web-00001", "a", 1))
        .pod(pod(&web, "web-old", "gone", 1));
    let p = run_plan(&w.snap, "web", true, &["gone"]);
    let names: Vec<String> = p.creates().map(|c| c.name.to_string()).collect();
    assert_eq!(names, vec!["web-00002".to_string()]);
}

#[test]
fn dirty_marks_only_the_sets_a_change_concerns() {
    let web = rs("web", 1);
    let other = rs("other", 1);
    let base = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rs(other.clone())
        .pod(pod(&web, "web-1", "a", 1))
        .pod(pod(&other, "other-1", "a", 1));
    let old = base.snap.clone();

    // A status change concerns its pod's set only.
    let new = World { snap: old.clone() }
        .status(status("web-1", PodPhase::Running, true, ""))
        .snap;
    let mut d = BTreeMap::new();
    dirty(&old, &new, &mut d);
    assert_eq!(
        d.keys().map(|k| k.1.to_string()).collect::<Vec<_>>(),
        vec!["web"]
    );

    // An unrelated change (endpoints) concerns none.
    let mut new = old.clone();
    new.endpoints.clear();
    new.revision += 1;
    let mut d = BTreeMap::new();
    dirty(&old, &new, &mut d);
    assert!(d.is_empty());

    // A node change concerns all sets.
    let new = World { snap: old.clone() }.nodes(&["b"]).snap;
    let mut d = BTreeMap::new();
    dirty(&old, &new, &mut d);
    assert_eq!(d.len(), 2);

    // A deleted pod concerns its set.
    let mut new = old.clone();
    new.pods.remove(&(ns(), n("other-1")));
    let mut d = BTreeMap::new();
    dirty(&old, &new, &mut d);
    assert_eq!(d, BTreeMap::from([((ns(), n("other")), "pod deleted")]));
}

#[test]
fn pod_index_kept_in_step_equals_one_built_afresh() {
    let (web, other) = (rs("web", 2), rs("other", 2));
    let mut snap = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .rs(other.clone())
        .snap;
    let mut ix = PodIndex::build(&snap);
    let same = |ix: &PodIndex, snap: &Snapshot| {
        let fresh = PodIndex::build(snap);
        for set in ["web", "other", "gone"] {
            let k = (ns(), n(set));
            assert_eq!(ix.pods_of(&k), fresh.pods_of(&k), "{set}");
            assert_eq!(ix.pods_of(&k), pods_of(snap, &k), "{set}");
        }
        let nodes = |ix: &PodIndex| ix.nodes().cloned().collect::<BTreeSet<_>>();
        assert_eq!(nodes(ix), nodes(&fresh));
        let sets = |ix: &PodIndex| ix.sets().cloned().collect::<BTreeSet<_>>();
        assert_eq!(sets(ix), sets(&fresh));
    };
    // Adds, a move to another node (an update), deletes, a set emptied.
    type Step<'a> = Box<dyn Fn(&mut Snapshot) + 'a>;
    let steps: Vec<Step<'_>> = vec![
        Box::new(|s| {
            for (set, name, node) in [
                (&web, "web-1", "a"),
                (&web, "web-2", "b"),
                (&other, "other-1", "a"),
            ] {
                s.pods
                    .insert((ns(), n(name)), Arc::new(pod(set, name, node, 1)));
            }
        }),
        Box::new(|s| {
            s.pods
                .insert((ns(), n("web-2")), Arc::new(pod(&web, "web-2", "a", 2)));
            s.pods.insert(
                (ns(), n("gone-1")),
                Arc::new(pod(&rs("gone", 1), "gone-1", "b", 1)),
            );
        }),
        Box::new(|s| {
            s.pods.remove(&(ns(), n("web-1")));
            s.pods.remove(&(ns(), n("other-1")));
        }),
        Box::new(|s| s.pods = pier_model::Map::new()),
    ];
    for step in steps {
        let old = snap.clone();
        step(&mut snap);
        ix.update(&old.pods, &snap.pods);
        same(&ix, &snap);
    }
    assert_eq!(ix.nodes().count(), 0);
}

// ---- placement across nodes and sets ----

fn constraint(s: &str) -> pier_model::Constraint {
    s.parse().unwrap()
}

#[test]
fn constraints_by_hostname_and_label_are_respected_and_named() {
    let w = World::default()
        .node(node("a", &[("zone", "x")], Resources::default()))
        .node(node("b", &[("zone", "y")], Resources::default()))
        .node(node("c", &[], Resources::default()));
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, usize)]);
    let cases: &[Case<'_>] = &[
        (&["node.labels.zone==y"], &[("b", 2)]),
        (&["node.labels.zone!=x"], &[("b", 1), ("c", 1)]),
        (&["node.hostname==c"], &[("c", 2)]),
        (&["node.hostname!=a", "node.labels.zone!=y"], &[("c", 2)]),
    ];
    for (cs, want) in cases {
        let mut web = rs("web", 2);
        web.placement.constraints = cs.iter().map(|c| constraint(c)).collect();
        let w = World {
            snap: w.snap.clone(),
        }
        .rs(web);
        let p = run_plan(&w.snap, "web", true, &[]);
        let want: BTreeMap<String, usize> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        assert_eq!(per_node(&p), want, "{cs:?}");
    }
    let mut web = rs("web", 1);
    web.placement.constraints = vec![constraint("node.labels.zone==z")];
    let w = World {
        snap: w.snap.clone(),
    }
    .rs(web);
    let p = run_plan(&w.snap, "web", true, &[]);
    let why = p.unschedulable.unwrap();
    assert!(
        why.contains("3 fail constraint node.labels.zone==z"),
        "{why}"
    );
}

#[test]
fn labels_set_through_the_api_overlay_the_nodes_own() {
    let mut w = World::default()
        .node(node("a", &[("zone", "x")], Resources::default()))
        .node(node("b", &[("zone", "x")], Resources::default()));
    let overlay = pier_model::NodeLabels {
        labels: [
            ("zone".to_string(), Some("y".to_string())),
            ("gone".to_string(), None),
        ]
        .into(),
    };
    w.snap.node_labels.insert(n("b"), Arc::new(overlay));
    let mut web = rs("web", 2);
    web.placement.constraints = vec![constraint("node.labels.zone==y")];
    let w = w.rs(web);
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 2)]));
}

/// The single-host case: whichever set came first keeps the host,
/// the other's pods are not placed and the reason names the rule; once
/// the first set's pods are gone the second is placed.
#[test]
fn anti_affinity_is_hard_and_two_way() {
    let keyserver = rs("keyserver", 1);
    let mut frontend = rs("frontend", 1);
    frontend.placement.anti_affinity = vec![n("keyserver")];

    // The keyserver came first: the frontend's own rule blocks it.
    let w = World::default()
        .nodes(&["a"])
        .rs(keyserver.clone())
        .rs(frontend.clone())
        .pod(pod(&keyserver, "keyserver-1", "a", 1));
    let p = run_plan(&w.snap, "frontend", true, &[]);
    assert_eq!(p.creates().count(), 0);
    let why = p.unschedulable.unwrap();
    assert!(
        why.contains("run a pod of keyserver, which this set's anti_affinity keeps away"),
        "{why}"
    );

    // The frontend came first: the keyserver, which has no rule of its
    // own, is kept away by the frontend's.
    let w = World::default()
        .nodes(&["a"])
        .rs(keyserver.clone())
        .rs(frontend.clone())
        .pod(pod(&frontend, "frontend-1", "a", 1));
    let p = run_plan(&w.snap, "keyserver", true, &[]);
    assert_eq!(p.creates().count(), 0);
    let why = p.unschedulable.unwrap();
    assert!(
        why.contains("run a pod of frontend, whose anti_affinity keeps this set away"),
        "{why}"
    );

    // The blocker's pod is gone: placed.
    let w = World::default().nodes(&["a"]).rs(keyserver).rs(frontend);
    let p = run_plan(&w.snap, "keyserver", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("a".into(), 1)]));
    assert!(p.unschedulable.is_none());
}

/// The OAuth example on three hosts: the keyserver on one, one front-end on
/// each of the others, and a third front-end nowhere.
#[test]
fn anti_affinity_with_max_per_node_across_three_nodes() {
    let keyserver = rs("keyserver", 1);
    let mut frontend = rs("frontend", 3);
    frontend.placement.anti_affinity = vec![n("keyserver")];
    frontend.placement.max_per_node = Some(1);
    let w = World::default()
        .nodes(&["a", "b", "c"])
        .rs(keyserver.clone())
        .rs(frontend)
        .pod(pod(&keyserver, "keyserver-1", "b", 1));
    let p = run_plan(&w.snap, "frontend", true, &[]);
    assert_eq!(
        per_node(&p),
        BTreeMap::from([("a".into(), 1), ("c".into(), 1)])
    );
    assert_eq!(p.unscheduled, 1);
    let why = p.unschedulable.unwrap();
    assert!(
        why.contains("1 run a pod of keyserver") && why.contains("2 already hold max_per_node=1"),
        "{why}"
    );
}

#[test]
fn anti_affinity_ignores_other_namespaces() {
    let mut keyserver = rs("keyserver", 1);
    keyserver.namespace = Namespace::new("other").unwrap();
    let mut frontend = rs("frontend", 1);
    frontend.placement.anti_affinity = vec![n("keyserver")];
    let mut ks_pod = pod(&keyserver, "keyserver-1", "a", 1);
    ks_pod.namespace = keyserver.namespace.clone();
    let w = World::default()
        .nodes(&["a"])
        .rs(keyserver)
        .rs(frontend)
        .pod(ks_pod);
    let p = run_plan(&w.snap, "frontend", true, &[]);
    assert_eq!(p.creates().count(), 1);
}

#[test]
fn affinity_places_beside_the_named_set_or_explains() {
    let db = rs("db", 1);
    let mut cache = rs("cache", 2);
    cache.placement.affinity = vec![n("db")];
    let w = World::default()
        .nodes(&["a", "b", "c"])
        .rs(db.clone())
        .rs(cache.clone())
        .pod(pod(&db, "db-1", "b", 1));
    let p = run_plan(&w.snap, "cache", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 2)]));

    let w = World::default().nodes(&["a", "b"]).rs(db).rs(cache);
    let p = run_plan(&w.snap, "cache", true, &[]);
    assert_eq!(p.unscheduled, 2);
    let why = p.unschedulable.unwrap();
    assert!(why.contains("2 run no pod of db"), "{why}");
}

#[test]
fn spread_by_a_label_spreads_over_its_values_first() {
    let mut web = rs("web", 2);
    web.placement.spread_by = Some("zone".into());
    let w = World::default()
        .node(node("a", &[("zone", "1")], Resources::default()))
        .node(node("b", &[("zone", "1")], Resources::default()))
        .node(node("c", &[("zone", "2")], Resources::default()))
        .rs(web.clone());
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(
        per_node(&p),
        BTreeMap::from([("a".into(), 1), ("c".into(), 1)])
    );
    // Without spread_by, node names break the tie: a then b.
    web.placement.spread_by = None;
    let w = w.rs(web);
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(
        per_node(&p),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
}

// ---- rollouts ----

use pier_model::{
    FailureAction, Ratio, Rollout, RolloutState, TemplateRevision, UpdateConfig, UpdateOrder,
};

const NOW: u64 = 1000;

fn tpl(image: &str) -> PodTemplate {
    PodTemplate {
        image: image.into(),
        ..Default::default()
    }
}

/// A set at revision 2 (image v2) whose revision 1 ran image v1.
fn rs_v2(replicas: u32, cfg: UpdateConfig) -> ReplicaSet {
    let mut r = rs("web", replicas);
    r.template = tpl("web:v2");
    r.revision = 2;
    r.history = vec![TemplateRevision {
        revision: 1,
        template: tpl("web:v1"),
        replaced_at: 0,
        replaced_by: String::new(),
    }];
    r.update_config = cfg;
    r
}

fn pod_of(rs: &ReplicaSet, t: &PodTemplate, name: &str, node: &str, created_at: u64) -> Pod {
    Pod {
        template_hash: t.hash(),
        template: t.clone(),
        ..pod(rs, name, node, created_at)
    }
}

fn started(name: &str, phase: PodPhase, ready: bool, at: u64) -> PodStatus {
    PodStatus {
        started_at: Some(at),
        ..status(name, phase, ready, "")
    }
}

fn complete_at(rev: u64) -> Rollout {
    Rollout {
        revision: rev,
        hash: tpl(&format!("web:v{rev}")).hash(),
        target: rev,
        state: RolloutState::Complete,
        ..Default::default()
    }
}

impl World {
    fn rollout(mut self, r: Rollout) -> Self {
        self.snap.rollouts.insert((ns(), n("web")), Arc::new(r));
        self
    }
    /// `count` ready pods `web-<prefix><i>` on node a, started long ago.
    fn ready_pods(mut self, rs: &ReplicaSet, t: &PodTemplate, prefix: &str, count: usize) -> Self {
        for i in 0..count {
            let name = format!("web-{prefix}{i}");
            self = self.pod(pod_of(rs, t, &name, "a", 1)).status(started(
                &name,
                PodPhase::Running,
                true,
                1,
            ));
        }
        self
    }
}

fn run_at(snap: &Snapshot, now: u64, replace_failed: bool) -> Plan {
    let expired = BTreeSet::new();
    let mut i = 0u32;
    let mut suffix = move || {
        i += 1;
        format!("n{i:04}")
    };
    let mut input = PlanInput {
        now_ms: now,
        replace_failed,
        expired_nodes: &expired,
        suffix: &mut suffix,
        index: None,
        usage: None,
        respread: Default::default(),
    };
    plan(snap, &(ns(), n("web")), &mut input)
}

fn written(p: &Plan) -> Rollout {
    match &p.rollout {
        Some(RolloutWrite::Put(r)) => r.clone(),
        other => panic!("no rollout record written: {other:?}"),
    }
}

fn deleted_names(p: &Plan, reason: DeleteReason) -> Vec<String> {
    p.deletes()
        .filter(|(_, r)| *r == reason)
        .map(|(k, _)| k.1.to_string())
        .collect()
}

#[test]
fn stop_first_step_replaces_one_old_pod_and_records_where_it_came_from() {
    let web = rs_v2(3, UpdateConfig::default());
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(complete_at(1))
        .ready_pods(&web, &tpl("web:v1"), "old", 3);
    let p = run_at(&w.snap, NOW, true);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout).len(), 1);
    let created: Vec<&Pod> = p.creates().collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].template.image, "web:v2");
    let r = written(&p);
    assert_eq!(
        (r.revision, r.target, r.from, r.state, r.steps),
        (2, 2, Some(1), RolloutState::Progressing, 1)
    );
    // The new pod's deadline is the next wake-up.
    assert_eq!(
        p.wake_at_ms,
        Some(NOW + UpdateConfig::DEFAULT_READY_TIMEOUT_MS)
    );
}

/// Each step waits for the new pods to pass their checks and the monitor.
#[test]
fn next_step_waits_until_the_new_pods_are_ready_and_monitored() {
    let cfg = UpdateConfig::default();
    let web = rs_v2(3, cfg);
    let v2 = web.template.clone();
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 1,
        ..Default::default()
    };
    let base = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(rec.clone())
        .ready_pods(&web, &tpl("web:v1"), "old", 2)
        .pod(pod_of(&web, &v2, "web-new0", "a", NOW));
    // Not ready yet: nothing happens; woken at its deadline.
    let p = run_at(&base.snap, NOW + 10, true);
    assert!(p.actions.is_empty() && p.rollout.is_none(), "{p:?}");
    assert_eq!(p.wake_at_ms, Some(NOW + cfg.ready_timeout_ms));
    // Ready but inside the monitor: still nothing; woken when it ends.
    let w = World {
        snap: base.snap.clone(),
    }
    .status(started("web-new0", PodPhase::Running, true, NOW + 100));
    let p = run_at(&w.snap, NOW + 200, true);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.wake_at_ms, Some(NOW + 100 + cfg.monitor_ms));
    // Monitored: the next step.
    let p = run_at(&w.snap, NOW + 100 + cfg.monitor_ms, true);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout).len(), 1);
    assert_eq!(p.creates().count(), 1);
    assert_eq!(written(&p).steps, 2);
}

#[test]
fn start_first_starts_the_new_pod_then_stops_an_old_one_when_it_is_ready() {
    let cfg = UpdateConfig {
        order: UpdateOrder::StartFirst,
        monitor_ms: 0,
        ..Default::default()
    };
    let web = rs_v2(2, cfg);
    let v2 = web.template.clone();
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(complete_at(1))
        .ready_pods(&web, &tpl("web:v1"), "old", 2);
    let p = run_at(&w.snap, NOW, true);
    assert_eq!(p.deletes().count(), 0, "start-first deletes nothing first");
    assert_eq!(p.creates().count(), 1);
    let rec = written(&p);
    // The new pod starts, unready: nothing more.
    let w = w
        .rollout(rec.clone())
        .pod(pod_of(&web, &v2, "web-new0", "a", NOW))
        .status(started("web-new0", PodPhase::Running, false, NOW + 10));
    let p = run_at(&w.snap, NOW + 20, true);
    assert!(p.actions.is_empty(), "{p:?}");
    // Ready: one old pod goes, and (monitor 0) the next step starts.
    let w = w.status(started("web-new0", PodPhase::Running, true, NOW + 10));
    let p = run_at(&w.snap, NOW + 30, true);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout).len(), 1);
    assert_eq!(p.creates().count(), 1);
}

#[test]
fn parallelism_zero_replaces_every_pod_in_one_step() {
    let cfg = UpdateConfig {
        parallelism: 0,
        ..Default::default()
    };
    let web = rs_v2(4, cfg);
    let w = World::default()
        .nodes(&["a", "b"])
        .rs(web.clone())
        .rollout(complete_at(1))
        .ready_pods(&web, &tpl("web:v1"), "old", 4);
    let p = run_at(&w.snap, NOW, true);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout).len(), 4);
    assert_eq!(p.creates().count(), 4);
}

#[test]
fn delay_runs_from_when_the_step_was_done() {
    let cfg = UpdateConfig {
        delay_ms: 2000,
        monitor_ms: 0,
        ..Default::default()
    };
    let web = rs_v2(2, cfg);
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 1,
        ..Default::default()
    };
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(rec)
        .ready_pods(&web, &tpl("web:v1"), "old", 1)
        .ready_pods(&web, &web.template.clone(), "new", 1);
    let p = run_at(&w.snap, NOW, true);
    assert!(p.actions.is_empty());
    let rec = written(&p);
    assert_eq!(rec.step_done_at, Some(NOW));
    assert_eq!(p.wake_at_ms, Some(NOW + 2000));
    let w = w.rollout(rec);
    let p = run_at(&w.snap, NOW + 1999, true);
    assert!(p.actions.is_empty() && p.rollout.is_none());
    let p = run_at(&w.snap, NOW + 2000, true);
    assert_eq!(p.creates().count(), 1);
    assert_eq!(written(&p).step_done_at, None);
}

#[test]
fn rollout_completes_when_every_pod_is_new_and_done() {
    let web = rs_v2(2, UpdateConfig::default());
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 2,
        ..Default::default()
    };
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(rec)
        .ready_pods(&web, &web.template.clone(), "new", 2);
    let p = run_at(&w.snap, NOW + 10_000, true);
    assert!(p.actions.is_empty());
    let r = written(&p);
    assert_eq!(r.state, RolloutState::Complete);
    assert_eq!(r.finished_at, Some(NOW + 10_000));
}

/// A failing new pod with `pause`: the rollout stops where it is, the old
/// pods stay, and the record says which pod and why.
#[test]
fn failed_new_pod_pauses_the_rollout_with_the_reason() {
    let web = rs_v2(3, UpdateConfig::default());
    let v2 = web.template.clone();
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 1,
        ..Default::default()
    };
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(rec)
        .ready_pods(&web, &tpl("web:v1"), "old", 2)
        .pod(pod_of(&web, &v2, "web-new0", "a", NOW))
        .status(status(
            "web-new0",
            PodPhase::Failed,
            false,
            "image web:v2 not found",
        ));
    let p = run_at(&w.snap, NOW + 50, false);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout).len(), 0);
    let r = written(&p);
    assert_eq!(r.state, RolloutState::Paused);
    assert!(
        r.message.contains("rollout of revision 2 paused")
            && r.message
                .contains("pod web-new0 failed: image web:v2 not found"),
        "{}",
        r.message
    );
    // Paused is final: later plans make no step.
    let w = w.rollout(r);
    let p = run_at(&w.snap, NOW + 100_000, false);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout).len(), 0);
    assert!(p.rollout.is_none());
}

/// A new pod never ready, with `rollback`: past its deadline the rollout
/// turns around, and the next plan replaces the new pod by one of the
/// revision that ran before.
#[test]
fn never_ready_pod_rolls_back_after_the_deadline() {
    let cfg = UpdateConfig {
        failure_action: FailureAction::Rollback,
        ready_timeout_ms: 5000,
        ..Default::default()
    };
    let web = rs_v2(2, cfg);
    let v2 = web.template.clone();
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 1,
        ..Default::default()
    };
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(rec)
        .ready_pods(&web, &tpl("web:v1"), "old", 1)
        .pod(pod_of(&web, &v2, "web-new0", "a", NOW))
        .status(started("web-new0", PodPhase::Running, false, NOW + 10));
    let p = run_at(&w.snap, NOW + 4999, true);
    assert!(p.actions.is_empty() && p.rollout.is_none());
    let p = run_at(&w.snap, NOW + 5000, true);
    assert!(p.actions.is_empty());
    let r = written(&p);
    assert_eq!((r.state, r.target), (RolloutState::RollingBack, 1));
    assert!(
        r.message
            .contains("pod web-new0 not ready 5s after it was created")
            && r.message.contains("rolling back to revision 1"),
        "{}",
        r.message
    );
    // Rolling back (rollback_config: stop-first, one at a time): the v2
    // pod is the old one now.
    let w = w.rollout(r);
    let p = run_at(&w.snap, NOW + 5001, true);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout), vec!["web-new0"]);
    let c: Vec<&Pod> = p.creates().collect();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].template.image, "web:v1");
    // Back on v1 and done: rolled back, the message kept.
    let r = written(&p);
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(r)
        .ready_pods(&web, &tpl("web:v1"), "back", 2);
    let p = run_at(&w.snap, NOW + 60_000, true);
    let r = written(&p);
    assert_eq!(r.state, RolloutState::RolledBack);
    assert!(r.message.contains("rolling back to revision 1"));
}

#[test]
fn failures_under_max_failure_ratio_are_replaced_and_counted() {
    let cfg = UpdateConfig {
        max_failure_ratio: Ratio::new(0.5).unwrap(),
        ready_timeout_ms: 5000,
        ..Default::default()
    };
    let web = rs_v2(4, cfg);
    let v2 = web.template.clone();
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 1,
        ..Default::default()
    };
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(rec)
        .ready_pods(&web, &tpl("web:v1"), "old", 3)
        .pod(pod_of(&web, &v2, "web-new0", "a", NOW));
    let p = run_at(&w.snap, NOW + 5000, true);
    assert_eq!(deleted_names(&p, DeleteReason::NotReady), vec!["web-new0"]);
    assert_eq!(p.creates().count(), 1);
    let r = written(&p);
    assert_eq!((r.state, r.failures), (RolloutState::Progressing, 1));
    // Two more (3 > 0.5 × 4): paused.
    let w = w.rollout(Rollout { failures: 2, ..r }).status(status(
        "web-new0",
        PodPhase::Failed,
        false,
        "exit 1",
    ));
    let p = run_at(&w.snap, NOW + 6000, false);
    assert_eq!(written(&p).state, RolloutState::Paused);
}

#[test]
fn a_new_template_starts_from_what_ran_in_full_not_a_paused_revision() {
    let mut web = rs_v2(1, UpdateConfig::default());
    // Revision 3 after revision 2 paused mid-way: a rollback returns to 1.
    web.history.push(TemplateRevision {
        revision: 2,
        template: tpl("web:v2"),
        replaced_at: 0,
        replaced_by: String::new(),
    });
    web.template = tpl("web:v3");
    web.revision = 3;
    let paused = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        state: RolloutState::Paused,
        ..Default::default()
    };
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(paused)
        .ready_pods(&web, &tpl("web:v1"), "old", 1);
    let r = written(&run_at(&w.snap, NOW, true));
    assert_eq!(
        (r.revision, r.from, r.state),
        (3, Some(1), RolloutState::Progressing)
    );
}

#[test]
fn the_rollout_record_of_a_deleted_set_is_deleted() {
    let w = World::default().nodes(&["a"]).rollout(complete_at(1));
    let p = run_at(&w.snap, NOW, true);
    assert_eq!(p.rollout, Some(RolloutWrite::Delete));
    assert!(all_sets(&w.snap).contains(&(ns(), n("web"))));
}

/// The OAuth example's front-ends (start-first, one per node, never beside
/// the keyserver) on three nodes: a new pod fits nowhere beside the old
/// ones, so the step replaces an old pod in place instead of stalling; with
/// a fourth node it starts first as asked.
#[test]
fn start_first_with_no_room_replaces_in_place_instead_of_stalling() {
    let cfg = UpdateConfig {
        order: UpdateOrder::StartFirst,
        ..Default::default()
    };
    let mut web = rs_v2(2, cfg);
    web.placement.anti_affinity = vec![n("keyserver")];
    web.placement.max_per_node = Some(1);
    let keyserver = rs("keyserver", 1);
    let v1 = tpl("web:v1");
    let w = World::default()
        .nodes(&["a", "b", "c"])
        .rs(web.clone())
        .rs(keyserver.clone())
        .rollout(complete_at(1))
        .pod(pod(&keyserver, "keyserver-1", "b", 1))
        .pod(pod_of(&web, &v1, "web-old0", "a", 1))
        .status(started("web-old0", PodPhase::Running, true, 1))
        .pod(pod_of(&web, &v1, "web-old1", "c", 2))
        .status(started("web-old1", PodPhase::Running, true, 2));
    let p = run_at(&w.snap, NOW, true);
    // Newest first among equally ready pods: web-old1 on c makes room.
    assert_eq!(deleted_names(&p, DeleteReason::Rollout), ["web-old1"]);
    assert_eq!(per_node(&p), BTreeMap::from([("c".into(), 1)]));
    assert_eq!(p.unscheduled, 0, "{:?}", p.unschedulable);
    let r = written(&p);
    assert_eq!((r.state, r.steps), (RolloutState::Progressing, 1));
    assert!(
        r.message.contains("start-first: no node has room")
            && r.message.contains("max_per_node=1")
            && r.message.contains("replaced web-old1 in place"),
        "{}",
        r.message
    );

    // A fourth node: start-first as asked, nothing stopped first.
    let w = w.nodes(&["d"]);
    let p = run_at(&w.snap, NOW, true);
    assert_eq!(p.deletes().count(), 0, "{p:?}");
    assert_eq!(per_node(&p), BTreeMap::from([("d".into(), 1)]));
    assert!(written(&p).message.is_empty());
}

/// One host, two replicas, one per node: the second was never placed. A
/// new template must still roll the one that runs (it stalled at "0 of 2
/// updated" for ever, the step waiting on a replica no node can take).
#[test]
fn a_shortfall_no_node_can_take_does_not_hold_the_rollout() {
    let mut web = rs_v2(2, UpdateConfig::default());
    web.placement.max_per_node = Some(1);
    let v1 = tpl("web:v1");
    let w = World::default()
        .nodes(&["a"])
        .rs(web.clone())
        .rollout(complete_at(1))
        .pod(pod_of(&web, &v1, "web-old0", "a", 1))
        .status(started("web-old0", PodPhase::Running, true, 1));
    let p = run_at(&w.snap, NOW, true);
    assert_eq!(deleted_names(&p, DeleteReason::Rollout), ["web-old0"]);
    let created: Vec<&Pod> = p.creates().collect();
    assert_eq!(created.len(), 1, "{p:?}");
    assert_eq!(created[0].template.image, "web:v2");
    assert_eq!(p.unscheduled, 1, "the shortfall stays unplaced");
    assert_eq!(written(&p).steps, 1);
}

// ---- several sets planned on one snapshot (the leader's batches) ----

fn batch_suffix() -> impl FnMut() -> String + Send {
    let mut i = 0u32;
    move || {
        i += 1;
        format!("{i:05}")
    }
}

/// Plans `names` in order on `snap` with one shared usage, as the leader's
/// batch does.
fn plan_batch(snap: &Snapshot, names: &[&str], expired: &[&str]) -> Vec<Plan> {
    let expired: BTreeSet<Name> = expired.iter().map(|s| n(s)).collect();
    let ix = PodIndex::build(snap);
    let mut usage = SharedUsage::default();
    let mut suffix = batch_suffix();
    names
        .iter()
        .map(|name| {
            let mut input = PlanInput {
                now_ms: 1000,
                replace_failed: true,
                expired_nodes: &expired,
                suffix: &mut suffix,
                index: Some(&ix),
                usage: Some(&mut usage),
                respread: Default::default(),
            };
            plan(snap, &(ns(), n(name)), &mut input)
        })
        .collect()
}

/// Plans `names` one after another, each on the snapshot with the writes of
/// the plans before it applied: the leader's order before batching.
fn plan_one_by_one(snap: &Snapshot, names: &[&str], expired: &[&str]) -> Vec<Plan> {
    let expired_set: BTreeSet<Name> = expired.iter().map(|s| n(s)).collect();
    let mut snap = snap.clone();
    let mut suffix = batch_suffix();
    let mut out = Vec::new();
    for name in names {
        let mut input = PlanInput {
            now_ms: 1000,
            replace_failed: true,
            expired_nodes: &expired_set,
            suffix: &mut suffix,
            index: None,
            usage: None,
            respread: Default::default(),
        };
        let p = plan(&snap, &(ns(), n(name)), &mut input);
        let pods = &mut snap.pods;
        for a in &p.actions {
            match a {
                Action::Create(pod) => {
                    pods.insert(
                        (pod.namespace.clone(), pod.name.clone()),
                        Arc::new((**pod).clone()),
                    );
                }
                Action::Delete { pod, .. } => {
                    pods.remove(pod);
                }
            }
        }
        out.push(p);
    }
    out
}

#[test]
fn sets_planned_together_spread_as_if_planned_one_by_one() {
    // Three sets of 2 replicas on 3 empty nodes: alone on this snapshot
    // each would pick nodes a and b (fewest pods, then name); together
    // they fill c as well, exactly as one after another.
    let w = World::default()
        .nodes(&["a", "b", "c"])
        .rs(rs("x", 2))
        .rs(rs("y", 2))
        .rs(rs("z", 2));
    let together = plan_batch(&w.snap, &["x", "y", "z"], &[]);
    let one_by_one = plan_one_by_one(&w.snap, &["x", "y", "z"], &[]);
    assert_eq!(together, one_by_one);
    let mut all: BTreeMap<String, usize> = BTreeMap::new();
    for p in &together {
        for (k, v) in per_node(p) {
            *all.entry(k).or_default() += v;
        }
    }
    assert_eq!(
        all,
        BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)])
    );
    // Alone, each set would have put its pods on a and b.
    for name in ["y", "z"] {
        assert_eq!(
            per_node(&run_plan(&w.snap, name, true, &[])),
            BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
        );
    }
}

#[test]
fn sets_planned_together_never_overfill_a_node() {
    // Two nodes with room for one pod each, three sets of one replica:
    // the third set's pod finds no room (alone it would have taken a).
    let cap = Resources {
        pods: 1,
        ..Default::default()
    };
    let w = World::default()
        .node(node("a", &[], cap))
        .node(node("b", &[], cap))
        .rs(rs("x", 1))
        .rs(rs("y", 1))
        .rs(rs("z", 1));
    let together = plan_batch(&w.snap, &["x", "y", "z"], &[]);
    assert_eq!(together, plan_one_by_one(&w.snap, &["x", "y", "z"], &[]));
    assert_eq!(per_node(&together[0]), BTreeMap::from([("a".into(), 1)]));
    assert_eq!(per_node(&together[1]), BTreeMap::from([("b".into(), 1)]));
    assert!(together[2].actions.is_empty(), "{:?}", together[2]);
    assert_eq!(together[2].unscheduled, 1);
    let why = together[2].unschedulable.as_deref().unwrap_or_default();
    assert!(why.contains("full (pod capacity)"), "{why}");
    assert_eq!(per_node(&run_plan(&w.snap, "z", true, &[])).len(), 1);
}

#[test]
fn a_delete_planned_earlier_in_the_batch_frees_its_node() {
    // Node a is full with a pod of a deleted set; b is lost. The orphan's
    // delete, planned first, makes room on a for the lost pod's
    // replacement planned after it.
    let cap = Resources {
        pods: 1,
        ..Default::default()
    };
    let gone = rs("gone", 1);
    let web = rs("web", 1);
    let w = World::default()
        .node(node("a", &[], cap))
        .rs(web.clone())
        .pod(pod(&gone, "gone-aaaaa", "a", 1))
        .pod(pod(&web, "web-bbbbb", "b", 1));
    let together = plan_batch(&w.snap, &["gone", "web"], &["b"]);
    assert_eq!(together, plan_one_by_one(&w.snap, &["gone", "web"], &["b"]));
    assert_eq!(
        deleted(&together[0]),
        vec![("gone-aaaaa".to_string(), DeleteReason::Orphan)]
    );
    assert_eq!(
        deleted(&together[1]),
        vec![("web-bbbbb".to_string(), DeleteReason::NodeLost)]
    );
    assert_eq!(per_node(&together[1]), BTreeMap::from([("a".into(), 1)]));
    // Alone, on the same snapshot, the replacement finds a full.
    assert_eq!(run_plan(&w.snap, "web", true, &["b"]).unscheduled, 1);
}

#[test]
fn many_sets_losing_a_node_replace_as_one_by_one() {
    // 40 sets of 3 over 6 nodes (20 pods each, room for 25), max_per_node
    // 1; node f is lost. Planned together, every set's replacement lands
    // where planning one after another puts it. The 20 sets on f also run
    // on b and d, so their replacements fit only on a, c and e: 15 of them,
    // the last 5 find those nodes full.
    let cap = Resources {
        pods: 25,
        ..Default::default()
    };
    let nodes = ["a", "b", "c", "d", "e", "f"];
    let mut w = World::default();
    for nd in nodes {
        w = w.node(node(nd, &[], cap));
    }
    let names: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        let mut r = rs(name, 3);
        r.placement.max_per_node = Some(1);
        for j in 0..3 {
            let nd = nodes[(i + j * 2) % nodes.len()];
            w = w.pod(pod(&r, &format!("{name}-p{j}000"), nd, 1));
        }
        w = w.rs(r);
    }
    w.snap.nodes.remove(&n("f"));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let together = plan_batch(&w.snap, &names, &["f"]);
    assert_eq!(together, plan_one_by_one(&w.snap, &names, &["f"]));
    let replaced: usize = together.iter().map(|p| p.creates().count()).sum();
    let unplaced: u32 = together.iter().map(|p| p.unscheduled).sum();
    let lost = w
        .snap
        .pods
        .values()
        .filter(|p| p.node.as_str() == "f")
        .count();
    assert_eq!((lost, replaced, unplaced), (20, 15, 5));
    let mut all: BTreeMap<String, usize> = BTreeMap::new();
    for p in &together {
        for (k, v) in per_node(p) {
            *all.entry(k).or_default() += v;
        }
    }
    assert_eq!(
        all,
        BTreeMap::from([("a".into(), 5), ("c".into(), 5), ("e".into(), 5)])
    );
}

// Re-spreading (`respread_start`, `respread_surge`).

/// `web`'s rollout record, complete on its current template (no rollout
/// under way).
fn settled(r: &ReplicaSet) -> Rollout {
    Rollout {
        revision: r.revision,
        hash: r.template.hash(),
        target: r.revision,
        state: RolloutState::Complete,
        ..Default::default()
    }
}

/// `web` with `count` ready pods `web-<node><i>` on each (node, count).
fn spread_world(r: &ReplicaSet, nodes: &[&str], pods: &[(&str, usize)]) -> World {
    let mut w = World::default()
        .nodes(nodes)
        .rs(r.clone())
        .rollout(settled(r));
    for (nd, count) in pods {
        for i in 0..*count {
            let name = format!("web-{nd}{i}");
            w = w
                .pod(pod(r, &name, nd, 1))
                .status(started(&name, PodPhase::Running, true, 1));
        }
    }
    w
}

fn run_respread(snap: &Snapshot, now: u64, respread: Respread) -> Plan {
    let expired = BTreeSet::new();
    let mut i = 0u32;
    let mut suffix = move || {
        i += 1;
        format!("s{i:04}")
    };
    let mut input = PlanInput {
        now_ms: now,
        replace_failed: true,
        expired_nodes: &expired,
        suffix: &mut suffix,
        index: None,
        usage: None,
        respread,
    };
    plan(snap, &(ns(), n("web")), &mut input)
}

fn allowed() -> Respread {
    Respread {
        allowed: true,
        surge: None,
    }
}

fn surge(name: &str) -> Respread {
    Respread {
        allowed: true,
        surge: Some(n(name)),
    }
}

/// The trigger: a node holding at least 2 more of the set than the node
/// the scheduler would pick starts one extra pod there, and deletes
/// nothing yet.
#[test]
fn respread_starts_an_extra_pod_where_a_node_holds_two_more() {
    let web = rs("web", 3);
    // 2 on a, 1 on b, none on c: an extra pod on c.
    let w = spread_world(&web, &["a", "b", "c"], &[("a", 2), ("b", 1)]);
    let p = run_respread(&w.snap, 10_000, allowed());
    assert_eq!(per_node(&p), BTreeMap::from([("c".into(), 1)]));
    assert!(deleted(&p).is_empty());
    assert_eq!(
        p.respread,
        Some(RespreadStep::Started {
            pod: n("web-s0001"),
            from: n("a"),
            from_count: 2,
            to: n("c"),
            to_count: 0,
        })
    );
    // Plan again at its ready deadline.
    assert_eq!(
        p.wake_at_ms,
        Some(10_000 + UpdateConfig::default().ready_timeout_ms)
    );

    // Every pod on one node of two: the same.
    let web2 = rs("web", 2);
    let w = spread_world(&web2, &["a", "b"], &[("a", 2)]);
    let p = run_respread(&w.snap, 10_000, allowed());
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 1)]));

    // Skew 1 is spread enough: 2, 1 on two nodes; 2, 2, 1 on three.
    for (nodes, pods, replicas) in [
        (&["a", "b"][..], &[("a", 2), ("b", 1)][..], 3),
        (&["a", "b", "c"][..], &[("a", 2), ("b", 2), ("c", 1)][..], 5),
        (&["a", "b", "c"][..], &[("a", 1), ("b", 1), ("c", 1)][..], 3),
        (&["a"][..], &[("a", 3)][..], 3),
    ] {
        let r = rs("web", replicas);
        let w = spread_world(&r, nodes, pods);
        let p = run_respread(&w.snap, 10_000, allowed());
        assert_eq!((p.actions.len(), &p.respread), (0, &None), "{pods:?}");
    }
}

/// It starts only on a settled set: not while a rollout is under way, a
/// pod is not ready, another action is due, the controller holds it back
/// (backoff), or the set does not ask to be spread by node.
#[test]
fn respread_waits_for_a_settled_set_that_asks_for_it() {
    let web = rs("web", 3);
    let crowded = spread_world(&web, &["a", "b", "c"], &[("a", 3)]);
    let p = run_respread(&crowded.snap, 10_000, allowed());
    assert_eq!(p.creates().count(), 1, "the baseline starts one");

    // The controller's backoff.
    let p = run_respread(&crowded.snap, 10_000, Respread::default());
    assert!(p.actions.is_empty());

    // A rollout under way (no record: the set's first one, progressing).
    let mut w = crowded.clone();
    w.snap.rollouts.clear();
    let p = run_respread(&w.snap, 2_000, allowed());
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.respread, None);

    // A pod not ready.
    let w = crowded
        .clone()
        .status(started("web-a0", PodPhase::Running, false, 1));
    let p = run_respread(&w.snap, 10_000, allowed());
    assert!(p.actions.is_empty());

    // One pod short: the missing one is placed (on b, by the spread); no
    // extra pod.
    let w = crowded.clone().rs(rs("web", 4));
    let p = run_respread(&w.snap, 10_000, allowed());
    assert_eq!(p.creates().count(), 1);
    assert_eq!(p.respread, None);

    // spread off, or by a label.
    for f in [
        (|pl: &mut Placement| pl.spread = false) as fn(&mut Placement),
        |pl| pl.spread_by = Some("zone".into()),
    ] {
        let mut r = rs("web", 3);
        f(&mut r.placement);
        let w = spread_world(&r, &["a", "b", "c"], &[("a", 3)]);
        let p = run_respread(&w.snap, 10_000, allowed());
        assert!(p.actions.is_empty());
    }
}

/// The extra pod goes only where a new pod may go: a node that fails the
/// selector, `max_per_node`, anti-affinity, capacity or is held takes
/// none, so a set kept crowded by its own rules is left alone (no loop).
#[test]
fn respread_respects_every_placement_rule() {
    let crowded = |r: &ReplicaSet| {
        let mut w = World::default()
            .node(node("a", &[("disk", "ssd")], Resources::default()))
            .node(node("b", &[], Resources::default()))
            .rs(r.clone())
            .rollout(settled(r));
        for i in 0..3 {
            let name = format!("web-a{i}");
            w = w
                .pod(pod(r, &name, "a", 1))
                .status(started(&name, PodPhase::Running, true, 1));
        }
        w
    };
    // Selector: b lacks disk=ssd.
    let mut r = rs("web", 3);
    r.placement.node_selector = [("disk".to_string(), "ssd".to_string())].into();
    let p = run_respread(&crowded(&r).snap, 10_000, allowed());
    assert!(p.actions.is_empty());
    // Constraint.
    let mut r = rs("web", 3);
    r.placement.constraints = vec![constraint("node.hostname==a")];
    let p = run_respread(&crowded(&r).snap, 10_000, allowed());
    assert!(p.actions.is_empty());
    // Anti-affinity with a set on b.
    let mut r = rs("web", 3);
    r.placement.anti_affinity = vec![n("db")];
    let db = rs("db", 1);
    let w = crowded(&r).rs(db.clone()).pod(pod(&db, "db-b0000", "b", 1));
    let p = run_respread(&w.snap, 10_000, allowed());
    assert!(p.actions.is_empty());
    // b full.
    let r = rs("web", 3);
    let other = rs("other", 1);
    let w = crowded(&r)
        .node(node(
            "b",
            &[],
            Resources {
                pods: 1,
                ..Default::default()
            },
        ))
        .rs(other.clone())
        .pod(pod(&other, "other-b0000", "b", 1));
    let p = run_respread(&w.snap, 10_000, allowed());
    assert!(p.actions.is_empty());
    // b held after a store stall.
    let mut w = crowded(&rs("web", 3));
    Arc::make_mut(&mut w.snap.held_nodes).insert(n("b"), 99_999);
    let p = run_respread(&w.snap, 10_000, allowed());
    assert!(p.actions.is_empty());
    // And with room on b, it moves.
    let p = run_respread(&crowded(&rs("web", 3)).snap, 10_000, allowed());
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 1)]));
}

/// While the extra pod starts, nothing is deleted (the set keeps its count
/// of ready pods); once it is ready, the surplus rule takes one from the
/// most crowded node; if it is not ready by its deadline, or fails, it is
/// the one that goes, and the step says so (the controller backs off).
#[test]
fn respread_removes_a_pod_only_once_the_extra_one_is_ready() {
    let web = rs("web", 3);
    let deadline = 10_000 + UpdateConfig::default().ready_timeout_ms;
    let base = spread_world(&web, &["a", "b", "c"], &[("a", 2), ("b", 1)]).pod(pod(
        &web,
        "web-extra",
        "c",
        10_000,
    ));

    // Starting: no delete, no new extra pod, a wake at its deadline.
    for st in [
        None,
        Some(started("web-extra", PodPhase::Pending, false, 10_000)),
        Some(started("web-extra", PodPhase::Running, false, 10_100)),
    ] {
        let mut w = base.clone();
        if let Some(st) = st {
            w = w.status(st);
        }
        let p = run_respread(&w.snap, 12_000, surge("web-extra"));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.respread, None);
        assert_eq!(p.wake_at_ms, Some(deadline));
    }

    // Ready: one goes from a, the most crowded node.
    let ready = base
        .clone()
        .status(started("web-extra", PodPhase::Running, true, 10_100));
    let p = run_respread(&ready.snap, 12_000, surge("web-extra"));
    assert_eq!(deleted(&p), vec![("web-a1".into(), DeleteReason::Surplus)]);
    assert_eq!(p.respread, Some(RespreadStep::Settled));

    // A leader without the memory of it: the same once ready.
    let p = run_respread(&ready.snap, 12_000, allowed());
    assert_eq!(deleted(&p), vec![("web-a1".into(), DeleteReason::Surplus)]);

    // Not ready by its deadline: it goes.
    let late = base
        .clone()
        .status(started("web-extra", PodPhase::Running, false, 10_100));
    let p = run_respread(&late.snap, deadline, surge("web-extra"));
    assert_eq!(
        deleted(&p),
        vec![("web-extra".into(), DeleteReason::Surplus)]
    );
    assert!(matches!(p.respread, Some(RespreadStep::Failed { .. })));
    assert_eq!(p.creates().count(), 0, "no new extra pod in the same plan");

    // Failed: it goes, and is not replaced (it was the extra one).
    let failed = base.clone().status(status(
        "web-extra",
        PodPhase::Failed,
        false,
        "container exited with code 1",
    ));
    let p = run_respread(&failed.snap, 12_000, surge("web-extra"));
    assert_eq!(
        deleted(&p),
        vec![("web-extra".into(), DeleteReason::Failed)]
    );
    assert_eq!(p.creates().count(), 0);
    assert!(matches!(p.respread, Some(RespreadStep::Failed { .. })));

    // Gone (deleted by hand, or its create never landed): settled.
    let gone = spread_world(&web, &["a", "b", "c"], &[("a", 1), ("b", 1), ("c", 1)]);
    let p = run_respread(&gone.snap, 12_000, surge("web-extra"));
    assert_eq!(p.respread, Some(RespreadStep::Settled));
    assert!(p.actions.is_empty());

    // A scale down meanwhile (3 -> 2): the extra pod still waits, one other
    // goes at once.
    let w = base.clone().rs(rs("web", 2));
    let p = run_respread(&w.snap, 12_000, surge("web-extra"));
    assert_eq!(deleted(&p), vec![("web-a1".into(), DeleteReason::Surplus)]);
}

/// Played out (each plan's writes applied, new pods ready at once), a set
/// crowded on one node ends spread within a few moves, never has fewer
/// ready pods than its count, and then stays put: no move undoes another.
#[test]
fn respread_converges_and_never_goes_below_the_count() {
    for (nodes, replicas, max_per_node, moves) in [
        (&["a", "b", "c"][..], 6u32, None, 4usize),
        (&["a", "b", "c"][..], 3, None, 2),
        (&["a", "b", "c", "d"][..], 5, None, 3),
        (&["a", "b"][..], 4, Some(3), 2),
    ] {
        let mut r = rs("web", replicas);
        r.placement.max_per_node = max_per_node;
        let mut w = spread_world(&r, nodes, &[("a", replicas as usize)]);
        let mut surge_name: Option<Name> = None;
        let mut started_moves = 0;
        let mut now = 10_000;
        for round in 0..50 {
            let p = run_respread(
                &w.snap,
                now,
                Respread {
                    allowed: true,
                    surge: surge_name.clone(),
                },
            );
            match &p.respread {
                Some(RespreadStep::Started { pod, .. }) => {
                    started_moves += 1;
                    surge_name = Some(pod.clone());
                }
                Some(RespreadStep::Settled) => surge_name = None,
                Some(RespreadStep::Failed { .. }) => panic!("round {round}: failed"),
                None => {}
            }
            if p.actions.is_empty() {
                break;
            }
            for a in &p.actions {
                match a {
                    Action::Create(pd) => {
                        let nm = pd.name.to_string();
                        w = w.pod((**pd).clone()).status(started(
                            &nm,
                            PodPhase::Running,
                            true,
                            now,
                        ));
                    }
                    Action::Delete { pod, .. } => {
                        w.snap.pods.remove(pod);
                        w.snap.pod_statuses.remove(pod);
                    }
                }
            }
            let ready = w.snap.pods.len();
            assert!(ready >= replicas as usize, "round {round}: {ready} pods");
            now += 1_000;
        }
        let mut on: BTreeMap<String, usize> = BTreeMap::new();
        for p in w.snap.pods.values() {
            *on.entry(p.node.to_string()).or_default() += 1;
        }
        let (max, min) = (
            on.values().copied().max().unwrap(),
            nodes
                .iter()
                .map(|nd| on.get(*nd).copied().unwrap_or(0))
                .min()
                .unwrap(),
        );
        assert_eq!(w.snap.pods.len(), replicas as usize, "{on:?}");
        assert!(max - min <= 1, "{nodes:?} {replicas}: {on:?}");
        assert_eq!(started_moves, moves, "{nodes:?} {replicas}: {on:?}");
    }
}

/// A new pod its node stopped (exit 143: a dockerd restart stops every
/// container with SIGTERM) is replaced, but is no failure of the template:
/// the rollout goes on. The same pod exiting with 1, or killed by SIGKILL
/// (137: the OOM killer), still pauses it.
#[test]
fn a_new_pod_stopped_by_its_node_is_no_rollout_failure() {
    let web = rs_v2(3, UpdateConfig::default());
    let v2 = web.template.clone();
    let rec = Rollout {
        revision: 2,
        hash: tpl("web:v2").hash(),
        target: 2,
        from: Some(1),
        steps: 1,
        ..Default::default()
    };
    let world = |code: i64| {
        World::default()
            .nodes(&["a"])
            .rs(web.clone())
            .rollout(rec.clone())
            .ready_pods(&web, &tpl("web:v1"), "old", 2)
            .pod(pod_of(&web, &v2, "web-new0", "a", NOW))
            .status(status(
                "web-new0",
                PodPhase::Failed,
                false,
                &PodStatus::exited_message(code),
            ))
    };
    // Replaced at once (the backoff allows), not counted.
    let p = run_at(&world(143).snap, NOW + 50, true);
    assert_eq!(deleted_names(&p, DeleteReason::Failed), vec!["web-new0"]);
    assert_eq!(p.creates().count(), 1);
    assert_eq!(p.failed_replaced.len(), 1);
    assert!(
        p.rollout.is_none(),
        "the record is unchanged: {:?}",
        p.rollout
    );
    // Kept while the backoff runs, not counted either.
    let p = run_at(&world(143).snap, NOW + 50, false);
    assert!(p.rollout.is_none(), "{:?}", p.rollout);
    // Exit 1 and 137 are the template's: paused.
    for code in [1, 137] {
        let p = run_at(&world(code).snap, NOW + 50, false);
        assert_eq!(written(&p).state, RolloutState::Paused, "exit {code}");
        let p = run_at(&world(code).snap, NOW + 50, true);
        assert_eq!(written(&p).failures, 1, "exit {code}");
    }
}

/// A node whose agent cannot reach its dockerd takes no new pod (the
/// problem says why), and its pods still pending there are replaced on
/// another node after `RUNTIME_DOWN_GRACE_MS`; running ones (dockerd's
/// live-restore keeps them) stay.
#[test]
fn a_node_without_its_dockerd_takes_no_pod_and_its_pending_ones_move() {
    let down = |name: &str, since: u64| Node {
        runtime_down_since: Some(since),
        ..node(name, &[], Resources::default())
    };
    // New pods: only on b.
    let web = rs("web", 2);
    let w = World::default()
        .node(down("a", 500))
        .nodes(&["b"])
        .rs(web.clone());
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 2)]));
    // Only a: nothing placed, and the problem names the rule.
    let w = World::default().node(down("a", 500)).rs(web.clone());
    let p = run_plan(&w.snap, "web", true, &[]);
    assert_eq!(p.unscheduled, 2);
    let why = p.unschedulable.unwrap_or_default();
    assert!(why.contains("cannot reach their dockerd"), "{why}");

    // A pod pending on a (no status, or Pending), one running there, one
    // ready on b.
    let since = 20_000;
    let web = rs("web", 4);
    let w = World::default()
        .node(down("a", since))
        .nodes(&["b"])
        .rs(web.clone())
        .rollout(settled(&web))
        .pod(pod(&web, "web-a-new", "a", 1))
        .pod(pod(&web, "web-a-pend", "a", 1))
        .status(status("web-a-pend", PodPhase::Pending, false, "creating"))
        .pod(pod(&web, "web-a-run", "a", 1))
        .status(started("web-a-run", PodPhase::Running, true, 1))
        .pod(pod(&web, "web-b", "b", 1))
        .status(started("web-b", PodPhase::Running, true, 1));
    // Within the grace: kept, and planned again when it ends.
    let p = run_respread(
        &w.snap,
        since + RUNTIME_DOWN_GRACE_MS - 1,
        Respread::default(),
    );
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.wake_at_ms, Some(since + RUNTIME_DOWN_GRACE_MS));
    // After it: the two pending ones go, and their replacements go to b.
    let p = run_respread(&w.snap, since + RUNTIME_DOWN_GRACE_MS, Respread::default());
    let mut d = deleted(&p);
    d.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        d,
        vec![
            ("web-a-new".into(), DeleteReason::RuntimeDown),
            ("web-a-pend".into(), DeleteReason::RuntimeDown),
        ]
    );
    assert_eq!(per_node(&p), BTreeMap::from([("b".into(), 2)]));

    // The node record without the field reads as before; with it, back.
    let rec = node("a", &[], Resources::default());
    let json = serde_json::to_string(&rec).unwrap();
    assert!(!json.contains("runtime_down_since"), "{json}");
    let back: Node = serde_json::from_str(&serde_json::to_string(&down("a", 7)).unwrap()).unwrap();
    assert_eq!(back.runtime_down_since, Some(7));
}

/// A set deleted and created again under the same name before the
/// supervisor saw it gone: the earlier set's record (here a paused
/// rollout of the same template) is not the new set's, which rolls out
/// afresh; the set's own record, and one from before `set_created_at`,
/// are kept.
#[test]
fn a_recreated_set_does_not_take_over_the_earlier_sets_rollout() {
    let mut web = rs("web", 2);
    web.template = tpl("web:v1");
    web.revision = 1;
    web.created_at = 500;
    let paused = |set_created_at: u64| Rollout {
        revision: 1,
        hash: tpl("web:v1").hash(),
        target: 1,
        state: RolloutState::Paused,
        message: "new pods failed: 3 of 3".into(),
        failures: 3,
        started_at: 100,
        finished_at: Some(200),
        set_created_at,
        ..Default::default()
    };
    let world = |rec: Rollout| World::default().nodes(&["a"]).rs(web.clone()).rollout(rec);

    // The earlier set's (created at 100).
    let p = run_at(&world(paused(100)).snap, NOW, true);
    let r = written(&p);
    assert_eq!(
        (
            r.state,
            r.failures,
            r.set_created_at,
            r.from,
            r.message.as_str()
        ),
        (RolloutState::Progressing, 0, 500, None, "")
    );
    assert_eq!(p.creates().count(), 2, "{p:?}");

    // Its own, and one written before the field: kept as they are.
    for own in [500, 0] {
        let p = run_at(&world(paused(own)).snap, NOW, true);
        assert!(
            !matches!(&p.rollout, Some(RolloutWrite::Put(r)) if r.state != RolloutState::Paused),
            "set_created_at {own}: {:?}",
            p.rollout
        );
    }
}
