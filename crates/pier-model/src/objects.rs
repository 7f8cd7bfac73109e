//! The objects kept in the store, one per key kind (see [`crate::keys`]).
//!
//! Every object is plain data with serde. Unknown fields are rejected, so a
//! typo in an API request is an error rather than a silent default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{Name, NameError, Namespace, PortNum, Replicas};
use crate::placement::Placement;
use crate::rollout::{TemplateRevision, UpdateConfig};
use crate::sketch::Sketch;

/// Free-form labels, as on Docker containers and Kubernetes objects.
pub type Labels = BTreeMap<String, String>;

/// Container labels that pier reads and writes.
pub mod labels {
    /// Required on a container that pier did not start: the service it serves.
    pub const SERVICE: &str = "pier.service";
    /// Optional: the namespace of that service (default `default`).
    pub const NAMESPACE: &str = "pier.namespace";
    /// One container port: `pier.port=8080`.
    pub const PORT: &str = "pier.port";
    /// Named ports: `pier.ports=http:8080,admin:9000`.
    pub const PORTS: &str = "pier.ports";
    /// Health check: `tcp`, `http:/path`, `docker` or `none`.
    pub const HEALTH: &str = "pier.health";
    /// Health check interval in milliseconds.
    pub const HEALTH_INTERVAL: &str = "pier.health.interval-ms";
    /// Health check timeout in milliseconds.
    pub const HEALTH_TIMEOUT: &str = "pier.health.timeout-ms";
    /// Consecutive passes before ready.
    pub const HEALTH_HEALTHY: &str = "pier.health.healthy-threshold";
    /// Consecutive failures before unready.
    pub const HEALTH_UNHEALTHY: &str = "pier.health.unhealthy-threshold";
    /// `true`: the auto-created service sends each host's clients to that
    /// host's own ready endpoints when it has any (the service's
    /// `prefer_local`). Read when the agent creates the service.
    pub const PREFER_LOCAL: &str = "pier.prefer-local";
    /// `true`: the auto-created service is headless (no VIP, no proxy
    /// listener; its name answers one endpoint VIP per ready container).
    /// Read when the agent creates the service; a container that says it
    /// while joining a service with a VIP is warned about, once.
    pub const HEADLESS: &str = "pier.headless";
    /// Set by pier on the containers it starts: the pod name.
    pub const POD: &str = "pier.pod";
    /// Set by pier on the containers it starts: the replica set.
    pub const REPLICASET: &str = "pier.replicaset";
    /// Set by pier on the containers it starts: the node that owns it.
    pub const NODE: &str = "pier.node";
    /// Set by pier on the containers it starts: the pod's template hash.
    pub const TEMPLATE_HASH: &str = "pier.template-hash";
}

/// CPU, memory and pod-count amounts. Zero means "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// Thousandths of a CPU.
    pub cpu_millis: u32,
    pub memory_mb: u32,
    /// As capacity: the most pods a node takes. Unused on requests.
    pub pods: u32,
}

/// `/pier/v1/nodes/<node>`: a host running `pier agent`. Leased by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: Name,
    /// The address other hosts and node ports use.
    pub addr: IpAddr,
    /// The mTLS mesh port; 0 when the mesh is off.
    #[serde(default)]
    pub mesh_port: u16,
    /// The address of this node's DNS server, given to its pods as `--dns`.
    #[serde(default)]
    pub dns_addr: Option<IpAddr>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub capacity: Resources,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// Unix milliseconds when the agent registered.
    #[serde(default)]
    pub started_at: u64,
    /// Containers on this node that asked to join a service by their labels
    /// and were refused by the agent's label policy, with the reason (at
    /// most [`Node::MAX_REFUSED`]). Left out when empty, so that agents of
    /// an older version still read the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refusal>,
}

impl Node {
    /// The most refusals a node record carries; the agent's log has all.
    pub const MAX_REFUSED: usize = 64;
}

/// A container the agent did not let join a service, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The container's name.
    pub container: String,
    /// The 12 hex digits Docker shows.
    pub id: String,
    pub namespace: Namespace,
    /// The service it asked for or was selected by, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
    /// What was refused and what to do, for a person.
    pub reason: String,
}

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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    pub ip: IpAddr,
    pub port: PortNum,
}

impl fmt::Display for StaticEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        })
    }
}

/// What the autoscaler keeps true for a replica set (`ReplicaSet.sla`):
/// targets per ready pod, summed over every node's proxy, and how fast it
/// may move. A target left out is not scaled on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: Name,
    #[serde(default)]
    pub namespace: Namespace,
    /// The virtual IP; `None` for a headless service.
    #[serde(default)]
    pub vip: Option<IpAddr>,
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

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// A TCP connect to the first port.
    Tcp,
    /// An HTTP GET of the path on the first port; 2xx and 3xx pass.
    Http { path: String },
    /// Docker's own health status (the image's HEALTHCHECK).
    Docker,
    /// Ready as soon as it runs.
    None,
}

impl FromStr for HealthKind {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bad = |why| NameError::Invalid {
            what: "health check",
            value: s.chars().take(80).collect(),
            why,
        };
        match s {
            "tcp" => Ok(HealthKind::Tcp),
            "docker" => Ok(HealthKind::Docker),
            "none" => Ok(HealthKind::None),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                    Ok(HealthKind::Http { path: path.into() })
                }
                Some(_) => Err(bad("an http check takes a path: http:/healthz")),
                None => Err(bad("use tcp, http:/PATH, docker or none")),
            },
        }
    }
}

impl fmt::Display for HealthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthKind::Tcp => f.write_str("tcp"),
            HealthKind::Http { path } => write!(f, "http:{path}"),
            HealthKind::Docker => f.write_str("docker"),
            HealthKind::None => f.write_str("none"),
        }
    }
}

/// A health check with its timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: HealthKind,
    #[serde(default = "HealthCheck::default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "HealthCheck::default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "HealthCheck::default_healthy")]
    pub healthy_threshold: u32,
    #[serde(default = "HealthCheck::default_unhealthy")]
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    /// 500 ms: a new container is ready within about half a second of
    /// listening, and a check costs one connect.
    pub fn default_interval_ms() -> u64 {
        500
    }
    pub fn default_timeout_ms() -> u64 {
        1000
    }
    pub fn default_healthy() -> u32 {
        1
    }
    pub fn default_unhealthy() -> u32 {
        2
    }
    pub fn new(kind: HealthKind) -> Self {
        HealthCheck {
            kind,
            interval_ms: Self::default_interval_ms(),
            timeout_ms: Self::default_timeout_ms(),
            healthy_threshold: Self::default_healthy(),
            unhealthy_threshold: Self::default_unhealthy(),
        }
    }
}

/// A port a pod's container listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPort {
    pub name: Name,
    pub port: PortNum,
    /// TCP (the default, left out of the JSON, so existing templates hash
    /// as before) or UDP.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// What a pod runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodTemplate {
    pub image: String,
    /// The command and its arguments; empty keeps the image's own.
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// Extra container labels.
    #[serde(default)]
    pub labels: Labels,
    /// What one pod asks of a node.
    #[serde(default)]
    pub resources: Resources,
    /// `None`: a TCP check on the first port, or `none` without ports.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Replaces the image's entrypoint; empty keeps it. Left out when
    /// empty, so the hash of a template without it is unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// A check Docker runs inside the container (Compose's
    /// `healthcheck`); pier reads its result with a `docker` health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_health: Option<ContainerHealth>,
}

/// A health check that Docker runs in the container, as Compose's
/// `healthcheck` and the Dockerfile's `HEALTHCHECK` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerHealth {
    /// `["CMD", args…]`, `["CMD-SHELL", command]` or `["NONE"]`.
    pub test: Vec<String>,
    /// 0 leaves Docker's default (30 s).
    #[serde(default)]
    pub interval_ms: u64,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub start_period_ms: u64,
}

impl PodTemplate {
    /// A stable hash of the template (FNV-1a 64 over its JSON, whose maps
    /// are ordered), as 16 hex digits.
    pub fn hash(&self) -> String {
        let bytes = crate::encode(self);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// `/pier/v1/problems/<ns>/<rs>`: what keeps a replica set from its desired
/// state (an image missing on every node, no node that fits…). Written and
/// deleted by the supervisor leader only, under its election lease, so a
/// dead leader's reports go with it; every agent's API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSetProblem {
    pub message: String,
    /// The node whose supervisor reported it.
    pub reported_by: Name,
}

/// `/pier/v1/replicasets/<ns>/<rs>`: desired state, written by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSet {
    pub name: Name,
    #[serde(default)]
    pub namespace: Namespace,
    pub template: PodTemplate,
    pub replicas: Replicas,
    #[serde(default)]
    pub placement: Placement,
    /// Bounds for the autoscaler; it runs for a set that has both and an
    /// `sla` with a target.
    #[serde(default)]
    pub min_replicas: Option<Replicas>,
    #[serde(default)]
    pub max_replicas: Option<Replicas>,
    /// The autoscaler's targets. Left out when unset, so that agents of an
    /// older version still read the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,
    #[serde(default)]
    pub created_at: u64,
    /// How a new template rolls out (Compose `deploy.update_config`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub update_config: UpdateConfig,
    /// How a failed rollout rolls back (Compose `deploy.rollback_config`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub rollback_config: UpdateConfig,
    /// The template's revision: 1 at creation, +1 on every template change.
    /// Set by the API; 0 in records written before revisions existed.
    #[serde(default, skip_serializing_if = "is_default")]
    pub revision: u64,
    /// Earlier templates, oldest first, at most
    /// [`ReplicaSet::HISTORY_LIMIT`]. Set by the API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<TemplateRevision>,
}

impl ReplicaSet {
    /// Earlier templates kept for `rollout undo` (Kubernetes keeps 10).
    pub const HISTORY_LIMIT: usize = 10;

    /// The template of `revision`: the current one or one in the history.
    pub fn template_of(&self, revision: u64) -> Option<&PodTemplate> {
        if revision == self.revision {
            return Some(&self.template);
        }
        self.history
            .iter()
            .find(|h| h.revision == revision)
            .map(|h| &h.template)
    }

    /// The revision whose template hashes to `hash`, newest first.
    pub fn revision_of_hash(&self, hash: &str) -> Option<u64> {
        if self.template.hash() == hash {
            return Some(self.revision);
        }
        self.history
            .iter()
            .rev()
            .find(|h| h.template.hash() == hash)
            .map(|h| h.revision)
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// `/pier/v1/nodelabels/<node>`: labels set with `pier label node`, laid
/// over the labels the node's agent registers from its `[node] labels`.
/// Written by the API only; kept when the node goes away (no lease), so a
/// host that comes back keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLabels {
    /// `Some(v)` sets the label; `None` removes it, also when the config
    /// sets it (`pier label node N k-`).
    pub labels: BTreeMap<String, Option<String>>,
}

impl NodeLabels {
    /// The node's labels with this overlay applied.
    pub fn apply(&self, base: &Labels) -> Labels {
        let mut out = base.clone();
        for (k, v) in &self.labels {
            match v {
                Some(v) => {
                    out.insert(k.clone(), v.clone());
                }
                None => {
                    out.remove(k);
                }
            }
        }
        out
    }
}

impl ReplicaSet {
    /// The set's autoscaling, when it has bounds and a target.
    pub fn autoscale(&self) -> Option<(Replicas, Replicas, &Sla)> {
        match (self.min_replicas, self.max_replicas, &self.sla) {
            (Some(min), Some(max), Some(sla)) if sla.has_target() => Some((min, max, sla)),
            _ => None,
        }
    }
}

/// `/pier/v1/pods/<ns>/<pod>`: a pod placed on a node. Written by the
/// supervisor leader only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub name: Name,
    #[serde(default)]
    pub namespace: Namespace,
    pub replicaset: Name,
    pub node: Name,
    pub template_hash: String,
    /// A copy of the replica set's template, so that the node's runtime
    /// needs nothing else.
    pub template: PodTemplate,
    #[serde(default)]
    pub created_at: u64,
}

/// A pod's phase, spelled as Kubernetes spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Failed,
}

impl fmt::Display for PodPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Failed => "Failed",
        })
    }
}

/// `/pier/v1/podstatus/<ns>/<pod>`: what the node's runtime sees. Leased by
/// that node's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodStatus {
    pub name: Option<Name>,
    #[serde(default)]
    pub namespace: Namespace,
    pub node: Option<Name>,
    pub phase: PodPhase,
    /// Passed its health check.
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Unix milliseconds.
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub restarts: u32,
    /// Why it is not running, for a person.
    #[serde(default)]
    pub message: String,
}

/// A named port on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields, default)]
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

/// The value of an allocation key: which service holds the address or port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    pub namespace: Namespace,
    pub service: Name,
    /// For an endpoint VIP (`Endpoint.addr`): the node and id of the
    /// endpoint holding it. Left out for a service's own VIP or node port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<(Name, Name)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_with_protocols() {
        let p: PortSpec = "53/udp".parse().unwrap();
        assert_eq!(
            (p.name.clone(), p.port.get(), p.protocol),
            (None, 53, Protocol::Udp)
        );
        assert_eq!(p.name_or_default().as_str(), "p53-udp");
        let p: PortSpec = "dns:53/udp".parse().unwrap();
        assert_eq!(p.name.as_ref().unwrap().as_str(), "dns");
        assert_eq!(p.to_string(), "dns:53/udp");
        let p: PortSpec = "http:8080".parse().unwrap();
        assert_eq!((p.port.get(), p.protocol), (8080, Protocol::Tcp));
        assert_eq!(p.to_string(), "http:8080");
        assert_eq!(
            "8080/tcp"
                .parse::<PortSpec>()
                .unwrap()
                .name_or_default()
                .as_str(),
            "p8080"
        );
        for bad in ["53/sctp", "0/udp", "x:70000", "Bad_Name:80", "udp", ""] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
        let e = "53/sctp".parse::<PortSpec>().unwrap_err().to_string();
        assert!(e.contains("tcp or udp"), "{e}");
    }

    /// TCP stays out of the JSON (older readers, same template hashes);
    /// UDP is written and read back.
    #[test]
    fn protocol_is_left_out_for_tcp() {
        let sp: ServicePort =
            serde_json::from_str(r#"{"name":"p","port":80,"target_port":80}"#).unwrap();
        assert_eq!(sp.protocol, Protocol::Tcp);
        assert!(!serde_json::to_string(&sp).unwrap().contains("protocol"));
        let sp = ServicePort {
            protocol: Protocol::Udp,
            ..sp
        };
        let j = serde_json::to_string(&sp).unwrap();
        assert!(j.contains(r#""protocol":"udp""#), "{j}");
        assert_eq!(serde_json::from_str::<ServicePort>(&j).unwrap(), sp);
    }

    #[test]
    fn service_ports_share_a_number_across_protocols_only() {
        let port = |name: &str, n: u16, protocol| ServicePort {
            name: Name::new(name).unwrap(),
            port: PortNum::new(n).unwrap(),
            target_port: PortNum::new(n).unwrap(),
            node_port: None,
            protocol,
        };
        let mut s = Service::new(
            Namespace::default(),
            Name::new("dns").unwrap(),
            vec![
                port("dns", 53, Protocol::Udp),
                port("dns-tcp", 53, Protocol::Tcp),
            ],
        );
        s.check_ports().unwrap();
        s.ports.push(port("again", 53, Protocol::Udp));
        let e = s.check_ports().unwrap_err();
        assert!(e.starts_with("ports[2]") && e.contains("53/udp"), "{e}");
        s.ports[2] = port("dns", 54, Protocol::Tcp);
        let e = s.check_ports().unwrap_err();
        assert!(e.contains("ports[2].name"), "{e}");
        s.ports.pop();
        s.session_affinity = Some(SessionAffinity {
            kind: AffinityKind::ClientIP,
            timeout_s: 0,
        });
        let e = s.check_ports().unwrap_err();
        assert!(e.contains("session_affinity.timeout_s"), "{e}");
    }

    /// An endpoint's unnamed ports match a service port by number and
    /// protocol: TCP 53 is not UDP 53.
    #[test]
    fn endpoint_ports_match_by_protocol() {
        let ep: Endpoint = serde_json::from_str(
            r#"{"service":"d","node":"n","id":"x","ip":"10.0.0.2","ready":true,
               "ports":[{"name":"a","port":53},{"name":"b","port":53,"protocol":"udp"}]}"#,
        )
        .unwrap();
        let sp: ServicePort =
            serde_json::from_str(r#"{"name":"z","port":53,"target_port":53,"protocol":"udp"}"#)
                .unwrap();
        assert_eq!(ep.port_for(&sp).map(|p| p.get()), Some(53));
        let ep2 = Endpoint {
            ports: vec![ep.ports[0].clone()],
            ..ep.clone()
        };
        assert_eq!(ep2.port_for(&sp), None, "a TCP port does not serve UDP");
    }

    #[test]
    fn health_kinds_parse() {
        assert_eq!("tcp".parse::<HealthKind>().unwrap(), HealthKind::Tcp);
        assert_eq!(
            "http:/healthz".parse::<HealthKind>().unwrap(),
            HealthKind::Http {
                path: "/healthz".into()
            }
        );
        let e = "grpc".parse::<HealthKind>().unwrap_err().to_string();
        assert!(e.contains("grpc") && e.contains("tcp"), "{e}");
        assert!("http:healthz".parse::<HealthKind>().is_err());
    }

    #[test]
    fn template_hash_is_stable() {
        let t = PodTemplate {
            image: "busybox".into(),
            ..Default::default()
        };
        assert_eq!(t.hash(), t.clone().hash());
        let mut t2 = t.clone();
        t2.env.insert("A".into(), "1".into());
        assert_ne!(t.hash(), t2.hash());
    }

    #[test]
    fn sla_fills_defaults_and_old_replica_sets_read() {
        let sla: Sla = serde_json::from_str(r#"{"max_active_per_pod":5}"#).unwrap();
        assert_eq!(sla.max_active_per_pod, Some(5));
        assert_eq!(sla.scale_down_window_ms, Sla::DEFAULT_SCALE_DOWN_WINDOW_MS);
        assert_eq!(sla.tolerance_pct, 10);
        assert!(sla.has_target() && !Sla::default().has_target());
        let rs: ReplicaSet = serde_json::from_str(
            r#"{"name":"web","template":{"image":"busybox"},"replicas":2,"min_replicas":1,"max_replicas":4}"#,
        )
        .unwrap();
        assert_eq!(rs.sla, None);
        assert!(rs.autoscale().is_none());
        // Unset, it is left out, so that an older agent still reads it.
        assert!(
            !String::from_utf8(crate::encode(&rs))
                .unwrap()
                .contains("sla")
        );
    }

    #[test]
    fn stats_written_on_real_change_or_refresh_only() {
        let base = Stats {
            active: 20,
            new_conns: 100,
            window_ms: 1000,
            at: 1_000,
            ..Default::default()
        };
        assert!(base.worth_writing(None));
        let same = |f: &dyn Fn(&mut Stats)| {
            let mut s = base.clone();
            s.at += 1000;
            f(&mut s);
            s.worth_writing(Some(&base))
        };
        assert!(!same(&|_| {}));
        assert!(!same(&|s| s.active = 21), "under 10% of 20");
        assert!(same(&|s| s.active = 22));
        assert!(!same(&|s| s.new_conns = 115), "under 20% of 100/s");
        assert!(same(&|s| s.new_conns = 120));
        assert!(same(&|s| s.at = 1_000 + STATS_REFRESH_MS));
        // Small counts: a change of 2 counts.
        let one = Stats {
            active: 1,
            at: 1,
            ..Default::default()
        };
        let two = Stats {
            active: 2,
            at: 2,
            ..Default::default()
        };
        assert!(
            !two.worth_writing(Some(&one)),
            "0 and 1 alternate under short connections"
        );
        let three = Stats {
            active: 3,
            at: 2,
            ..Default::default()
        };
        assert!(three.worth_writing(Some(&one)));
        // Going idle is written once, then nothing.
        let idle = Stats {
            at: 3,
            ..Default::default()
        };
        assert!(idle.worth_writing(Some(&one)));
        let later = Stats {
            at: 3 + 10 * STATS_REFRESH_MS,
            ..Default::default()
        };
        assert!(!later.worth_writing(Some(&idle)));
    }

    #[test]
    fn unknown_fields_rejected() {
        let e = serde_json::from_str::<Node>(r#"{"name":"a","addr":"10.0.0.1","bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
