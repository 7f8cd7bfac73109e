//! Workloads: replica sets (`/pier/v1/replicasets/`) and their pod template
//! (ports, health check, resources), the pods placed from them and the pods'
//! statuses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::node::Resources;
use super::service::{Protocol, Sla};
use super::{Labels, is_default};
use crate::names::{Name, NameError, Namespace, PortNum, Replicas};
use crate::placement::Placement;
use crate::rollout::{TemplateRevision, UpdateConfig};

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
pub struct ReplicaSetProblem {
    pub message: String,
    /// The node whose supervisor reported it.
    pub reported_by: Name,
}

/// `/pier/v1/replicasets/<ns>/<rs>`: desired state, written by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl PodStatus {
    /// The message of a pod whose container exited with `code` (the node's
    /// agent writes it; [`PodStatus::exit_code`] reads it back).
    pub fn exited_message(code: i64) -> String {
        format!("container exited with code {code}")
    }

    /// The exit code of a Failed pod whose container exited by itself or was
    /// stopped ([`PodStatus::exited_message`]).
    pub fn exit_code(&self) -> Option<i64> {
        if self.phase != PodPhase::Failed {
            return None;
        }
        self.message
            .strip_prefix("container exited with code ")?
            .parse()
            .ok()
    }

    /// Its container was stopped by SIGTERM (exit 143): its node stopped it
    /// (a dockerd stop or restart stops every container so, as does `docker
    /// stop`), not its template; a process does not send itself SIGTERM,
    /// and the kernel's OOM killer sends SIGKILL (137), which still counts.
    pub fn stopped_by_its_node(&self) -> bool {
        self.exit_code() == Some(143)
    }
}
