//! Who is answered: the host itself (loopback and every address of its own
//! network namespace, unless turned off), the container networks and the
//! configured CIDRs. Everyone else gets REFUSED, so the server is never an
//! open resolver.
//!
//! A query the host sends to an address of its own (the DNS VIP on pier0,
//! say) leaves from that address, not from 127.0.0.0/8, so loopback alone
//! would refuse the host. Linux drops a packet that arrives from outside
//! with a source address of the host's own (`accept_local` is off by
//! default), so such a source really is the host.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use pier_model::Cidr;

/// A refused client makes the server read the host's addresses again at
/// most this often, so an address added since the last read (a new
/// interface, DHCP) is answered at once, and a flood of refused queries
/// costs at most ten `getifaddrs` a second.
pub const LOCAL_RESCAN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// Answer the host itself: loopback and [`Acl::local`].
    pub host: bool,
    pub nets: Vec<Cidr>,
    /// The host's own addresses (canonical form), consulted when `host`.
    pub local: Vec<IpAddr>,
}

/// Whether `ip` is inside `net`.
pub fn contains(net: &Cidr, ip: IpAddr) -> bool {
    let p = net.prefix() as u32;
    match (net.addr(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

impl Acl {
    /// `host`: answer loopback and the `local` addresses. `allow`: the
    /// configured CIDRs. `container_networks`: Docker's subnets.
    pub fn new(host: bool, allow: &[Cidr], container_networks: &[Cidr], local: &[IpAddr]) -> Acl {
        let mut nets: Vec<Cidr> = allow.iter().chain(container_networks).copied().collect();
        nets.sort();
        nets.dedup();
        let mut local: Vec<IpAddr> = if host {
            local.iter().map(|a| a.to_canonical()).collect()
        } else {
            Vec::new()
        };
        local.sort();
        local.dedup();
        Acl { host, nets, local }
    }

    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        (self.host && (ip.is_loopback() || self.local.contains(&ip)))
            || self.nets.iter().any(|n| contains(n, ip))
    }
}

/// What the ACL is built from, and when the host's addresses were read.
#[derive(Debug)]
pub(crate) struct AclInputs {
    pub host: bool,
    pub allow: Vec<Cidr>,
    pub nets: Vec<Cidr>,
    pub local: Vec<IpAddr>,
    pub scanned: Option<Instant>,
}

impl AclInputs {
    pub fn build(&self) -> Acl {
        Acl::new(self.host, &self.allow, &self.nets, &self.local)
    }

    /// Read the host's addresses again; true when they changed.
    pub fn scan_local(&mut self) -> bool {
        if !self.host {
            return false;
        }
        self.scanned = Some(Instant::now());
        match local_addrs() {
            Ok(l) if l != self.local => {
                tracing::debug!(addrs = ?l, "host addresses changed");
                self.local = l;
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "cannot list the host's addresses; only loopback counts as the host");
                false
            }
        }
    }

    /// Whether a refused client may be a host address added since the last
    /// read: not when the host is not answered, nor within [`LOCAL_RESCAN`]
    /// of the last read.
    pub fn may_rescan(&self, now: Instant) -> bool {
        self.host
            && self
                .scanned
                .is_none_or(|t| now.saturating_duration_since(t) >= LOCAL_RESCAN)
    }
}

/// The host's own addresses ([`pier_model::addr::host_addrs`]).
pub fn local_addrs() -> std::io::Result<Vec<IpAddr>> {
    pier_model::addr::host_addrs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_container_networks_and_allow() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let acl = Acl::new(
            true,
            &[c("192.0.2.0/24")],
            &[c("172.18.0.0/16")],
            &[ip("10.213.0.10"), ip("198.51.100.7"), ip("2001:db8::7")],
        );
        assert!(acl.allows(ip("127.0.0.1")));
        assert!(acl.allows(ip("127.9.9.9")));
        assert!(acl.allows(ip("::1")));
        assert!(acl.allows(ip("::ffff:172.18.3.4")));
        assert!(acl.allows(ip("192.0.2.77")));
        // The host's own addresses, in either form.
        assert!(acl.allows(ip("10.213.0.10")));
        assert!(acl.allows(ip("::ffff:198.51.100.7")));
        assert!(acl.allows(ip("2001:db8::7")));
        // Their neighbours are not the host.
        assert!(!acl.allows(ip("10.213.0.11")));
        assert!(!acl.allows(ip("198.51.100.8")));
        assert!(!acl.allows(ip("2001:db8::8")));
        assert!(!acl.allows(ip("172.19.0.1")));
        assert!(!acl.allows(ip("8.8.8.8")));
        assert!(!acl.allows(ip("2001:db8::1")));
        // Turning the host off drops loopback and the local addresses alike.
        let strict = Acl::new(false, &[c("127.0.0.2/32")], &[], &[ip("198.51.100.7")]);
        assert!(!strict.allows(ip("127.0.0.1")));
        assert!(!strict.allows(ip("198.51.100.7")));
        assert!(strict.allows(ip("127.0.0.2")));
        let v6 = Acl::new(false, &[c("fd00::/8")], &[], &[]);
        assert!(v6.allows(ip("fd12::1")));
        assert!(!v6.allows(ip("fe80::1")));
    }

    #[test]
    fn local_addrs_include_loopback() {
        let l = local_addrs().unwrap();
        assert!(l.contains(&ip4(127, 0, 0, 1)), "{l:?}");
        assert!(
            l.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates: {l:?}"
        );
    }

    #[test]
    fn rescan_is_rate_limited_and_off_without_host() {
        let t0 = Instant::now();
        let mut i = AclInputs {
            host: true,
            allow: vec![],
            nets: vec![],
            local: vec![],
            scanned: None,
        };
        assert!(i.may_rescan(t0));
        assert!(i.scan_local(), "the first read finds at least loopback");
        let t = i.scanned.unwrap();
        assert!(!i.may_rescan(t + LOCAL_RESCAN / 2));
        assert!(i.may_rescan(t + LOCAL_RESCAN));
        assert!(i.build().allows(ip4(127, 0, 0, 1)));
        i.host = false;
        assert!(!i.may_rescan(t + LOCAL_RESCAN * 10));
        assert!(!i.scan_local());
    }

    fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
    }
}
