//! Rolling updates: how a replica set moves its pods to a new template
//! ([`UpdateConfig`], Compose's `deploy.update_config` and
//! `rollback_config`), the template revisions it keeps ([`TemplateRevision`]),
//! and the supervisor's record of a rollout's progress ([`Rollout`]).
//!
//! Writers: the API writes the replica set (its template, `revision` and
//! `history`); the supervisor leader writes `rollouts/<ns>/<rs>`, and never
//! the replica set. An automatic rollback is a state of the rollout record
//! (`RolledBack`, pods on the earlier revision's template), not a rewrite of
//! the replica set; `pier rollout undo` is the API's rewrite.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::NameError;
use crate::objects::PodTemplate;

/// Which goes first in each step of a rolling update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop an old pod, then start its replacement: never more pods than
    /// replicas (Swarm's default).
    #[default]
    StopFirst,
    /// Start the new pod and wait until it is ready, then stop an old one:
    /// never fewer ready pods than replicas.
    StartFirst,
}

impl FromStr for UpdateOrder {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s {
            "stop-first" => Ok(UpdateOrder::StopFirst),
            "start-first" => Ok(UpdateOrder::StartFirst),
            _ => Err(NameError::Invalid {
                what: "update order",
                value: s.chars().take(40).collect(),
                why: "use start-first or stop-first",
            }),
        }
    }
}

impl fmt::Display for UpdateOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpdateOrder::StopFirst => "stop-first",
            UpdateOrder::StartFirst => "start-first",
        })
    }
}

/// What a rollout does when more of its new pods fail than
/// `max_failure_ratio` allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    /// Stop making steps; pods stay as they are (Swarm's default).
    #[default]
    Pause,
    /// Move the pods back to the revision that ran before, under the
    /// replica set's `rollback_config`.
    Rollback,
    /// Go on; failed pods are replaced as usual.
    Continue,
}

impl FromStr for FailureAction {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s {
            "pause" => Ok(FailureAction::Pause),
            "rollback" => Ok(FailureAction::Rollback),
            "continue" => Ok(FailureAction::Continue),
            _ => Err(NameError::Invalid {
                what: "failure action",
                value: s.chars().take(40).collect(),
                why: "use pause, rollback or continue",
            }),
        }
    }
}

impl fmt::Display for FailureAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureAction::Pause => "pause",
            FailureAction::Rollback => "rollback",
            FailureAction::Continue => "continue",
        })
    }
}

/// A fraction from 0 to 1, finite (so it can be compared for equality).
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

// Safe: the value is never NaN (refused by `new`).
impl Eq for Ratio {}

impl Ratio {
    pub fn new(v: f64) -> Result<Ratio, NameError> {
        if v.is_finite() && (0.0..=1.0).contains(&v) {
            Ok(Ratio(v))
        } else {
            Err(NameError::Invalid {
                what: "ratio",
                value: v.to_string(),
                why: "use a number from 0 to 1, such as 0.2",
            })
        }
    }
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Ratio {
    type Error = NameError;
    fn try_from(v: f64) -> Result<Ratio, NameError> {
        Ratio::new(v)
    }
}

impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
    }
}

/// How a changed template rolls out (and how a rollback rolls back), as in
/// Compose's `deploy.update_config`. Defaults are Swarm's, plus
/// `ready_timeout_ms`, which Swarm does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateConfig {
    /// Pods replaced per step; 0 replaces all at once.
    pub parallelism: u32,
    /// Wait between steps, in ms, after a step's new pods are done.
    pub delay_ms: u64,
    pub order: UpdateOrder,
    pub failure_action: FailureAction,
    /// How long a new pod must stay up after it became ready before its
    /// step is done, in ms; a pod that fails meanwhile is a failure.
    pub monitor_ms: u64,
    /// The share of the replicas whose new pods may fail before
    /// `failure_action` is taken; 0 takes it at the first failure.
    pub max_failure_ratio: Ratio,
    /// A new pod that is not ready this long (ms) after it was created
    /// counts as failed: this is the rollout's deadline per step.
    pub ready_timeout_ms: u64,
}

impl UpdateConfig {
    /// 5 s: Swarm's default monitor.
    pub const DEFAULT_MONITOR_MS: u64 = 5_000;
    /// 60 s: images are loaded on the host, and a pod that has not passed
    /// its health check in a minute is not going to.
    pub const DEFAULT_READY_TIMEOUT_MS: u64 = 60_000;
    /// 1 h: a longer wait is a typo (ms for s).
    pub const MAX_MS: u64 = 3_600_000;

    /// Steps of at most this many pods, out of `replicas`.
    pub fn step(&self, replicas: u32) -> u32 {
        if self.parallelism == 0 {
            replicas.max(1)
        } else {
            self.parallelism
        }
    }

    /// Checks what serde cannot, naming the field under `what`
    /// (`update_config` or `rollback_config`).
    pub fn validate(&self, what: &str) -> Result<(), String> {
        for (field, v) in [
            ("delay_ms", self.delay_ms),
            ("monitor_ms", self.monitor_ms),
            ("ready_timeout_ms", self.ready_timeout_ms),
        ] {
            if v > Self::MAX_MS {
                return Err(format!(
                    "{what}.{field}: {v} is above {} (1 hour); the unit is milliseconds",
                    Self::MAX_MS
                ));
            }
        }
        if self.ready_timeout_ms < 1000 {
            return Err(format!(
                "{what}.ready_timeout_ms: {} is below 1000; a pod needs time to start and pass its health check",
                self.ready_timeout_ms
            ));
        }
        Ok(())
    }
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            order: UpdateOrder::StopFirst,
            failure_action: FailureAction::Pause,
            monitor_ms: Self::DEFAULT_MONITOR_MS,
            max_failure_ratio: Ratio::default(),
            ready_timeout_ms: Self::DEFAULT_READY_TIMEOUT_MS,
        }
    }
}

/// An earlier template of a replica set, kept for `rollout history` and
/// `rollout undo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRevision {
    pub revision: u64,
    pub template: PodTemplate,
    /// Unix milliseconds when a newer template replaced it.
    #[serde(default)]
    pub replaced_at: u64,
    /// What replaced it (`set image web:v2`, `rollout undo`, `replace`).
    #[serde(default)]
    pub replaced_by: String,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Steps are being made toward `target`.
    #[default]
    Progressing,
    /// Every pod runs `target` (= `revision`) and passed its checks.
    Complete,
    /// Stopped by `failure_action: pause`; `message` says why. A new
    /// template (or `rollout undo`) starts a new rollout.
    Paused,
    /// Moving the pods back to `target` (the revision that ran before).
    RollingBack,
    /// Back on `target` after `revision` failed; `message` says why.
    RolledBack,
}

impl RolloutState {
    /// Nothing more happens until the replica set's template changes.
    pub fn is_final(self) -> bool {
        !matches!(self, RolloutState::Progressing | RolloutState::RollingBack)
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Complete => "complete",
            RolloutState::Paused => "paused",
            RolloutState::RollingBack => "rolling back",
            RolloutState::RolledBack => "rolled back",
        })
    }
}

/// `/pier/v1/rollouts/<ns>/<rs>`: the progress of the latest rollout of a
/// replica set. Written by the supervisor leader only (fenced, with no
/// lease, so a paused or rolled-back rollout stays so across a failover);
/// deleted with the replica set's last pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rollout {
    /// The replica set revision this rollout brings in.
    pub revision: u64,
    /// Its template's hash: a template written without a new revision (by
    /// hand in the store) still starts a new rollout.
    pub hash: String,
    /// The revision the pods are moving to: `revision`, or after a failure
    /// with `failure_action: rollback`, the one that ran before.
    pub target: u64,
    /// The revision that ran before, when known (what a rollback returns
    /// to).
    pub from: Option<u64>,
    pub state: RolloutState,
    /// Why it paused or rolled back, or the last failure, for a person.
    pub message: String,
    /// New pods that failed (or were not ready by the deadline) so far.
    pub failures: u32,
    /// Steps started so far.
    pub steps: u32,
    /// Unix ms when the last step's new pods were all done (the delay runs
    /// from here); `None` while a step is in flight.
    pub step_done_at: Option<u64>,
    /// Unix milliseconds.
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// The `created_at` of the set this record is about. A set deleted
    /// and created again under the same name before the supervisor saw it
    /// gone starts a rollout of its own instead of taking over the earlier
    /// set's record (its state, its revisions). 0 in records written
    /// before this field: those are taken as the current set's.
    #[serde(skip_serializing_if = "is_zero")]
    pub set_created_at: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Rollout {
    /// Whether this record is about the set created at `created_at` (not
    /// an earlier set of the same name).
    pub fn is_of_set(&self, created_at: u64) -> bool {
        self.set_created_at == 0 || self.set_created_at == created_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_swarms_and_old_records_read() {
        let u: UpdateConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(u, UpdateConfig::default());
        assert_eq!(u.parallelism, 1);
        assert_eq!(u.order, UpdateOrder::StopFirst);
        assert_eq!(u.failure_action, FailureAction::Pause);
        let u: UpdateConfig = serde_json::from_str(
            r#"{"order":"start-first","failure_action":"rollback","max_failure_ratio":0.25}"#,
        )
        .unwrap();
        assert_eq!(u.order, UpdateOrder::StartFirst);
        assert_eq!(u.max_failure_ratio.get(), 0.25);
    }

    #[test]
    fn bad_values_name_themselves() {
        let e = serde_json::from_str::<UpdateConfig>(r#"{"max_failure_ratio":1.5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1.5") && e.contains("0 to 1"), "{e}");
        let e = serde_json::from_str::<UpdateConfig>(r#"{"order":"random"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("random"), "{e}");
        let u = UpdateConfig {
            delay_ms: 10_000_000,
            ..Default::default()
        };
        assert!(
            u.validate("update_config")
                .unwrap_err()
                .contains("update_config.delay_ms")
        );
        assert_eq!(
            "start-first".parse::<UpdateOrder>().unwrap(),
            UpdateOrder::StartFirst
        );
        assert!("stop".parse::<UpdateOrder>().is_err());
        assert_eq!(
            "rollback".parse::<FailureAction>().unwrap(),
            FailureAction::Rollback
        );
    }

    #[test]
    fn step_size() {
        let u = UpdateConfig::default();
        assert_eq!(u.step(10), 1);
        let all = UpdateConfig {
            parallelism: 0,
            ..Default::default()
        };
        assert_eq!(all.step(10), 10);
        assert_eq!(all.step(0), 1);
    }
}
