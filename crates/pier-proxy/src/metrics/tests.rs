use super::*;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

#[test]
fn windows_hold_what_happened_since_the_last_sample() {
    let m = Metrics::new();
    let s = m.service("default/web", "http");
    let e = m.endpoint("default/web", "http", "10.0.0.2:80", "direct");
    let t0 = Instant::now();
    let w0 = s.sig.window(0, t0);
    assert_eq!((w0.ms, w0.new_conns), (0, 0));
    for _ in 0..990 {
        s.sig.connect.observe(100);
    }
    for _ in 0..10 {
        s.sig.connect.observe(5000);
    }
    let w = s
        .sig
        .window(1000, t0 + std::time::Duration::from_millis(500));
    assert_eq!((w.ms, w.new_conns, w.connect.count()), (500, 1000, 1000));
    let p99 = w.connect.quantile(0.99).unwrap();
    assert!((94..=106).contains(&p99), "{p99}");
    assert_eq!(s.sig.rate.get(), 2000.0);
    // The next window holds only what came after.
    s.sig.connect.observe(5000);
    let w = s
        .sig
        .window(1001, t0 + std::time::Duration::from_millis(1500));
    assert_eq!((w.new_conns, w.connect.count()), (1, 1));
    let p = w.connect.quantile(0.99).unwrap();
    assert!((4700..=5300).contains(&p), "{p}");
    // First byte: a sample only once a client byte went out first.
    let fb = FirstByte::new(&s.sig, &e.sig);
    fb.on_bytes(true);
    std::thread::sleep(std::time::Duration::from_millis(3));
    fb.on_bytes(true);
    fb.on_bytes(false);
    fb.on_bytes(false);
    let server_first = FirstByte::new(&s.sig, &e.sig);
    server_first.on_bytes(false);
    server_first.on_bytes(true);
    server_first.on_bytes(false);
    let w = s
        .sig
        .window(1001, t0 + std::time::Duration::from_millis(2500));
    assert_eq!(w.first_byte.count(), 1);
    let p = w.first_byte.quantile(0.5).unwrap();
    assert!((2800..=200_000).contains(&p), "{p}");
    let we = e.sig.window(0, t0);
    assert_eq!(we.first_byte.count(), 1);
}

#[test]
fn atomic_counts_wrap_within_a_window() {
    let a = AtomicSketch::default();
    a.b[5].store(u32::MAX - 1, Relaxed);
    let mut prev = Vec::new();
    a.window(&mut prev);
    a.observe(5);
    a.observe(5);
    a.observe(5);
    assert_eq!(a.window(&mut prev).0, vec![(5, 3)]);
}

#[test]
fn metrics_encode_with_service_and_endpoint_labels() {
    let m = Metrics::new();
    // As the daemon does: its registry prefixes everything `pier`.
    let mut r = Registry::with_prefix("pier");
    m.register(&mut r);
    let s = m.service("default/web", "http");
    s.total.inc();
    let e = m.endpoint("default/web", "http", "10.0.0.2:80", "mesh");
    e.error(ConnectCause::Refused).inc();
    e.bytes_out.inc_by(42);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
    assert!(
        out.contains(r#"pier_proxy_connections_total{service="default/web",port="http"} 1"#),
        "{out}"
    );
    assert!(out.contains(r#"cause="refused""#), "{out}");
    assert!(out.contains(r#"pier_proxy_endpoint_bytes_total{service="default/web",port="http",endpoint="10.0.0.2:80",route="mesh",direction="out"} 42"#), "{out}");
    assert!(!out.contains("pier_pier_"), "{out}");
    m.remove_endpoint(&e);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
    assert!(!out.contains("10.0.0.2:80"), "{out}");
}
