//! Services (`/pier/v1/services/`) and what they are made of: ports and
//! protocols, load-balancing policy and session affinity, static endpoints,
//! the SLA, and the allocation keys that hold their addresses and ports.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Labels;
use super::workload::{ContainerPort, HealthCheck};
use crate::names::{Name, NameError, Namespace, PortNum};

/// How a service spreads connections over its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices over outstanding connections, weighted by an
    /// EWMA of connect latency.
    #[default]
    P2c,
    RoundRobin,
}

impl FromStr for LbPolicy {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s {
            "p2c" => Ok(LbPolicy::P2c),
            "round_robin" | "round-robin" | "rr" => Ok(LbPolicy::RoundRobin),
            _ => Err(NameError::Invalid {
                what: "load-balancing policy",
                value: s.chars().take(40).collect(),
                why: "use p2c or round_robin",
            }),
        }
    }
}

/// `ClusterIP` (a VIP only) or `NodePort` (a VIP plus a port on every node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
}

impl FromStr for ServiceType {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s {
            "ClusterIP" | "clusterip" => Ok(ServiceType::ClusterIP),
            "NodePort" | "nodeport" => Ok(ServiceType::NodePort),
            _ => Err(NameError::Invalid {
                what: "service type",
                value: s.chars().take(40).collect(),
                why: "use ClusterIP or NodePort",
            }),
        }
    }
}

/// The transport of a port. TCP is the default and is left out of the
/// stored JSON, so records written before UDP existed read the same and
/// older agents still read TCP ports.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
    /// The name of an unnamed port: `p53` for TCP, `p53-udp` for UDP, so
    /// that TCP and UDP can share a number.
    pub fn default_port_name(&self, port: PortNum) -> Name {
        let n = match self {
            Protocol::Tcp => format!("p{port}"),
            Protocol::Udp => format!("p{port}-udp"),
        };
        Name::new(&n).expect("p<digits>[-udp] is a valid name")
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s.trim() {
            "tcp" | "TCP" => Ok(Protocol::Tcp),
            "udp" | "UDP" => Ok(Protocol::Udp),
            _ => Err(NameError::Invalid {
                what: "protocol",
                value: s.chars().take(40).collect(),
                why: "use tcp or udp",
            }),
        }
    }
}

/// A port as users write it: `[NAME:]P[/udp|/tcp]` (`53/udp`,
/// `dns:53/udp`, `8080`), for `--port` and the `pier.port(s)` labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: Option<Name>,
    pub port: PortNum,
    pub protocol: Protocol,
}

impl PortSpec {
    /// Its name, or the protocol's default name for its number.
    pub fn name_or_default(&self) -> Name {
        self.name
            .clone()
            .unwrap_or_else(|| self.protocol.default_port_name(self.port))
    }
}

impl From<&ContainerPort> for PortSpec {
    /// A template's port as `run --port` spells it (`NAME:P[/udp]`).
    fn from(p: &ContainerPort) -> Self {
        PortSpec {
            name: Some(p.name.clone()),
            port: p.port,
            protocol: p.protocol,
        }
    }
}

impl FromStr for PortSpec {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let s = s.trim();
        let (rest, protocol) = match s.rsplit_once('/') {
            Some((r, p)) => (r, p.parse::<Protocol>()?),
            None => (s, Protocol::Tcp),
        };
        let (name, num) = match rest.split_once(':') {
            Some((n, p)) => (Some(Name::new(n.trim())?), p),
            None => (None, rest),
        };
        Ok(PortSpec {
            name,
            port: num.parse()?,
            protocol,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.name {
            write!(f, "{n}:")?;
        }
        write!(f, "{}", self.port)?;
        if !self.protocol.is_tcp() {
            write!(f, "/{}", self.protocol)?;
        }
        Ok(())
    }
}

/// How a service keeps a client on one endpoint (`--session-affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAffinity {
    /// Only `ClientIP`: by the client's address.
    pub kind: AffinityKind,
    /// A client idle this long (no connection, no datagram) is balanced
    /// afresh; Kubernetes' default is 3 h.
    #[serde(default = "SessionAffinity::default_timeout_s")]
    pub timeout_s: u32,
}

impl SessionAffinity {
    /// 3 h, as Kubernetes' `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub fn default_timeout_s() -> u32 {
        10_800
    }
    /// At most a day, as Kubernetes (86400 s).
    pub const MAX_TIMEOUT_S: u32 = 86_400;
}

/// The kinds of session affinity: only by client IP, as Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AffinityKind {
    ClientIP,
}

impl FromStr for AffinityKind {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s {
            "ClientIP" | "clientip" | "client-ip" => Ok(AffinityKind::ClientIP),
            _ => Err(NameError::Invalid {
                what: "session affinity",
                value: s.chars().take(40).collect(),
                why: "use ClientIP (or None, the default)",
            }),
        }
    }
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// The port's name, used in SRV names (`_http._tcp.…`) and to match an
    /// endpoint's named port.
    pub name: Name,
    /// The port on the VIP.
    pub port: PortNum,
    /// The port on the endpoints.
    pub target_port: PortNum,
    /// The port on every node's address, for `NodePort` services.
    #[serde(default)]
    pub node_port: Option<PortNum>,
    /// TCP (the default, left out of the JSON) or UDP.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// A fixed `host:port` behind a service with no selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StaticEndpoint {
    /// The address; for an endpoint given by `name`, the one the writer
    /// (the CLI) resolved, used by each agent until its own lookup answers.
    pub ip: IpAddr,
    pub port: PortNum,
    /// The DNS name the endpoint was given by (`db.example.com`), which
    /// every agent looks up again at the record's TTL (ARCHITECTURE.md,
    /// "External endpoints by name"). Records written before names were
    /// kept have none: their `ip` is used as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `ip:port`, or `name:port` for an endpoint given by a name.
impl fmt::Display for StaticEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            return write!(f, "{name}:{}", self.port);
        }
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

impl FromStr for StaticEndpoint {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let sa: std::net::SocketAddr = s.parse().map_err(|_| NameError::Invalid {
            what: "endpoint",
            value: s.chars().take(80).collect(),
            why: "write it as IP:PORT, e.g. 127.0.0.1:8080",
        })?;
        Ok(StaticEndpoint {
            ip: sa.ip(),
            port: PortNum::new(sa.port())?,
            name: None,
        })
    }
}

/// What the autoscaler keeps true for a replica set (`ReplicaSet.sla`):
/// targets per ready pod, summed over every node's proxy, and how fast it
/// may move. A target left out is not scaled on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sla {
    /// At most this many open connections per ready pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_active_per_pod: Option<u32>,
    /// At most this many new connections per second per ready pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_conn_rate_per_pod: Option<u32>,
    /// The p99 time to first response byte (first client byte forwarded →
    /// first byte back), over all nodes' traffic, at most this, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_first_byte_ms: Option<u32>,
    /// A scale-up happens only when every recommendation of this window
    /// (ms) asked for more; 0 (the default, as Kubernetes' HPA) scales up
    /// at once.
    pub scale_up_window_ms: u64,
    /// A scale-down goes only to the highest recommendation of this window
    /// (ms): the `--scale-down-delay`. Default 30 s.
    pub scale_down_window_ms: u64,
    /// The most pods added or removed in one decision; 0 for no limit.
    pub max_step: u32,
    /// Ratios of measurement to target within this many percent of 1 do
    /// not scale (10, as the HPA's 0.1).
    pub tolerance_pct: u32,
    /// Service-level fields of an earlier version, kept so that such
    /// records still read; not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_p99_connect_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_active_per_endpoint: Option<u32>,
}

impl Sla {
    pub const DEFAULT_SCALE_DOWN_WINDOW_MS: u64 = 30_000;
    pub const DEFAULT_TOLERANCE_PCT: u32 = 10;

    /// True when at least one target is set.
    pub fn has_target(&self) -> bool {
        self.max_active_per_pod.is_some()
            || self.max_conn_rate_per_pod.is_some()
            || self.p99_first_byte_ms.is_some()
    }
}

impl Default for Sla {
    fn default() -> Self {
        Sla {
            max_active_per_pod: None,
            max_conn_rate_per_pod: None,
            p99_first_byte_ms: None,
            scale_up_window_ms: 0,
            scale_down_window_ms: Self::DEFAULT_SCALE_DOWN_WINDOW_MS,
            max_step: 0,
            tolerance_pct: Self::DEFAULT_TOLERANCE_PCT,
            max_p99_connect_ms: None,
            max_active_per_endpoint: None,
        }
    }
}

/// `/pier/v1/services/<ns>/<svc>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: Name,
    #[serde(default)]
    pub namespace: Namespace,
    /// The virtual IP; `None` for a headless service.
    #[serde(default)]
    pub vip: Option<IpAddr>,
    /// The IPv6 virtual IP, from `[network] service_cidr6` when the cluster
    /// has one (dual stack); `None` otherwise, and for a headless or
    /// ExternalName service. Left out when unset, so older agents still
    /// read the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<IpAddr>,
    /// A headless service: no VIP and no proxy listener; DNS answers its
    /// name with the endpoint VIPs of its ready endpoints, one per pod
    /// (see `Endpoint.addr`), and SRV per pod. Set at creation only. Left
    /// out when false, so older agents still read the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    /// An ExternalName service: DNS answers its name with a CNAME to this
    /// host name (followed by the host's own records), and there is no VIP,
    /// proxy, port or endpoint. Checked by
    /// [`crate::check_external_name`]. Left out when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    /// Containers whose labels include all of these are endpoints. Empty
    /// means only containers labelled `pier.service=<name>` (and static
    /// endpoints).
    #[serde(default)]
    pub selector: Labels,
    /// Fixed endpoints, for a service that fronts something pier does not
    /// run.
    #[serde(default)]
    pub static_endpoints: Vec<StaticEndpoint>,
    #[serde(default)]
    pub lb: LbPolicy,
    /// Send a PROXY protocol v2 header to the endpoint first.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Prefer endpoints on the proxy's own node when any are ready.
    #[serde(default)]
    pub prefer_local: bool,
    /// Let containers that are not pier's own pods join through the
    /// selector (by carrying its labels). Off: a selector takes only the
    /// pods pier started. Left out when false, so that agents of an older
    /// version still read the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_labelled: bool,
    /// How long a removed endpoint's connections may live on, in ms. `None`
    /// uses the proxy's default.
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
    /// The health check of the static endpoints.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub sla: Option<Sla>,
    /// Keep each client on one endpoint (`--session-affinity ClientIP`).
    /// Left out when unset, so older agents still read the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Unix milliseconds.
    #[serde(default)]
    pub created_at: u64,
}

impl Service {
    /// A ClusterIP service with these ports and every other field at its
    /// default: no VIP yet (the writer allocates one), no selector, no
    /// static endpoints, round robin, no health check, `created_at` 0. Set
    /// what differs on the result.
    pub fn new(namespace: Namespace, name: Name, ports: Vec<ServicePort>) -> Service {
        Service {
            name,
            namespace,
            vip: None,
            vip6: None,
            headless: false,
            external_name: None,
            service_type: ServiceType::default(),
            ports,
            selector: Labels::new(),
            static_endpoints: Vec::new(),
            lb: LbPolicy::default(),
            proxy_protocol: false,
            prefer_local: false,
            accept_labelled: false,
            drain_timeout_ms: None,
            health: None,
            sla: None,
            session_affinity: None,
            created_at: 0,
        }
    }
    /// A service with no VIP answers DNS with its endpoints' addresses.
    pub fn is_headless(&self) -> bool {
        self.headless || self.vip.is_none()
    }
    /// The service's VIPs: the IPv4 one, then the IPv6 one. A service
    /// without an IPv4 VIP is headless, and has none (a `vip6` alone, which
    /// no writer makes, is ignored everywhere).
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vip.into_iter().chain(self.vip.and(self.vip6))
    }
    pub fn port_by_name(&self, name: &str) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.name.as_str() == name)
    }

    /// Port names are unique (they key SRV names and endpoint ports), and
    /// so are (port, protocol) pairs: TCP and UDP may share a number, two
    /// TCP ports may not. The error names the field.
    pub fn check_ports(&self) -> Result<(), String> {
        for (i, p) in self.ports.iter().enumerate() {
            for (j, q) in self.ports[..i].iter().enumerate() {
                if p.name == q.name {
                    return Err(format!(
                        "ports[{i}].name: {} is also ports[{j}]'s name; give each port its own name",
                        p.name
                    ));
                }
                if p.port == q.port && p.protocol == q.protocol {
                    return Err(format!(
                        "ports[{i}]: {}/{} is also ports[{j}]; a port number is used once per protocol",
                        p.port, p.protocol
                    ));
                }
                if p.node_port.is_some() && p.node_port == q.node_port && p.protocol == q.protocol {
                    return Err(format!(
                        "ports[{i}].node_port: {} is also ports[{j}]'s node port",
                        p.node_port.map_or(0, |n| n.get())
                    ));
                }
            }
        }
        if let Some(a) = &self.session_affinity
            && (a.timeout_s == 0 || a.timeout_s > SessionAffinity::MAX_TIMEOUT_S)
        {
            return Err(format!(
                "session_affinity.timeout_s: {} is out of range; give 1 to {} seconds",
                a.timeout_s,
                SessionAffinity::MAX_TIMEOUT_S
            ));
        }
        Ok(())
    }
}

/// The value of an allocation key: which service holds the address or port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub namespace: Namespace,
    pub service: Name,
    /// For an endpoint VIP (`Endpoint.addr`): the node and id of the
    /// endpoint holding it. Left out for a service's own VIP or node port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<(Name, Name)>,
}
