//! Service creation with VIP and node-port allocation, against both stores.

use std::sync::Arc;

use pier_model::{Name, Namespace, PortNum, Service, ServicePort, ServiceType};
use pier_store::alloc::AllocConfig;
use pier_store::testing::EtcdServer;
use pier_store::writes::{WriteError, create_service, delete_service, update_service};
use pier_store::{EmbeddedStore, EtcdStore, Store};

fn cfg() -> AllocConfig {
    AllocConfig {
        service_cidr: "10.213.0.0/24".parse().unwrap(),
        service_cidr6: None,
        node_port_min: 30000,
        node_port_max: 30002,
    }
}

fn svc(name: &str, ty: ServiceType, node_port: Option<u16>) -> Service {
    Service {
        name: Name::new(name).unwrap(),
        namespace: Namespace::default(),
        vip: None,
        vip6: None,
        headless: false,
        external_name: None,
        service_type: ty,
        ports: vec![ServicePort {
            name: Name::new("http").unwrap(),
            port: PortNum::new(80).unwrap(),
            target_port: PortNum::new(8080).unwrap(),
            node_port: node_port.map(|p| PortNum::new(p).unwrap()),
            protocol: Default::default(),
        }],
        selector: Default::default(),
        static_endpoints: vec![],
        lb: Default::default(),
        proxy_protocol: false,
        prefer_local: false,
        drain_timeout_ms: None,
        health: None,
        sla: None,
        session_affinity: None,
        created_at: 0,
        accept_labelled: false,
    }
}

async fn allocation_rules(store: Arc<dyn Store>) {
    let c = cfg();
    // VIPs skip .0-.10 (.10 is DNS) and are unique.
    let a = create_service(&*store, &c, svc("a", ServiceType::ClusterIP, None), true)
        .await
        .unwrap();
    let b = create_service(&*store, &c, svc("b", ServiceType::NodePort, None), true)
        .await
        .unwrap();
    assert_eq!(a.vip, Some("10.213.0.11".parse().unwrap()));
    assert_eq!(b.vip, Some("10.213.0.12".parse().unwrap()));
    assert_eq!(b.ports[0].node_port.map(|p| p.get()), Some(30000));

    // Creating twice reports the existing service, unchanged.
    match create_service(&*store, &c, svc("a", ServiceType::ClusterIP, None), true).await {
        Err(WriteError::AlreadyExists(s)) => assert_eq!(s.vip, a.vip),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }

    // An explicit node port that is taken names its holder.
    match create_service(
        &*store,
        &c,
        svc("c", ServiceType::NodePort, Some(30000)),
        true,
    )
    .await
    {
        Err(WriteError::NodePortTaken { port: 30000, by }) => assert_eq!(by.service.as_str(), "b"),
        other => panic!("expected NodePortTaken, got {other:?}"),
    }
    // A node port on a ClusterIP service is a validation error.
    assert!(matches!(
        create_service(
            &*store,
            &c,
            svc("d", ServiceType::ClusterIP, Some(30001)),
            true
        )
        .await,
        Err(WriteError::Invalid(_))
    ));

    // The range runs out with a clear error.
    create_service(&*store, &c, svc("e", ServiceType::NodePort, None), true)
        .await
        .unwrap();
    create_service(&*store, &c, svc("f", ServiceType::NodePort, None), true)
        .await
        .unwrap();
    let e = create_service(&*store, &c, svc("g", ServiceType::NodePort, None), true)
        .await
        .unwrap_err();
    assert!(matches!(e, WriteError::Exhausted(_)), "{e}");
    assert!(e.to_string().contains("node port"), "{e}");

    // Turning b into ClusterIP frees its node port, with a revision check.
    let kv = store
        .get(&pier_model::keys::service(
            &Namespace::default(),
            &Name::new("b").unwrap(),
        ))
        .await
        .unwrap()
        .unwrap();
    let mut b2 = b.clone();
    b2.service_type = ServiceType::ClusterIP;
    b2.ports[0].node_port = None;
    assert!(matches!(
        update_service(&*store, &c, kv.mod_revision - 1, b2.clone()).await,
        Err(WriteError::Conflict(_))
    ));
    update_service(&*store, &c, kv.mod_revision, b2)
        .await
        .unwrap();
    let g = create_service(&*store, &c, svc("g", ServiceType::NodePort, None), true)
        .await
        .unwrap();
    assert_eq!(g.ports[0].node_port.map(|p| p.get()), Some(30000));

    // Deleting frees the VIP for reuse.
    assert!(
        delete_service(&*store, &Namespace::default(), &Name::new("a").unwrap())
            .await
            .unwrap()
    );
    assert!(
        !delete_service(&*store, &Namespace::default(), &Name::new("a").unwrap())
            .await
            .unwrap()
    );
    let h = create_service(&*store, &c, svc("h", ServiceType::ClusterIP, None), true)
        .await
        .unwrap();
    assert_eq!(h.vip, a.vip);
}

/// Two writers creating the same service at once: exactly one wins, and no
/// VIP is handed out twice.
async fn concurrent_create(store: Arc<dyn Store>) {
    let c = cfg();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (s, c) = (store.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let name = if i % 2 == 0 {
                "same".to_owned()
            } else {
                format!("other{i}")
            };
            create_service(&*s, &c, svc(&name, ServiceType::ClusterIP, None), true).await
        }));
    }
    let mut created = 0;
    let mut vips = std::collections::BTreeSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => {
                created += 1;
                assert!(vips.insert(s.vip.unwrap()), "VIP handed out twice");
            }
            Err(WriteError::AlreadyExists(_)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(created, 5, "one 'same' and four 'otherN'");
    let allocs = store
        .list(pier_model::keys::prefix::VIP_ALLOCS)
        .await
        .unwrap();
    assert_eq!(allocs.kvs.len(), 5, "one VIP allocation per service");
}

#[tokio::test]
async fn embedded_allocation_rules() {
    let dir = tempfile::tempdir().unwrap();
    allocation_rules(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
}

#[tokio::test]
async fn etcd_allocation_rules() {
    let etcd = EtcdServer::start().unwrap();
    allocation_rules(Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_concurrent_create_never_doubles() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_create(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_concurrent_create_never_doubles() {
    let etcd = EtcdServer::start().unwrap();
    concurrent_create(Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    ))
    .await;
}

/// Attack (P1): a service asks for a node port outside the range (:22,
/// :80 on every host) or a VIP outside the service CIDR (any address, or
/// the DNS VIP). Refused at the one place services are written, naming
/// the field; nothing is stored.
#[tokio::test]
async fn attack_explicit_node_ports_and_vips_outside_their_ranges_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let c = cfg();
    for port in [22u16, 80, 29999, 30003, 65535] {
        let e = create_service(
            &*store,
            &c,
            svc("np", ServiceType::NodePort, Some(port)),
            true,
        )
        .await
        .unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(e, WriteError::Invalid(_))
                && m.contains("ports[0].node_port")
                && m.contains(&port.to_string())
                && m.contains("30000-30002"),
            "{m}"
        );
    }
    for vip in [
        "10.214.0.5",
        "127.0.0.1",
        "10.213.0.0",
        "10.213.0.10",
        "10.213.0.255",
    ] {
        let mut s = svc("v", ServiceType::ClusterIP, None);
        s.vip = Some(vip.parse().unwrap());
        let e = create_service(&*store, &c, s, true).await.unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(e, WriteError::Invalid(_)) && m.starts_with("vip: ") && m.contains(vip),
            "{m}"
        );
    }
    assert!(store.list("").await.unwrap().kvs.is_empty());
    // In range, both are taken as asked.
    let mut s = svc("ok", ServiceType::NodePort, Some(30002));
    s.vip = Some("10.213.0.200".parse().unwrap());
    let made = create_service(&*store, &c, s, true).await.unwrap();
    assert_eq!(made.vip, Some("10.213.0.200".parse().unwrap()));
    assert_eq!(made.ports[0].node_port.map(|p| p.get()), Some(30002));
    // An update cannot move a node port out of the range either.
    let kv = store
        .get(&pier_model::keys::service(&made.namespace, &made.name))
        .await
        .unwrap()
        .unwrap();
    let mut moved = made.clone();
    moved.ports[0].node_port = Some(PortNum::new(80).unwrap());
    let e = update_service(&*store, &c, kv.mod_revision, moved)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ports[0].node_port: 80"), "{e}");
}

/// Endpoint VIPs share the service VIPs' keys: never one address twice,
/// held under the claimer's lease (gone with it), found again by node; a
/// headless service claims no VIP and refuses a VIP or node ports.
async fn endpoint_addrs_and_headless(store: Arc<dyn Store>) {
    use pier_store::writes::{claim_endpoint_addr, endpoint_addrs_of};
    let c = cfg();
    let n = |s: &str| Name::new(s).unwrap();
    let ns = Namespace::default();
    let lease = store
        .lease_grant(pier_store::Ttl::from_secs(30).unwrap())
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..20 {
        let ip = claim_endpoint_addr(
            &*store,
            &c,
            &ns,
            &n("db"),
            &n("h1"),
            &n(&format!("e{i}")),
            lease,
        )
        .await
        .unwrap();
        assert!(c.service_cidr.contains(ip), "{ip}");
        assert!(seen.insert(ip), "endpoint VIP {ip} handed out twice");
    }
    // A service's VIP avoids every claimed endpoint VIP.
    let s = create_service(&*store, &c, svc("web", ServiceType::ClusterIP, None), true)
        .await
        .unwrap();
    assert!(!seen.contains(&s.vip.unwrap()));
    // A successor finds its node's claims, each under the endpoint's key.
    let mine = endpoint_addrs_of(&*store, &n("h1")).await.unwrap();
    assert_eq!(mine.len(), 20);
    assert!(mine.iter().all(|(k, ip, kv)| seen.contains(ip)
        && k.contains("/endpoints/default/db/h1/e")
        && kv.lease == Some(lease)));
    assert!(
        endpoint_addrs_of(&*store, &n("h2"))
            .await
            .unwrap()
            .is_empty()
    );
    // Deleting the service does not touch endpoint VIPs.
    delete_service(&*store, &ns, &n("web")).await.unwrap();
    assert_eq!(
        endpoint_addrs_of(&*store, &n("h1")).await.unwrap().len(),
        20
    );
    // The lease takes them.
    store.lease_revoke(lease).await.unwrap();
    assert!(
        endpoint_addrs_of(&*store, &n("h1"))
            .await
            .unwrap()
            .is_empty()
    );

    // Headless: no VIP claimed; a VIP or node ports are refused.
    let mut h = svc("peers", ServiceType::ClusterIP, None);
    h.headless = true;
    let created = create_service(&*store, &c, h.clone(), true).await.unwrap();
    assert_eq!(created.vip, None);
    assert!(created.is_headless());
    let mut bad = h.clone();
    bad.name = n("peers2");
    bad.vip = Some("10.213.0.99".parse().unwrap());
    let e = create_service(&*store, &c, bad, true).await.unwrap_err();
    assert!(e.to_string().contains("headless"), "{e}");
    let mut bad = h.clone();
    bad.name = n("peers3");
    bad.service_type = ServiceType::NodePort;
    let e = create_service(&*store, &c, bad, true).await.unwrap_err();
    assert!(e.to_string().contains("no node ports"), "{e}");
}

#[tokio::test]
async fn embedded_endpoint_addrs_and_headless() {
    let dir = tempfile::tempdir().unwrap();
    endpoint_addrs_and_headless(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
}

#[tokio::test]
async fn etcd_endpoint_addrs_and_headless() {
    let etcd = EtcdServer::start().unwrap();
    endpoint_addrs_and_headless(Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    ))
    .await;
}

fn cfg6() -> AllocConfig {
    AllocConfig {
        service_cidr6: Some("fd5e:1:2:3::/124".parse().unwrap()),
        ..cfg()
    }
}

/// Dual stack: with an IPv6 service CIDR every service given a VIP gets an
/// IPv6 VIP too, from the same rules (skip ::0-::a, never twice, the
/// range runs out with an error naming it), claimed in the same txn and
/// freed with the service; an explicit vip6 is checked like a vip, and a
/// headless or ExternalName service gets none.
async fn dual_stack_vips(store: Arc<dyn Store>) {
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    let c = cfg6();
    let a = create_service(&*store, &c, svc("a", ServiceType::ClusterIP, None), true)
        .await
        .unwrap();
    assert_eq!(a.vip, Some("10.213.0.11".parse().unwrap()));
    assert_eq!(a.vip6, Some("fd5e:1:2:3::b".parse().unwrap()));
    let mut s = svc("b", ServiceType::ClusterIP, None);
    s.vip6 = Some("fd5e:1:2:3::e".parse().unwrap());
    let b = create_service(&*store, &c, s, true).await.unwrap();
    assert_eq!(b.vip6, Some("fd5e:1:2:3::e".parse().unwrap()));
    // Both families' claims are in the store.
    let used = pier_store::alloc::used_vips(&*store).await.unwrap();
    let want: BTreeSet<IpAddr> = [
        "10.213.0.11",
        "10.213.0.12",
        "fd5e:1:2:3::b",
        "fd5e:1:2:3::e",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    assert_eq!(used, want);
    // Taken, or reserved, or outside the CIDR: refused, naming vip6.
    for (vip6, why) in [
        ("fd5e:1:2:3::e", "already in use"),
        ("fd5e:1:2:3::", "reserved"),
        ("fd5e:1:2:3::a", "reserved"),
        ("fd5e:1:2:3::f", "reserved"),
        ("fd5e:1:2:4::20", "outside"),
        ("::1", "outside"),
        ("::ffff:10.213.0.40", "outside"),
    ] {
        let mut s = svc("x", ServiceType::ClusterIP, None);
        s.vip6 = Some(vip6.parse().unwrap());
        let e = create_service(&*store, &c, s, true).await.unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("vip6") && m.contains(why), "{vip6}: {m}");
    }
    // Without an IPv6 service CIDR, an explicit vip6 is refused with what to set.
    let mut s = svc("x", ServiceType::ClusterIP, None);
    s.vip6 = Some("fd5e:1:2:3::c".parse().unwrap());
    let e = create_service(&*store, &cfg(), s, true).await.unwrap_err();
    assert!(e.to_string().contains("service_cidr6"), "{e}");
    // A headless service gets neither, and may not ask for a vip6.
    let mut h = svc("h", ServiceType::ClusterIP, None);
    h.headless = true;
    let hs = create_service(&*store, &c, h.clone(), true).await.unwrap();
    assert_eq!((hs.vip, hs.vip6), (None, None));
    h.name = Name::new("h2").unwrap();
    h.vip6 = Some("fd5e:1:2:3::c".parse().unwrap());
    let e = create_service(&*store, &c, h, true).await.unwrap_err();
    assert!(e.to_string().contains("headless"), "{e}");
    // An update that leaves vip6 out keeps it; another one is refused.
    let key = pier_model::keys::service(&a.namespace, &a.name);
    let rev = store.get(&key).await.unwrap().unwrap().mod_revision;
    let mut a2 = a.clone();
    a2.vip6 = None;
    a2.prefer_local = true;
    let a3 = update_service(&*store, &c, rev, a2).await.unwrap();
    assert_eq!(a3.vip6, a.vip6);
    let rev = store.get(&key).await.unwrap().unwrap().mod_revision;
    let mut a4 = a3.clone();
    a4.vip6 = Some("fd5e:1:2:3::c".parse().unwrap());
    let e = update_service(&*store, &c, rev, a4).await.unwrap_err();
    assert!(e.to_string().starts_with("vip6: "), "{e}");
    // The /124 has ::b-::e; ::b and ::e are taken: two more, then exhausted.
    for n in ["c", "d"] {
        let s = create_service(&*store, &c, svc(n, ServiceType::ClusterIP, None), true)
            .await
            .unwrap();
        assert!(s.vip6.is_some(), "{s:?}");
    }
    let e = create_service(&*store, &c, svc("full", ServiceType::ClusterIP, None), true)
        .await
        .unwrap_err();
    assert!(
        matches!(e, WriteError::Exhausted(_)) && e.to_string().contains("IPv6"),
        "{e}"
    );
    // Deleting frees both addresses.
    assert!(
        delete_service(&*store, &a.namespace, &a.name)
            .await
            .unwrap()
    );
    let used = pier_store::alloc::used_vips(&*store).await.unwrap();
    assert!(
        !used.contains(&a.vip.unwrap()) && !used.contains(&a.vip6.unwrap()),
        "{used:?}"
    );
    let again = create_service(&*store, &c, svc("a", ServiceType::ClusterIP, None), true)
        .await
        .unwrap();
    assert_eq!(again.vip6, a.vip6);
}

#[tokio::test]
async fn embedded_dual_stack_vips() {
    let dir = tempfile::tempdir().unwrap();
    dual_stack_vips(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
}

#[tokio::test]
async fn etcd_dual_stack_vips() {
    let etcd = EtcdServer::start().unwrap();
    dual_stack_vips(Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    ))
    .await;
}
