//! Which addresses a static endpoint may name.
//!
//! Every host's proxy connects to a service's static endpoints, and every
//! host health-checks them. An endpoint at `127.0.0.1` would let a container
//! (through the VIP) or the network (through a node port) reach each host's
//! own loopback services: the API, a local etcd, the cloud metadata service
//! at `169.254.169.254`. [`check_static_ip`] is the one decision both the API
//! (at write time, a 400 naming the field) and the agent (before it proxies
//! to or health-checks an endpoint already in the store) make.
//!
//! Pure but for [`host_addrs`], which reads the host's own addresses: the
//! one place pier lists them (the API, the agent and DNS all ask it).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Cidr;

/// Why an address may not be a static endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 127.0.0.0/8, ::1, or an IPv4-mapped loopback address.
    Loopback,
    /// 169.254.0.0/16 (cloud metadata lives here) or fe80::/10.
    LinkLocal,
    /// 0.0.0.0 or ::, which connect to the local host.
    Unspecified,
    /// 224.0.0.0/4 or ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// Inside the service CIDR: a VIP, which would loop through the proxy.
    ServiceCidr(Cidr),
    /// One of the host's own addresses (reaches services bound on it).
    HostAddress,
}

impl Refusal {
    /// A short name of the kind of address, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Loopback => "loopback",
            Refusal::LinkLocal => "link-local",
            Refusal::Unspecified => "unspecified",
            Refusal::Multicast => "multicast",
            Refusal::Broadcast => "broadcast",
            Refusal::ServiceCidr(_) => "service-cidr",
            Refusal::HostAddress => "host-address",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Loopback => f.write_str("is a loopback address"),
            Refusal::LinkLocal => {
                f.write_str("is a link-local address (169.254.0.0/16 or fe80::/10)")
            }
            Refusal::Unspecified => f.write_str("is the unspecified address"),
            Refusal::Multicast => f.write_str("is a multicast address"),
            Refusal::Broadcast => f.write_str("is the broadcast address"),
            Refusal::ServiceCidr(c) => write!(f, "is inside the service CIDR {c}"),
            Refusal::HostAddress => f.write_str("is one of this host's own addresses"),
        }
    }
}

/// The IPv4 address an IPv4-mapped (`::ffff:a.b.c.d`) IPv6 address stands
/// for, so `::ffff:127.0.0.1` is judged as `127.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn is_link_local_v6(ip: &Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

/// Decide whether `ip` may be a static endpoint.
///
/// Refused, unless an entry of `allow` contains it: loopback, link-local,
/// unspecified, multicast and broadcast addresses, addresses inside
/// `service_cidr`, and any of `host_addrs` (the host's own addresses, as
/// read by the caller). IPv4-mapped IPv6 addresses are judged as the IPv4
/// address they map.
pub fn check_static_ip(
    ip: IpAddr,
    service_cidr: &Cidr,
    host_addrs: &[IpAddr],
    allow: &[Cidr],
) -> Result<(), Refusal> {
    let c = canonical(ip);
    if allow.iter().any(|a| a.contains(ip) || a.contains(c)) {
        return Ok(());
    }
    let refusal = match c {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    };
    if let Some(r) = refusal {
        return Err(r);
    }
    if service_cidr.contains(c) || service_cidr.contains(ip) {
        return Err(Refusal::ServiceCidr(*service_cidr));
    }
    if host_addrs.iter().any(|h| canonical(*h) == c) {
        return Err(Refusal::HostAddress);
    }
    Ok(())
}

/// The refusal that depends on the address alone (loopback, link-local,
/// unspecified, multicast, broadcast), for callers that know no service
/// CIDR or host addresses: the proxy, before it connects straight to an
/// endpoint.
pub fn address_kind_refusal(ip: IpAddr) -> Option<Refusal> {
    match canonical(ip) {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

/// The addresses of every interface of this network namespace
/// (getifaddrs(3)), IPv4-mapped ones as IPv4, sorted, without duplicates.
pub fn host_addrs() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
        .filter_map(|i| i.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .map(canonical)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

fn refusal_v4(ip: Ipv4Addr) -> Option<Refusal> {
    if ip.is_loopback() {
        Some(Refusal::Loopback)
    } else if ip.is_link_local() {
        Some(Refusal::LinkLocal)
    } else if ip.is_unspecified() {
        Some(Refusal::Unspecified)
    } else if ip.is_multicast() {
        Some(Refusal::Multicast)
    } else if ip.is_broadcast() {
        Some(Refusal::Broadcast)
    } else {
        None
    }
}

fn refusal_v6(ip: Ipv6Addr) -> Option<Refusal> {
    if ip.is_loopback() {
        Some(Refusal::Loopback)
    } else if is_link_local_v6(&ip) {
        Some(Refusal::LinkLocal)
    } else if ip.is_unspecified() {
        Some(Refusal::Unspecified)
    } else if ip.is_multicast() {
        Some(Refusal::Multicast)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> Cidr {
        "10.213.0.0/16".parse().unwrap()
    }

    fn check(ip: &str, host: &[&str], allow: &[&str]) -> Result<(), Refusal> {
        let host: Vec<IpAddr> = host.iter().map(|h| h.parse().unwrap()).collect();
        let allow: Vec<Cidr> = allow.iter().map(|a| a.parse().unwrap()).collect();
        check_static_ip(ip.parse().unwrap(), &cidr(), &host, &allow)
    }

    #[test]
    fn refuses_each_kind() {
        let cases = [
            ("127.0.0.1", Refusal::Loopback),
            ("127.8.9.10", Refusal::Loopback),
            ("::1", Refusal::Loopback),
            ("::ffff:127.0.0.1", Refusal::Loopback),
            ("169.254.169.254", Refusal::LinkLocal),
            ("::ffff:169.254.169.254", Refusal::LinkLocal),
            ("fe80::1", Refusal::LinkLocal),
            ("febf::1", Refusal::LinkLocal),
            ("0.0.0.0", Refusal::Unspecified),
            ("::", Refusal::Unspecified),
            ("224.0.0.1", Refusal::Multicast),
            ("239.255.255.250", Refusal::Multicast),
            ("ff02::1", Refusal::Multicast),
            ("255.255.255.255", Refusal::Broadcast),
            ("10.213.0.10", Refusal::ServiceCidr(cidr())),
            ("::ffff:10.213.7.7", Refusal::ServiceCidr(cidr())),
            ("192.0.2.7", Refusal::HostAddress),
            ("::ffff:192.0.2.7", Refusal::HostAddress),
            ("2001:db8::7", Refusal::HostAddress),
        ];
        for (ip, want) in cases {
            assert_eq!(
                check(ip, &["192.0.2.7", "2001:db8::7"], &[]),
                Err(want),
                "{ip}"
            );
        }
    }

    #[test]
    fn accepts_ordinary_addresses() {
        for ip in [
            "172.17.0.5",
            "192.0.2.8",
            "10.214.0.1",
            "10.212.255.255",
            "fe00::1",
            "fec0::1",
            "2001:db8::8",
        ] {
            assert_eq!(
                check(ip, &["192.0.2.7", "2001:db8::7"], &[]),
                Ok(()),
                "{ip}"
            );
        }
    }

    #[test]
    fn allowlist_lets_any_through() {
        assert_eq!(check("127.0.0.1", &[], &["127.0.0.0/8"]), Ok(()));
        assert_eq!(check("::ffff:127.0.0.1", &[], &["127.0.0.1/32"]), Ok(()));
        assert_eq!(check("169.254.169.254", &[], &["169.254.0.0/16"]), Ok(()));
        assert_eq!(check("10.213.0.10", &[], &["10.213.0.10/32"]), Ok(()));
        assert_eq!(
            check("192.0.2.7", &["192.0.2.7"], &["192.0.2.0/24"]),
            Ok(())
        );
        // An allowlist entry covers only what it contains.
        assert_eq!(
            check("127.0.0.2", &[], &["127.0.0.1/32"]),
            Err(Refusal::Loopback)
        );
    }

    #[test]
    fn messages_name_the_reason() {
        assert_eq!(
            Refusal::ServiceCidr(cidr()).to_string(),
            "is inside the service CIDR 10.213.0.0/16"
        );
        assert!(Refusal::LinkLocal.to_string().contains("169.254.0.0/16"));
        assert_eq!(Refusal::HostAddress.kind(), "host-address");
    }
}
