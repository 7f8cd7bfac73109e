use super::network::net;
use super::pod::{dns_search_for, image_in_registry};
use super::*;
use pier_model::Cidr;

#[test]
fn rfc3339() {
    assert_eq!(parse_rfc3339_ms("1970-01-02T00:00:00Z"), None);
    assert_eq!(
        parse_rfc3339_ms("2026-11-25T22:40:44.123456789Z"),
        Some(1_795_646_444_123)
    );
    assert_eq!(
        parse_rfc3339_ms("2026-11-25T23:40:44+01:00"),
        Some(1_795_646_444_000)
    );
    assert_eq!(parse_rfc3339_ms("0001-01-01T00:00:00Z"), None);
}

#[test]
fn dns_search_gets_the_namespace() {
    let base = vec![
        "default.svc.pier.internal".to_owned(),
        "svc.pier.internal".to_owned(),
    ];
    assert_eq!(
        dns_search_for("prod", &base),
        vec!["prod.svc.pier.internal", "svc.pier.internal"]
    );
}

#[test]
fn registry_prefix() {
    assert_eq!(
        image_in_registry("web:1", "reg.local:5000"),
        "reg.local:5000/web:1"
    );
    assert_eq!(
        image_in_registry("reg.x/web:1", "reg.local:5000"),
        "reg.x/web:1"
    );
}

/// Issue 12 (D1): a macvlan or ipvlan network's subnet is usually the
/// LAN, so the DNS ACL does not take it in; a bridge's subnet it does.
/// (This kernel cannot create such networks, so the driver is judged
/// as dockerd reports it.)
#[test]
fn lan_driver_networks_are_not_trusted() {
    let ipam = bollard::models::Ipam {
        config: Some(vec![bollard::models::IpamConfig {
            subnet: Some("192.168.1.0/24".into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    for driver in ["macvlan", "ipvlan"] {
        let n = net(Some(driver), Some(&ipam));
        assert!(n.subnets.is_empty(), "{driver}: {n:?}");
        assert_eq!(n.lan_driver.as_deref(), Some(driver));
    }
    for driver in [Some("bridge"), Some("overlay"), None] {
        let n = net(driver, Some(&ipam));
        assert_eq!(n.subnets, vec!["192.168.1.0/24".parse::<Cidr>().unwrap()]);
        assert_eq!(n.lan_driver, None);
    }
    let all: HashMap<String, Net> = [
        ("a".to_owned(), net(Some("bridge"), Some(&ipam))),
        ("b".to_owned(), net(Some("macvlan"), Some(&ipam))),
    ]
    .into();
    assert_eq!(all_subnets(&all).len(), 1);
}

/// A container's address: per network (the pod network first), its IPv4
/// address, else its IPv6 one; a dual-stack network (Docker 20.10's
/// `--ipv6`) gives the IPv4 one, an IPv6-only network (Docker 26's
/// `--ipv4=false`) the IPv6 one.
#[test]
fn container_address_falls_back_to_ipv6() {
    let inspect = |nets: serde_json::Value| -> bollard::models::ContainerInspectResponse {
        serde_json::from_value(serde_json::json!({
            "Id": "0123456789abcdef",
            "Name": "/c",
            "State": {"Running": true},
            "NetworkSettings": {"Networks": nets},
        }))
        .expect("inspect")
    };
    let host: IpAddr = "192.0.2.1".parse().unwrap();
    let ip = |nets, pod: Option<&str>| from_inspect(inspect(nets), pod, host).unwrap().ip;
    let v6only = serde_json::json!({"IPAddress": "", "GlobalIPv6Address": "fd5e:7e57:1::2"});
    let dual =
        serde_json::json!({"IPAddress": "172.18.0.2", "GlobalIPv6Address": "fd5e:7e57:2::2"});
    let v4 = serde_json::json!({"IPAddress": "172.19.0.3", "GlobalIPv6Address": ""});
    assert_eq!(
        ip(serde_json::json!({"six": v6only}), None),
        Some("fd5e:7e57:1::2".parse().unwrap())
    );
    assert_eq!(
        ip(serde_json::json!({"both": dual}), None),
        Some("172.18.0.2".parse().unwrap())
    );
    // The pod network first, whichever family it has.
    assert_eq!(
        ip(
            serde_json::json!({"a": v4.clone(), "six": v6only.clone()}),
            Some("six")
        ),
        Some("fd5e:7e57:1::2".parse().unwrap())
    );
    assert_eq!(
        ip(serde_json::json!({"a": v4, "six": v6only}), None),
        Some("172.19.0.3".parse().unwrap())
    );
    // No address at all: none (not the host's, unless host networking).
    assert_eq!(
        ip(
            serde_json::json!({"n": {"IPAddress": "", "GlobalIPv6Address": ""}}),
            None
        ),
        None
    );
}
