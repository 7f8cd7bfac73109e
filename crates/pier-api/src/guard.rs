//! What a request must get past before a handler sees it, as pure checks:
//! the Host header (against DNS rebinding), the Origin header (against
//! cross-site requests), the Content-Type of writes; and the watch slots
//! (a global and a per-client cap).
//!
//! The API never sends CORS headers, so a browser never lets another
//! site's page read an answer; these checks stop the requests themselves.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// The host names and addresses this API answers to.
#[derive(Debug, Clone)]
pub(crate) struct HostCheck {
    names: BTreeSet<String>,
}

/// `Host:` or the authority of an `Origin:`, normalised: lower case, no
/// port, no brackets, no trailing dot, addresses in their canonical text.
/// `None` when it does not parse.
pub(crate) fn host_of(authority: &str) -> Option<String> {
    let a = authority.trim();
    if a.is_empty() || a.contains(['/', '@', ' ', '\\']) {
        return None;
    }
    let host = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        let ip: std::net::Ipv6Addr = h.parse().ok()?;
        return Some(canonical_ip(IpAddr::V6(ip)));
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if is_port(p) && !h.contains(':') => h,
            Some(_) => return None,
            None => a,
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => canonical_ip(ip),
        Err(_) => host,
    })
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

fn canonical_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        v4 => v4.to_string(),
    }
}

impl HostCheck {
    /// The loopback names, the listen address (or, on a wildcard listener,
    /// every address of the host), and `extra` (the node's name and
    /// address, `[api] allowed_hosts`).
    pub(crate) fn new(listen: SocketAddr, host_addrs: &[IpAddr], extra: &[String]) -> HostCheck {
        let mut names: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if listen.ip().is_unspecified() {
            names.extend(host_addrs.iter().map(|ip| canonical_ip(*ip)));
        } else {
            names.insert(canonical_ip(listen.ip()));
        }
        names.extend(extra.iter().filter_map(|e| host_of(e)));
        HostCheck { names }
    }

    /// Whether a `Host:` value names this API. The port is not checked (a
    /// port forward may change it); the name is what DNS rebinding forges.
    pub(crate) fn allows(&self, host: &str) -> bool {
        host_of(host).is_some_and(|h| self.names.contains(&h))
    }

    /// Whether an `Origin:` value is this API's own (`http://` and an
    /// allowed host). `null` and every other site are not.
    pub(crate) fn allows_origin(&self, origin: &str) -> bool {
        origin
            .trim()
            .strip_prefix("http://")
            .is_some_and(|a| self.allows(a))
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }
}

/// Whether a `Content-Type:` value is JSON (`application/json`, with any
/// parameters such as `charset=utf-8`).
pub(crate) fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The host's own addresses ([`pier_model::addr::host_addrs`]). Empty if
/// they cannot be read (the caller still refuses loopback, link-local and
/// the rest).
pub fn host_addrs() -> Vec<IpAddr> {
    pier_model::addr::host_addrs().unwrap_or_default()
}

/// The open watches: at most `max` in all and `per_client` per client
/// address. A [`WatchSlot`] gives its place back when dropped (when the
/// watch's stream ends or its client goes away).
#[derive(Debug)]
pub(crate) struct WatchSlots {
    max: usize,
    per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

#[derive(Debug)]
pub(crate) struct WatchSlot {
    slots: Arc<WatchSlots>,
    ip: IpAddr,
}

impl WatchSlots {
    pub(crate) fn new(max: usize, per_client: usize) -> Arc<WatchSlots> {
        Arc::new(WatchSlots {
            max,
            per_client,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a watch from `ip`, or why not.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Result<WatchSlot, String> {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per) = &mut *g;
        if *total >= self.max {
            return Err(format!(
                "too many watches open on this agent ({} of max_watches {}); close some and try again",
                total, self.max
            ));
        }
        let mine = per.entry(ip).or_default();
        if *mine >= self.per_client {
            return Err(format!(
                "too many watches open from {ip} ({mine} of max_watches_per_client {}); close some and try again",
                self.per_client
            ));
        }
        *mine += 1;
        *total += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.lock().unwrap().0
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut g = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> HostCheck {
        HostCheck::new(
            "127.0.0.1:7370".parse().unwrap(),
            &[],
            &["host-1".into(), "192.0.2.7".into(), "Pier.Example.".into()],
        )
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(host_of("LocalHost:7370").as_deref(), Some("localhost"));
        assert_eq!(host_of("[::1]:7370").as_deref(), Some("::1"));
        assert_eq!(host_of("[::ffff:127.0.0.1]").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("example.com.").as_deref(), Some("example.com"));
        for bad in ["", "a b", "x/y", "u@h", "[::1", "h:port", "::1", "h:123456"] {
            assert_eq!(host_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_header_must_name_this_api() {
        let c = check();
        for ok in [
            "127.0.0.1:7370",
            "127.0.0.1",
            "localhost:7370",
            "[::1]:7370",
            "host-1:7370",
            "HOST-1",
            "192.0.2.7:7370",
            "pier.example:80",
        ] {
            assert!(c.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:7370",
            "attacker.test",
            "127.0.0.2:7370",
            "localhost.evil.example",
            "host-1.evil.example",
            "",
        ] {
            assert!(!c.allows(bad), "{bad}");
        }
    }

    #[test]
    fn a_wildcard_listener_answers_to_the_host_addresses() {
        let c = HostCheck::new(
            "0.0.0.0:7370".parse().unwrap(),
            &["192.0.2.9".parse().unwrap()],
            &[],
        );
        assert!(c.allows("192.0.2.9:7370"));
        assert!(!c.allows("0.0.0.0:7370"));
        assert!(!c.allows("192.0.2.10:7370"));
    }

    #[test]
    fn origins() {
        let c = check();
        assert!(c.allows_origin("http://127.0.0.1:7370"));
        assert!(c.allows_origin("http://localhost:7370"));
        for bad in [
            "null",
            "https://evil.example",
            "http://evil.example:7370",
            "file://",
            "http://127.0.0.1.evil.example",
            "https://127.0.0.1:7370",
        ] {
            assert!(!c.allows_origin(bad), "{bad}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }

    #[test]
    fn watch_slots_cap_and_give_back() {
        let s = WatchSlots::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = s.take(a).unwrap();
        let _a2 = s.take(a).unwrap();
        let e = s.take(a).unwrap_err();
        assert!(
            e.contains("from 127.0.0.1") && e.contains("max_watches_per_client 2"),
            "{e}"
        );
        let _b1 = s.take(b).unwrap();
        let e = s.take(b).unwrap_err();
        assert!(e.contains("max_watches 3"), "{e}");
        drop(a1);
        assert_eq!(s.open(), 2);
        let _b2 = s.take(b).unwrap();
        assert_eq!(s.open(), 3);
    }

    #[test]
    fn host_addrs_include_loopback() {
        let a = host_addrs();
        assert!(a.contains(&"127.0.0.1".parse().unwrap()), "{a:?}");
    }
}
