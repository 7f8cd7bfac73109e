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

/// The IPv4 address an IPv6 address that embeds one stands for, so that
/// it is judged as that address: IPv4-mapped (`::ffff:127.0.0.1`) and the
/// deprecated IPv4-compatible form (`::127.0.0.1`, which a host with the
/// sit tunnel up routes to that IPv4 address). `::` and `::1` are
/// themselves.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if v6.segments()[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback() => {
                let o = v6.octets();
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            }
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
/// unspecified, multicast and broadcast addresses, addresses inside any of
/// `service_cidrs` (the IPv4 one and, dual stack, the IPv6 one), and any of
/// `host_addrs` (the host's own addresses, as read by the caller).
/// IPv4-mapped and IPv4-compatible IPv6 addresses are judged as the IPv4
/// address they embed.
pub fn check_static_ip(
    ip: IpAddr,
    service_cidrs: &[Cidr],
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
    if let Some(sc) = service_cidrs
        .iter()
        .find(|sc| sc.contains(c) || sc.contains(ip))
    {
        return Err(Refusal::ServiceCidr(*sc));
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

    fn cidr6() -> Cidr {
        "fd5e:1:2:3::/112".parse().unwrap()
    }

    fn check(ip: &str, host: &[&str], allow: &[&str]) -> Result<(), Refusal> {
        let host: Vec<IpAddr> = host.iter().map(|h| h.parse().unwrap()).collect();
        let allow: Vec<Cidr> = allow.iter().map(|a| a.parse().unwrap()).collect();
        check_static_ip(ip.parse().unwrap(), &[cidr(), cidr6()], &host, &allow)
    }

    /// IPv6: the loopback and the host's own addresses in every IPv6
    /// spelling, and the IPv6 service CIDR, are refused as their IPv4
    /// forms are; the proxy's own check (no CIDR, no host addresses) agrees
    /// on the kinds.
    #[test]
    fn ipv6_spellings_of_refused_addresses() {
        let cases = [
            ("::1", Refusal::Loopback),
            ("0:0:0:0:0:0:0:1", Refusal::Loopback),
            ("::ffff:127.0.0.2", Refusal::Loopback),
            ("::127.0.0.1", Refusal::Loopback),
            ("::169.254.169.254", Refusal::LinkLocal),
            ("::ffff:0.0.0.0", Refusal::Unspecified),
            ("fe80::1%0".split('%').next().unwrap(), Refusal::LinkLocal),
            ("ff05::2", Refusal::Multicast),
            ("fd5e:1:2:3::b", Refusal::ServiceCidr(cidr6())),
            ("::10.213.0.11", Refusal::ServiceCidr(cidr())),
            ("2001:db8::7", Refusal::HostAddress),
            ("::192.0.2.7", Refusal::HostAddress),
        ];
        for (ip, want) in cases {
            assert_eq!(
                check(ip, &["192.0.2.7", "2001:db8::7"], &[]),
                Err(want),
                "{ip}"
            );
        }
        for ip in ["::1", "::ffff:127.0.0.1", "::127.0.0.1", "fe80::9", "::"] {
            assert!(address_kind_refusal(ip.parse().unwrap()).is_some(), "{ip}");
        }
        // Ordinary IPv6 addresses, a Docker network's ULA among them.
        for ip in ["fd7e:1:2:3::2", "2001:db8::8", "fd5e:1:2:4::b"] {
            assert_eq!(check(ip, &["2001:db8::7"], &[]), Ok(()), "{ip}");
            assert_eq!(address_kind_refusal(ip.parse().unwrap()), None, "{ip}");
        }
        // The allowlist lets an IPv6 loopback through only when it names it.
        assert_eq!(check("::1", &[], &["::1/128"]), Ok(()));
        assert_eq!(check("::1", &[], &["127.0.0.0/8"]), Err(Refusal::Loopback));
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
