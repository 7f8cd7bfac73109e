use super::*;

use std::net::{IpAddr, Ipv4Addr};

use pier_model::{Namespace, Placement, PodTemplate, Replicas};

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

#[derive(Default)]
struct World {
    snap: Snapshot,
}

impl World {
    fn node(mut self, nd: Node) -> Self {
        Arc::make_mut(&mut self.snap.nodes).insert(nd.name.clone(), Arc::new(nd));
        self
    }
    fn nodes(mut self, names: &[&str]) -> Self {
        for name in names {
            self = self.node(node(name, &[], Resources::default()));
        }
        self
    }
    fn rs(mut self, r: ReplicaSet) -> Self {
        Arc::make_mut(&mut self.snap.replicasets)
            .insert((r.namespace.clone(), r.name.clone()), Arc::new(r));
        self
    }
    fn pod(mut self, p: Pod) -> Self {
        Arc::make_mut(&mut self.snap.pods)
            .insert((p.namespace.clone(), p.name.clone()), Arc::new(p));
        self
    }
    fn status(mut self, s: PodStatus) -> Self {
        let k = (s.namespace.clone(), s.name.clone().unwrap());
        Arc::make_mut(&mut self.snap.pod_statuses).insert(k, Arc::new(s));
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
    };
    plan(snap, &(ns(), n(name)), &mut input)
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
    Arc::make_mut(&mut new.endpoints).clear();
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
    Arc::make_mut(&mut new.pods).remove(&(ns(), n("other-1")));
    let mut d = BTreeMap::new();
    dirty(&old, &new, &mut d);
    assert_eq!(d, BTreeMap::from([((ns(), n("other")), "pod deleted")]));
}
