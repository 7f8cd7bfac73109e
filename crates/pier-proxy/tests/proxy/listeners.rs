use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test]
async fn listener_follows_service_without_disturbing_others() {
    let (be, _h) = echo_backend().await;
    let vip_a = unique_vip();
    let vip_b = unique_vip();
    let a = service("lis-a", vip_a);
    let b = service("lis-b", vip_b);
    let ea = [endpoint(&a, "e1", be, true)];
    let eb = [endpoint(&b, "e1", be, true)];
    let p = start(test_config(), snapshot(&[(&a, &ea)]));
    let mut held = connect_within(vip_a, Duration::from_secs(2)).await;
    held.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    held.read_exact(&mut buf).await.unwrap();

    // B appears within 1 s of being published.
    let t0 = Instant::now();
    p.publish(snapshot(&[(&a, &ea), (&b, &eb)]));
    drop(connect_within(vip_b, Duration::from_secs(1)).await);
    assert!(t0.elapsed() < Duration::from_secs(1));

    // B removed: its listener goes away within 1 s.
    p.publish(snapshot(&[(&a, &ea)]));
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::net::TcpStream::connect(vip_b).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if Instant::now() < end => tokio::time::sleep(Duration::from_millis(10)).await,
            r => panic!("listener on {vip_b} still there after 1 s: {r:?}"),
        }
    }
    // A's established connection and A's listener were never disturbed.
    held.write_all(b"two").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    let mut fresh = connect_within(vip_a, Duration::from_millis(100)).await;
    fresh.write_all(b"new").await.unwrap();
    fresh.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"new");
    p.stop().await;
}

#[tokio::test]
async fn vip_handed_to_another_service_in_one_snapshot_is_served_by_it() {
    let (one, _h1) = id_backend("one").await;
    let (two, _h2) = id_backend("two").await;
    let vip = unique_vip();
    let a = service("handover-a", vip);
    let b = service("handover-b", vip);
    let p = start(
        test_config(),
        snapshot(&[(&a, &[endpoint(&a, "e", one, true)])]),
    );
    drop(connect_within(vip, Duration::from_secs(2)).await);
    assert_eq!(request_id(vip).await.unwrap(), "one");
    // Same VIP and port, another service: the old socket is closed before
    // the new one binds, so there is no "address in use" in between.
    p.publish(snapshot(&[(&b, &[endpoint(&b, "e", two, true)])]));
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        match request_id(vip).await {
            Ok(id) if id == "two" => break,
            _ if Instant::now() < end => tokio::time::sleep(Duration::from_millis(10)).await,
            r => panic!("not served by the new service within 1 s: {r:?}"),
        }
    }
    assert!(p.problems.borrow().is_empty(), "{:?}", p.problems.borrow());
    p.stop().await;
}
