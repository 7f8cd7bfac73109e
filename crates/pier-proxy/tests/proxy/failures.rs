use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::common::*;

#[tokio::test]
async fn dead_endpoint_costs_zero_failed_requests() {
    let (a, _ha) = id_backend("a").await;
    let (b, _hb) = id_backend("b").await;
    let dead = closed_port();
    let vip = unique_vip();
    let svc = service("dead", vip);
    let eps = [
        endpoint(&svc, "e1", a, true),
        endpoint(&svc, "e2", b, true),
        endpoint(&svc, "e3", dead, true),
    ];
    let mut cfg = test_config();
    cfg.eject_base_ms = 200; // readmitted (and re-ejected) several times in the loop
    let mut p = start(cfg, snapshot(&[(&svc, &eps)]));
    drop(connect_within(vip, Duration::from_secs(2)).await);
    let mut failed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for i in 0..500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "loop too slow at {i}"
        );
        match request_id(vip).await {
            Ok(id) if id == "a" || id == "b" => {}
            other => {
                failed += 1;
                eprintln!("request {i}: {other:?}");
            }
        }
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await; // let ejection expire
        }
    }
    assert_eq!(failed, 0);
    // The refused connects were seen, counted and retried elsewhere.
    let text = p.metrics_text();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("pier_proxy_connect_errors_total{")
                && l.contains("dead")
                && l.contains("refused")
        })
        .unwrap_or_else(|| panic!("{text}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1, "{line}");
    let stats = wait_for(&mut p.stats, Duration::from_secs(5), |s| {
        s.values()
            .any(|st| st.connect_errors >= 1 && st.total >= 500)
    })
    .await;
    assert_eq!(stats.len(), 1);
    p.stop().await;
}

#[tokio::test]
async fn all_endpoints_dead_fails_fast_and_counts() {
    let vip = unique_vip();
    let svc = service("alldead", vip);
    let eps = [
        endpoint(&svc, "e1", closed_port(), true),
        endpoint(&svc, "e2", closed_port(), true),
    ];
    let p = start(test_config(), snapshot(&[(&svc, &eps)]));
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    let mut buf = Vec::new();
    // The proxy closes the client connection once every attempt failed.
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(r.map(|n| n == 0).unwrap_or(true));
    // No endpoints at all: counted as no_endpoint.
    let svc2 = service("alldead", vip);
    p.publish(snapshot(&[(&svc2, &[])]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(r.map(|n| n == 0).unwrap_or(true));
    let text = p.metrics_text();
    assert!(
        text.lines().any(|l| l.contains("cause=\"no_endpoint\"")
            && l.contains("alldead")
            && l.ends_with(" 1")),
        "{text}"
    );
    p.stop().await;
}

#[tokio::test]
async fn node_port_in_use_is_reported_as_a_problem() {
    let (be, _h) = id_backend("np").await;
    // Another process's socket on the node port (same address, no SO_REUSEPORT).
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let np = squatter.local_addr().unwrap().port();
    let vip = unique_vip();
    let mut svc = service("nodeport", vip);
    svc.service_type = pier_model::ServiceType::NodePort;
    svc.ports[0].node_port = Some(pier_model::PortNum::new(np).unwrap());
    let eps = [endpoint(&svc, "e1", be, true)];
    let mut p = start(test_config(), snapshot(&[(&svc, &eps)]));
    let problems = wait_for(&mut p.problems, Duration::from_secs(2), |m| !m.is_empty()).await;
    let key = (svc.namespace.clone(), svc.name.clone());
    let msg = problems.get(&key).expect("problem for the service");
    assert!(
        msg.contains(&format!("node port {np}")) && msg.contains("in use"),
        "{msg}"
    );
    // The VIP listener works regardless.
    assert_eq!(
        {
            let mut s = connect_within(vip, Duration::from_secs(2)).await;
            let mut o = String::new();
            s.read_to_string(&mut o).await.unwrap();
            o
        },
        "np"
    );
    // Freed, and the next snapshot change binds it; the problem clears.
    drop(squatter);
    let mut bumped = (*snapshot(&[(&svc, &eps)])).clone();
    bumped.revision += 1;
    p.publish(std::sync::Arc::new(bumped));
    wait_for(&mut p.problems, Duration::from_secs(2), |m| m.is_empty()).await;
    let node_port = std::net::SocketAddr::from(([127, 0, 0, 1], np));
    assert_eq!(request_id(node_port).await.unwrap(), "np");
    p.stop().await;
}
