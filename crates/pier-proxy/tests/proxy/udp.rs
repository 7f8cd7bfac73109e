//! UDP service ports and session affinity over real loopback sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use pier_model::{Endpoint, Service};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use crate::common::*;

/// A UDP backend that answers each datagram with `id:` and the datagram.
async fn udp_backend(id: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a = s.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let mut out = format!("{id}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    (a, h)
}

fn udp_service(name: &str, vip: SocketAddr) -> Service {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vip": vip.ip(),
        "ports": [{"name": "dns", "port": vip.port(), "target_port": 53, "protocol": "udp"}],
        "lb": "round_robin",
    }))
    .unwrap()
}

fn udp_endpoint(svc: &Service, id: &str, addr: SocketAddr, ready: bool) -> Endpoint {
    let mut e = endpoint(svc, id, addr, ready);
    e.ports[0].name = pier_model::Name::new("dns").unwrap();
    e.ports[0].protocol = pier_model::Protocol::Udp;
    e
}

/// A client socket connected to `to` from `from_ip` (any 127/8 address is
/// this host's), so that only replies from `to` itself reach it.
async fn client(from_ip: Ipv4Addr, to: SocketAddr) -> UdpSocket {
    let c = UdpSocket::bind((from_ip, 0)).await.unwrap();
    c.connect(to).await.unwrap();
    c
}

/// Sends `msg` and waits up to 500 ms for the answer, resending while the
/// listener may still be starting; the answering backend's id.
async fn ask(c: &UdpSocket, msg: &str, tries: u32) -> Option<String> {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..tries {
        c.send(msg.as_bytes()).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), c.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let s = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (id, echoed) = s.split_once(':').expect("id:payload");
                assert_eq!(echoed, msg, "the datagram came back whole");
                return Some(id.to_owned());
            }
            Ok(Err(e)) => panic!("recv: {e}"),
            Err(_) => continue,
        }
    }
    None
}

/// Datagrams to the VIP reach an endpoint and the replies come back from
/// the VIP (the client's socket is connected to it). A client's datagrams
/// stay on one endpoint (its flow); another client may go elsewhere
/// (round robin over flows). TCP on the same number is another port.
#[tokio::test]
async fn udp_flows_reach_endpoints_and_answer_from_the_vip() {
    let (a, _ha) = udp_backend("a").await;
    let (b, _hb) = udp_backend("b").await;
    let vip = unique_vip();
    let svc = udp_service("dns", vip);
    let eps = [
        udp_endpoint(&svc, "ea", a, true),
        udp_endpoint(&svc, "eb", b, true),
    ];
    let p = start(test_config(), snapshot(&[(&svc, &eps)]));
    let c1 = client(Ipv4Addr::LOCALHOST, vip).await;
    let first = ask(&c1, "q0", 20).await.expect("an answer through the VIP");
    for i in 1..20 {
        assert_eq!(
            ask(&c1, &format!("q{i}"), 1).await.as_deref(),
            Some(first.as_str())
        );
    }
    // Round robin over new flows: the next client gets the other one.
    let c2 = client(Ipv4Addr::LOCALHOST, vip).await;
    let second = ask(&c2, "x", 2).await.unwrap();
    assert_ne!(first, second);
    // A large datagram passes whole.
    let big = "z".repeat(8000);
    assert_eq!(ask(&c1, &big, 2).await.as_deref(), Some(first.as_str()));
    // Nothing listens on TCP at the VIP's number: UDP only.
    assert!(TcpStream::connect(vip).await.is_err());
    let m = p.metrics_text();
    assert!(m.contains("port=\"dns\""), "{m}");
    p.stop().await;
}

/// No stale-conntrack blackhole: when a flow's endpoint leaves the
/// snapshot (its pod died: the agent deletes it) or stops being ready,
/// the client's very next datagram is answered by a live endpoint.
#[tokio::test]
async fn a_dead_endpoints_flows_move_on_their_next_datagram() {
    let (a, ha) = udp_backend("a").await;
    let (b, _hb) = udp_backend("b").await;
    let (c_, _hc) = udp_backend("c").await;
    let vip = unique_vip();
    let svc = udp_service("dns", vip);
    let ea = udp_endpoint(&svc, "ea", a, true);
    let eb = udp_endpoint(&svc, "eb", b, true);
    let ec = udp_endpoint(&svc, "ec", c_, true);
    let p = start(
        test_config(),
        snapshot(&[(&svc, &[ea.clone(), eb.clone(), ec.clone()])]),
    );
    // Three clients: one flow on each endpoint (round robin).
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = client(Ipv4Addr::LOCALHOST, vip).await;
        let id = ask(&c, "hello", 20).await.unwrap();
        clients.push((c, id));
    }
    let mut ids: Vec<_> = clients.iter().map(|(_, id)| id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
    // Pod a dies: its process is gone and its endpoint removed.
    ha.abort();
    p.publish(snapshot(&[(&svc, &[eb.clone(), ec.clone()])]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (c, was) in &clients {
        // One try, no resend: the first datagram after the death.
        let now = ask(c, "again", 1).await;
        if was == "a" {
            let now = now.expect("the moved flow's first datagram is answered");
            assert!(now == "b" || now == "c", "{now}");
        } else {
            assert_eq!(now.as_ref(), Some(was), "a live endpoint's flow stays");
        }
    }
    // Endpoint b stops being ready: its flows move too.
    let mut eb_down = eb.clone();
    eb_down.ready = false;
    p.publish(snapshot(&[(&svc, &[eb_down, ec.clone()])]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (c, _) in &clients {
        assert_eq!(ask(c, "last", 1).await.as_deref(), Some("c"));
    }
    p.stop().await;
}

/// A flow idle past `udp_idle_timeout_ms` ends (the active gauge drops),
/// and the client's next datagram opens a new one.
#[tokio::test]
async fn idle_flows_end() {
    let (a, _ha) = udp_backend("a").await;
    let vip = unique_vip();
    let svc = udp_service("dns", vip);
    let eps = [udp_endpoint(&svc, "ea", a, true)];
    let cfg = pier_proxy::ProxyConfig {
        udp_idle_timeout_ms: 1000,
        ..test_config()
    };
    let p = start(cfg, snapshot(&[(&svc, &eps)]));
    let c = client(Ipv4Addr::LOCALHOST, vip).await;
    assert_eq!(ask(&c, "one", 20).await.as_deref(), Some("a"));
    let active = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("pier_proxy_connections_active{") && l.contains("port=\"dns\""))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(
        active(&p.metrics_text()).as_deref(),
        Some("1"),
        "{}",
        p.metrics_text()
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        active(&p.metrics_text()).as_deref(),
        Some("0"),
        "{}",
        p.metrics_text()
    );
    assert_eq!(ask(&c, "two", 1).await.as_deref(), Some("a"));
    p.stop().await;
}

fn affine(svc: &mut Service) {
    svc.session_affinity = Some(pier_model::SessionAffinity {
        kind: pier_model::AffinityKind::ClientIP,
        timeout_s: 3600,
    });
}

async fn tcp_id(from: Ipv4Addr, to: SocketAddr) -> String {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    let mut c = s.connect(to).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}

/// `--session-affinity ClientIP` over TCP: each client address keeps its
/// endpoint over many connections; two proxies (two hosts) choose the same
/// endpoint for every client with no shared state; when an endpoint goes,
/// only its clients move, and both proxies move them to the same one.
#[tokio::test]
async fn session_affinity_sticks_agrees_across_proxies_and_moves_on_death() {
    let mut backends = Vec::new();
    for id in ["a", "b", "c"] {
        backends.push(id_backend(id).await);
    }
    let (vip1, vip2) = (unique_vip(), unique_vip());
    let mut s1 = service("web", vip1);
    let mut s2 = service("web", vip2);
    affine(&mut s1);
    affine(&mut s2);
    let eps = |svc: &Service, skip: Option<usize>| -> Vec<Endpoint> {
        backends
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(i, (a, _))| endpoint(svc, &format!("e{i}"), *a, true))
            .collect()
    };
    let p1 = start(test_config(), snapshot(&[(&s1, &eps(&s1, None))]));
    let p2 = start(test_config(), snapshot(&[(&s2, &eps(&s2, None))]));
    connect_within(vip1, Duration::from_secs(2)).await;
    connect_within(vip2, Duration::from_secs(2)).await;
    let clients: Vec<Ipv4Addr> = (1..=24).map(|i| Ipv4Addr::new(127, 0, 3, i)).collect();
    let mut chosen = Vec::new();
    for c in &clients {
        let first = tcp_id(*c, vip1).await;
        for _ in 0..5 {
            assert_eq!(tcp_id(*c, vip1).await, first, "client {c} moved on proxy 1");
        }
        assert_eq!(
            tcp_id(*c, vip2).await,
            first,
            "proxies disagree on client {c}"
        );
        chosen.push(first);
    }
    let used: std::collections::BTreeSet<_> = chosen.iter().cloned().collect();
    assert!(used.len() >= 2, "24 clients all on {used:?}");
    // Endpoint "b" (index 1) dies on both hosts.
    p1.publish(snapshot(&[(&s1, &eps(&s1, Some(1)))]));
    p2.publish(snapshot(&[(&s2, &eps(&s2, Some(1)))]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (c, was) in clients.iter().zip(&chosen) {
        let now = tcp_id(*c, vip1).await;
        if was == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(&now, was, "client {c} moved although its pod lives");
        }
        assert_eq!(
            tcp_id(*c, vip2).await,
            now,
            "proxies disagree on client {c} after the death"
        );
    }
    p1.stop().await;
    p2.stop().await;
}

/// Session affinity applies to UDP flows too: a client's new flow (after
/// the old went idle) returns to the same endpoint.
#[tokio::test]
async fn session_affinity_keeps_a_udp_client_across_flows() {
    let (a, _ha) = udp_backend("a").await;
    let (b, _hb) = udp_backend("b").await;
    let vip = unique_vip();
    let mut svc = udp_service("dns", vip);
    affine(&mut svc);
    let eps = [
        udp_endpoint(&svc, "ea", a, true),
        udp_endpoint(&svc, "eb", b, true),
    ];
    let p = start(test_config(), snapshot(&[(&svc, &eps)]));
    // Different source ports (new flows) from one address: one endpoint.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let c = client(Ipv4Addr::new(127, 0, 4, 1), vip).await;
        seen.insert(ask(&c, "q", 20).await.unwrap());
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    p.stop().await;
}
