//! The autoscaler's signals, measured on real proxied connections.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// A backend that answers each request line after `delay`.
async fn slow_backend(delay: Duration) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = listener();
    let a = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    if s.write_all(b"ok\n").await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (a, h)
}

/// 20 connections to a backend that answers after 40 ms: the stats show
/// them open, then a first-byte time of 40 ms (p50 and p99 within the
/// sketch's 6.25% plus scheduling), then the window's new connections.
#[tokio::test]
async fn first_byte_time_active_and_rate_reach_the_stats() {
    let (b, _hb) = slow_backend(Duration::from_millis(40)).await;
    let vip = unique_vip();
    let svc = service("slow", vip);
    let eps = [endpoint(&svc, "e1", b, true)];
    let mut p = start(test_config(), snapshot(&[(&svc, &eps)]));
    drop(connect_within(vip, Duration::from_secs(2)).await);
    // Let the window of the probe close, so it is not counted below.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sums the windows until 20 first bytes were seen.
    let mut rx = p.stats.clone();
    rx.borrow_and_update();
    let collect = tokio::spawn(async move {
        let mut sum = pier_model::Stats::default();
        let mut active = 0;
        tokio::time::timeout(Duration::from_secs(5), async {
            while sum.first_byte.count() < 20 || active < 20 {
                rx.changed().await.unwrap();
                let cur = rx.borrow_and_update().clone();
                for st in cur.values() {
                    assert!(st.window_ms >= 150 && st.window_ms <= 1000, "{st:?}");
                    sum.new_conns += st.new_conns;
                    sum.first_byte.merge(&st.first_byte);
                    sum.connect.merge(&st.connect);
                    active = active.max(st.active);
                }
            }
        })
        .await
        .expect("20 first bytes within 5 s");
        (sum, active)
    });
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut c = tokio::net::TcpStream::connect(vip).await.unwrap();
        c.write_all(b"hi\n").await.unwrap();
        conns.push(c);
    }
    for c in &mut conns {
        let mut b = [0u8; 3];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ok\n");
    }
    // Open: 20; first bytes ~40 ms. The connections may straddle two
    // windows: the collector sums every window since the probe's.
    let (sum, active) = collect.await.unwrap();
    assert_eq!(active, 20);
    let p50 = sum.first_byte.quantile(0.5).unwrap();
    let p99 = sum.first_byte.quantile(0.99).unwrap();
    assert!((37_000..60_000).contains(&p50), "p50 {p50} µs");
    assert!((37_000..80_000).contains(&p99), "p99 {p99} µs");
    assert_eq!(sum.new_conns, 20, "{sum:?}");
    assert_eq!(sum.connect.count(), 20, "{sum:?}");
    let text = p.metrics_text();
    let g = text
        .lines()
        .find(|l| l.starts_with("pier_proxy_first_byte_p99_seconds{") && l.contains("slow"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        g.contains("service=") && text.contains("pier_proxy_connection_rate{"),
        "{text}"
    );
    assert!(
        text.contains("pier_proxy_endpoint_first_byte_p99_seconds{"),
        "{text}"
    );
    // Closed: the next windows are idle.
    drop(conns);
    wait_for(&mut p.stats, Duration::from_secs(5), |s| {
        s.values().any(|st| st.is_idle())
    })
    .await;
    p.stop().await;
}
