//! The HTTP API's request and response types, shared by the server in
//! `pier-api` and its client (the CLI).
//!
//! Stored objects that a person reads as they are (services, endpoints) are
//! returned as the model types. Nodes, replica sets and pods are returned as
//! views that add what the store keeps elsewhere: a node's readiness, a
//! replica set's current and ready counts, a pod's status.
//!
//! Requests reject unknown fields; responses do not, so that an older client
//! can read a newer agent's answers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::names::{Name, Namespace, PortNum, Replicas};
use crate::objects::{
    Labels, PodPhase, Protocol, ReplicaSet, Resources, ServiceType, SessionAffinity,
};
use crate::rollout::Rollout;

/// Every API path starts with this.
pub const PREFIX: &str = "/api/v1";

/// The kinds of object the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Nodes,
    ReplicaSets,
    Pods,
    Services,
    Endpoints,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Nodes,
        Resource::ReplicaSets,
        Resource::Pods,
        Resource::Services,
        Resource::Endpoints,
    ];

    /// The names a person may type, for error messages.
    pub const VALID: &'static str = "nodes, rs (replicasets), pods, svc (services), endpoints (ep)";

    /// The path segment: `/api/v1/namespaces/<ns>/<path>`.
    pub fn path(self) -> &'static str {
        match self {
            Resource::Nodes => "nodes",
            Resource::ReplicaSets => "replicasets",
            Resource::Pods => "pods",
            Resource::Services => "services",
            Resource::Endpoints => "endpoints",
        }
    }

    /// The short singular name used in messages (`pod/web-x1z9a deleted`).
    pub fn singular(self) -> &'static str {
        match self {
            Resource::Nodes => "node",
            Resource::ReplicaSets => "replicaset",
            Resource::Pods => "pod",
            Resource::Services => "service",
            Resource::Endpoints => "endpoints",
        }
    }

    /// Nodes are cluster-wide; everything else lives in a namespace.
    pub fn namespaced(self) -> bool {
        self != Resource::Nodes
    }

    /// Parses a kind as kubectl users type it: plural, singular or short.
    pub fn parse(s: &str) -> Option<Resource> {
        Some(match s {
            "nodes" | "node" | "no" => Resource::Nodes,
            "replicasets" | "replicaset" | "rs" => Resource::ReplicaSets,
            "pods" | "pod" | "po" => Resource::Pods,
            "services" | "service" | "svc" => Resource::Services,
            "endpoints" | "endpoint" | "ep" => Resource::Endpoints,
            _ => return None,
        })
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line that says what was wrong, naming the field for a 400.
    pub error: String,
}

/// A node, as `get nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: Name,
    pub addr: IpAddr,
    /// The node's agent holds its lease and the agent answering reads the
    /// store live (a node held after a store stall is not ready).
    pub ready: bool,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub mesh_port: u16,
    #[serde(default)]
    pub capacity: Resources,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub started_at: u64,
    /// Pods assigned to the node.
    #[serde(default)]
    pub pods: u32,
    /// Containers the node's agent refused to let join a service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<crate::Refusal>,
    /// Unix ms since when the node's agent cannot reach its dockerd (no
    /// new pod is placed there meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_down_since: Option<u64>,
}

/// A replica set with its observed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSetView {
    /// The replica set as stored (its fields inline in the JSON).
    #[serde(flatten)]
    pub spec: ReplicaSet,
    /// Pods that exist.
    pub current: u32,
    /// Pods that run and passed their health check.
    pub ready: u32,
    /// Pods on the current template (`revision`).
    #[serde(default)]
    pub updated: u32,
    /// Of those, ready.
    #[serde(default)]
    pub updated_ready: u32,
    /// The latest rollout, as the supervisor leader recorded it.
    #[serde(default)]
    pub rollout: Option<Rollout>,
    /// What keeps the set from its desired state, as the supervisor
    /// leader reported it (`problems/<ns>/<rs>`); absent when nothing does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A pod merged with its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodView {
    pub name: Name,
    pub namespace: Namespace,
    pub replicaset: Name,
    pub node: Name,
    /// `Pending` until the node's agent reports otherwise.
    pub phase: PodPhase,
    pub ready: bool,
    pub ip: Option<IpAddr>,
    pub container_id: Option<String>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub started_at: Option<u64>,
}

/// `PUT …/replicasets/<rs>/scale`. Exactly one of `replicas` (absolute)
/// and `delta` (relative, applied to the value read under the same revision
/// check) is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleRequest {
    pub replicas: Option<Replicas>,
    pub delta: Option<i64>,
}

/// `PUT …/replicasets/<rs>/autoscale`: autoscale the set between `min`
/// and `max` replicas on `sla`'s targets. `DELETE` on the same path turns
/// autoscaling off (the count stays where it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleRequest {
    pub min: Replicas,
    pub max: Replicas,
    pub sla: crate::Sla,
}

/// `GET …/replicasets/<rs>/autoscale`: the set's targets, what the
/// autoscaler measures now (every node's stats, as it reads them) and its
/// last decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleView {
    pub min: Option<Replicas>,
    pub max: Option<Replicas>,
    pub sla: Option<crate::Sla>,
    /// Desired, as the set says now.
    pub replicas: Replicas,
    pub ready: u32,
    /// The services whose stats are summed.
    pub services: Vec<Name>,
    pub measured: crate::autoscale::Measurement,
    #[serde(default)]
    pub status: crate::autoscale::AutoscaleStatus,
}

/// `PUT …/replicasets/<rs>/image`: a new image for the template (a new
/// revision, rolled out under the set's `update_config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetImageRequest {
    pub image: String,
}

/// `POST …/replicasets/<rs>/rollback`: the template of an earlier revision
/// becomes a new revision (as `kubectl rollout undo` does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackRequest {
    /// The revision to go back to; the one before the current by default.
    pub to_revision: Option<u64>,
}

/// `PATCH /api/v1/nodes/<node>/labels`: `Some(v)` sets a label, `None`
/// (JSON null) removes it, also one the node's config sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLabelsRequest {
    pub labels: BTreeMap<String, Option<String>>,
}

/// `POST …/replicasets/<rs>/expose`: a service whose selector is the replica
/// set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    /// The service name; the replica set's name when absent.
    #[serde(default)]
    pub name: Option<Name>,
    pub port: PortNum,
    /// The container port; `port` when absent.
    #[serde(default)]
    pub target_port: Option<PortNum>,
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,
    /// An explicit node port for a NodePort service; allocated when absent.
    #[serde(default)]
    pub node_port: Option<PortNum>,
    /// Each host's proxy uses that host's own ready endpoints when it has
    /// any, and the others' only when it has none.
    #[serde(default)]
    pub prefer_local: bool,
    /// A headless service: no VIP, no proxy listener; DNS answers the
    /// service's name with one address per ready pod (its endpoint VIP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    /// Send a PROXY protocol v2 header (the client's address) to the pod
    /// before the client's bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// The protocol of `port` (TCP when absent).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    /// The name of `port`; the replica set's container port of that number
    /// and protocol names it when absent, else `p<port>` (`p<port>-udp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<Name>,
    /// More ports, each with `target_port == port` (`--port` repeated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_ports: Vec<ExposePort>,
    /// `--session-affinity ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
}

/// One more port of an [`ExposeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    pub port: PortNum,
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// Something wrong with an object, reported by a subsystem (the proxy's
/// node-port conflicts, the supervisor's replica-set problems).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub namespace: Namespace,
    pub name: Name,
    pub message: String,
}

/// `GET /api/v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    /// The node whose agent answered.
    pub node: Name,
    /// The store revision its snapshot reflects.
    pub revision: i64,
    /// The DNS domain its agent serves (`<svc>.<ns>.svc.<domain>`); empty
    /// from an agent older than the dashboard.
    #[serde(default)]
    pub domain: String,
}

/// `POST /api/v1/dashboard/logins`: a one-time code for the dashboard,
/// opened as `/ui/login?code=CODE` on the same agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardLogin {
    pub code: String,
    /// The path to open on the agent's API address.
    pub path: String,
    /// How long the code is good for.
    pub expires_in_ms: u64,
}

/// `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: BTreeMap<String, bool>,
    /// How current the agent's view of the store is. A stale agent stays
    /// ready: it goes on serving DNS and proxying from its last snapshot.
    #[serde(default)]
    pub store: StoreFreshness,
    /// `true` when the API was started with `--insecure-no-auth`: anyone
    /// who can reach it may change the cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_no_auth: bool,
}

/// The agent's view of the store, in `/readyz` and `pier version`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreFreshness {
    /// The store revision its snapshot reflects.
    pub revision: i64,
    /// Unix milliseconds since when the store has been unreachable; absent
    /// (null) while the watch is live.
    pub stale_since_ms: Option<u64>,
    /// How long it has been stale, in milliseconds (0 while live).
    pub stale_for_ms: u64,
}

/// What happened to an object in a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
}

impl fmt::Display for WatchEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WatchEventType::Added => "ADDED",
            WatchEventType::Modified => "MODIFIED",
            WatchEventType::Deleted => "DELETED",
        })
    }
}

/// One line of a watch stream (`?watch=true`): the objects that exist when
/// the watch starts come first as `ADDED`, then every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent<T> {
    #[serde(rename = "type")]
    pub kind: WatchEventType,
    pub object: T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parse_aliases() {
        for r in Resource::ALL {
            assert_eq!(Resource::parse(r.path()), Some(r));
            assert_eq!(Resource::parse(r.singular()), Some(r));
        }
        assert_eq!(Resource::parse("svc"), Some(Resource::Services));
        assert_eq!(Resource::parse("rs"), Some(Resource::ReplicaSets));
        assert_eq!(Resource::parse("deployments"), None);
    }

    #[test]
    fn scale_request_rejects_unknown_fields() {
        let e = serde_json::from_str::<ScaleRequest>(r#"{"replica":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("replica"), "{e}");
        let e = serde_json::from_str::<ScaleRequest>(r#"{"replicas":5000}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 to 1000"), "{e}");
    }

    #[test]
    fn watch_event_shape() {
        let e = WatchEvent {
            kind: WatchEventType::Deleted,
            object: 1u32,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"DELETED","object":1}"#
        );
    }
}

/// One object of `GET /api/v1/signals[?watch=true]`: what the dashboard
/// charts and lists beside the snapshot's objects, read from the store's
/// `stats/` and `autoscale/` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Signal {
    Traffic(TrafficView),
    Autoscale(AutoscaleSignal),
}

/// A service's traffic, every node's latest `stats/` record summed (the
/// first-byte sketches merged, so the quantiles are over all the traffic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficView {
    pub namespace: Namespace,
    pub service: Name,
    /// Unix ms of the newest record summed.
    pub at: u64,
    /// Nodes with a record.
    pub nodes: u32,
    /// Open client connections.
    pub active: u64,
    /// New connections per second (each node's last window).
    pub conn_rate: f64,
    /// Failed connects to endpoints since each node's proxy started
    /// (a counter: the dashboard charts its rate).
    pub connect_errors: u64,
    /// Time to first response byte over the last windows, ms; `None`
    /// when nothing was measured.
    pub p50_first_byte_ms: Option<f64>,
    pub p99_first_byte_ms: Option<f64>,
}

/// A replica set's last autoscaler decisions (`autoscale/<ns>/<rs>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleSignal {
    pub namespace: Namespace,
    pub replicaset: Name,
    pub decisions: Vec<crate::autoscale::ScaleDecision>,
    /// Decisions since the record was made.
    pub total: u64,
}
