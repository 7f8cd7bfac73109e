//! What each node's agent publishes about services: endpoints
//! (`/pier/v1/endpoints/`, the backends) and traffic stats
//! (`/pier/v1/stats/`, for the autoscaler).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::service::{Protocol, ServicePort};
use crate::names::{Name, Namespace, PortNum};
use crate::sketch::Sketch;

/// A named port on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: Name,
    pub port: PortNum,
    /// TCP (the default, left out of the JSON) or UDP.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// `/pier/v1/endpoints/<ns>/<svc>/<node>/<id>`: one backend of a service.
/// Leased by the agent of `node`, the only writer under that node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub service: Name,
    #[serde(default)]
    pub namespace: Namespace,
    pub node: Name,
    /// Unique under the service and node: the first 12 hex digits of the
    /// container id, or `static-<n>` for a static endpoint.
    pub id: Name,
    #[serde(default)]
    pub pod: Option<Name>,
    /// The container's hostname or name, for a container pier did not start.
    #[serde(default)]
    pub hostname: Option<String>,
    pub ip: IpAddr,
    pub ports: Vec<EndpointPort>,
    pub ready: bool,
    /// A static endpoint of the service rather than a container. Only the
    /// node that checked it uses it, and it connects directly.
    #[serde(default, rename = "static")]
    pub is_static: bool,
    /// The endpoint's own address (its *endpoint VIP*), from the service
    /// CIDR: every node's proxy listens on it, on the endpoint's ports, and
    /// forwards to this endpoint only (over the mesh from other nodes).
    /// DNS answers the endpoint's pod name, SRV targets and a headless
    /// service's A records with it, so they work from every host. Claimed
    /// by the endpoint's agent (`alloc/vip/<addr>`, under its lease); `None`
    /// for a static endpoint, or until the claim succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
}

impl Endpoint {
    /// The endpoint port a service port targets: by name, then by number
    /// and protocol.
    pub fn port_for(&self, sp: &ServicePort) -> Option<PortNum> {
        self.ports
            .iter()
            .find(|p| p.name == sp.name)
            .or_else(|| {
                self.ports
                    .iter()
                    .find(|p| p.port == sp.target_port && p.protocol == sp.protocol)
            })
            .map(|p| p.port)
            .or(if self.ports.is_empty() {
                Some(sp.target_port)
            } else {
                None
            })
    }
}

/// `/pier/v1/stats/<ns>/<svc>/<node>`: one node's proxy traffic for one
/// service (all its ports), for the autoscaler. Leased. Written by the
/// node's agent when [`Stats::worth_writing`] says so, never per
/// connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Open client connections now.
    pub active: u64,
    /// Client connections accepted since the proxy started.
    pub total: u64,
    pub connect_errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The p99 connect latency of the window, µs (0: no connects).
    pub connect_p99_us: u64,
    /// Unix milliseconds when sampled.
    pub at: u64,
    /// The window the fields below cover, ms (the proxy's sample interval).
    pub window_ms: u64,
    /// Client connections accepted in the window.
    pub new_conns: u64,
    /// Connect latencies of the window, µs.
    #[serde(skip_serializing_if = "Sketch::is_empty")]
    pub connect: Sketch,
    /// Times to first response byte of the window, µs.
    #[serde(skip_serializing_if = "Sketch::is_empty")]
    pub first_byte: Sketch,
}

/// A record with load is written again after this long even when nothing
/// moved, so that a reader can tell a live steady load from a stale one.
pub const STATS_REFRESH_MS: u64 = 10_000;

impl Stats {
    /// New connections per second over the window.
    pub fn conn_rate(&self) -> f64 {
        if self.window_ms == 0 {
            return 0.0;
        }
        self.new_conns as f64 * 1000.0 / self.window_ms as f64
    }

    /// No open connection and nothing in the window.
    pub fn is_idle(&self) -> bool {
        self.active == 0 && self.new_conns == 0 && self.first_byte.is_empty()
    }

    /// Whether `self` (the new sample) is worth a store write after `last`
    /// (what was last written): the open connections moved by at least 2
    /// and 10% (short connections make 0 and 1 alternate), the connection
    /// rate by at least 2/s and 20%, the
    /// first-byte p99 by half (a one-second window's p99 is noisy: with 50
    /// samples it is their maximum), the record went idle or stopped being
    /// idle, or a record with load is [`STATS_REFRESH_MS`] old. A steady
    /// load is so about one write per 10 s, and an idle service none;
    /// BENCHMARKS.md has the measured rates.
    pub fn worth_writing(&self, last: Option<&Stats>) -> bool {
        let Some(last) = last else { return true };
        if self.is_idle() != last.is_idle() {
            return true;
        }
        if self.is_idle() {
            return false;
        }
        let moved = |a: f64, b: f64, min: f64, frac: f64| (a - b).abs() >= min.max(b.abs() * frac);
        moved(self.active as f64, last.active as f64, 2.0, 0.1)
            || moved(self.conn_rate(), last.conn_rate(), 2.0, 0.2)
            || match (
                self.first_byte.quantile(0.99),
                last.first_byte.quantile(0.99),
            ) {
                (Some(a), Some(b)) => moved(a as f64, b as f64, 0.0, 0.5),
                // Samples appearing or not from one window to the next is
                // the rate's business.
                _ => false,
            }
            || self.at.saturating_sub(last.at) >= STATS_REFRESH_MS
    }
}
