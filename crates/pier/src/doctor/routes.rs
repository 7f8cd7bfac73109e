//! The service CIDR check: the CIDR against this host's routing table
//! (`/proc/net/route`), so that no route but pier0's covers it.

use std::net::{IpAddr, Ipv4Addr};

use pier_model::Cidr;

use super::{Check, fail, ok};
use crate::daemon::config::Config;

/// A route of the main table (/proc/net/route), IPv4.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) iface: String,
    pub(crate) dst: Ipv4Addr,
    pub(crate) prefix: u8,
    pub(crate) reject: bool,
}

pub(crate) fn routes() -> std::io::Result<Vec<Route>> {
    Ok(parse_routes(&std::fs::read_to_string("/proc/net/route")?))
}

pub(crate) fn parse_routes(text: &str) -> Vec<Route> {
    const RTF_REJECT: u32 = 0x0200;
    let mut v = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(flags), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[3], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        v.push(Route {
            iface: f[0].to_owned(),
            dst: Ipv4Addr::from(dst.to_le_bytes()),
            prefix: u32::from_be_bytes(mask.to_le_bytes()).count_ones() as u8,
            // Blackhole routes have no device ("*"); unreachable and
            // prohibit ones also carry RTF_REJECT.
            reject: flags & RTF_REJECT != 0 || f[0] == "*",
        });
    }
    v
}

/// Whether two IPv4 prefixes share an address.
pub(crate) fn overlaps(a: Ipv4Addr, alen: u8, b: Ipv4Addr, blen: u8) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

/// The routes that would take traffic for `cidr` away from pier: every
/// route but the default one, pier's own interface, and reject routes
/// (blackhole, unreachable, prohibit: guards like tests/run.sh's).
pub(crate) fn conflicting_routes<'a>(
    cidr: &Cidr,
    iface: &str,
    routes: &'a [Route],
) -> Vec<&'a Route> {
    let IpAddr::V4(net) = cidr.addr() else {
        return Vec::new();
    };
    routes
        .iter()
        .filter(|r| r.prefix > 0 && !r.reject && r.iface != iface)
        .filter(|r| overlaps(r.dst, r.prefix, net, cidr.prefix()))
        .collect()
}

pub(crate) fn service_cidr(cfg: &Config) -> Check {
    const NAME: &str = "service CIDR";
    let cidr = &cfg.network.service_cidr;
    if !cfg.proxy.manage_iface {
        return ok(
            NAME,
            format!("{cidr} (unprivileged: VIPs on loopback, no route needed)"),
        );
    }
    let routes = match routes() {
        Ok(r) => r,
        Err(e) => {
            return fail(
                NAME,
                format!("cannot read /proc/net/route: {e}"),
                "mount /proc",
            );
        }
    };
    let bad = conflicting_routes(cidr, &cfg.proxy.iface, &routes);
    if bad.is_empty() {
        return ok(NAME, format!("{cidr} overlaps no route"));
    }
    let list: Vec<String> = bad
        .iter()
        .map(|r| format!("{}/{} dev {}", r.dst, r.prefix, r.iface))
        .collect();
    let free = (200u8..=250).map(|b| Ipv4Addr::new(10, b, 0, 0)).find(|a| {
        conflicting_routes(&format!("{a}/16").parse().expect("CIDR"), "", &routes).is_empty()
    });
    let suggest = free.map_or(String::new(), |a| format!(", e.g. {a}/16"));
    fail(
        NAME,
        format!(
            "{cidr} overlaps {}: traffic for those addresses would not reach pier",
            list.join(", ")
        ),
        format!(
            "pick a service CIDR no route covers{suggest} (network.service_cidr or --service-cidr)"
        ),
    )
}

// ---- store ---------------------------------------------------------------
