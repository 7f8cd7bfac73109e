//! The ports check: every address the agent would bind (DNS, API, mesh,
//! node ports), each tried, and when one is taken, who holds it, read from
//! `/proc/net/{tcp,udp}{,6}` and the processes' sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Check, fail, ok};
use crate::daemon::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A socket bound in this network namespace (from /proc/net).
#[derive(Debug, Clone)]
pub(crate) struct Bound {
    pub(crate) proto: Proto,
    pub(crate) addr: SocketAddr,
    pub(crate) inode: u64,
}

/// What the agent binds: (role, what to change instead, proto, address).
pub(crate) fn agent_binds(cfg: &Config) -> Vec<(&'static str, String, Proto, SocketAddr)> {
    let mut v = Vec::new();
    let dns_instead = "or serve DNS elsewhere: network.serve_dns_vip = false and network.dns_listen = [\"127.0.0.1:5353\"] in the config (--dns only adds an address; it leaves the DNS VIP on)".to_owned();
    if cfg.network.serve_dns_vip {
        // The DNS VIP: `.10` of the service CIDR (as the agent's allocator).
        if let Some(vip) = cfg.network.service_cidr.nth(10) {
            for p in [Proto::Udp, Proto::Tcp] {
                v.push(("DNS VIP", dns_instead.clone(), p, SocketAddr::new(vip, 53)));
            }
        }
    }
    for a in &cfg.network.dns_listen {
        for p in [Proto::Udp, Proto::Tcp] {
            v.push((
                "DNS",
                "or change network.dns_listen (or --dns)".to_owned(),
                p,
                *a,
            ));
        }
    }
    v.push((
        "API",
        "or give the API another address: [api] listen = \"127.0.0.1:7371\" (or --api)".to_owned(),
        Proto::Tcp,
        cfg.api.listen,
    ));
    if let Some(m) = &cfg.mesh {
        v.push((
            "mesh",
            "or change [mesh] listen (or --mesh)".to_owned(),
            Proto::Tcp,
            m.listen,
        ));
    }
    if let Some(r) = &cfg.relay {
        v.push((
            "watch relay",
            "or change [relay] listen (and the other hosts' store.relays)".to_owned(),
            Proto::Tcp,
            r.listen,
        ));
    }
    v
}

pub(crate) fn ports(cfg: &Config) -> Vec<Check> {
    let bound = match bound_sockets() {
        Ok(b) => b,
        Err(e) => {
            return vec![fail(
                "ports",
                format!("cannot read the socket tables: {e}"),
                "mount /proc (pier reads /proc/net/{tcp,udp}{,6})",
            )];
        }
    };
    // One line per port and role, e.g. "port 53 (DNS VIP)".
    let mut out: Vec<Check> = Vec::new();
    let mut seen: Vec<(u16, &str)> = Vec::new();
    let binds = agent_binds(cfg);
    for (role, instead, _, addr) in &binds {
        if seen.contains(&(addr.port(), *role)) {
            continue;
        }
        seen.push((addr.port(), *role));
        let name = format!("port {} ({role})", addr.port());
        let mine: Vec<_> = binds
            .iter()
            .filter(|(r, _, _, a)| r == role && a.port() == addr.port())
            .collect();
        let mut problems = Vec::new();
        let mut holders = Vec::new();
        for (_, _, proto, want) in &mine {
            for b in bound.iter().filter(|b| conflicts(b, *proto, *want)) {
                let who = holder(b.inode);
                problems.push(format!(
                    "{proto} {want} is taken: {} {} is held by {}",
                    b.proto,
                    b.addr,
                    who.as_deref().unwrap_or("an unknown process")
                ));
                if let Some(w) = who
                    && !holders.contains(&w)
                {
                    holders.push(w);
                }
            }
        }
        let low = !may_bind_port(addr.port(), &privilege());
        if problems.is_empty() && low {
            out.push(fail(
                name,
                format!(
                    "free, but this user may not bind port {} (below net.ipv4.ip_unprivileged_port_start, and no CAP_NET_BIND_SERVICE)",
                    addr.port()
                ),
                format!("run the agent as root or give it CAP_NET_BIND_SERVICE, {instead}"),
            ));
        } else if problems.is_empty() {
            let what: Vec<String> = mine.iter().map(|(_, _, p, a)| format!("{p} {a}")).collect();
            out.push(ok(name, format!("free ({})", what.join(", "))));
        } else {
            problems.dedup();
            let pier_running = holders.iter().find(|h| h.starts_with("pier "));
            let orphan = crate::daemon::adoption_socket(&cfg.network.data_dir);
            let fix = match pier_running {
                Some(h) if orphan_listens(&orphan) => format!(
                    "an orphaned pier agent worker serves from this data dir ({h}; its keeper is gone, it waits on {}): start `pier agent` with this config to adopt it without closing a port, or stop it with `kill -TERM` and its pid",
                    orphan.display()
                ),
                Some(h) => format!(
                    "a pier agent already runs ({h}): stop it first (`systemctl stop pier`, or kill its pid) {instead}"
                ),
                None if holders.is_empty() => {
                    format!("stop what holds the port (`ss -lntup` names it) {instead}")
                }
                None => format!("stop {} {instead}", holders.join(", ")),
            };
            out.push(fail(name, problems.join("; "), fix));
        }
    }
    out
}

/// What decides whether this process may bind a port below 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Privilege {
    /// `net.ipv4.ip_unprivileged_port_start` (1024 when unreadable).
    pub(crate) unprivileged_port_start: u16,
    /// CAP_NET_BIND_SERVICE in the effective set (root has it).
    pub(crate) net_bind_service: bool,
}

fn privilege() -> Privilege {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    Privilege {
        unprivileged_port_start: start,
        net_bind_service: cap_net_bind_service(&status),
    }
}

/// Whether `CapEff:` in a `/proc/PID/status` text holds
/// CAP_NET_BIND_SERVICE (bit 10). Unreadable: assume it does, so that the
/// check never fails on a guess.
pub(crate) fn cap_net_bind_service(status: &str) -> bool {
    const CAP_NET_BIND_SERVICE: u32 = 10;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_NET_BIND_SERVICE) != 0)
}

pub(crate) fn may_bind_port(port: u16, p: &Privilege) -> bool {
    port >= p.unprivileged_port_start || p.net_bind_service
}

/// Whether a socket `b` keeps the agent from binding `proto` `want`: same
/// protocol and port, a listening TCP socket or any UDP one, and the same
/// address or a wildcard on either side.
pub(crate) fn conflicts(b: &Bound, proto: Proto, want: SocketAddr) -> bool {
    if b.proto != proto || b.addr.port() != want.port() {
        return false;
    }
    let (have, want) = (b.addr.ip(), want.ip());
    have == want || have.is_unspecified() || want.is_unspecified()
}

/// Listening TCP and bound UDP sockets of this network namespace.
pub(crate) fn bound_sockets() -> std::io::Result<Vec<Bound>> {
    let mut v = Vec::new();
    for (file, proto, v6) in [
        ("/proc/net/tcp", Proto::Tcp, false),
        ("/proc/net/tcp6", Proto::Tcp, true),
        ("/proc/net/udp", Proto::Udp, false),
        ("/proc/net/udp6", Proto::Udp, true),
    ] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            // No IPv6 in this kernel: no v6 table.
            Err(e) if v6 && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        v.extend(parse_proc_net(&text, proto, v6));
    }
    Ok(v)
}

/// Parses a /proc/net/{tcp,udp}[6] table: TCP sockets in LISTEN (0A) and
/// every UDP socket that is not connected (07).
pub(crate) fn parse_proc_net(text: &str, proto: Proto, v6: bool) -> Vec<Bound> {
    let mut v = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let wanted_state = match proto {
            Proto::Tcp => "0A",
            Proto::Udp => "07",
        };
        if f[3] != wanted_state {
            continue;
        }
        let Some((a, p)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(p, 16) else {
            continue;
        };
        let ip = if v6 { parse_v6(a) } else { parse_v4(a) };
        let (Some(ip), Ok(inode)) = (ip, f[9].parse::<u64>()) else {
            continue;
        };
        // A v4-mapped v6 address is the v4 one; `::` also takes v4.
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let ip = if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            ip
        };
        v.push(Bound {
            proto,
            addr: SocketAddr::new(ip, port),
            inode,
        });
    }
    v
}

/// /proc/net's IPv4 address: 8 hex digits, the address in host byte order.
pub(crate) fn parse_v4(hex: &str) -> Option<IpAddr> {
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(n.to_le_bytes())))
}

/// /proc/net's IPv6 address: four 32-bit words, each in host byte order.
pub(crate) fn parse_v6(hex: &str) -> Option<IpAddr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let w = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// "NAME (pid N)" of the process holding the socket with this inode.
/// Some process listens on the unix socket at `path` (an orphaned
/// worker's adoption socket), from /proc/net/unix; nothing is connected.
fn orphan_listens(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/net/unix")
        .is_ok_and(|t| unix_listening(&t, &path.to_string_lossy()))
}

/// Whether /proc/net/unix's `text` has a listening socket bound to `path`.
pub(crate) fn unix_listening(text: &str, path: &str) -> bool {
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is
    // __SO_ACCEPTCON (listening).
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x0001_0000 != 0)
    })
}

pub(crate) fn holder(inode: u64) -> Option<String> {
    let want = format!("socket:[{inode}]");
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    None
}

// ---- routes --------------------------------------------------------------
