//! The autoscaler's leader loop: campaign in the `autoscaler` election
//! (the supervisor's mechanism, its own key, so it may lead on another
//! node), then once per `autoscale_interval_ms` decide every autoscaled
//! replica set ([`crate::autoscale::decide`]) from every node's `stats/`
//! records of the services that select it, and write a changed count
//! through the set's revision and the election fence, with the decision
//! in `autoscale/<ns>/<rs>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pier_model::autoscale::{Measurement, ScaleDecision, measure, selects};
use pier_model::keys::{self, Key};
use pier_model::{Name, ObjectKey, ReplicaSet, Snapshot, Stats, decode, now_ms};
use pier_store::election::{self, Fence};
use pier_store::{Store, Ttl, writes};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::autoscale::{Input, Recommendation, decide};
use crate::controller::CAMPAIGN_RETRY;
use crate::{SupervisorConfig, SupervisorError};

/// The election the autoscalers campaign in.
pub const ELECTION: &str = "autoscaler";

/// What the leader remembers of a set between rounds.
#[derive(Debug)]
struct SetHistory {
    since_ms: u64,
    recs: Vec<Recommendation>,
}

pub(crate) struct Autoscaler {
    pub cfg: SupervisorConfig,
    pub node: Name,
    pub store: Arc<dyn Store>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl Autoscaler {
    pub(crate) async fn run(self, cancel: CancellationToken) -> Result<(), SupervisorError> {
        let name = Name::new(ELECTION).map_err(|e| SupervisorError::Config {
            field: "election",
            why: e.to_string(),
        })?;
        let ttl = Ttl::from_secs(self.cfg.lease_ttl_secs).map_err(|e| SupervisorError::Config {
            field: "supervisor.lease_ttl_secs",
            why: e.to_string(),
        })?;
        let span = tracing::info_span!("autoscaler", node = %self.node);
        async move {
            loop {
                let Some((leadership, fence)) = election::campaign_fenced(
                    &self.store,
                    &name,
                    self.node.as_str(),
                    ttl,
                    CAMPAIGN_RETRY,
                    &cancel,
                )
                .await
                else {
                    return Ok(());
                };
                tracing::info!("leading the autoscaler");
                let mut hist = BTreeMap::new();
                let mut tick =
                    tokio::time::interval(Duration::from_millis(self.cfg.autoscale_interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let lost = loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break false,
                        _ = leadership.lost() => break true,
                        _ = tick.tick() => self.round(&fence, &mut hist).await,
                    }
                };
                if lost && !cancel.is_cancelled() {
                    tracing::warn!("no longer leading the autoscaler; campaigning again");
                    drop(leadership);
                    continue;
                }
                if let Err(e) = leadership.resign().await {
                    tracing::warn!(error = %e, "resigning failed; the lease expires by itself");
                }
                return Ok(());
            }
        }
        .instrument(span)
        .await
    }

    /// Every node's stats of the services that select `rs`; `None` when
    /// there is no such service or a read failed.
    async fn measure(&self, snap: &Snapshot, rs: &ReplicaSet, now: u64) -> Option<Measurement> {
        let mut recs: Vec<(Name, Stats)> = Vec::new();
        let mut any = false;
        for svc in snap.services.values().filter(|s| selects(s, rs)) {
            any = true;
            let prefix = keys::prefix::stats_of(&svc.namespace, &svc.name);
            let list = match self.store.list(&prefix).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(prefix, error = %e, "reading stats failed");
                    return None;
                }
            };
            for kv in list.kvs {
                let node = match Key::parse(&kv.key) {
                    Ok(Key::Stats { node, .. }) => node,
                    _ => {
                        tracing::warn!(key = kv.key, "not a stats key; skipped");
                        continue;
                    }
                };
                match decode::<Stats>(&kv.key, &kv.value) {
                    Ok(s) => recs.push((node, s)),
                    Err(e) => tracing::warn!(error = %e, "stats record skipped"),
                }
            }
        }
        any.then(|| measure(recs.iter().map(|(n, s)| (n, s)), now))
    }

    async fn round(&self, fence: &Fence, hist: &mut BTreeMap<ObjectKey, SetHistory>) {
        let snap = self.snapshot.borrow().clone();
        let now = now_ms();
        hist.retain(|k, _| {
            snap.replicasets
                .get(k)
                .is_some_and(|rs| rs.autoscale().is_some())
        });
        for (key, rs) in snap.replicasets.iter() {
            let Some((min, max, sla)) = rs.autoscale() else {
                continue;
            };
            let measured = self.measure(&snap, rs, now).await;
            let ready = snap
                .pods
                .iter()
                .filter(|((ns, _), p)| *ns == rs.namespace && p.replicaset == rs.name)
                .filter(|(k, _)| snap.pod_statuses.get(*k).is_some_and(|s| s.ready))
                .count() as u32;
            let h = hist.entry(key.clone()).or_insert_with(|| SetHistory {
                since_ms: now,
                recs: Vec::new(),
            });
            let keep = sla.scale_down_window_ms.max(sla.scale_up_window_ms);
            h.recs.retain(|(at, _)| now.saturating_sub(*at) < keep);
            let d = decide(&Input {
                now_ms: now,
                current: rs.replicas.get(),
                ready,
                min: min.get(),
                max: max.get(),
                sla,
                measured: measured.as_ref(),
                snapshot_stale: snap.stale_since_ms.is_some(),
                watching_since_ms: h.since_ms,
                history: &h.recs,
            });
            h.recs.push((now, d.recommendation));
            tracing::debug!(replicaset = %format_args!("{}/{}", key.0, key.1), current = rs.replicas.get(), desired = d.desired, reason = d.reason, "autoscale round");
            if d.desired != rs.replicas.get() {
                self.write(fence, key, rs.replicas.get(), d.desired, d.reason, now)
                    .await;
            }
        }
    }

    /// Writes the new count through the set's revision and the fence,
    /// with the decision ([`writes::autoscale_step`]). A set changed
    /// meanwhile (a user's write) is left for the next round.
    async fn write(
        &self,
        fence: &Fence,
        key: &ObjectKey,
        from: u32,
        to: u32,
        reason: String,
        now: u64,
    ) {
        let span = tracing::info_span!("autoscale", replicaset = %keys::replicaset(&key.0, &key.1));
        let decision = ScaleDecision {
            at: now,
            from,
            to,
            reason: reason.clone(),
        };
        let r = writes::autoscale_step(&*self.store, fence, &key.0, &key.1, decision)
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        match r {
            Ok(true) => tracing::info!(from, to, reason, "scaled"),
            Ok(false) => {
                tracing::debug!("the replica set changed meanwhile; deciding again next round")
            }
            Err(e) => tracing::warn!(error = %e, "writing the scale decision failed"),
        }
    }
}
