//! Names outside the mesh: forwarding to an upstream the test starts on
//! loopback, the cache, TCP fallback upstream, and the timeout bound.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::harness::*;
use pier_model::Service;

/// A tiny upstream: answers every A query with `count` addresses
/// 192.0.2.1.. (TTL 60), setting TC over UDP when `udp_tc`. Counts queries.
struct Upstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn reply(q: &Message, count: usize, tc: bool) -> Vec<u8> {
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.clone());
    if tc {
        r.metadata.truncation = true;
    } else {
        for i in 0..count {
            let name = q.queries[0].name().clone();
            r.add_answer(Record::from_rdata(
                name,
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1 + i as u8))),
            ));
        }
    }
    if let Some(e) = &q.edns {
        r.set_edns(e.clone());
    }
    r.to_vec().expect("encode reply")
}

async fn upstream(count: usize, udp_tc: bool) -> Result<Upstream> {
    let (udp, tcp) = bind_pair("127.0.0.1").await?;
    let addr = udp.local_addr()?;
    let cancel = CancellationToken::new();
    let (uq, tq) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, n) = (cancel.clone(), uq.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (len, peer) = tokio::select! { _ = c.cancelled() => return, r = udp.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => return } };
            n.fetch_add(1, Ordering::SeqCst);
            if let Ok(q) = Message::from_vec(&buf[..len]) {
                let _ = udp.send_to(&reply(&q, count, udp_tc), peer).await;
            }
        }
    });
    let (c, n) = (cancel.clone(), tq.clone());
    tokio::spawn(async move {
        serve_tcp(tcp, c, n, count).await;
    });
    Ok(Upstream {
        addr,
        udp_queries: uq,
        tcp_queries: tq,
        cancel,
    })
}

async fn serve_tcp(tcp: TcpListener, c: CancellationToken, n: Arc<AtomicUsize>, count: usize) {
    loop {
        let (mut s, _) = tokio::select! { _ = c.cancelled() => return, r = tcp.accept() => match r { Ok(x) => x, Err(_) => return } };
        let n = n.clone();
        tokio::spawn(async move {
            let Ok(len) = s.read_u16().await else { return };
            let mut buf = vec![0u8; len as usize];
            if s.read_exact(&mut buf).await.is_err() {
                return;
            }
            n.fetch_add(1, Ordering::SeqCst);
            if let Ok(q) = Message::from_vec(&buf) {
                let r = reply(&q, count, false);
                let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&r);
                let _ = s.write_all(&framed).await;
            }
        });
    }
}

fn with_upstream(up: SocketAddr, timeout_ms: u64) -> pier_dns::DnsConfig {
    pier_dns::DnsConfig {
        upstreams: vec![up],
        upstream_timeout_ms: timeout_ms,
        ..test_config()
    }
}

#[tokio::test]
async fn forwards_outside_names_and_caches_within_ttl() -> Result<()> {
    let up = upstream(1, false).await?;
    let (s, e) = base_snapshot();
    let t = TestServer::start(with_upstream(up.addr, 2000), snapshot(1, &s, &e)).await?;
    let q = query_msg("www.example.org.", RecordType::A, None);
    let r = udp_query(t.addr, &q).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&r), vec!["192.0.2.1".parse::<std::net::IpAddr>()?]);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
    // Again, in another case: from the cache, the question echoed as asked.
    let q2 = query_msg("WWW.Example.ORG.", RecordType::A, None);
    let r = udp_query(t.addr, &q2).await?;
    assert_eq!(ips(&r), vec!["192.0.2.1".parse::<std::net::IpAddr>()?]);
    assert_eq!(r.queries[0].name().to_ascii(), "WWW.Example.ORG.");
    assert!(r.answers[0].ttl <= 60 && r.answers[0].ttl >= 58);
    assert_eq!(
        up.udp_queries.load(Ordering::SeqCst),
        1,
        "second answer came from the cache"
    );
    // Over TCP as well, from the cache.
    let r = tcp_query(t.addr, &query_msg("www.example.org.", RecordType::A, None)).await?;
    assert_eq!(r.answers.len(), 1);
    let m = t.metrics_text();
    assert!(m.contains("dns_cache_hits_total 2"), "{m}");
    assert!(m.contains("dns_cache_misses_total 1"), "{m}");
    Ok(())
}

#[tokio::test]
async fn truncated_upstream_answer_is_retried_over_tcp() -> Result<()> {
    let up = upstream(3, true).await?;
    let (s, e) = base_snapshot();
    let t = TestServer::start(with_upstream(up.addr, 2000), snapshot(1, &s, &e)).await?;
    let r = udp_query(
        t.addr,
        &query_msg("big.example.org.", RecordType::A, Some(1232)),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 3);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn dead_upstream_gives_servfail_within_the_bound() -> Result<()> {
    // A socket that is bound but never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await?;
    let (s, e) = base_snapshot();
    let t = TestServer::start(
        with_upstream(silent.local_addr()?, 400),
        snapshot(1, &s, &e),
    )
    .await?;
    let t0 = Instant::now();
    let r = udp_query(t.addr, &query_msg("slow.example.org.", RecordType::A, None)).await?;
    let took = t0.elapsed();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(
        took >= Duration::from_millis(350),
        "answered before the timeout: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "SERVFAIL took {took:?} with a 400 ms bound"
    );
    // Over TCP too.
    let t0 = Instant::now();
    let r = tcp_query(
        t.addr,
        &query_msg("slow2.example.org.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(t0.elapsed() < Duration::from_millis(1500));
    // Mesh names still answer at once meanwhile.
    let r = udp_query(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.answers.len(), 1);
    let m = t.metrics_text();
    assert!(m.contains("dns_upstream_failures_total 2"), "{m}");
    drop(silent);
    Ok(())
}

#[tokio::test]
async fn second_upstream_is_used_when_the_first_is_dead() -> Result<()> {
    let silent = UdpSocket::bind("127.0.0.1:0").await?;
    let up = upstream(1, false).await?;
    let (s, e) = base_snapshot();
    let cfg = pier_dns::DnsConfig {
        upstreams: vec![silent.local_addr()?, up.addr],
        upstream_timeout_ms: 1000,
        ..test_config()
    };
    let t = TestServer::start(cfg, snapshot(1, &s, &e)).await?;
    let r = udp_query(t.addr, &query_msg("two.example.org.", RecordType::A, None)).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1);
    Ok(())
}

/// An ExternalName service's name is a CNAME: a CNAME query gets it alone;
/// an A query gets it followed by the target's addresses, from the zone
/// for a pier name and from the upstream for another, the question echoed
/// as asked.
#[tokio::test]
async fn external_name_is_a_cname_followed_to_its_target() -> Result<()> {
    let up = upstream(1, false).await?;
    let (mut s, e) = base_snapshot();
    let alias = |name: &str, host: &str| -> Service {
        let mut a = service("default", name, None, &[]);
        a.external_name = Some(host.to_owned());
        a
    };
    s.push(alias("ext", "db.example.test"));
    s.push(alias("local", "web.default.svc.pier.internal"));
    let t = TestServer::start(with_upstream(up.addr, 2000), snapshot(1, &s, &e)).await?;
    let cname_of = |r: &Message| -> Vec<String> {
        r.answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::CNAME(c) => Some(c.0.to_ascii()),
                _ => None,
            })
            .collect()
    };

    let r = udp_query(
        t.addr,
        &query_msg("ext.default.svc.pier.internal.", RecordType::CNAME, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(cname_of(&r), ["db.example.test."]);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 0);

    let r = udp_query(
        t.addr,
        &query_msg("Ext.Default.svc.pier.internal.", RecordType::A, Some(1232)),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        r.queries[0].name().to_ascii(),
        "Ext.Default.svc.pier.internal."
    );
    assert_eq!(cname_of(&r), ["db.example.test."]);
    assert_eq!(ips(&r), vec!["192.0.2.1".parse::<std::net::IpAddr>()?]);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);

    // A pier name as the target: answered from the zone, over TCP too.
    let r = tcp_query(
        t.addr,
        &query_msg("local.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(cname_of(&r), ["web.default.svc.pier.internal."]);
    assert_eq!(ips(&r), vec!["10.96.0.10".parse::<std::net::IpAddr>()?]);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1, "not forwarded");
    // dig, as a person would.
    let out = dig(
        t.addr,
        &["local.default.svc.pier.internal", "A", "+noall", "+answer"],
    )
    .await?;
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.len() == 5)
        .collect();
    assert!(
        lines.len() == 2
            && lines[0][3] == "CNAME"
            && lines[0][4] == "web.default.svc.pier.internal."
            && lines[1][3] == "A"
            && lines[1][4] == "10.96.0.10",
        "{out}"
    );
    Ok(())
}
