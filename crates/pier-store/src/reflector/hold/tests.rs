use super::*;
use crate::KeyValue;
use crate::reflector::build;
use pier_model::keys;
use pier_model::{Name, Namespace};

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn kv(key: String, value: serde_json::Value) -> KeyValue {
    KeyValue {
        key,
        value: value.to_string().into_bytes(),
        create_revision: 1,
        mod_revision: 1,
        version: 1,
        lease: None,
    }
}

/// Node `node` with one ready endpoint of `web` and one pod status.
fn node_keys(node: &str, ip: &str) -> Vec<KeyValue> {
    let ns = Namespace::default();
    vec![
        kv(
            keys::node(&n(node)),
            serde_json::json!({"name": node, "addr": ip}),
        ),
        kv(
            keys::endpoint(&ns, &n("web"), &n(node), &n("c1")),
            serde_json::json!({"service": "web", "node": node, "id": "c1", "ip": ip,
                "ports": [{"name": "http", "port": 80}], "ready": true}),
        ),
        kv(
            keys::pod_status(&ns, &n(&format!("web-{node}"))),
            serde_json::json!({"name": format!("web-{node}"), "node": node, "phase": "Running", "ready": true}),
        ),
    ]
}

fn snap(nodes: &[(&str, &str)]) -> Snapshot {
    let kvs: Vec<KeyValue> = nodes.iter().flat_map(|(a, b)| node_keys(a, b)).collect();
    build(&kvs, 1)
}

fn policy() -> Option<HoldPolicy> {
    Some(HoldPolicy {
        grace: Duration::from_millis(10_000),
        window: Duration::from_millis(6_000),
    })
}

fn ready_nodes_of_web(s: &Snapshot) -> Vec<String> {
    s.ready_endpoints_of(&Namespace::default(), &n("web"))
        .map(|e| e.node.to_string())
        .collect()
}

#[test]
fn node_lost_while_the_store_was_live_goes_at_once() {
    let mut h = Holds::new(policy());
    let before = snap(&[("a", "10.0.0.1"), ("b", "10.0.0.2")]);
    let after = snap(&[("a", "10.0.0.1")]);
    h.saw(false, 1_000);
    assert!(!h.update(&before, &after, false, 100_000));
    let v = h.view(&after);
    assert_eq!(ready_nodes_of_web(&v), ["a"]);
    assert!(!v.nodes.contains_key(&n("b")));
    assert!(v.held_nodes.is_empty());
}

#[test]
fn nodes_lost_after_a_store_stall_are_held_until_they_register_again() {
    let mut h = Holds::new(policy());
    let before = snap(&[("a", "10.0.0.1"), ("b", "10.0.0.2")]);
    // Stale at 10 s; both leases go when the store is back at 14 s, in the
    // batch that makes the view fresh again.
    h.saw(true, 10_000);
    let empty = build(&[], 2);
    assert!(h.update(&before, &empty, true, 14_000));
    let v = h.view(&empty);
    assert_eq!(ready_nodes_of_web(&v), ["a", "b"]);
    assert_eq!(v.pod_statuses.len(), 2);
    assert_eq!(v.held_nodes.get(&n("a")), Some(&24_000));

    // a writes its endpoint again (a new container id), then its record:
    // a's held keys give way; b is still held.
    let ns = Namespace::default();
    let mut a_back = vec![kv(
        keys::endpoint(&ns, &n("web"), &n("a"), &n("c2")),
        serde_json::json!({"service": "web", "node": "a", "id": "c2", "ip": "10.0.0.1",
            "ports": [{"name": "http", "port": 80}], "ready": true}),
    )];
    let eps_only = build(&a_back, 3);
    assert!(!h.update(&empty, &eps_only, false, 15_000));
    let v = h.view(&eps_only);
    assert_eq!(
        v.ready_endpoints_of(&ns, &n("web"))
            .map(|e| e.id.to_string())
            .collect::<Vec<_>>(),
        ["c1", "c2", "c1"],
        "a's old endpoint stays held until a's record is back"
    );
    a_back.push(node_keys("a", "10.0.0.1").remove(0));
    let a_done = build(&a_back, 4);
    assert!(h.update(&eps_only, &a_done, false, 15_500));
    let v = h.view(&a_done);
    let ids: Vec<(String, String)> = v
        .ready_endpoints_of(&ns, &n("web"))
        .map(|e| (e.node.to_string(), e.id.to_string()))
        .collect();
    assert_eq!(
        ids,
        [("a".into(), "c2".into()), ("b".into(), "c1".into())],
        "a's c1 died during the stall: gone once a registered again"
    );
    assert_eq!(v.held_nodes.keys().collect::<Vec<_>>(), [&n("b")]);
    assert!(v.nodes.contains_key(&n("b")));
    assert_eq!(h.next_deadline_ms(), Some(24_000));

    // b never comes back: gone at its deadline, not before.
    assert!(!h.update(&a_done, &a_done, false, 23_999));
    assert!(h.update(&a_done, &a_done, false, 24_000));
    let v = h.view(&a_done);
    assert_eq!(ready_nodes_of_web(&v), ["a"]);
    assert!(!v.nodes.contains_key(&n("b")));
    assert!(v.pod_statuses.keys().all(|(_, p)| p.as_str() != "web-b"));
    assert!(h.is_empty() && v.held_nodes.is_empty());
}

#[test]
fn a_stall_is_remembered_for_the_window_only() {
    let before = snap(&[("a", "10.0.0.1")]);
    let empty = build(&[], 2);
    let mut h = Holds::new(policy());
    h.saw(true, 10_000);
    assert!(
        h.update(&before, &empty, false, 16_000),
        "within the window"
    );
    let mut h = Holds::new(policy());
    h.saw(true, 10_000);
    assert!(
        !h.update(&before, &empty, false, 16_001),
        "after the window"
    );
    assert!(h.is_empty());
}

#[test]
fn without_a_policy_nothing_is_held() {
    let mut h = Holds::new(None);
    let before = snap(&[("a", "10.0.0.1")]);
    let empty = build(&[], 2);
    assert!(!h.update(&before, &empty, true, 1_000));
    assert!(h.view(&empty).nodes.is_empty());
}

#[test]
fn the_view_shares_the_stores_maps_when_nothing_is_held() {
    let h = Holds::new(policy());
    let s = snap(&[("a", "10.0.0.1")]);
    let v = h.view(&s);
    assert!(v.endpoints.ptr_eq(&s.endpoints) && v.nodes.ptr_eq(&s.nodes));
}
