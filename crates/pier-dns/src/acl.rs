//! Who is answered: loopback (unless turned off), the container networks
//! and the configured CIDRs. Everyone else gets REFUSED, so the server is
//! never an open resolver.

use std::net::IpAddr;

use pier_model::Cidr;

#[derive(Debug, Clone, Default)]
pub struct Acl {
    pub loopback: bool,
    pub nets: Vec<Cidr>,
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
    pub fn new(loopback: bool, allow: &[Cidr], container_networks: &[Cidr]) -> Acl {
        let mut nets: Vec<Cidr> = allow.iter().chain(container_networks).copied().collect();
        nets.sort();
        nets.dedup();
        Acl { loopback, nets }
    }

    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        (self.loopback && ip.is_loopback()) || self.nets.iter().any(|n| contains(n, ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_container_networks_and_allow() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let acl = Acl::new(true, &[c("192.0.2.0/24")], &[c("172.18.0.0/16")]);
        assert!(acl.allows("127.0.0.1".parse().unwrap()));
        assert!(acl.allows("127.9.9.9".parse().unwrap()));
        assert!(acl.allows("::1".parse().unwrap()));
        assert!(acl.allows("::ffff:172.18.3.4".parse().unwrap()));
        assert!(acl.allows("192.0.2.77".parse().unwrap()));
        assert!(!acl.allows("172.19.0.1".parse().unwrap()));
        assert!(!acl.allows("8.8.8.8".parse().unwrap()));
        assert!(!acl.allows("2001:db8::1".parse().unwrap()));
        let strict = Acl::new(false, &[c("127.0.0.2/32")], &[]);
        assert!(!strict.allows("127.0.0.1".parse().unwrap()));
        assert!(strict.allows("127.0.0.2".parse().unwrap()));
        let v6 = Acl::new(false, &[c("fd00::/8")], &[]);
        assert!(v6.allows("fd12::1".parse().unwrap()));
        assert!(!v6.allows("fe80::1".parse().unwrap()));
    }
}
