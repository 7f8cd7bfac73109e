//! The zone's tests: lookups, and the property that an update equals a build.

use super::encode::*;
use super::update::*;
use super::*;
use pier_model::{Endpoint, EndpointPort, Name, Namespace, ObjectKey, PortNum, Service, Snapshot};
use std::collections::BTreeMap;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

fn params() -> ZoneParams {
    ZoneParams {
        domain: wire::wire_name("pier.internal").unwrap_or_else(|| vec![0]),
        vip_ttl: 30,
        headless_ttl: 1,
        pod_ttl: 2,
        negative_ttl: 3,
    }
}

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

/// Small pools so that names, pods and addresses collide: VIPs that are
/// also pod addresses, an address shared by pods of several services,
/// two endpoints with the same pod name, IPv6.
const IPS: &[&str] = &[
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "fd00::1",
    "172.16.0.1",
    "172.16.0.2",
    "172.16.0.3",
    "172.16.0.4",
    "172.16.0.5",
    "fd01::5",
];

fn ip(r: &mut Rng) -> IpAddr {
    r.pick(IPS).parse().expect("ip")
}

fn key(r: &mut Rng) -> ObjectKey {
    let ns = *r.pick(&["default", "a", "b"]);
    let n = *r.pick(&["s0", "s1", "s2", "s3", "s4", "s5"]);
    (Namespace::new(ns).expect("ns"), name(n))
}

fn service(r: &mut Rng, k: &ObjectKey) -> Service {
    let vip = if r.below(4) == 0 { None } else { Some(ip(r)) };
    let mut ports = Vec::new();
    for _ in 0..r.below(3) {
        let n = *r.pick(&["http", "grpc", "http"]);
        let tp = *r.pick(&[8080u16, 9090]);
        ports.push(serde_json::json!({"name": n, "port": 80, "target_port": tp}));
    }
    // Dual stack now and then: an IPv6 VIP beside the IPv4 one.
    let vip6 = match vip {
        Some(_) if r.below(3) == 0 => Some(*r.pick(&["fd5e::b", "fd5e::c"])),
        _ => None,
    };
    serde_json::from_value(serde_json::json!({
        "name": k.1, "namespace": k.0, "vip": vip, "vip6": vip6, "ports": ports,
    }))
    .expect("service")
}

fn endpoint(r: &mut Rng, k: &ObjectKey, node: &Name, id: &Name) -> Endpoint {
    let ports = match r.below(3) {
        0 => vec![],
        1 => vec![EndpointPort {
            name: name("http"),
            port: PortNum::new(8080).expect("port"),
            protocol: Default::default(),
        }],
        _ => vec![EndpointPort {
            name: name("metrics"),
            port: PortNum::new(9090).expect("port"),
            protocol: Default::default(),
        }],
    };
    Endpoint {
        service: k.1.clone(),
        namespace: k.0.clone(),
        node: node.clone(),
        id: id.clone(),
        pod: if r.below(3) == 0 {
            None
        } else {
            Some(name(r.pick::<&str>(&["p0", "p1", "p2"])))
        },
        hostname: None,
        ip: ip(r),
        ports,
        ready: r.below(4) != 0,
        is_static: false,
        addr: if r.below(5) == 0 { None } else { Some(ip(r)) },
    }
}

/// One random change, copy-on-write as the reflector makes it.
fn mutate(r: &mut Rng, s: &mut Snapshot) {
    match r.below(9) {
        0 | 1 => {
            let k = key(r);
            let svc = service(r, &k);
            s.services.insert(k, Arc::new(svc));
        }
        2 => {
            let k = key(r);
            s.services.remove(&k);
        }
        3 | 4 => {
            // Endpoints of any key, also of services that do not exist.
            let k = key(r);
            let node = name(r.pick::<&str>(&["n1", "n2"]));
            let id = name(r.pick::<&str>(&["c0", "c1", "c2", "c3"]));
            let e = endpoint(r, &k, &node, &id);
            let m = s.endpoints.entry(k).or_default();
            Arc::make_mut(m).insert((node, id), Arc::new(e));
        }
        5 => {
            // Flip readiness of an existing endpoint.
            let keys: Vec<ObjectKey> = s.endpoints.keys().cloned().collect();
            if keys.is_empty() {
                return;
            }
            let k = r.pick(&keys).clone();
            let eps = &mut s.endpoints;
            if let Some(m) = eps.get_mut(&k) {
                let ek: Vec<_> = m.keys().cloned().collect();
                if ek.is_empty() {
                    return;
                }
                let ek = r.pick(&ek).clone();
                let m = Arc::make_mut(m);
                if let Some(e) = m.get_mut(&ek) {
                    Arc::make_mut(e).ready ^= true;
                }
            }
        }
        6 => {
            // Remove one endpoint, or a service's whole map.
            let keys: Vec<ObjectKey> = s.endpoints.keys().cloned().collect();
            if keys.is_empty() {
                return;
            }
            let k = r.pick(&keys).clone();
            let eps = &mut s.endpoints;
            if r.below(3) == 0 {
                eps.remove(&k);
            } else if let Some(m) = eps.get_mut(&k) {
                let ek: Vec<_> = m.keys().cloned().collect();
                if let Some(first) = ek.first() {
                    Arc::make_mut(m).remove(first);
                }
            }
        }
        7 => {
            // A new Arc with the same content: changed by pointer only.
            let keys: Vec<ObjectKey> = s.services.keys().cloned().collect();
            if keys.is_empty() {
                return;
            }
            let k = r.pick(&keys).clone();
            let svcs = &mut s.services;
            if let Some(v) = svcs.get_mut(&k) {
                *v = Arc::new((**v).clone());
            }
            if let Some(m) = s.endpoints.get_mut(&k) {
                *m = Arc::new((**m).clone());
            }
        }
        _ => {
            // Only the VIP changes (or the service becomes headless).
            let keys: Vec<ObjectKey> = s.services.keys().cloned().collect();
            if keys.is_empty() {
                return;
            }
            let k = r.pick(&keys).clone();
            let vip = if r.below(3) == 0 { None } else { Some(ip(r)) };
            if let Some(v) = s.services.get_mut(&k) {
                Arc::make_mut(v).vip = vip;
            }
        }
    }
}

fn diff(got: &Zone, want: &Zone) -> String {
    let mut out = String::new();
    for (k, v) in want.names.iter() {
        if got.names.get(k) != Some(v) {
            out += &format!(
                "{:?}: want {v:?} got {:?}\n",
                String::from_utf8_lossy(k),
                got.names.get(k)
            );
        }
    }
    for (k, v) in got.names.iter() {
        if want.names.get(k).is_none() {
            out += &format!("{:?}: extra {v:?}\n", String::from_utf8_lossy(k));
        }
    }
    out
}

#[test]
fn incremental_updates_equal_full_rebuilds() {
    let mut stats = [0usize; 3];
    let mut shared_ptr = 0usize;
    for seed in 0..150u64 {
        let mut r = Rng(seed);
        let mut s = Snapshot::default();
        for _ in 0..r.below(12) {
            mutate(&mut r, &mut s);
        }
        let mut up = ZoneUpdater::new(Arc::new(s.clone()), params());
        for step in 0..40 {
            for _ in 0..1 + r.below(4) {
                mutate(&mut r, &mut s);
            }
            if r.below(5) != 0 {
                s.revision += 1;
            }
            let kind = up.update(Arc::new(s.clone()));
            stats[match kind {
                UpdateKind::Unchanged => 0,
                UpdateKind::Incremental { .. } => 1,
                UpdateKind::Full => 2,
            }] += 1;
            let want = build(&s, params());
            let got = up.zone();
            assert!(
                *got == want,
                "seed {seed} step {step} ({kind:?}):\n{}",
                diff(&got, &want)
            );
            assert_eq!(got.serial, want.serial);
            shared_ptr += want
                .names
                .iter()
                .filter(|(_, e)| e.types.iter().any(|(t, a)| *t == rtype::PTR && a.an > 1))
                .count();
        }
    }
    // The sequences did exercise the incremental path and PTR names
    // shared by several services.
    assert!(stats[1] > 4000, "{stats:?}");
    assert!(shared_ptr > 1000, "{shared_ptr}");
}

#[test]
fn many_changes_fall_back_to_a_full_build_and_agree() {
    let mut r = Rng(7);
    let mut s = Snapshot::default();
    let mut svcs = BTreeMap::new();
    for i in 0..400 {
        let k = (Namespace::default(), name(&format!("m{i}")));
        svcs.insert(k.clone(), Arc::new(service(&mut r, &k)));
    }
    s.services = pier_model::Map::from(svcs);
    let mut up = ZoneUpdater::new(Arc::new(s.clone()), params());
    // One change: incremental.
    let k = (Namespace::default(), name("m3"));
    s.services.insert(k.clone(), Arc::new(service(&mut r, &k)));
    s.revision = 2;
    assert_eq!(
        up.update(Arc::new(s.clone())),
        UpdateKind::Incremental { services: 1 }
    );
    assert!(*up.zone() == build(&s, params()));
    // Half of them: full.
    for i in 0..200 {
        let k = (Namespace::default(), name(&format!("m{i}")));
        s.services.remove(&k);
    }
    s.revision = 3;
    assert_eq!(up.update(Arc::new(s.clone())), UpdateKind::Full);
    assert!(*up.zone() == build(&s, params()));
    // Nothing but the revision: the SOA serial follows.
    s.revision = 4;
    assert_eq!(up.update(Arc::new(s.clone())), UpdateKind::Unchanged);
    let z = up.zone();
    assert!(*z == build(&s, params()));
    assert_eq!(z.serial, 4);
}

#[test]
fn an_update_copies_only_the_shards_it_touches() {
    let mut r = Rng(11);
    let mut s = Snapshot::default();
    let mut svcs = BTreeMap::new();
    for i in 0..6000 {
        let k = (Namespace::default(), name(&format!("m{i}")));
        svcs.insert(k.clone(), Arc::new(service(&mut r, &k)));
    }
    s.services = pier_model::Map::from(svcs);
    let mut up = ZoneUpdater::new(Arc::new(s.clone()), params());
    let before = up.zone();
    let k = (Namespace::default(), name("m5"));
    let mut svc = service(&mut r, &k);
    svc.vip = Some("10.200.0.9".parse().expect("ip"));
    s.services.insert(k, Arc::new(svc));
    s.revision = 9;
    up.update(Arc::new(s.clone()));
    let after = up.zone();
    assert!(*after == build(&s, params()));
    let copied = before
        .names
        .shards
        .iter()
        .zip(after.names.shards.iter())
        .filter(|(a, b)| !Arc::ptr_eq(a, b))
        .count();
    assert!(
        before.names.shard_count() >= 32,
        "{}",
        before.names.shard_count()
    );
    // The service's names, two reverse names and the SOA: a handful.
    assert!((1..=8).contains(&copied), "{copied} shards copied");
}

/// The A records' addresses at `qname`, decoded from the pre-encoded
/// answer (each record ends with its 4 address bytes).
fn a_addrs(z: &Zone, qname: &str) -> Vec<std::net::IpAddr> {
    let n = wire::wire_name(qname).expect("name");
    match z.lookup(&n, rtype::A) {
        Lookup::Answer(a) => {
            // Owner (2-byte pointer), type, class, TTL, rdlength: 12 bytes,
            // then the address.
            a.body
                .chunks(16)
                .map(|r| std::net::IpAddr::from([r[12], r[13], r[14], r[15]]))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Pod names and a headless service's name answer the endpoint VIP (what
/// every host's proxy serves), never the bridge address, and a pod
/// endpoint without one yet is left out.
#[test]
fn pod_names_and_headless_answer_endpoint_vips() {
    let k = (Namespace::default(), name("db"));
    let mut svc: Service = serde_json::from_value(serde_json::json!({
        "name": "db", "headless": true,
        "ports": [{"name": "pg", "port": 5432, "target_port": 5432}],
    }))
    .expect("service");
    svc.vip = None;
    let ep = |id: &str, ip: &str, addr: Option<&str>| Endpoint {
        service: name("db"),
        namespace: Namespace::default(),
        node: name("n1"),
        id: name(id),
        pod: Some(name(id)),
        hostname: None,
        ip: ip.parse().expect("ip"),
        ports: vec![EndpointPort {
            name: name("pg"),
            port: PortNum::new(5432).expect("port"),
            protocol: Default::default(),
        }],
        ready: true,
        is_static: false,
        addr: addr.map(|a| a.parse().expect("ip")),
    };
    let mut m = pier_model::EndpointMap::new();
    for e in [
        ep("db-a", "172.30.0.2", Some("10.213.0.40")),
        ep("db-b", "172.30.0.3", Some("10.213.0.41")),
        ep("db-c", "172.30.0.4", None),
    ] {
        m.insert((e.node.clone(), e.id.clone()), Arc::new(e));
    }
    let s = Snapshot {
        services: pier_model::Map::from(BTreeMap::from([(k.clone(), Arc::new(svc))])),
        endpoints: pier_model::Map::from(BTreeMap::from([(k, Arc::new(m))])),
        ..Snapshot::default()
    };
    let z = build(&s, params());
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("ip") };
    let mut all = a_addrs(&z, "db.default.svc.pier.internal");
    all.sort();
    assert_eq!(all, [ip("10.213.0.40"), ip("10.213.0.41")]);
    assert_eq!(
        a_addrs(&z, "db-a.db.default.svc.pier.internal"),
        [ip("10.213.0.40")]
    );
    assert!(a_addrs(&z, "db-c.db.default.svc.pier.internal").is_empty());
    let srv = wire::wire_name("_pg._tcp.db.default.svc.pier.internal").expect("name");
    match z.lookup(&srv, rtype::SRV) {
        Lookup::Answer(a) => assert_eq!((a.an, a.ar), (2, 2)),
        other => panic!("SRV: {other:?}"),
    }
}

/// Dual stack: a service with an IPv6 VIP answers A with its IPv4 VIP and
/// AAAA with its IPv6 one, with a PTR at each; an IPv4-only service's name
/// has no AAAA (NODATA, not NXDOMAIN, so a resolver goes on to A).
#[test]
fn a_dual_stack_service_answers_aaaa_with_its_ipv6_vip() {
    let svc = |n: &str, vip: &str, vip6: Option<&str>| -> Service {
        serde_json::from_value(serde_json::json!({
            "name": n, "vip": vip, "vip6": vip6,
            "ports": [{"name": "http", "port": 80, "target_port": 8080}],
        }))
        .expect("service")
    };
    let web = svc("web", "10.213.0.11", Some("fd5e:1:2:3::b"));
    let old = svc("old", "10.213.0.12", None);
    let services = [web, old]
        .into_iter()
        .map(|s| ((s.namespace.clone(), s.name.clone()), Arc::new(s)))
        .collect::<BTreeMap<_, _>>();
    let s = Snapshot {
        services: pier_model::Map::from(services),
        ..Snapshot::default()
    };
    let z = build(&s, params());
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("ip") };
    assert_eq!(
        a_addrs(&z, "web.default.svc.pier.internal"),
        [ip("10.213.0.11")]
    );
    let n = wire::wire_name("web.default.svc.pier.internal").expect("name");
    match z.lookup(&n, rtype::AAAA) {
        Lookup::Answer(a) => {
            assert_eq!(a.an, 1);
            // Owner pointer, type, class, TTL, rdlength (12 bytes), then
            // the 16 address bytes.
            let b: [u8; 16] = a.body[12..28].try_into().expect("16 bytes");
            assert_eq!(std::net::IpAddr::from(b), ip("fd5e:1:2:3::b"));
        }
        other => panic!("AAAA: {other:?}"),
    }
    let n = wire::wire_name("old.default.svc.pier.internal").expect("name");
    assert!(
        matches!(z.lookup(&n, rtype::AAAA), Lookup::NoData { soa: true }),
        "an IPv4-only service has no AAAA"
    );
    for vip in ["10.213.0.11", "fd5e:1:2:3::b"] {
        match z.lookup(&reverse_name(ip(vip)), rtype::PTR) {
            Lookup::Answer(a) => assert_eq!(a.an, 1, "{vip}"),
            other => panic!("PTR at {vip}: {other:?}"),
        }
    }
}
