use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test]
async fn removed_endpoint_connection_lives_until_drain_timeout() {
    let (old_be, _h1) = echo_backend().await;
    let (new_be, _h2) = id_backend("new").await;
    let vip = unique_vip();
    let mut svc = service("drain", vip);
    svc.drain_timeout_ms = Some(1_500);
    let p = start(
        test_config(),
        snapshot(&[(&svc, &[endpoint(&svc, "old", old_be, true)])]),
    );
    let mut held = connect_within(vip, Duration::from_secs(2)).await;
    let mut buf = [0u8; 4];
    held.write_all(b"ping").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();

    let removed_at = Instant::now();
    p.publish(snapshot(&[(&svc, &[endpoint(&svc, "new", new_be, true)])]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections go to the new endpoint only.
    for _ in 0..5 {
        assert_eq!(request_id(vip).await.unwrap(), "new");
    }
    // The established one still works well into the drain period.
    for _ in 0..5 {
        held.write_all(b"pong").await.unwrap();
        held.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(removed_at.elapsed() < Duration::from_millis(1_500));
    // Then the drain timeout closes it.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), held.read_to_end(&mut rest))
        .await
        .expect("closed by the drain");
    let closed_after = removed_at.elapsed();
    // A drain deadline cuts the connection: a reset, not a clean end the
    // client could take for a complete response.
    let e = r.expect_err("the drain's cut must not look like a clean end");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        closed_after >= Duration::from_millis(1_400),
        "closed too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_millis(3_500),
        "closed too late: {closed_after:?}"
    );
    p.stop().await;
}

#[tokio::test]
async fn idle_connections_are_not_cut() {
    let (be, _h) = echo_backend().await;
    let vip = unique_vip();
    let svc = service("idle", vip);
    let mut cfg = test_config();
    cfg.drain_timeout_ms = 500;
    let p = start(cfg, snapshot(&[(&svc, &[endpoint(&svc, "e", be, true)])]));
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    // Snapshot changes that keep the endpoint do not touch the connection.
    for i in 0..3 {
        let mut snap = (*snapshot(&[(&svc, &[endpoint(&svc, "e", be, true)])])).clone();
        snap.revision = i;
        p.publish(std::sync::Arc::new(snap));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    s.write_all(b"late").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"late");
    p.stop().await;
}
