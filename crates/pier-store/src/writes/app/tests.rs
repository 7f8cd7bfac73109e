use super::*;
use pier_model::keys::Key;
use pier_model::{Cidr, decode};

use crate::{Compare, TxnOp};

fn cfg() -> AllocConfig {
    AllocConfig {
        service_cidr: Cidr::new("10.213.0.0".parse().unwrap(), 16).unwrap(),
        service_cidr6: None,
        node_port_min: 30000,
        node_port_max: 32767,
    }
}

fn spec(yaml: &str) -> AppSpec {
    let l = pier_compose::load(
        &[pier_compose::Source {
            name: "compose.yaml".into(),
            text: yaml.into(),
        }],
        &pier_compose::Options::default(),
        &|_| Err("no files here".into()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    l.spec
}

const SHOP: &str = r#"
name: shop
services:
  web:
    image: web:1
    ports: ["30080:8080"]
    deploy: {replicas: 2}
  db:
    image: db:1
    expose: [5432]
  worker:
    image: worker:1
"#;

/// Play a transaction onto `cur` as the store would, at revision `rev`.
fn play(cur: &mut Current, txn: &Txn, rev: Revision) {
    for c in &txn.compares {
        let (key, want) = match c {
            Compare::ModRevision(k, r) => (k, Some(*r)),
            Compare::Absent(k) => (k, Some(0)),
            Compare::Exists(k) => (k, None),
        };
        let have = match Key::parse(key).unwrap() {
            Key::App(..) => cur.app.as_ref().map(|a| a.1).unwrap_or(0),
            Key::ReplicaSet(_, n) => cur.replicasets.get(&n).map(|a| a.1).unwrap_or(0),
            Key::Service(_, n) => cur.services.get(&n).map(|a| a.1).unwrap_or(0),
            Key::VipAlloc(ip) => -i64::from(cur.vips.contains(&ip)),
            Key::NodePortAlloc(p) => -i64::from(cur.node_ports.contains_key(&p.get())),
            k => panic!("unexpected compare on {k:?}"),
        };
        if let Some(w) = want {
            assert_eq!(have, w, "compare on {key} fails");
        }
    }
    for op in &txn.success {
        match op {
            TxnOp::Put { key, value, .. } => match Key::parse(key).unwrap() {
                Key::App(..) => cur.app = Some((decode(key, value).unwrap(), rev)),
                Key::ReplicaSet(_, n) => {
                    cur.replicasets
                        .insert(n, (decode(key, value).unwrap(), rev));
                }
                Key::Service(_, n) => {
                    cur.services.insert(n, (decode(key, value).unwrap(), rev));
                }
                Key::VipAlloc(ip) => {
                    cur.vips.insert(ip);
                }
                Key::NodePortAlloc(p) => {
                    cur.node_ports.insert(p.get(), decode(key, value).unwrap());
                }
                k => panic!("unexpected put of {k:?}"),
            },
            TxnOp::Delete { key } => match Key::parse(key).unwrap() {
                Key::App(..) => cur.app = None,
                Key::ReplicaSet(_, n) => {
                    cur.replicasets.remove(&n);
                }
                Key::Service(_, n) => {
                    cur.services.remove(&n);
                }
                Key::VipAlloc(ip) => {
                    cur.vips.remove(&ip);
                }
                Key::NodePortAlloc(p) => {
                    cur.node_ports.remove(&p.get());
                }
                k => panic!("unexpected delete of {k:?}"),
            },
        }
    }
}

fn actions(p: &Planned) -> Vec<String> {
    p.changes
        .iter()
        .map(|c| format!("{:?} {} {}", c.action, c.kind, c.name).to_lowercase())
        .collect()
}

fn applied(yaml: &str) -> Current {
    let mut cur = Current::default();
    let p = plan(&spec(yaml), &cur, &cfg(), 1).unwrap();
    play(&mut cur, p.txn.as_ref().unwrap(), 10);
    cur
}

#[test]
fn first_apply_creates_everything_in_one_txn() {
    let cur = Current::default();
    let p = plan(&spec(SHOP), &cur, &cfg(), 1).unwrap();
    assert_eq!(
        actions(&p),
        [
            "create replicaset web",
            "create service web",
            "create replicaset db",
            "create service db",
            "create replicaset worker",
            "create app shop"
        ]
    );
    let mut cur = cur;
    play(&mut cur, p.txn.as_ref().unwrap(), 10);
    let web = &cur.services[&Name::new("web").unwrap()].0;
    let db = &cur.services[&Name::new("db").unwrap()].0;
    assert!(web.vip.is_some() && db.vip.is_some() && web.vip != db.vip);
    assert_eq!(web.service_type, ServiceType::NodePort);
    assert!(cur.node_ports.contains_key(&30080));
    let app = &cur.app.as_ref().unwrap().0;
    assert_eq!(app.generation, 1);
    assert_eq!(app.components.len(), 3);
    assert!(
        !app.components[2].service,
        "worker has no ports, so no service"
    );
}

#[test]
fn second_apply_of_the_same_file_writes_nothing() {
    let cur = applied(SHOP);
    let p = plan(&spec(SHOP), &cur, &cfg(), 2).unwrap();
    assert!(p.txn.is_none(), "{:?}", p.txn);
    assert!(
        p.changes
            .iter()
            .all(|c| c.action == ChangeAction::Unchanged),
        "{:?}",
        p.changes
    );
    assert_eq!(p.from_revision, 10);
}

#[test]
fn a_changed_field_is_an_update_naming_it() {
    let cur = applied(SHOP);
    let p = plan(&spec(&SHOP.replace("web:1", "web:2")), &cur, &cfg(), 2).unwrap();
    let ch: Vec<&Change> = p
        .changes
        .iter()
        .filter(|c| c.action != ChangeAction::Unchanged)
        .collect();
    assert_eq!(ch.len(), 2, "{ch:?}");
    assert_eq!(ch[0].kind, "replicaset");
    assert_eq!(ch[0].fields, ["history", "revision", "template.image"]);
    assert_eq!(ch[1].kind, "app");
    let mut cur = cur;
    play(&mut cur, p.txn.as_ref().unwrap(), 11);
    assert_eq!(cur.app.as_ref().unwrap().0.generation, 2);
    let rs = &cur.replicasets[&Name::new("web").unwrap()].0;
    assert_eq!(rs.revision, 2, "a new template is a new revision");
    assert_eq!(rs.history[0].template.image, "web:1");
    assert_eq!(
        (
            rs.history[0].replaced_at,
            rs.history[0].replaced_by.as_str()
        ),
        (2, "apply"),
        "the history entry says when and by what it was replaced"
    );
    // Applying it again changes nothing: the revision stays.
    let again = plan(&spec(&SHOP.replace("web:1", "web:2")), &cur, &cfg(), 3).unwrap();
    assert!(again.txn.is_none(), "{:?}", again.changes);
    // The service kept its VIP and node port.
    let web = &cur.services[&Name::new("web").unwrap()].0;
    assert_eq!(web.ports[0].node_port.unwrap().get(), 30080);
}

#[test]
fn a_service_removed_from_the_file_is_removed() {
    let mut cur = applied(SHOP);
    let vip = cur.services[&Name::new("web").unwrap()].0.vip.unwrap();
    let without_web = SHOP.replace(
        "  web:\n    image: web:1\n    ports: [\"30080:8080\"]\n    deploy: {replicas: 2}\n",
        "",
    );
    let p = plan(&spec(&without_web), &cur, &cfg(), 2).unwrap();
    let a = actions(&p);
    assert!(
        a.contains(&"delete replicaset web".into()) && a.contains(&"delete service web".into()),
        "{a:?}"
    );
    play(&mut cur, p.txn.as_ref().unwrap(), 11);
    assert!(!cur.replicasets.contains_key(&Name::new("web").unwrap()));
    assert!(!cur.services.contains_key(&Name::new("web").unwrap()));
    assert!(
        !cur.vips.contains(&vip) && !cur.node_ports.contains_key(&30080),
        "allocations freed"
    );
    assert!(cur.replicasets.contains_key(&Name::new("db").unwrap()));
}

#[test]
fn objects_the_app_does_not_own_are_not_taken() {
    let mut cur = Current::default();
    let other = spec("name: shop\nservices: {db: {image: mine}}").components[0]
        .replicaset
        .clone();
    cur.replicasets.insert(Name::new("db").unwrap(), (other, 5));
    let e = plan(&spec(SHOP), &cur, &cfg(), 1).unwrap_err();
    let PlanError::Conflict(m) = e else {
        panic!("{e:?}")
    };
    assert!(
        m.contains("services.db") && m.contains("pier delete rs db"),
        "{m}"
    );
}

#[test]
fn published_port_outside_the_range_names_the_setting() {
    let e = plan(
        &spec(&SHOP.replace("30080:8080", "8080:8080")),
        &Current::default(),
        &cfg(),
        1,
    )
    .unwrap_err();
    let PlanError::Bad(m) = e else {
        panic!("{e:?}")
    };
    assert!(
        m.starts_with("services.web.ports: published port 8080")
            && m.contains("node_port_min/node_port_max"),
        "{m}"
    );
}

#[test]
fn a_port_held_by_another_service_is_a_conflict() {
    let mut cur = Current::default();
    cur.node_ports.insert(
        30080,
        Allocation {
            namespace: Namespace::default(),
            service: Name::new("other").unwrap(),
            endpoint: None,
        },
    );
    let e = plan(&spec(SHOP), &cur, &cfg(), 1).unwrap_err();
    assert!(
        matches!(&e, PlanError::Conflict(m) if m.contains("default/other")),
        "{e:?}"
    );
}

#[test]
fn expected_revision_is_checked() {
    let cur = applied(SHOP);
    let mut s = spec(SHOP);
    s.expect_revision = Some(9);
    let e = plan(&s, &cur, &cfg(), 2).unwrap_err();
    assert!(
        matches!(&e, PlanError::Conflict(m) if m.contains("revision 10, not 9")),
        "{e:?}"
    );
    s.expect_revision = Some(10);
    assert!(plan(&s, &cur, &cfg(), 2).is_ok());
}

#[test]
fn every_txn_compares_the_app_revision() {
    // Two applies computed from the same state: the second's compare on
    // the application key fails once the first is written.
    let cur = applied(SHOP);
    let a = plan(&spec(&SHOP.replace("web:1", "web:2")), &cur, &cfg(), 2).unwrap();
    let b = plan(&spec(&SHOP.replace("web:1", "web:3")), &cur, &cfg(), 2).unwrap();
    let app_key = keys::app(
        &Namespace::new("shop").unwrap(),
        &Name::new("shop").unwrap(),
    );
    for p in [&a, &b] {
        assert!(
            p.txn
                .as_ref()
                .unwrap()
                .compares
                .contains(&Compare::ModRevision(app_key.clone(), 10))
        );
    }
}

#[test]
fn delete_removes_all_it_owns() {
    let mut cur = applied(SHOP);
    let p = plan_delete(
        &Namespace::new("shop").unwrap(),
        &Name::new("shop").unwrap(),
        &cur,
    )
    .unwrap();
    play(&mut cur, p.txn.as_ref().unwrap(), 11);
    assert!(cur.app.is_none() && cur.replicasets.is_empty() && cur.services.is_empty());
    assert!(cur.vips.is_empty() && cur.node_ports.is_empty());
}

#[test]
fn changed_fields_go_two_levels_deep() {
    let a = spec(SHOP).components[0].replicaset.clone();
    let mut b = a.clone();
    b.replicas = pier_model::Replicas::new(5).unwrap();
    b.template.env.insert("A".into(), "1".into());
    assert_eq!(changed_fields(&a, &b), ["replicas", "template.env"]);
}
