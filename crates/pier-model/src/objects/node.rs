//! Hosts: a node's record (`/pier/v1/nodes/`), the resources it offers, the
//! labels laid over it with `pier label node`, and the containers its agent
//! refused.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::Labels;
use crate::names::{Name, Namespace};

/// CPU, memory and pod-count amounts. Zero means "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Thousandths of a CPU.
    pub cpu_millis: u32,
    pub memory_mb: u32,
    /// As capacity: the most pods a node takes. Unused on requests.
    pub pods: u32,
}

/// `/pier/v1/nodes/<node>`: a host running `pier agent`. Leased by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Unix milliseconds since when the agent cannot reach its dockerd
    /// (`None`: connected). The supervisor places no new pod here while it
    /// is set, and replaces this node's pods that are still pending after
    /// a grace. Left out when `None`, so that agents of an older version
    /// still read the record while dockerd is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_down_since: Option<u64>,
}

impl Node {
    /// The most refusals a node record carries; the agent's log has all.
    pub const MAX_REFUSED: usize = 64;
    /// How long a pod may stay pending on a node whose agent cannot reach
    /// its dockerd ([`Node::runtime_down_since`]) before the supervisor
    /// replaces it elsewhere: longer than a dockerd restart (a few
    /// seconds), so a restart moves nothing.
    pub const RUNTIME_DOWN_GRACE_MS: u64 = 10_000;
}

/// A container the agent did not let join a service, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

/// `/pier/v1/nodelabels/<node>`: labels set with `pier label node`, laid
/// over the labels the node's agent registers from its `[node] labels`.
/// Written by the API only; kept when the node goes away (no lease), so a
/// host that comes back keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
