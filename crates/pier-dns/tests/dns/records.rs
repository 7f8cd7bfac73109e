//! Each record kind, and how fast the answers follow the snapshot.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use crate::harness::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn vip_service_answers_its_vip_with_vip_ttl() -> Result<()> {
    let t = base_server().await?;
    let r = udp_query(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(ips(&r), vec![ip("10.96.0.10")]);
    assert_eq!(r.answers[0].ttl, 30);
    // The same name through dig, a second client implementation.
    let out = dig(t.addr, &["+short", "web.default.svc.pier.internal", "A"]).await?;
    assert_eq!(out.trim(), "10.96.0.10");
    Ok(())
}

#[tokio::test]
async fn v6_vip_is_aaaa_and_a_is_nodata() -> Result<()> {
    let t = base_server().await?;
    let r = udp_query(
        t.addr,
        &query_msg("v6svc.default.svc.pier.internal.", RecordType::AAAA, None),
    )
    .await?;
    assert_eq!(ips(&r), vec![ip("fd00::10")]);
    let r = udp_query(
        t.addr,
        &query_msg("v6svc.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities.len(), 1, "NODATA carries the SOA");
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    Ok(())
}

#[tokio::test]
async fn headless_service_answers_ready_endpoints_with_short_ttl() -> Result<()> {
    let t = base_server().await?;
    let r = udp_query(
        t.addr,
        &query_msg("db.prod.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(ips(&r), vec![ip("172.18.1.2"), ip("172.18.1.3")]);
    assert!(r.answers.iter().all(|a| a.ttl == 1));
    Ok(())
}

#[tokio::test]
async fn srv_lists_ready_endpoints_with_targets_in_additional() -> Result<()> {
    let t = base_server().await?;
    let r = udp_query(
        t.addr,
        &query_msg(
            "_http._tcp.web.default.svc.pier.internal.",
            RecordType::SRV,
            Some(1232),
        ),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let mut srv: Vec<(String, u16)> = r
        .answers
        .iter()
        .map(|a| match &a.data {
            RData::SRV(s) => (s.target.to_ascii(), s.port),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    srv.sort();
    // The unready web-3 is left out; ports are the endpoints' own.
    assert_eq!(
        srv,
        vec![
            ("web-1.web.default.svc.pier.internal.".to_string(), 8080),
            ("web-2.web.default.svc.pier.internal.".to_string(), 8081),
        ]
    );
    let mut glue: Vec<(String, IpAddr)> = r
        .additionals
        .iter()
        .filter_map(|a| a.data.ip_addr().map(|ip| (a.name.to_ascii(), ip)))
        .collect();
    glue.sort();
    assert_eq!(
        glue,
        vec![
            (
                "web-1.web.default.svc.pier.internal.".to_string(),
                ip("172.18.0.2")
            ),
            (
                "web-2.web.default.svc.pier.internal.".to_string(),
                ip("172.18.0.3")
            ),
        ]
    );
    // A second named port maps by name too.
    let r = udp_query(
        t.addr,
        &query_msg(
            "_admin._tcp.web.default.svc.pier.internal.",
            RecordType::SRV,
            None,
        ),
    )
    .await?;
    let mut ports: Vec<u16> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    ports.sort();
    assert_eq!(ports, vec![9100, 9101]);
    // Through dig as well.
    let out = dig(
        t.addr,
        &["+short", "_http._tcp.web.default.svc.pier.internal", "SRV"],
    )
    .await?;
    assert_eq!(out.lines().count(), 2, "{out}");
    Ok(())
}

#[tokio::test]
async fn pod_names_resolve_by_pod_or_container_id() -> Result<()> {
    let t = base_server().await?;
    let r = udp_query(
        t.addr,
        &query_msg("web-2.web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(ips(&r), vec![ip("172.18.0.3")]);
    // A container without a pod is named by its id.
    let r = udp_query(
        t.addr,
        &query_msg(
            "bbbbbbbbbbb2.db.prod.svc.pier.internal.",
            RecordType::A,
            None,
        ),
    )
    .await?;
    assert_eq!(ips(&r), vec![ip("172.18.1.3")]);
    // An unready endpoint has no name.
    let r = udp_query(
        t.addr,
        &query_msg("web-3.web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    Ok(())
}

#[tokio::test]
async fn ptr_for_vips_and_endpoint_ips() -> Result<()> {
    let t = base_server().await?;
    let ptr = |m: &hickory_proto::op::Message| -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect()
    };
    let r = udp_query(
        t.addr,
        &query_msg("10.0.96.10.in-addr.arpa.", RecordType::PTR, None),
    )
    .await?;
    assert_eq!(ptr(&r), vec!["web.default.svc.pier.internal."]);
    assert_eq!(r.answers[0].ttl, 30);
    let r = udp_query(
        t.addr,
        &query_msg("2.0.18.172.in-addr.arpa.", RecordType::PTR, None),
    )
    .await?;
    assert_eq!(ptr(&r), vec!["web-1.web.default.svc.pier.internal."]);
    let out = dig(t.addr, &["+short", "-x", "172.18.1.3"]).await?;
    assert_eq!(out.trim(), "bbbbbbbbbbb2.db.prod.svc.pier.internal.");
    let out = dig(t.addr, &["+short", "-x", "fd00::10"]).await?;
    assert_eq!(out.trim(), "v6svc.default.svc.pier.internal.");
    Ok(())
}

#[tokio::test]
async fn nxdomain_and_nodata_carry_soa_with_negative_ttl() -> Result<()> {
    let t = base_server().await?;
    let r = udp_query(
        t.addr,
        &query_msg(
            "nosuch.default.svc.pier.internal.",
            RecordType::A,
            Some(1232),
        ),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.metadata.authoritative);
    assert_eq!(r.authorities.len(), 1);
    let soa = &r.authorities[0];
    assert_eq!(soa.name.to_ascii(), "pier.internal.");
    assert_eq!(soa.ttl, 1);
    match &soa.data {
        RData::SOA(s) => {
            assert_eq!(s.minimum, 1);
            assert_eq!(s.serial, 7, "the SOA serial is the snapshot revision");
        }
        other => panic!("not SOA: {other:?}"),
    }
    assert!(r.edns.is_some(), "EDNS query gets an OPT back");
    // NODATA: the name exists without that type.
    let r = udp_query(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::TXT, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    // Empty non-terminals exist too.
    let r = udp_query(
        t.addr,
        &query_msg("default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    // The apex answers its SOA.
    let r = udp_query(t.addr, &query_msg("pier.internal.", RecordType::SOA, None)).await?;
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].record_type(), RecordType::SOA);
    Ok(())
}

#[tokio::test]
async fn ttls_follow_the_config() -> Result<()> {
    let (s, e) = base_snapshot();
    let cfg = pier_dns::DnsConfig {
        vip_ttl_secs: 77,
        headless_ttl_secs: 5,
        pod_ttl_secs: 6,
        negative_ttl_secs: 9,
        ..test_config()
    };
    let t = TestServer::start(cfg, snapshot(1, &s, &e)).await?;
    let r = udp_query(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.answers[0].ttl, 77);
    let r = udp_query(
        t.addr,
        &query_msg("db.prod.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.answers[0].ttl, 5);
    let r = udp_query(
        t.addr,
        &query_msg("db-0.db.prod.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.answers[0].ttl, 6);
    let r = udp_query(t.addr, &query_msg("x.pier.internal.", RecordType::A, None)).await?;
    assert_eq!(r.authorities[0].ttl, 9);
    Ok(())
}

#[tokio::test]
async fn new_service_resolves_within_1s_of_its_snapshot() -> Result<()> {
    let t = base_server().await?;
    let q = query_msg("late.default.svc.pier.internal.", RecordType::A, None);
    let r = udp_query(t.addr, &q).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    let (mut s, e) = base_snapshot();
    s.push(service(
        "default",
        "late",
        Some("10.96.0.99"),
        &[("http", 80)],
    ));
    t.publish(snapshot(8, &s, &e));
    let took = within(Duration::from_secs(1), || async {
        let r = udp_query(t.addr, &q).await?;
        Ok(ips(&r) == vec![ip("10.96.0.99")])
    })
    .await?;
    eprintln!("new service resolved after {took:?}");
    Ok(())
}

#[tokio::test]
async fn removed_endpoint_leaves_srv_and_headless_answers_within_1s() -> Result<()> {
    let t = base_server().await?;
    let (s, mut e) = base_snapshot();
    // web-1 and db's container-without-pod die.
    e.retain(|x| x.id.as_str() != "aaaaaaaaaaa1" && x.id.as_str() != "bbbbbbbbbbb2");
    t.publish(snapshot(9, &s, &e));
    let srv = query_msg(
        "_http._tcp.web.default.svc.pier.internal.",
        RecordType::SRV,
        None,
    );
    let headless = query_msg("db.prod.svc.pier.internal.", RecordType::A, None);
    within(Duration::from_secs(1), || async {
        let a = udp_query(t.addr, &srv).await?;
        let b = udp_query(t.addr, &headless).await?;
        Ok(a.answers.len() == 1 && ips(&b) == vec![ip("172.18.1.2")])
    })
    .await?;
    let a = udp_query(t.addr, &srv).await?;
    match &a.answers[0].data {
        RData::SRV(s) => assert_eq!(s.target.to_ascii(), "web-2.web.default.svc.pier.internal."),
        other => panic!("not SRV: {other:?}"),
    }
    let r = udp_query(
        t.addr,
        &query_msg("web-1.web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    // An endpoint going unready counts as leaving too.
    let (s, mut e) = base_snapshot();
    for x in e.iter_mut() {
        if x.id.as_str() == "bbbbbbbbbbb1" {
            x.ready = false;
        }
    }
    t.publish(snapshot(10, &s, &e));
    within(Duration::from_secs(1), || async {
        Ok(ips(&udp_query(t.addr, &headless).await?) == vec![ip("172.18.1.3")])
    })
    .await?;
    Ok(())
}

/// Copy-on-write snapshots, as the reflector publishes them: only the
/// changed service's `Arc`s are new, so the server updates only its names.
/// The PTRs must follow: the old VIP's and the unready pod's reverse names
/// go away, the new VIP's appears, the other services' stay.
#[tokio::test]
async fn incremental_update_moves_ptrs_with_the_vip_and_endpoints() -> Result<()> {
    let (s, e) = base_snapshot();
    let snap = snapshot(7, &s, &e);
    let t = TestServer::start(test_config(), snap.clone()).await?;
    let mut next = snap.clone();
    next.revision = 8;
    let web = (
        pier_model::Namespace::default(),
        pier_model::Name::new("web")?,
    );
    {
        let svcs = &mut next.services;
        let w = svcs.get_mut(&web).expect("web");
        std::sync::Arc::make_mut(w).vip = Some(ip("10.96.0.77"));
        let eps = &mut next.endpoints;
        let m = std::sync::Arc::make_mut(eps.get_mut(&web).expect("web endpoints"));
        for ep in m.values_mut() {
            if ep.id.as_str() == "aaaaaaaaaaa1" {
                std::sync::Arc::make_mut(ep).ready = false;
            }
        }
    }
    assert!(std::sync::Arc::ptr_eq(
        &snap.services[&(
            pier_model::Namespace::new("prod")?,
            pier_model::Name::new("db")?
        )],
        &next.services[&(
            pier_model::Namespace::new("prod")?,
            pier_model::Name::new("db")?
        )],
    ));
    t.publish(next);
    within(Duration::from_secs(1), || async {
        Ok(dig(t.addr, &["+short", "-x", "10.96.0.77"]).await?.trim()
            == "web.default.svc.pier.internal.")
    })
    .await?;
    // Reverse names the zone no longer has are not ours: forwarded, to the
    // test's dead upstream, hence SERVFAIL and no answer.
    for gone in ["10.0.96.10.in-addr.arpa.", "2.0.18.172.in-addr.arpa."] {
        let r = udp_query(t.addr, &query_msg(gone, RecordType::PTR, None)).await?;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{gone}");
        assert!(r.answers.is_empty(), "{gone}: {:?}", r.answers);
    }
    let r = udp_query(
        t.addr,
        &query_msg("web-1.web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    let r = udp_query(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(ips(&r), vec![ip("10.96.0.77")]);
    // Unchanged services answer as before.
    let out = dig(t.addr, &["+short", "-x", "172.18.1.3"]).await?;
    assert_eq!(out.trim(), "bbbbbbbbbbb2.db.prod.svc.pier.internal.");
    let out = dig(t.addr, &["+short", "-x", "fd00::10"]).await?;
    assert_eq!(out.trim(), "v6svc.default.svc.pier.internal.");
    Ok(())
}

/// A UDP port's SRV name is `_<port>._udp`; TCP and UDP share number 53
/// under two names, and neither protocol's name answers for the other.
#[tokio::test]
async fn udp_ports_have_udp_srv_names() -> Result<()> {
    let mut svc = service("default", "resolver", Some("10.96.0.53"), &[]);
    svc.ports = serde_json::from_value(serde_json::json!([
        {"name": "dns", "port": 53, "target_port": 53, "protocol": "udp"},
        {"name": "dns-tcp", "port": 53, "target_port": 53},
    ]))?;
    let mut ep = endpoint(
        &svc,
        "cccccccccc01",
        Some("resolver-1"),
        "172.18.2.2",
        &[("dns", 5353), ("dns-tcp", 5354)],
        true,
    );
    ep.ports[0].protocol = pier_model::Protocol::Udp;
    let t = TestServer::start(test_config(), snapshot(3, &[svc], &[ep])).await?;
    let srv = |r: &Message| -> Vec<(String, u16)> {
        r.answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::SRV(s) => Some((s.target.to_ascii(), s.port)),
                _ => None,
            })
            .collect()
    };
    let q = |n: &str| query_msg(n, RecordType::SRV, None);
    let r = udp_query(t.addr, &q("_dns._udp.resolver.default.svc.pier.internal.")).await?;
    assert_eq!(
        srv(&r),
        vec![(
            "resolver-1.resolver.default.svc.pier.internal.".to_string(),
            5353
        )]
    );
    let r = udp_query(
        t.addr,
        &q("_dns-tcp._tcp.resolver.default.svc.pier.internal."),
    )
    .await?;
    assert_eq!(
        srv(&r),
        vec![(
            "resolver-1.resolver.default.svc.pier.internal.".to_string(),
            5354
        )]
    );
    for wrong in [
        "_dns._tcp.resolver.default.svc.pier.internal.",
        "_dns-tcp._udp.resolver.default.svc.pier.internal.",
    ] {
        let r = udp_query(t.addr, &q(wrong)).await?;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{wrong}");
    }
    // Through dig as well.
    let out = dig(
        t.addr,
        &[
            "+short",
            "_dns._udp.resolver.default.svc.pier.internal",
            "SRV",
        ],
    )
    .await?;
    assert_eq!(
        out.trim(),
        "0 10 5353 resolver-1.resolver.default.svc.pier.internal.",
        "{out}"
    );
    Ok(())
}
