use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

#[tokio::test]
async fn three_endpoints_share_300_connections() {
    let (a, _ha) = id_backend("a").await;
    let (b, _hb) = id_backend("b").await;
    let (c, _hc) = id_backend("c").await;
    let vip = unique_vip();
    let svc = service("share", vip);
    let eps = [
        endpoint(&svc, "e1", a, true),
        endpoint(&svc, "e2", b, true),
        endpoint(&svc, "e3", c, true),
    ];
    let p = start(test_config(), snapshot(&[(&svc, &eps)]));
    drop(connect_within(vip, Duration::from_secs(2)).await);

    let mut counts: HashMap<String, u32> = HashMap::new();
    // 300 connections, 10 at a time.
    for _ in 0..30 {
        let batch: Vec<_> = (0..10).map(|_| tokio::spawn(request_id(vip))).collect();
        for t in batch {
            *counts.entry(t.await.unwrap().unwrap()).or_default() += 1;
        }
    }
    let total: u32 = counts.values().sum();
    assert_eq!(total, 300, "{counts:?}");
    for id in ["a", "b", "c"] {
        let n = counts.get(id).copied().unwrap_or(0);
        // A fair share is 100; P2C keeps every endpoint well inside this.
        assert!(n >= 50, "endpoint {id} got {n} of 300: {counts:?}");
    }
    p.stop().await;
}

#[tokio::test]
async fn round_robin_gives_equal_shares() {
    let (a, _ha) = id_backend("a").await;
    let (b, _hb) = id_backend("b").await;
    let (c, _hc) = id_backend("c").await;
    let vip = unique_vip();
    let mut svc = service("rr", vip);
    svc.lb = pier_model::LbPolicy::RoundRobin;
    let eps = [
        endpoint(&svc, "e1", a, true),
        endpoint(&svc, "e2", b, true),
        endpoint(&svc, "e3", c, true),
    ];
    // A not-ready endpoint is never picked.
    let (d, _hd) = id_backend("d").await;
    let mut all = eps.to_vec();
    all.push(endpoint(&svc, "e4", d, false));
    let p = start(test_config(), snapshot(&[(&svc, &all)]));
    let first = {
        let mut s = connect_within(vip, Duration::from_secs(2)).await;
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let mut counts: HashMap<String, u32> = HashMap::from([(first, 1)]);
    for _ in 0..299 {
        *counts.entry(request_id(vip).await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&100), "{counts:?}");
    assert!(!counts.contains_key("d"));
    p.stop().await;
}

/// A backend that reads until EOF, then answers with the byte count and a
/// 1 MiB tail, then closes.
async fn eof_then_reply_backend() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(format!("got {}\n", buf.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    a
}

#[tokio::test]
async fn client_shutdown_write_still_receives_whole_response() {
    let be = eof_then_reply_backend().await;
    let vip = unique_vip();
    let svc = service("halfclose", vip);
    let p = start(
        test_config(),
        snapshot(&[(&svc, &[endpoint(&svc, "e1", be, true)])]),
    );
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    s.write_all(&[7u8; 100_000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let head = b"got 100000\n";
    assert_eq!(&out[..head.len()], head);
    assert_eq!(out.len(), head.len() + (1 << 20));
    assert!(out[head.len()..].iter().all(|b| *b == b'x'));
    p.stop().await;
}

#[tokio::test]
async fn half_close_works_without_splice() {
    let be = eof_then_reply_backend().await;
    let vip = unique_vip();
    let svc = service("halfcopy", vip);
    let cfg = pier_proxy::ProxyConfig {
        splice: false,
        ..test_config()
    };
    let p = start(cfg, snapshot(&[(&svc, &[endpoint(&svc, "e1", be, true)])]));
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&out[..8], b"got 5\nxx");
    assert_eq!(out.len(), 6 + (1 << 20));
    p.stop().await;
}

/// A backend that reads one line, sends its reply and its FIN in one
/// segment (MSG_MORE, then shutdown), then reads on until the client's EOF
/// and reports how many bytes came after the reply.
async fn reply_and_fin_backend() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<usize>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut line = [0u8; 3];
                s.read_exact(&mut line).await.unwrap();
                assert_eq!(&line, b"hi\n");
                s.writable().await.unwrap();
                let sent = rustix::net::send(&s, b"reply\n", rustix::net::SendFlags::MORE).unwrap();
                assert_eq!(sent, 6);
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                let _ = tx.send(rest.len());
            });
        }
    });
    (a, rx)
}

/// Segments the socket has received, as `ss -ti` reports them
/// (`segs_in`, the kernel's `tcpi_segs_in`).
fn segs_in(s: &TcpStream) -> u32 {
    let (l, r) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    let out = std::process::Command::new("ss")
        .args(["-Htin", "src", &l.to_string(), "dst", &r.to_string()])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u32> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("segs_in:"))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 1, "one socket {l} -> {r} in ss's answer: {text}");
    v[0]
}

/// One exchange with a `reply_and_fin_backend` at `a`: the segments the
/// client had received when it saw the reply and the EOF; then 1,000 bytes
/// the other way, after the server's FIN.
async fn reply_then_fin_exchange(a: std::net::SocketAddr) -> u32 {
    let mut s = connect_within(a, Duration::from_secs(2)).await;
    s.write_all(b"hi\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the reply and EOF within 5 s")
        .unwrap();
    assert_eq!(out, b"reply\n");
    let n = segs_in(&s);
    s.write_all(&[1u8; 1000]).await.unwrap();
    s.shutdown().await.unwrap();
    n
}

/// When the server's reply and FIN arrive together, the proxy sends them
/// on together too: the client receives as many segments as it does from
/// the server directly (SYN-ACK, the ACK of its request, reply + FIN), not
/// one more for a separate FIN. The direction still open goes on: what the
/// client sends after the server's FIN reaches the server.
#[tokio::test]
async fn a_reply_and_its_fin_leave_the_proxy_in_one_segment() {
    let (be, mut got) = reply_and_fin_backend().await;
    let direct = reply_then_fin_exchange(be).await;
    assert_eq!(got.recv().await, Some(1000));
    let vip = unique_vip();
    let svc = service("replyfin", vip);
    for splice in [true, false] {
        let cfg = pier_proxy::ProxyConfig {
            splice,
            ..test_config()
        };
        let p = start(cfg, snapshot(&[(&svc, &[endpoint(&svc, "e1", be, true)])]));
        for i in 0..5 {
            let via = reply_then_fin_exchange(vip).await;
            assert_eq!(
                via, direct,
                "exchange {i} (splice {splice}): segments received through the proxy vs directly"
            );
            assert_eq!(got.recv().await, Some(1000), "exchange {i}");
        }
        p.stop().await;
    }
}

/// Order-sensitive 64-bit checksum, cheap enough for 1 GiB in a debug build.
fn checksum(mut h: u64, data: &[u8]) -> u64 {
    for c in data.chunks_exact(8) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_arrives_with_identical_checksum_through_splice() {
    const CHUNK: usize = 1 << 20;
    const TOTAL: usize = 1 << 30;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; CHUNK];
        let (mut h, mut n, mut fill) = (0u64, 0usize, 0usize);
        loop {
            let r = s.read(&mut buf[fill..]).await.unwrap();
            if r == 0 {
                break;
            }
            fill += r;
            n += r;
            if fill == CHUNK {
                h = checksum(h, &buf);
                fill = 0;
            }
        }
        h = checksum(h, &buf[..fill]);
        s.write_all(&h.to_le_bytes()).await.unwrap();
        s.write_all(&(n as u64).to_le_bytes()).await.unwrap();
    });
    let vip = unique_vip();
    let svc = service("gib", vip);
    let cfg = test_config();
    assert!(cfg.splice, "splice is the default on Linux");
    let p = start(cfg, snapshot(&[(&svc, &[endpoint(&svc, "e1", be, true)])]));
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    let spliced_before = pier_proxy::spliced_directions();
    let mut block = vec![0u8; CHUNK];
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let mut h = 0u64;
    for i in 0..TOTAL / CHUNK {
        // Every block differs, so a repeated or dropped block changes the sum.
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        h = checksum(h, &block);
        s.write_all(&block).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut reply = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    server.await.unwrap();
    assert_eq!(
        u64::from_le_bytes(reply[8..].try_into().unwrap()),
        TOTAL as u64
    );
    assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), h);
    assert!(
        pier_proxy::spliced_directions() > spliced_before,
        "the bulk direction was spliced"
    );
    let text = p.metrics_text();
    assert!(
        text.contains(&format!(
            "pier_proxy_bytes_total{{service=\"default/gib\",port=\"p\",direction=\"in\"}} {TOTAL}"
        )),
        "{text}"
    );
    p.stop().await;
}

fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let want = l.maximum.unwrap_or(1 << 20).min(1 << 20);
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: l.maximum,
        },
    )
    .unwrap();
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        now >= 16_384,
        "need 16k file descriptors for 1,000 proxied connections, have {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_all_succeed() {
    raise_nofile();
    let (be, _h) = echo_backend().await;
    let vip = unique_vip();
    let svc = service("thousand", vip);
    let p = start(
        test_config(),
        snapshot(&[(&svc, &[endpoint(&svc, "e1", be, true)])]),
    );
    drop(connect_within(vip, Duration::from_secs(2)).await);
    // Every client opens its connection and checks an echo, then waits
    // until all 1,000 are open through the proxy at once, then finishes.
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let all_open = std::sync::Arc::new(tokio::sync::Notify::new());
    let tasks: Vec<_> = (0..1000u32)
        .map(|i| {
            let opened = opened.clone();
            let all_open = all_open.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(vip).await?;
                let msg = format!("hello {i}\n");
                s.write_all(msg.as_bytes()).await?;
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await?;
                assert_eq!(back, msg.as_bytes());
                let waiting = all_open.notified();
                if opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 1000 {
                    all_open.notify_waiters();
                } else {
                    waiting.await;
                }
                s.write_all(b"bye").await?;
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                assert_eq!(rest, b"bye");
                std::io::Result::Ok(())
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok(()))) => ok += 1,
            Ok(Ok(Err(e))) => errors.push(e.to_string()),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push(format!(
                "timed out; {} had opened",
                opened.load(std::sync::atomic::Ordering::SeqCst)
            )),
        }
    }
    // One failure leaves the others waiting: show the distinct errors.
    errors.sort();
    errors.dedup_by(|a, b| a.get(..10) == b.get(..10));
    errors.push(
        p.metrics_text()
            .lines()
            .filter(|l| l.contains("error") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(ok, 1000, "{errors:?}");
    p.stop().await;
}

#[tokio::test]
async fn proxy_protocol_v2_header_reaches_backend() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 28 + 4];
        s.read_exact(&mut buf).await.unwrap();
        let (src, dst, len) = pier_proxy::ppv2::decode(&buf).expect("a PROXY v2 header");
        assert_eq!(len, 28);
        assert_eq!(&buf[len..], b"ping");
        s.write_all(format!("{src} {dst}").as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let vip = unique_vip();
    let mut svc = service("ppv2", vip);
    svc.proxy_protocol = true;
    let p = start(
        test_config(),
        snapshot(&[(&svc, &[endpoint(&svc, "e1", be, true)])]),
    );
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    s.write_all(b"ping").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, format!("{} {}", s.local_addr().unwrap(), vip));
    p.stop().await;
}
