//! The proxy's own configuration section.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::ProxyError;

/// Most connect attempts one client connection may make (first try plus
/// retries); the per-connection "tried" list is a fixed array of this size.
pub const MAX_CONNECT_ATTEMPTS: u32 = 16;

/// The `[proxy]` section of the agent's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The interface that holds the VIPs, `pier0`.
    pub iface: String,
    /// `true`: create `iface` (a dummy link, or an empty bridge where the
    /// kernel has no dummy type), add each VIP as a /32, remove gone ones,
    /// and add an unreachable route for the service CIDR. `false`
    /// (unprivileged): VIPs are in 127.0.0.0/8 and bind with no set-up.
    pub manage_iface: bool,
    /// Leave `iface` in place on a clean shutdown. By default it is removed.
    pub keep_iface: bool,
    /// Where node ports bind.
    pub node_port_addr: IpAddr,
    /// Connect timeout per attempt.
    pub connect_timeout_ms: u64,
    /// Connect attempts per client connection: the first try plus retries,
    /// each on an endpoint not yet tried.
    pub connect_attempts: u32,
    /// Consecutive connect failures that eject an endpoint.
    pub eject_after_failures: u32,
    /// The first ejection lasts this long; each further one doubles it, up
    /// to 64 times.
    pub eject_base_ms: u64,
    /// How long a removed endpoint's established connections may live on
    /// (a service's `drain_timeout_ms` overrides it). Also the grace period
    /// for open connections on shutdown.
    pub drain_timeout_ms: u64,
    /// Copy with splice(2) through a pipe pair (Linux). `false`: a plain
    /// user-space copy.
    pub splice: bool,
    /// Capacity of each splice pipe in KiB (F_SETPIPE_SZ); 0 keeps the
    /// kernel's 64 KiB. 256: measured 15% less CPU per GB than 64 KiB on
    /// loopback (0.25 against 0.29 CPU-s per GB), with the same throughput.
    pub pipe_size_kib: u32,
    /// How often listeners whose bind failed (e.g. a node port taken by
    /// another process) are tried again, besides on every snapshot change.
    pub bind_retry_ms: u64,
    /// How often per-service traffic stats are sampled: the window of the
    /// autoscaler's signals (1 s, its resolution).
    pub stats_interval_ms: u64,
    /// At most this many open client connections on this node's node ports
    /// in all; more are reset at once (`pier_proxy_node_port_refusals`).
    pub node_port_max_conns: u32,
    /// At most this many open node-port connections from one client IP.
    /// A UDP flow counts as a connection for both caps.
    pub node_port_max_conns_per_client: u32,
    /// A UDP flow (one client address on one service port) with no
    /// datagram either way for this long ends; the client's next datagram
    /// is balanced afresh.
    pub udp_idle_timeout_ms: u64,
    /// At most this many UDP flows per UDP listening socket; a new
    /// client's datagrams are dropped while it is full. Each flow holds a
    /// socket and a 64 KiB receive buffer.
    pub udp_max_flows: u32,
    /// Addresses the proxy may connect to directly although they reach the
    /// host itself (loopback, link-local, unspecified, multicast,
    /// broadcast): the agent's `[network] static_endpoint_allow`, set by
    /// the agent, not a key of this section.
    #[serde(skip)]
    pub direct_allow: Vec<pier_model::Cidr>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            iface: "pier0".into(),
            manage_iface: true,
            keep_iface: false,
            node_port_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            // 1 s: a local or LAN connect takes well under a millisecond;
            // a SYN lost once is retransmitted after 1 s, so by then another
            // endpoint is the better bet.
            connect_timeout_ms: 1000,
            connect_attempts: 3,
            eject_after_failures: 3,
            eject_base_ms: 1000,
            drain_timeout_ms: 30_000,
            splice: cfg!(target_os = "linux"),
            pipe_size_kib: 256,
            // 30 s: a port held by another process is rarely freed quickly,
            // and a retry logs nothing new unless the error changes.
            bind_retry_ms: 30_000,
            stats_interval_ms: 1_000,
            // 16384 in all: each proxied connection holds two sockets and,
            // with splice, two pipes (six descriptors), which stays within
            // a 1 Mi nofile limit. 1024 per client IP: many clients share
            // one address behind NAT, but one address holding all of the
            // node's connections is an attack.
            node_port_max_conns: 16_384,
            node_port_max_conns_per_client: 1024,
            // 30 s: kube-proxy's (and the kernel's) UDP conntrack timeout
            // for a flow that has seen replies.
            udp_idle_timeout_ms: 30_000,
            // 4096 flows × 64 KiB buffers: at most 256 MiB per socket,
            // reached only with that many clients active at once.
            udp_max_flows: 4096,
            direct_allow: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// Defaults for unprivileged use (tests, dev): no interface management,
    /// VIPs in 127.0.0.0/8.
    pub fn unprivileged() -> Self {
        ProxyConfig {
            manage_iface: false,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), ProxyError> {
        let bad = |field: &'static str, why: String| Err(ProxyError::Config { field, why });
        if self.manage_iface {
            let n = self.iface.len();
            // IFNAMSIZ is 16 including the NUL.
            if n == 0 || n > 15 {
                return bad(
                    "iface",
                    format!("{:?} must be 1 to 15 bytes long", self.iface),
                );
            }
            if self
                .iface
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
            {
                return bad(
                    "iface",
                    format!(
                        "{:?} has a character not allowed in a link name",
                        self.iface
                    ),
                );
            }
        }
        if self.connect_timeout_ms == 0 || self.connect_timeout_ms > 60_000 {
            return bad(
                "connect_timeout_ms",
                format!("{} must be 1..=60000", self.connect_timeout_ms),
            );
        }
        if self.connect_attempts == 0 || self.connect_attempts > MAX_CONNECT_ATTEMPTS {
            return bad(
                "connect_attempts",
                format!(
                    "{} must be 1..={MAX_CONNECT_ATTEMPTS}",
                    self.connect_attempts
                ),
            );
        }
        if self.eject_after_failures == 0 {
            return bad("eject_after_failures", "must be at least 1".into());
        }
        if self.eject_base_ms == 0 || self.eject_base_ms > 3_600_000 {
            return bad(
                "eject_base_ms",
                format!("{} must be 1..=3600000", self.eject_base_ms),
            );
        }
        if self.pipe_size_kib > 1024 {
            return bad(
                "pipe_size_kib",
                format!(
                    "{} must be at most 1024 (the kernel's pipe-max-size)",
                    self.pipe_size_kib
                ),
            );
        }
        if self.bind_retry_ms < 100 {
            return bad(
                "bind_retry_ms",
                format!("{} must be at least 100", self.bind_retry_ms),
            );
        }
        if self.node_port_max_conns == 0 {
            return bad("node_port_max_conns", "must be at least 1".into());
        }
        if self.node_port_max_conns_per_client == 0
            || self.node_port_max_conns_per_client > self.node_port_max_conns
        {
            return bad(
                "node_port_max_conns_per_client",
                format!(
                    "{} must be 1..=node_port_max_conns ({})",
                    self.node_port_max_conns_per_client, self.node_port_max_conns
                ),
            );
        }
        if self.stats_interval_ms < 100 {
            return bad(
                "stats_interval_ms",
                format!("{} must be at least 100", self.stats_interval_ms),
            );
        }
        if self.udp_idle_timeout_ms < 1000 || self.udp_idle_timeout_ms > 3_600_000 {
            return bad(
                "udp_idle_timeout_ms",
                format!("{} must be 1000..=3600000", self.udp_idle_timeout_ms),
            );
        }
        if self.udp_max_flows == 0 || self.udp_max_flows > 65_536 {
            return bad(
                "udp_max_flows",
                format!("{} must be 1..=65536", self.udp_max_flows),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_keys_are_rejected() {
        ProxyConfig::default().validate().unwrap();
        ProxyConfig::unprivileged().validate().unwrap();
        let c: ProxyConfig =
            serde_json::from_str(r#"{"iface":"pier9","connect_attempts":2}"#).unwrap();
        assert_eq!(c.iface, "pier9");
        assert_eq!(c.connect_timeout_ms, 1000);
        let e = serde_json::from_str::<ProxyConfig>(r#"{"bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let c = ProxyConfig {
            connect_attempts: 0,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("connect_attempts"), "{e}");
        let c = ProxyConfig {
            iface: "a-very-long-interface-name".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("iface"));
    }
}
