use std::time::{Duration, Instant};

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
    let cfg = test_config();
    // Refused connects fail at once: the client must not wait out even one
    // connect timeout, whatever the number of attempts.
    let fast = Duration::from_millis(cfg.connect_timeout_ms);
    let p = start(cfg, snapshot(&[(&svc, &eps)]));
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    let began = Instant::now();
    let mut buf = Vec::new();
    // The proxy closes the client connection, with no byte, once every
    // attempt failed.
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the proxy closes the connection")
        .expect("a clean close");
    let took = began.elapsed();
    assert_eq!(n, 0, "{buf:?}");
    assert!(
        took < fast,
        "every endpoint refused, yet the close took {took:?}"
    );
    // No endpoints at all: counted as no_endpoint.
    let svc2 = service("alldead", vip);
    p.publish(snapshot(&[(&svc2, &[])]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    let began = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the proxy closes the connection")
        .expect("a clean close");
    let took = began.elapsed();
    assert_eq!(n, 0, "{buf:?}");
    assert!(took < fast, "no endpoint, yet the close took {took:?}");
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

/// A connection from `from` (a loopback source address) to `to`; whether
/// the proxy serves it: an echo of one byte comes back.
async fn served_from(from: [u8; 4], to: std::net::SocketAddr) -> (bool, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let ok = async {
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b == *b"x")
    };
    let ok = tokio::time::timeout(Duration::from_secs(5), ok)
        .await
        .expect("served or refused in time")
        .unwrap_or(false);
    (ok, s)
}

/// Attack (P1): one client holds many node-port connections, and then
/// many clients do. The per-client cap, then the total cap, reset the
/// extra connections at accept (counted by reason); a freed slot is
/// taken again; the VIP listener has no such cap.
#[tokio::test]
async fn node_port_connection_caps_refuse_floods() {
    let (echo, _h) = echo_backend().await;
    let np = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let vip = unique_vip();
    let mut svc = service("capped", vip);
    svc.service_type = pier_model::ServiceType::NodePort;
    svc.ports[0].node_port = Some(pier_model::PortNum::new(np).unwrap());
    let eps = [endpoint(&svc, "e1", echo, true)];
    let mut cfg = test_config();
    cfg.node_port_max_conns = 3;
    cfg.node_port_max_conns_per_client = 2;
    let p = start(cfg, snapshot(&[(&svc, &eps)]));
    let node_port = std::net::SocketAddr::from(([127, 0, 0, 1], np));
    drop(connect_within(node_port, Duration::from_secs(2)).await);
    // That probe's slot is freed once its connection ends: wait (bounded)
    // for the service's active connections to go back to 0.
    let idle = |t: &str| {
        t.lines().any(|l| {
            l.starts_with("pier_proxy_connections_active{")
                && l.contains("capped")
                && l.ends_with(" 0")
        })
    };
    for _ in 0..100 {
        if idle(&p.metrics_text()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(idle(&p.metrics_text()), "{}", p.metrics_text());

    let (ok1, a1) = served_from([127, 0, 0, 1], node_port).await;
    let (ok2, _a2) = served_from([127, 0, 0, 1], node_port).await;
    assert!(ok1 && ok2, "a client's first two connections are served");
    let (ok3, _a3) = served_from([127, 0, 0, 1], node_port).await;
    assert!(!ok3, "a client's third connection must be refused");
    let (ok4, _b1) = served_from([127, 0, 0, 2], node_port).await;
    assert!(ok4, "another client is served while the total allows");
    let (ok5, _b2) = served_from([127, 0, 0, 3], node_port).await;
    assert!(!ok5, "the fourth connection in all must be refused");
    let text = p.metrics_text();
    for reason in ["per_client", "total"] {
        assert!(
            text.lines()
                .any(|l| l
                    == format!("pier_proxy_node_port_refusals_total{{reason=\"{reason}\"}} 1")),
            "{reason} not counted once:\n{text}"
        );
    }
    // A freed slot is taken again (bounded wait for the proxy to see the
    // close and end that connection).
    drop(a1);
    let mut served = false;
    for _ in 0..50 {
        let (ok, s) = served_from([127, 0, 0, 1], node_port).await;
        if ok {
            served = true;
            drop(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a freed slot was not reused");
    // The VIP listener is not capped.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (ok, s) = served_from([127, 0, 0, 1], vip).await;
        assert!(ok, "VIP connections are not capped");
        held.push(s);
    }
    drop(held);
    p.stop().await;
}

/// Issue 12, in depth behind the API and the agent: endpoint records that
/// point this node's proxy at the host itself (loopback, link-local
/// metadata; forged in the store, say) are not proxied to unless
/// `[network] static_endpoint_allow` lists them. The allowlisted endpoint
/// beside them serves every request, and the host's loopback service is
/// never connected to.
#[tokio::test]
async fn endpoints_into_the_host_itself_are_not_proxied() {
    // The host's "private" service, on 127.0.0.1.
    let private = listener();
    let private_addr = private.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    let _h = tokio::spawn(async move {
        while private.accept().await.is_ok() {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The legitimate backend, on 127.0.0.2, which the allowlist names.
    let good = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let good_addr = good.local_addr().unwrap();
    let _g = tokio::spawn(async move {
        while let Ok((mut s, _)) = good.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"good").await;
            });
        }
    });
    let vip = unique_vip();
    let svc = service("intohost", vip);
    let eps = [
        endpoint(&svc, "good", good_addr, true),
        endpoint(&svc, "loop", private_addr, true),
        endpoint(&svc, "loop6", "[::ffff:127.0.0.1]:1".parse().unwrap(), true),
        endpoint(&svc, "meta", "169.254.169.254:80".parse().unwrap(), true),
    ];
    let cfg = pier_proxy::ProxyConfig {
        direct_allow: vec!["127.0.0.2/32".parse().unwrap()],
        ..test_config()
    };
    let _p = start(cfg, snapshot(&[(&svc, &eps)]));
    let _ = connect_within(vip, Duration::from_secs(5)).await;
    for i in 0..40 {
        let got = request_id(vip)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(got, "good", "request {i}");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the proxy connected to the host's loopback service"
    );
}
