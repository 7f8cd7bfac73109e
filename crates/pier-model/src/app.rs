//! Applications: what `pier apply -f compose.yaml` asks for ([`AppSpec`]),
//! what the store keeps about it ([`App`], at `apps/<ns>/<app>`), and what
//! an apply would change ([`AppPlan`]).
//!
//! An application owns replica sets and services in its namespace, one of
//! each per Compose service (the service only when it has ports). The
//! [`App`] record lists them, so that a service removed from the file is
//! removed by the next apply, and nothing else is touched.

use serde::{Deserialize, Serialize};

use crate::names::{Name, Namespace};
use crate::objects::{Labels, ReplicaSet, Service};

/// The body of an apply or diff: the objects an application should have.
/// Built from Compose files by `pier-compose`, on the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: Name,
    pub namespace: Namespace,
    /// The files it came from, for people (`pier get apps`).
    #[serde(default)]
    pub files: Vec<String>,
    pub components: Vec<ComponentSpec>,
    /// Apply only if the application is at this revision (the store
    /// revision `pier diff` showed); 0 = it must not exist yet. `None`:
    /// whatever it is when the apply reads it.
    #[serde(default)]
    pub expect_revision: Option<i64>,
}

/// One Compose service: a replica set, and a service of the same name when
/// it has ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentSpec {
    pub name: Name,
    pub replicaset: ReplicaSet,
    #[serde(default)]
    pub service: Option<Service>,
    /// Compose's `deploy.labels`: labels of the service, not of its
    /// containers. Kept on the [`App`] record.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// `/pier/v1/apps/<ns>/<app>`: an applied application and what it owns.
/// Written by the API's apply and delete only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: Name,
    pub namespace: Namespace,
    pub components: Vec<AppComponent>,
    /// How many applies changed something (1 after the first).
    pub generation: u64,
    #[serde(default)]
    pub files: Vec<String>,
    /// Unix milliseconds.
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub updated_at: u64,
}

/// What one component of an application owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppComponent {
    pub name: Name,
    /// The replica set `name` is always owned; the service `name` when true.
    pub service: bool,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// What an apply does to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    Create,
    Update,
    Delete,
    Unchanged,
}

/// One object's change, with the fields that differ for an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub action: ChangeAction,
    /// `replicaset`, `service` or `app`.
    pub kind: String,
    pub name: Name,
    /// For an update: the fields that change, as `template.image`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

/// The answer to an apply, a diff or a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPlan {
    pub name: Name,
    pub namespace: Namespace,
    /// The application's revision (its key's mod revision) the plan was
    /// computed from; 0 when it did not exist.
    pub from_revision: i64,
    /// After an apply that wrote: the store revision of the write.
    #[serde(default)]
    pub to_revision: Option<i64>,
    pub changes: Vec<Change>,
    /// True when the changes were written (false for a diff, or when
    /// nothing changed).
    pub applied: bool,
}

impl AppPlan {
    /// Whether anything would change.
    pub fn changes_anything(&self) -> bool {
        self.changes
            .iter()
            .any(|c| c.action != ChangeAction::Unchanged)
    }
}

/// A row of `pier get apps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppView {
    pub name: Name,
    pub namespace: Namespace,
    pub generation: u64,
    pub revision: i64,
    pub files: Vec<String>,
    pub services: Vec<AppServiceView>,
    /// Every replica set has its desired pods, all on its current template
    /// and ready (so not while a rollout is under way).
    pub ready: bool,
    #[serde(default)]
    pub updated_at: u64,
}

/// One component of an application, with its readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppServiceView {
    pub name: Name,
    pub desired: u32,
    /// Pods on the replica set's current template that are ready.
    pub ready: u32,
    /// `VIP:port` list, and node ports, when it has a service.
    #[serde(default)]
    pub ports: Vec<String>,
    /// What the supervisor says keeps it from its desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}
