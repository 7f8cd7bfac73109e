//! The objects kept in the store, one per key kind (see [`crate::keys`]).
//!
//! Every object is plain data with serde. Unknown fields are rejected, so a
//! typo in an API request is an error rather than a silent default.
//!
//! One module per family of kinds: `node` (nodes, node labels, refusals),
//! `service` (services, their ports, SLA, allocations), `workload`
//! (replica sets, pod templates, pods, pod statuses) and `endpoint`
//! (endpoints and traffic stats); this module holds the labels and
//! re-exports them all.

use std::collections::BTreeMap;

mod endpoint;
mod node;
mod service;
mod workload;

pub use endpoint::{Endpoint, EndpointPort, STATS_REFRESH_MS, Stats};
pub use node::{Node, NodeLabels, Refusal, Resources};
pub use service::{
    AffinityKind, Allocation, LbPolicy, PortSpec, Protocol, Service, ServicePort, ServiceType,
    SessionAffinity, Sla, StaticEndpoint,
};
pub use workload::{
    ContainerHealth, ContainerPort, HealthCheck, HealthKind, Pod, PodPhase, PodStatus, PodTemplate,
    ReplicaSet, ReplicaSetProblem,
};

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

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[cfg(test)]
mod tests;
