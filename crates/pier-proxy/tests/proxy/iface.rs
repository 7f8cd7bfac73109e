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

/// Deletes the link and its routes even if the test fails half-way.
struct LinkGuard(String, &'static [&'static str]);
impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        for r in self.1 {
            let _ = Command::new("ip")
                .args(["route", "del", "unreachable", r])
                .output();
        }
    }
}

#[tokio::test]
async fn setup_iface_adds_link_vips_and_route_then_teardown_removes_them() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
    let name = format!("pt{:06x}", rand_u32() & 0xff_ffff);
    let _guard = LinkGuard(name.clone(), &["10.213.250.0/24"]);
    let cidr: Cidr = "10.213.250.0/24".parse().unwrap();
    let dns: IpAddr = cidr.nth(10).unwrap();
    let cfg = ProxyConfig {
        iface: name.clone(),
        manage_iface: true,
        drain_timeout_ms: 300,
        ..test_config()
    };
    setup_iface(&cfg, &[cidr], &[dns]).await.unwrap();
    // Idempotent: a second call checks and changes nothing.
    setup_iface(&cfg, &[cidr], &[dns]).await.unwrap();
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
    teardown_iface(&keep, &[cidr]).await.unwrap();
    assert!(ip(&["-o", "link", "show", "dev", &name]).contains(&name));
    teardown_iface(&cfg, &[cidr]).await.unwrap();
    assert!(!ip(&["-o", "link", "show"]).contains(&format!(" {name}:")));
    assert!(!ip(&["route", "show", "10.213.250.0/24"]).contains("unreachable"));
    // Tearing down twice is fine.
    teardown_iface(&cfg, &[cidr]).await.unwrap();
}

/// Dual stack: a service's IPv6 VIP goes on the link as a /128 without
/// DAD (bound at once), beside its IPv4 VIP, with an unreachable route for
/// the IPv6 service CIDR; both VIPs reach the same endpoints (an IPv6
/// client to an IPv4 endpoint, an IPv4 client to an IPv6 endpoint). Only
/// addresses on the link this test made, and loopback, are used.
#[tokio::test]
async fn dual_stack_vip6_is_added_without_dad_and_served_both_ways() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
    let name = format!("p6{:06x}", rand_u32() & 0xff_ffff);
    let _guard = LinkGuard(name.clone(), &["10.213.249.0/24", "fd5e:7e57:249::/112"]);
    let cidr: Cidr = "10.213.249.0/24".parse().unwrap();
    let cidr6: Cidr = "fd5e:7e57:249::/112".parse().unwrap();
    let cfg = ProxyConfig {
        iface: name.clone(),
        manage_iface: true,
        drain_timeout_ms: 300,
        direct_allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        ..test_config()
    };
    setup_iface(&cfg, &[cidr, cidr6], &[]).await.unwrap();
    let route = ip(&["-6", "route", "show", "fd5e:7e57:249::/112"]);
    assert!(route.contains("unreachable fd5e:7e57:249::/112"), "{route}");

    // An IPv4 backend and an IPv6 one (on ::1), each its own service.
    let (be4, _h4) = id_backend("four").await;
    let l6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let be6 = l6.local_addr().unwrap();
    let _h6 = tokio::spawn(async move {
        while let Ok((mut s, _)) = l6.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"six").await;
            let _ = s.shutdown().await;
        }
    });
    let vip_a = SocketAddr::new(cidr.nth(21).unwrap(), 8080);
    let vip6_a = SocketAddr::new(cidr6.nth(21).unwrap(), 8080);
    let mut a = service("dsa", vip_a);
    a.vip6 = Some(vip6_a.ip());
    let vip_b = SocketAddr::new(cidr.nth(22).unwrap(), 8080);
    let vip6_b = SocketAddr::new(cidr6.nth(22).unwrap(), 8080);
    let mut b = service("dsb", vip_b);
    b.vip6 = Some(vip6_b.ip());
    let p = start_with_cidrs(
        cfg.clone(),
        cidr,
        Some(cidr6),
        snapshot(&[
            (&a, &[endpoint(&a, "e", be4, true)]),
            (&b, &[endpoint(&b, "e", be6, true)]),
        ]),
    );
    let read = |addr: SocketAddr| async move {
        let mut s = connect_within(addr, Duration::from_secs(2)).await;
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    // v6 client -> v4 endpoint, and v4 client -> v4 endpoint.
    assert_eq!(read(vip6_a).await, "four");
    assert_eq!(read(vip_a).await, "four");
    // v4 client -> v6 endpoint, and v6 client -> v6 endpoint.
    assert_eq!(read(vip_b).await, "six");
    assert_eq!(read(vip6_b).await, "six");
    let addrs = ip(&["-o", "-6", "addr", "show", "dev", &name]);
    let line = addrs
        .lines()
        .find(|l| l.contains("fd5e:7e57:249::15/128"))
        .unwrap_or_else(|| panic!("no /128 for the IPv6 VIP: {addrs}"));
    assert!(
        line.contains("nodad") && !line.contains("tentative"),
        "{line}"
    );

    // A proxy without the IPv6 CIDR does not serve an IPv6 VIP: the
    // service's IPv4 VIP only.
    p.publish(snapshot(&[]));
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    while ip(&["-o", "-6", "addr", "show", "dev", &name]).contains("fd5e:7e57:249::15/128") {
        assert!(tokio::time::Instant::now() < end, "IPv6 VIP not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.stop().await;
    let p = start_with_cidrs(
        cfg.clone(),
        cidr,
        None,
        snapshot(&[(&a, &[endpoint(&a, "e", be4, true)])]),
    );
    assert_eq!(read(vip_a).await, "four");
    assert!(
        !ip(&["-o", "-6", "addr", "show", "dev", &name]).contains("fd5e:7e57:249::15"),
        "an IPv6 VIP was added without an IPv6 service CIDR"
    );
    assert!(tokio::net::TcpStream::connect(vip6_a).await.is_err());
    p.stop().await;

    teardown_iface(&cfg, &[cidr, cidr6]).await.unwrap();
    assert!(!ip(&["-6", "route", "show", "fd5e:7e57:249::/112"]).contains("unreachable"));
}
