//! Needs root (CI runs as root): creates a link with a unique name, and
//! sends traffic only to an address the test itself assigned to it.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use pier_model::Cidr;
use pier_proxy::{ProxyConfig, setup_iface, teardown_iface};
use tokio::io::AsyncReadExt;

use crate::common::*;

fn ip(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deletes the link even if the test fails half-way.
struct LinkGuard(String);
impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        let _ = Command::new("ip")
            .args(["route", "del", "unreachable", "10.213.250.0/24"])
            .output();
    }
}

#[tokio::test]
async fn setup_iface_adds_link_vips_and_route_then_teardown_removes_them() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
    let name = format!("pt{:06x}", rand_u32() & 0xff_ffff);
    let _guard = LinkGuard(name.clone());
    let cidr: Cidr = "10.213.250.0/24".parse().unwrap();
    let dns: IpAddr = cidr.nth(10).unwrap();
    let cfg = ProxyConfig {
        iface: name.clone(),
        manage_iface: true,
        drain_timeout_ms: 300,
        ..test_config()
    };
    setup_iface(&cfg, cidr, &[dns]).await.unwrap();
    // Idempotent: a second call checks and changes nothing.
    setup_iface(&cfg, cidr, &[dns]).await.unwrap();
    let addrs = ip(&["-o", "addr", "show", "dev", &name]);
    assert!(addrs.contains("10.213.250.10/32"), "{addrs}");
    let route = ip(&["route", "show", "10.213.250.0/24"]);
    assert!(route.contains("unreachable 10.213.250.0/24"), "{route}");

    // The proxy adds a service's VIP as /32 and serves it.
    let (be, _h) = id_backend("vip").await;
    let vip = SocketAddr::new(cidr.nth(20).unwrap(), 8080);
    let svc = service("ifacevip", vip);
    let p = start_with_cidr(
        cfg.clone(),
        cidr,
        snapshot(&[(&svc, &[endpoint(&svc, "e", be, true)])]),
    );
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while !ip(&["-o", "addr", "show", "dev", &name]).contains("10.213.250.20/32") {
        assert!(tokio::time::Instant::now() < end, "VIP not added");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = connect_within(vip, Duration::from_secs(2)).await;
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "vip");

    // Service gone: the VIP goes once the drain timeout has passed.
    p.publish(snapshot(&[]));
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    while ip(&["-o", "addr", "show", "dev", &name]).contains("10.213.250.20/32") {
        assert!(tokio::time::Instant::now() < end, "VIP not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The DNS address set up outside the proxy stays.
    assert!(ip(&["-o", "addr", "show", "dev", &name]).contains("10.213.250.10/32"));
    p.stop().await;

    // keep_iface leaves everything; the default removes link and route.
    let keep = ProxyConfig {
        keep_iface: true,
        ..cfg.clone()
    };
    teardown_iface(&keep, cidr).await.unwrap();
    assert!(ip(&["-o", "link", "show", "dev", &name]).contains(&name));
    teardown_iface(&cfg, cidr).await.unwrap();
    assert!(!ip(&["-o", "link", "show"]).contains(&format!(" {name}:")));
    assert!(!ip(&["route", "show", "10.213.250.0/24"]).contains("unreachable"));
    // Tearing down twice is fine.
    teardown_iface(&cfg, cidr).await.unwrap();
}
