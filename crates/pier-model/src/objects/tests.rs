use super::*;

use crate::names::{Name, Namespace, PortNum};

#[test]
fn port_specs_parse_with_protocols() {
    let p: PortSpec = "53/udp".parse().unwrap();
    assert_eq!(
        (p.name.clone(), p.port.get(), p.protocol),
        (None, 53, Protocol::Udp)
    );
    assert_eq!(p.name_or_default().as_str(), "p53-udp");
    let p: PortSpec = "dns:53/udp".parse().unwrap();
    assert_eq!(p.name.as_ref().unwrap().as_str(), "dns");
    assert_eq!(p.to_string(), "dns:53/udp");
    let p: PortSpec = "http:8080".parse().unwrap();
    assert_eq!((p.port.get(), p.protocol), (8080, Protocol::Tcp));
    assert_eq!(p.to_string(), "http:8080");
    assert_eq!(
        "8080/tcp"
            .parse::<PortSpec>()
            .unwrap()
            .name_or_default()
            .as_str(),
        "p8080"
    );
    for bad in ["53/sctp", "0/udp", "x:70000", "Bad_Name:80", "udp", ""] {
        assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
    }
    let e = "53/sctp".parse::<PortSpec>().unwrap_err().to_string();
    assert!(e.contains("tcp or udp"), "{e}");
}

/// TCP stays out of the JSON (older readers, same template hashes);
/// UDP is written and read back.
#[test]
fn protocol_is_left_out_for_tcp() {
    let sp: ServicePort =
        serde_json::from_str(r#"{"name":"p","port":80,"target_port":80}"#).unwrap();
    assert_eq!(sp.protocol, Protocol::Tcp);
    assert!(!serde_json::to_string(&sp).unwrap().contains("protocol"));
    let sp = ServicePort {
        protocol: Protocol::Udp,
        ..sp
    };
    let j = serde_json::to_string(&sp).unwrap();
    assert!(j.contains(r#""protocol":"udp""#), "{j}");
    assert_eq!(serde_json::from_str::<ServicePort>(&j).unwrap(), sp);
}

#[test]
fn service_ports_share_a_number_across_protocols_only() {
    let port = |name: &str, n: u16, protocol| ServicePort {
        name: Name::new(name).unwrap(),
        port: PortNum::new(n).unwrap(),
        target_port: PortNum::new(n).unwrap(),
        node_port: None,
        protocol,
    };
    let mut s = Service::new(
        Namespace::default(),
        Name::new("dns").unwrap(),
        vec![
            port("dns", 53, Protocol::Udp),
            port("dns-tcp", 53, Protocol::Tcp),
        ],
    );
    s.check_ports().unwrap();
    s.ports.push(port("again", 53, Protocol::Udp));
    let e = s.check_ports().unwrap_err();
    assert!(e.starts_with("ports[2]") && e.contains("53/udp"), "{e}");
    s.ports[2] = port("dns", 54, Protocol::Tcp);
    let e = s.check_ports().unwrap_err();
    assert!(e.contains("ports[2].name"), "{e}");
    s.ports.pop();
    s.session_affinity = Some(SessionAffinity {
        kind: AffinityKind::ClientIP,
        timeout_s: 0,
    });
    let e = s.check_ports().unwrap_err();
    assert!(e.contains("session_affinity.timeout_s"), "{e}");
}

/// An endpoint's unnamed ports match a service port by number and
/// protocol: TCP 53 is not UDP 53.
#[test]
fn endpoint_ports_match_by_protocol() {
    let ep: Endpoint = serde_json::from_str(
        r#"{"service":"d","node":"n","id":"x","ip":"10.0.0.2","ready":true,
           "ports":[{"name":"a","port":53},{"name":"b","port":53,"protocol":"udp"}]}"#,
    )
    .unwrap();
    let sp: ServicePort =
        serde_json::from_str(r#"{"name":"z","port":53,"target_port":53,"protocol":"udp"}"#)
            .unwrap();
    assert_eq!(ep.port_for(&sp).map(|p| p.get()), Some(53));
    let ep2 = Endpoint {
        ports: vec![ep.ports[0].clone()],
        ..ep.clone()
    };
    assert_eq!(ep2.port_for(&sp), None, "a TCP port does not serve UDP");
}

#[test]
fn health_kinds_parse() {
    assert_eq!("tcp".parse::<HealthKind>().unwrap(), HealthKind::Tcp);
    assert_eq!(
        "http:/healthz".parse::<HealthKind>().unwrap(),
        HealthKind::Http {
            path: "/healthz".into()
        }
    );
    let e = "grpc".parse::<HealthKind>().unwrap_err().to_string();
    assert!(e.contains("grpc") && e.contains("tcp"), "{e}");
    assert!("http:healthz".parse::<HealthKind>().is_err());
}

#[test]
fn template_hash_is_stable() {
    let t = PodTemplate {
        image: "busybox".into(),
        ..Default::default()
    };
    assert_eq!(t.hash(), t.clone().hash());
    let mut t2 = t.clone();
    t2.env.insert("A".into(), "1".into());
    assert_ne!(t.hash(), t2.hash());
}

#[test]
fn sla_fills_defaults_and_old_replica_sets_read() {
    let sla: Sla = serde_json::from_str(r#"{"max_active_per_pod":5}"#).unwrap();
    assert_eq!(sla.max_active_per_pod, Some(5));
    assert_eq!(sla.scale_down_window_ms, Sla::DEFAULT_SCALE_DOWN_WINDOW_MS);
    assert_eq!(sla.tolerance_pct, 10);
    assert!(sla.has_target() && !Sla::default().has_target());
    let rs: ReplicaSet = serde_json::from_str(
        r#"{"name":"web","template":{"image":"busybox"},"replicas":2,"min_replicas":1,"max_replicas":4}"#,
    )
    .unwrap();
    assert_eq!(rs.sla, None);
    assert!(rs.autoscale().is_none());
    // Unset, it is left out, so that an older agent still reads it.
    assert!(
        !String::from_utf8(crate::encode(&rs))
            .unwrap()
            .contains("sla")
    );
}

#[test]
fn stats_written_on_real_change_or_refresh_only() {
    let base = Stats {
        active: 20,
        new_conns: 100,
        window_ms: 1000,
        at: 1_000,
        ..Default::default()
    };
    assert!(base.worth_writing(None));
    let same = |f: &dyn Fn(&mut Stats)| {
        let mut s = base.clone();
        s.at += 1000;
        f(&mut s);
        s.worth_writing(Some(&base))
    };
    assert!(!same(&|_| {}));
    assert!(!same(&|s| s.active = 21), "under 10% of 20");
    assert!(same(&|s| s.active = 22));
    assert!(!same(&|s| s.new_conns = 115), "under 20% of 100/s");
    assert!(same(&|s| s.new_conns = 120));
    assert!(same(&|s| s.at = 1_000 + STATS_REFRESH_MS));
    // Small counts: a change of 2 counts.
    let one = Stats {
        active: 1,
        at: 1,
        ..Default::default()
    };
    let two = Stats {
        active: 2,
        at: 2,
        ..Default::default()
    };
    assert!(
        !two.worth_writing(Some(&one)),
        "0 and 1 alternate under short connections"
    );
    let three = Stats {
        active: 3,
        at: 2,
        ..Default::default()
    };
    assert!(three.worth_writing(Some(&one)));
    // Going idle is written once, then nothing.
    let idle = Stats {
        at: 3,
        ..Default::default()
    };
    assert!(idle.worth_writing(Some(&one)));
    let later = Stats {
        at: 3 + 10 * STATS_REFRESH_MS,
        ..Default::default()
    };
    assert!(!later.worth_writing(Some(&idle)));
}

/// A newer agent's record, with a field this version does not know, still
/// decodes from the store (an older agent must not drop the node during a
/// rolling upgrade); the same text as a person's input is refused, naming
/// the field.
#[test]
fn unknown_fields_pass_in_records_and_fail_in_input() {
    let text = r#"{"name":"a","addr":"10.0.0.1","bogus":1}"#;
    let node: Node = crate::decode("/pier/v1/nodes/a", text.as_bytes()).unwrap();
    assert_eq!(node.name.as_str(), "a");

    let e = crate::deserialize_strict::<_, Node>(&mut serde_json::Deserializer::from_str(text))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("unknown field `bogus`"), "{e}");

    // Nested, and more than one: every path is named.
    let rs = r#"{"namespace":"default","name":"web","replicas":1,
        "template":{"image":"nginx","imagee":"x"},"colour":"red"}"#;
    let e = crate::deserialize_strict::<_, ReplicaSet>(&mut serde_json::Deserializer::from_str(rs))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`template.imagee`") && e.contains("`colour`"),
        "{e}"
    );
    // A type error is still serde's own.
    let bad = r#"{"name":"a","addr":"not an address"}"#;
    let e = crate::deserialize_strict::<_, Node>(&mut serde_json::Deserializer::from_str(bad))
        .unwrap_err();
    assert!(matches!(e, crate::StrictError::Invalid(_)), "{e}");
}
