//! Transport and protocol behaviour: the ACL, truncation and TCP fallback,
//! EDNS, case, malformed input, metrics.

use std::time::Duration;

use anyhow::Result;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use pier_model::Cidr;

use crate::harness::*;

/// A headless service with `n` ready endpoints: its A answer is 16 bytes per
/// endpoint, so 40 overflow 512 bytes and 100 overflow 1232.
fn big_headless(n: usize) -> pier_model::Snapshot {
    let svc = service("default", "big", None, &[("http", 80)]);
    let eps: Vec<_> = (0..n)
        .map(|i| {
            endpoint(
                &svc,
                &format!("c{i:011}"),
                Some(&format!("big-{i}")),
                &format!("172.20.{}.{}", i / 200, i % 200 + 1),
                &[("http", 8080)],
                true,
            )
        })
        .collect();
    snapshot(1, &[svc], &eps)
}

#[tokio::test]
async fn client_outside_the_acl_is_refused() -> Result<()> {
    // Loopback is normally always answered; turn that off so that one host
    // has a client inside (127.0.0.2, via `allow`) and one outside (127.0.0.1).
    let (s, e) = base_snapshot();
    let cfg = pier_dns::DnsConfig {
        allow_loopback: false,
        allow: vec!["127.0.0.2/32".parse::<Cidr>()?],
        ..test_config()
    };
    let t = TestServer::start(cfg, snapshot(1, &s, &e)).await?;
    let q = query_msg("web.default.svc.pier.internal.", RecordType::A, None);
    let r = udp_query_from("127.0.0.1", t.addr, &q).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(r.answers.is_empty());
    // Forwarded names are refused too: not an open resolver.
    let r = udp_query_from(
        "127.0.0.1",
        t.addr,
        &query_msg("example.org.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    let r = udp_query_from("127.0.0.2", t.addr, &q).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1);
    // A container network published later is answered within 1 s.
    let q3 = query_msg("web.default.svc.pier.internal.", RecordType::A, None);
    assert_eq!(
        udp_query_from("127.0.0.3", t.addr, &q3)
            .await?
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    t.nets.send_replace(vec!["127.0.0.3/32".parse()?]);
    within(Duration::from_secs(1), || async {
        Ok(udp_query_from("127.0.0.3", t.addr, &q3)
            .await?
            .metadata
            .response_code
            == ResponseCode::NoError)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn oversized_answer_sets_tc_and_dig_falls_back_to_tcp() -> Result<()> {
    let t = TestServer::start(test_config(), big_headless(100)).await?;
    let name = "big.default.svc.pier.internal.";
    // Without EDNS: 512 bytes, TC set, no records.
    let r = udp_query(t.addr, &query_msg(name, RecordType::A, None)).await?;
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());
    // EDNS 4096 asked, but we send at most 1232 over UDP: still TC.
    let r = udp_query(t.addr, &query_msg(name, RecordType::A, Some(4096))).await?;
    assert!(r.metadata.truncation);
    assert!(r.edns.is_some());
    // TCP gets everything.
    let r = tcp_query(t.addr, &query_msg(name, RecordType::A, None)).await?;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 100);
    // dig sees TC and retries over TCP by itself.
    let out = dig(t.addr, &[name, "A"]).await?;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 100"), "{out}");
    // +ignore keeps the truncated UDP answer.
    let out = dig(t.addr, &["+ignore", "+noedns", name, "A"]).await?;
    assert!(out.contains(" tc"), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    Ok(())
}

#[tokio::test]
async fn edns_buffer_size_is_honoured() -> Result<()> {
    // 40 records: ~700 bytes. Too big for 512, fits in an EDNS 1232 buffer.
    let t = TestServer::start(test_config(), big_headless(40)).await?;
    let name = "big.default.svc.pier.internal.";
    let r = udp_query(t.addr, &query_msg(name, RecordType::A, None)).await?;
    assert!(r.metadata.truncation);
    let r = udp_query(t.addr, &query_msg(name, RecordType::A, Some(1232))).await?;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    assert_eq!(r.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    // SRV: 40 targets plus glue do not fit 1232, the SRV records alone do:
    // the glue is left out without TC (RFC 2181 9).
    let r = udp_query(
        t.addr,
        &query_msg(
            "_http._tcp.big.default.svc.pier.internal.",
            RecordType::SRV,
            Some(1232),
        ),
    )
    .await?;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    assert!(r.additionals.is_empty());
    Ok(())
}

#[tokio::test]
async fn upper_case_queries_are_answered_and_echoed_as_asked() -> Result<()> {
    let t = base_server().await?;
    let asked = "WEB.Default.SVC.Pier.INTERNAL.";
    let r = udp_query(t.addr, &query_msg(asked, RecordType::A, None)).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&r), vec!["10.96.0.10".parse::<std::net::IpAddr>()?]);
    assert_eq!(r.queries[0].name().to_ascii(), asked);
    assert_eq!(r.answers[0].name.to_ascii(), asked);
    let r = tcp_query(
        t.addr,
        &query_msg(
            "_HTTP._TCP.web.DEFAULT.svc.pier.internal.",
            RecordType::SRV,
            None,
        ),
    )
    .await?;
    assert_eq!(r.answers.len(), 2);
    // NXDOMAIN in upper case still finds the zone's SOA.
    let r = udp_query(
        t.addr,
        &query_msg("NOPE.PIER.INTERNAL.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        r.authorities[0].name.to_ascii().to_ascii_lowercase(),
        "pier.internal."
    );
    Ok(())
}

#[tokio::test]
async fn tcp_answers_several_queries_on_one_connection() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = base_server().await?;
    let mut s = tokio::net::TcpStream::connect(t.addr).await?;
    let a = query_msg("web.default.svc.pier.internal.", RecordType::A, None);
    let b = query_msg("db.prod.svc.pier.internal.", RecordType::A, None);
    let mut framed = Vec::new();
    for m in [&a, &b] {
        let v = m.to_vec()?;
        framed.extend_from_slice(&(v.len() as u16).to_be_bytes());
        framed.extend_from_slice(&v);
    }
    s.write_all(&framed).await?;
    for m in [&a, &b] {
        let len = tokio::time::timeout(Duration::from_secs(3), s.read_u16()).await?? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        let r = hickory_proto::op::Message::from_vec(&buf)?;
        assert_eq!(r.metadata.id, m.metadata.id);
        assert!(!r.answers.is_empty());
    }
    Ok(())
}

fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    [id, flags, qd, an, ns, ar]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_are_dropped() -> Result<()> {
    let t = base_server().await?;
    // 300 ms of silence counts as "dropped"; an expected answer gets the
    // 3 s a client waits, so a slow answer on a loaded machine is not
    // taken for a missing one.
    let wait = Duration::from_millis(300);
    let answer_wait = Duration::from_secs(3);
    let rcode = |r: &[u8]| r[3] & 0x0f;
    // No header: dropped.
    assert!(udp_raw(t.addr, &[1, 2, 3, 4, 5], wait).await?.is_none());
    // A response: dropped (never answer answers).
    let mut resp = header(7, 0x8000, 1, 0, 0, 0);
    resp.extend_from_slice(b"\x03web\x00\x00\x01\x00\x01");
    assert!(udp_raw(t.addr, &resp, wait).await?.is_none());
    // The question is cut short: FORMERR with the same id.
    let mut p = header(0x4141, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(b"\x03web\x07def");
    let r = udp_raw(t.addr, &p, answer_wait).await?.expect("an answer");
    assert_eq!(&r[0..2], &[0x41, 0x41]);
    assert_eq!(rcode(&r), 1);
    // Two questions: FORMERR.
    let mut p = header(9, 0, 2, 0, 0, 0);
    p.extend_from_slice(b"\x01a\x00\x00\x01\x00\x01\x01b\x00\x00\x01\x00\x01");
    assert_eq!(
        rcode(&udp_raw(t.addr, &p, answer_wait).await?.expect("an answer")),
        1
    );
    // A label that runs past the end, and a compression pointer in the question.
    for bad in [
        &b"\x3fabc\x00\x00\x01\x00\x01"[..],
        &b"\xc0\x0c\x00\x01\x00\x01"[..],
    ] {
        let mut p = header(10, 0, 1, 0, 0, 0);
        p.extend_from_slice(bad);
        assert_eq!(
            rcode(&udp_raw(t.addr, &p, answer_wait).await?.expect("an answer")),
            1
        );
    }
    // An additional record announced but missing.
    let mut p = header(11, 0, 1, 0, 0, 1);
    p.extend_from_slice(b"\x03web\x00\x00\x01\x00\x01");
    assert_eq!(
        rcode(&udp_raw(t.addr, &p, answer_wait).await?.expect("an answer")),
        1
    );
    // Opcode STATUS: NOTIMP.
    let mut p = header(12, 2 << 11, 1, 0, 0, 0);
    p.extend_from_slice(b"\x03web\x00\x00\x01\x00\x01");
    assert_eq!(
        rcode(&udp_raw(t.addr, &p, answer_wait).await?.expect("an answer")),
        4
    );
    // EDNS version 1: BADVERS (16 = header 0 + OPT extended rcode 1).
    let mut p = header(13, 0, 1, 0, 0, 1);
    p.extend_from_slice(b"\x03web\x00\x00\x01\x00\x01");
    p.extend_from_slice(&[0, 0, 41, 4, 0, 0, 1, 0, 0, 0, 0]);
    let r = udp_raw(t.addr, &p, answer_wait).await?.expect("an answer");
    assert_eq!(rcode(&r), 0);
    // Our OPT is the last 11 bytes; its TTL's first byte is the extended rcode.
    let opt = &r[r.len() - 11..];
    assert_eq!((opt[1], opt[2], opt[5]), (0, 41, 1));
    // Random garbage with a readable header (bounded: 3000 packets), then
    // the server still answers.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for i in 0..3000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 12 + (x % 80) as usize;
        let mut p: Vec<u8> = (0..len)
            .map(|j| (x.rotate_left(j as u32 * 7) >> 3) as u8)
            .collect();
        p[2] &= 0x7f; // a query, so that most get past the header
        if i % 2 == 0 {
            p[4..6].copy_from_slice(&1u16.to_be_bytes());
        }
        sock.send_to(&p, t.addr).await?;
    }
    // The flood outruns the server: its socket queue fills and the kernel
    // drops what does not fit, so ask as a resolver would, with retries.
    let r = udp_query_retrying(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(r.answers.len(), 1);
    // Over TCP, garbage closes the connection and the server lives on.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(t.addr).await?;
        s.write_all(&[0, 3, 1, 2, 3]).await?;
    }
    let r = tcp_query(
        t.addr,
        &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
    )
    .await?;
    assert_eq!(r.answers.len(), 1);
    let m = t.metrics_text();
    assert!(m.contains("dns_dropped_total"), "{m}");
    Ok(())
}

#[tokio::test]
async fn metrics_count_queries_by_type_and_rcode() -> Result<()> {
    let t = base_server().await?;
    for _ in 0..3 {
        udp_query(
            t.addr,
            &query_msg("web.default.svc.pier.internal.", RecordType::A, None),
        )
        .await?;
    }
    udp_query(
        t.addr,
        &query_msg("nosuch.pier.internal.", RecordType::AAAA, None),
    )
    .await?;
    let m = t.metrics_text();
    assert!(
        m.contains(r#"dns_queries_total{type="A",rcode="NOERROR"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"dns_queries_total{type="AAAA",rcode="NXDOMAIN"} 1"#),
        "{m}"
    );
    // The latency is observed just after the send: wait for the last one.
    within(Duration::from_secs(1), || async {
        Ok(t.metrics_text().contains("dns_latency_seconds_count 4"))
    })
    .await?;
    assert!(m.contains("dns_zone_names"), "{m}");
    Ok(())
}
