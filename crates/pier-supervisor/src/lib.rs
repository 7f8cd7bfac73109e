//! pier-supervisor: keeps every replica set at its count.
//!
//! - **Election.** Any agent may run the supervisor; each one campaigns in
//!   the `supervisor` election ([`pier_store::election`]) and exactly one
//!   leads. Every write of the leader is fenced by the election key's
//!   revision, so a deposed leader's late write fails.
//! - **Reconcile.** While leading, a level-triggered reconcile per replica
//!   set, driven by snapshot changes (those that concern the set: its
//!   replica set, its pods, their statuses, the nodes) and by a periodic
//!   requeue. The dirty sets are planned in batches on one snapshot, each
//!   in a span with the set's key and the reason, and written together
//!   (several sets per transaction: [`txns`]); a batch is never planned on a
//!   snapshot older than the supervisor's own last write.
//! - **Plan** ([`plan::plan`], pure): create pods `<rs>-<5 random [a-z0-9]>`,
//!   delete surplus pods (unready and newest first), replace Failed pods
//!   (with exponential backoff per set, 1 s to 30 s, so a missing image does
//!   not crash-loop), pods whose node is gone, and pods that were deleted;
//!   delete the pods of a deleted set.
//! - **Scheduler** ([`plan::schedule`]): nodes in the snapshot (lease alive),
//!   matching `node_selector`, with capacity and under `max_per_node`;
//!   spread by fewest pods of the set, then fewest pods, then name.
//!
//! It is not the node runtime: it writes only `pods/<ns>/<pod>` keys, never
//! pod statuses, and never talks to Docker.

use std::collections::BTreeMap;
use std::sync::Arc;

use pier_model::{Name, ObjectKey, Snapshot};
use pier_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod autoscale;
mod autoscaler;
mod controller;
pub mod pace;
pub mod plan;
pub mod txns;

/// The supervisor's part of the agent config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// true: this agent campaigns; any agent can run it, exactly one leads.
    pub enabled: bool,
    /// Election lease TTL in seconds (etcd's minimum is 2).
    pub lease_ttl_secs: u32,
    /// Periodic safety-net reconcile of every replica set, in ms.
    pub requeue_interval_ms: u64,
    /// A pod whose node record is gone (lease expired) is replaced after
    /// this many ms.
    pub node_grace_ms: u64,
    /// How often the autoscaler leader decides every autoscaled set, in
    /// ms: the proxies' stats window (1 s) is its resolution.
    pub autoscale_interval_ms: u64,
}

impl SupervisorConfig {
    /// 5 s: a failover within about 6 s, and three renewals per TTL.
    pub fn default_lease_ttl_secs() -> u32 {
        5
    }
    /// 5 s: the requeue is only a safety net; changes drive reconciles.
    pub fn default_requeue_interval_ms() -> u64 {
        5000
    }
    pub fn default_node_grace_ms() -> u64 {
        0
    }
    /// 1 s: the stats' resolution; a decision within 3 s of a breach.
    pub fn default_autoscale_interval_ms() -> u64 {
        1000
    }

    pub fn validate(&self) -> Result<(), SupervisorError> {
        if self.lease_ttl_secs < pier_store::Ttl::MIN || self.lease_ttl_secs > 300 {
            return Err(SupervisorError::Config {
                field: "supervisor.lease_ttl_secs",
                why: format!(
                    "{} is out of range: use {} to 300 seconds ({} is etcd's minimum lease TTL)",
                    self.lease_ttl_secs,
                    pier_store::Ttl::MIN,
                    pier_store::Ttl::MIN
                ),
            });
        }
        if !(100..=3_600_000).contains(&self.requeue_interval_ms) {
            return Err(SupervisorError::Config {
                field: "supervisor.requeue_interval_ms",
                why: format!(
                    "{} is out of range: use 100 to 3600000 ms",
                    self.requeue_interval_ms
                ),
            });
        }
        if !(100..=60_000).contains(&self.autoscale_interval_ms) {
            return Err(SupervisorError::Config {
                field: "supervisor.autoscale_interval_ms",
                why: format!(
                    "{} is out of range: use 100 to 60000 ms",
                    self.autoscale_interval_ms
                ),
            });
        }
        if self.node_grace_ms > 3_600_000 {
            return Err(SupervisorError::Config {
                field: "supervisor.node_grace_ms",
                why: format!(
                    "{} is out of range: use 0 to 3600000 ms",
                    self.node_grace_ms
                ),
            });
        }
        Ok(())
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            enabled: true,
            lease_ttl_secs: Self::default_lease_ttl_secs(),
            requeue_interval_ms: Self::default_requeue_interval_ms(),
            node_grace_ms: Self::default_node_grace_ms(),
            autoscale_interval_ms: Self::default_autoscale_interval_ms(),
        }
    }
}

/// Supervisor errors.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("invalid config: {field}: {why}")]
    Config { field: &'static str, why: String },
    #[error("{context}: {source}")]
    Store {
        context: String,
        #[source]
        source: StoreError,
    },
    #[error("the snapshot channel closed (the reflector stopped)")]
    SnapshotClosed,
}

/// The last problem of each replica set (no feasible node, failing pods), as
/// a sentence for `describe`. Empty for sets that are fine, and while this
/// process does not lead.
pub type Problems = Arc<BTreeMap<ObjectKey, String>>;

/// A supervisor, built before it runs so that its status can be watched.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    node: Name,
    store: Arc<dyn Store>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    leader_tx: watch::Sender<bool>,
    problems_tx: watch::Sender<Problems>,
}

impl Supervisor {
    /// Validates `cfg`. `node` is this agent's name, the candidate string.
    pub fn new(
        cfg: SupervisorConfig,
        node: Name,
        store: Arc<dyn Store>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
    ) -> Result<Supervisor, SupervisorError> {
        cfg.validate()?;
        Ok(Supervisor {
            cfg,
            node,
            store,
            snapshot,
            leader_tx: watch::channel(false).0,
            problems_tx: watch::channel(Problems::default()).0,
        })
    }

    /// true while this process leads.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.leader_tx.subscribe()
    }

    /// The last problem per replica set, while this process leads.
    pub fn problems(&self) -> watch::Receiver<Problems> {
        self.problems_tx.subscribe()
    }

    /// Campaigns, reconciles while leading, campaigns again when leadership
    /// is lost; until `cancel`, when it resigns (the next leader takes over
    /// at once). With `enabled = false` it waits for `cancel` and returns.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), SupervisorError> {
        if !self.cfg.enabled {
            tracing::info!("supervisor disabled on this node");
            cancel.cancelled().await;
            return Ok(());
        }
        // The autoscaler runs beside the controller, in its own election.
        let autoscaler = autoscaler::Autoscaler {
            cfg: self.cfg.clone(),
            node: self.node.clone(),
            store: self.store.clone(),
            snapshot: self.snapshot.clone(),
        };
        let (a, b) = tokio::join!(
            controller::run(self, cancel.clone()),
            autoscaler.run(cancel)
        );
        a.and(b)
    }
}

/// Builds a [`Supervisor`] and runs it until `cancel`.
pub async fn run(
    cfg: SupervisorConfig,
    node: Name,
    store: Arc<dyn Store>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    cancel: CancellationToken,
) -> Result<(), SupervisorError> {
    Supervisor::new(cfg, node, store, snapshot)?
        .run(cancel)
        .await
}

#[cfg(test)]
mod config_tests {
    use super::*;

    /// `pier agent` spawns it: the future must be Send.
    #[allow(dead_code)]
    fn run_is_send(s: Supervisor) {
        fn send<T: Send>(_: T) {}
        send(s.run(CancellationToken::new()));
    }

    #[test]
    fn defaults_validate() {
        SupervisorConfig::default().validate().unwrap();
    }

    #[test]
    fn ttl_below_etcd_minimum_names_the_field() {
        let cfg = SupervisorConfig {
            lease_ttl_secs: 1,
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("supervisor.lease_ttl_secs") && e.contains("1"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_rejected_and_defaults_filled() {
        let e = serde_json::from_str::<SupervisorConfig>(r#"{"enabled":true,"bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let c: SupervisorConfig = serde_json::from_str(r#"{"node_grace_ms":250}"#).unwrap();
        assert_eq!(c.node_grace_ms, 250);
        assert_eq!(c.lease_ttl_secs, 5);
        assert!(c.enabled);
    }
}
