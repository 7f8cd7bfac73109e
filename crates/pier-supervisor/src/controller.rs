//! The leader loop: campaign, then reconcile replica sets while leading, in
//! batches planned on one snapshot and written together ([`crate::txns`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pier_model::{
    Name, ObjectKey, PodPhase, ReplicaSetProblem, RolloutState, Snapshot, keys, now_ms,
};
use pier_store::election::{self, Fence};
use pier_store::{Compare, LeaseId, Revision, StoreError, Ttl, Txn, TxnOp};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::pace::Pace;
use crate::plan::{self, Action, PlanInput, RolloutWrite};
use crate::txns;
use crate::{Problems, Supervisor, SupervisorError};

/// The election every supervisor campaigns in.
pub const ELECTION: &str = "supervisor";
/// 5 ms: bursts of snapshots (a node's lease expiring takes its endpoints,
/// statuses and node key in a few batches) coalesce into one reconcile, at a
/// cost far below the 1.5 s replacement goal.
const DEBOUNCE: Duration = Duration::from_millis(5);
/// How long a reconcile waits for the snapshot to show the supervisor's own
/// last write before it goes ahead anyway (the reflector is normally a few
/// ms behind; longer means the store is in trouble).
const WRITE_VISIBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry of a replica set whose txn lost a race (a node or pod changed).
const CONFLICT_RETRY: Duration = Duration::from_millis(100);
/// Retry of a replica set whose write failed (store unreachable).
const ERROR_RETRY: Duration = Duration::from_secs(1);
/// How long the start-up check for this node's own stale election key may
/// take before campaigning normally.
const STALE_KEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Campaign retry when the store is unreachable.
pub(crate) const CAMPAIGN_RETRY: Duration = Duration::from_secs(1);
/// The most writes (pod creates and deletes, rollout records) the leader
/// plans on one snapshot before it writes them: about 32 full
/// transactions. The next batch waits until the snapshot shows them all.
/// The batch size follows what the store takes ([`pace`]): it starts at
/// the most (a store that keeps up is written as fast as before), grows by
/// [`BATCH_STEP`] after each full batch whose
/// slowest transaction and whose delay until the snapshot showed it both
/// took at most a fifth of the lease TTL, and halves after a slower one,
/// down to one transaction.
const BATCH_OPS: usize = 4096;
const BATCH_STEP: usize = 512;
/// Transactions in flight at once. Each is up to 128 writes; session 7 saw
/// a flood of transactions (1,000 hosts registering in txns) delay etcd's
/// lease renewals past their TTL, so the leader keeps only a few queued.
const TXNS_IN_FLIGHT: usize = 2;
/// Planning a batch is synchronous work (the simulator's leader placed
/// about 130 pods a second on 1,000 nodes in a dev build: some 30 s for a
/// full batch): the leader yields to the
/// runtime after each slice this long, so that the other tasks of the
/// process (the node's lease keepalive, DNS, the proxy) are not held up
/// behind it.
const PLAN_SLICE: Duration = Duration::from_millis(20);
/// Backoff of Failed-pod replacement: the first failed pod is replaced at
/// once, then 1 s, 2 s, … up to 30 s between rounds, until a new pod runs.
const FAILED_BACKOFF_MIN: Duration = Duration::from_secs(1);
const FAILED_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Backoff of re-spreading after an extra pod that failed or was not
/// ready in time (its node cannot run it): 30 s, doubling up to 10 min,
/// until a re-spread settles.
const RESPREAD_BACKOFF_MIN: Duration = Duration::from_secs(30);
const RESPREAD_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// Why the leader loop stopped.
enum Stop {
    Cancelled,
    Lost(String),
}

pub(crate) async fn run(sup: Supervisor, cancel: CancellationToken) -> Result<(), SupervisorError> {
    let election_name = Name::new(ELECTION).map_err(|e| SupervisorError::Config {
        field: "election",
        why: e.to_string(),
    })?;
    let ttl = Ttl::from_secs(sup.cfg.lease_ttl_secs).map_err(|e| SupervisorError::Config {
        field: "supervisor.lease_ttl_secs",
        why: e.to_string(),
    })?;
    let span = tracing::info_span!("supervisor", node = %sup.node);
    async move {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            // Best effort: without it the old lease simply runs out.
            r = timeout(STALE_KEY_TIMEOUT, take_over_own_stale_key(&sup, &election_name)) => {
                if r.is_err() {
                    tracing::debug!("checking for this node's stale election key timed out");
                }
            }
        }
        loop {
            sup.leader_tx.send_replace(false);
            sup.problems_tx.send_replace(Problems::default());
            let Some((leadership, fence)) = election::campaign_fenced(
                &sup.store,
                &election_name,
                sup.node.as_str(),
                ttl,
                CAMPAIGN_RETRY,
                &cancel,
            )
            .await
            else {
                return Ok(());
            };
            tracing::info!(lease = %leadership.lease(), "leading the supervisor");
            sup.leader_tx.send_replace(true);
            let mut leader = Leader::new(&sup, fence, leadership.lease());
            let stop = tokio::select! {
                s = leader.lead(&cancel) => s,
                _ = leadership.lost() => Ok(Stop::Lost("election lost".into())),
            };
            sup.leader_tx.send_replace(false);
            sup.problems_tx.send_replace(Problems::default());
            // The election monitor stops with our token too, so `lost` may
            // win the race against `Cancelled`: the token decides.
            let stop = if cancel.is_cancelled() { Ok(Stop::Cancelled) } else { stop };
            match stop {
                Ok(Stop::Cancelled) => {
                    if let Err(e) = leadership.resign().await {
                        tracing::warn!(error = %e, "resigning failed; the lease expires by itself");
                    }
                    return Ok(());
                }
                Ok(Stop::Lost(why)) => {
                    tracing::warn!(why, "no longer leading; campaigning again");
                    drop(leadership);
                }
                Err(e) => {
                    if let Err(re) = leadership.resign().await {
                        tracing::warn!(error = %re, "resigning failed; the lease expires by itself");
                    }
                    return Err(e);
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// At start: an election key that holds this node's own name was left by
/// this node's previous run (a crash or restart; one agent per node name).
/// Deleting it now, rather than waiting out its lease, lets a restarted
/// single-host agent lead again at once. The delete is guarded by the key's
/// revision, so a key written since is left alone.
async fn take_over_own_stale_key(sup: &Supervisor, election_name: &Name) {
    let key = keys::election(election_name);
    let kv = match sup.store.get(&key).await {
        Ok(Some(kv)) if kv.value == sup.node.as_str().as_bytes() => kv,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "reading the election key failed; campaigning normally");
            return;
        }
    };
    let txn = Txn {
        compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
        success: vec![TxnOp::Delete { key }],
        failure: vec![],
    };
    match sup.store.txn(txn).await {
        Ok(r) if r.succeeded => {
            tracing::info!("removed the election key left by this node's previous run")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "removing this node's stale election key failed"),
    }
}

/// Per replica set state the snapshot does not hold.
#[derive(Debug, Default)]
struct SetState {
    /// Rounds of Failed-pod replacement in a row.
    failures: u32,
    /// When Failed pods may be replaced again.
    next_failed_replace: Option<Instant>,
    /// Pods created since the failures began; one of them Running resets.
    probation: BTreeSet<Name>,
    /// The last failed pod's message.
    last_failure: Option<String>,
    /// The template hash when the failures began: a new template (a fixed
    /// image) ends the backoff.
    template_hash: Option<String>,
    /// Its last write failed in a transaction shared with other sets: the
    /// next one goes alone, so a set that keeps conflicting holds no other
    /// back.
    alone: bool,
    /// The extra pod of a re-spread under way ([`plan::Respread`]).
    surge: Option<Name>,
    /// Re-spreads in a row that failed, and when the next may start.
    respread_failures: u32,
    respread_after: Option<Instant>,
}

impl SetState {
    /// Ends the Failed-pod backoff (a re-spread under way is kept).
    fn reset_failures(&mut self) {
        self.failures = 0;
        self.next_failed_replace = None;
        self.probation.clear();
        self.last_failure = None;
        self.template_hash = None;
    }
}

struct Leader<'a> {
    sup: &'a Supervisor,
    fence: Fence,
    /// The election lease: problem reports live under it.
    lease: LeaseId,
    /// Problems whose store report failed to be written or deleted; retried
    /// at the set's next reconcile.
    problems_unsynced: BTreeSet<ObjectKey>,
    rx: watch::Receiver<Arc<Snapshot>>,
    current: Arc<Snapshot>,
    dirty: BTreeMap<ObjectKey, &'static str>,
    timers: BTreeMap<ObjectKey, Instant>,
    sets: BTreeMap<ObjectKey, SetState>,
    problems: BTreeMap<ObjectKey, String>,
    /// Sets with replicas no node could take: any change of pods, sets or
    /// nodes may unblock them (another set's pod gone frees its node of an
    /// anti-affinity), so each such change plans them again.
    blocked: BTreeSet<ObjectKey>,
    node_absent_since: BTreeMap<Name, Instant>,
    last_write: Revision,
    next_resync: Instant,
    /// `current`'s pods by set, kept in step with each snapshot taken.
    pod_index: Arc<plan::PodIndex>,
    /// How many writes the next batch may plan.
    pace: Pace,
    /// The last batch written and not yet seen in the snapshot: when its
    /// writes were done, how many, the revision that shows them all, and
    /// its slowest transaction.
    round: Option<(Instant, usize, Revision, Duration)>,
    /// The slowest transaction of the last [`Leader::write_batch`].
    slowest_txn: Duration,
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..plan::POD_SUFFIX_LEN)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn key_str(k: &ObjectKey) -> String {
    format!("{}/{}", k.0, k.1)
}

fn respread_backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (RESPREAD_BACKOFF_MIN * 2u32.pow(exp)).min(RESPREAD_BACKOFF_MAX)
}

fn failed_backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (FAILED_BACKOFF_MIN * 2u32.pow(exp)).min(FAILED_BACKOFF_MAX)
}

impl<'a> Leader<'a> {
    fn new(sup: &'a Supervisor, fence: Fence, lease: LeaseId) -> Self {
        let mut rx = sup.snapshot.clone();
        let current = rx.borrow_and_update().clone();
        Leader {
            sup,
            fence,
            lease,
            problems_unsynced: BTreeSet::new(),
            rx,
            current: Arc::new(Snapshot::default()),
            dirty: BTreeMap::new(),
            timers: BTreeMap::new(),
            sets: BTreeMap::new(),
            problems: BTreeMap::new(),
            blocked: BTreeSet::new(),
            node_absent_since: BTreeMap::new(),
            pod_index: Arc::default(),
            last_write: 0,
            next_resync: Instant::now(),
            pace: Pace::new(
                BATCH_OPS,
                txns::MAX_TXN_OPS,
                BATCH_OPS,
                BATCH_STEP,
                Duration::from_millis(u64::from(sup.cfg.lease_ttl_secs) * 1000 / 5),
            ),
            round: None,
            slowest_txn: Duration::ZERO,
        }
        .with_snapshot(current)
    }

    fn with_snapshot(mut self, snap: Arc<Snapshot>) -> Self {
        self.absorb(snap);
        self.dirty.clear();
        for k in plan::all_sets(&self.current) {
            self.dirty.insert(k, "became leader");
        }
        self.next_resync = Instant::now() + self.requeue_interval();
        self
    }

    fn requeue_interval(&self) -> Duration {
        Duration::from_millis(self.sup.cfg.requeue_interval_ms)
    }

    /// Takes a new snapshot: marks what changed dirty, tracks absent nodes.
    fn absorb(&mut self, snap: Arc<Snapshot>) {
        if Arc::ptr_eq(&snap, &self.current) {
            return;
        }
        plan::dirty(&self.current, &snap, &mut self.dirty);
        // The index follows the change (a batch's own copy, if still held,
        // is copied once; none is held between batches).
        Arc::make_mut(&mut self.pod_index).update(&self.current.pods, &snap.pods);
        if !self.blocked.is_empty()
            && (!self.current.pods.ptr_eq(&snap.pods)
                || !self.current.replicasets.ptr_eq(&snap.replicasets))
        {
            for k in &self.blocked {
                self.dirty
                    .entry(k.clone())
                    .or_insert("placement may have changed");
            }
        }
        let now = Instant::now();
        // The nodes holding pods but absent from the snapshot (per node,
        // from the index, not per pod).
        let absent: BTreeSet<&Name> = self
            .pod_index
            .nodes()
            .filter(|n| !snap.nodes.contains_key(*n))
            .collect();
        self.node_absent_since.retain(|n, _| absent.contains(n));
        for n in absent {
            self.node_absent_since.entry(n.clone()).or_insert(now);
        }
        self.current = snap;
    }

    async fn lead(&mut self, cancel: &CancellationToken) -> Result<Stop, SupervisorError> {
        loop {
            if let Some((written, writes, want, slowest)) = self.round
                && self.current.revision >= want.min(self.last_write)
            {
                self.round = None;
                let seen_after = written.elapsed();
                if self.pace.observe(writes, slowest.max(seen_after)) {
                    tracing::info!(
                        writes,
                        slowest_txn_ms = slowest.as_millis() as u64,
                        seen_after_ms = seen_after.as_millis() as u64,
                        target_ms = self.pace.target().as_millis() as u64,
                        limit = self.pace.limit(),
                        "the store took the last batch slowly; smaller batches"
                    );
                }
            }
            let live = self.current.stale_since_ms.is_none();
            if live && self.current.revision < self.last_write {
                // Never plan on a snapshot that does not show our own writes.
                let want = self.last_write;
                let waited = tokio::select! {
                    _ = cancel.cancelled() => return Ok(Stop::Cancelled),
                    r = timeout(WRITE_VISIBLE_TIMEOUT, self.rx.wait_for(|s| s.revision >= want)) => {
                        r.map(|r| r.map(|s| s.clone()))
                    }
                };
                match waited {
                    Ok(Ok(s)) => self.absorb(s),
                    Ok(Err(_)) => return Err(SupervisorError::SnapshotClosed),
                    Err(_) => {
                        tracing::warn!(
                            revision = want,
                            seen = self.current.revision,
                            "the snapshot does not show the supervisor's last write after {WRITE_VISIBLE_TIMEOUT:?}; going on"
                        );
                        self.last_write = self.current.revision;
                    }
                }
                continue;
            }
            if live && !self.dirty.is_empty() {
                let r = tokio::select! {
                    _ = cancel.cancelled() => return Ok(Stop::Cancelled),
                    r = self.reconcile_batch() => r,
                };
                if let Some(stop) = r {
                    return Ok(stop);
                }
                continue;
            }
            let next_timer = self
                .timers
                .values()
                .copied()
                .min()
                .map_or(self.next_resync, |t| t.min(self.next_resync));
            tokio::select! {
                _ = cancel.cancelled() => return Ok(Stop::Cancelled),
                r = self.rx.changed() => {
                    if r.is_err() {
                        return Err(SupervisorError::SnapshotClosed);
                    }
                    sleep(DEBOUNCE).await;
                    let s = self.rx.borrow_and_update().clone();
                    self.absorb(s);
                }
                _ = sleep_until(next_timer) => {
                    let now = Instant::now();
                    let due: Vec<ObjectKey> = self
                        .timers
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in due {
                        self.timers.remove(&k);
                        self.dirty.entry(k).or_insert("requeue after");
                    }
                    if self.next_resync <= now {
                        for k in plan::all_sets(&self.current) {
                            self.dirty.entry(k).or_insert("periodic requeue");
                        }
                        self.next_resync = now + self.requeue_interval();
                    }
                }
            }
        }
    }

    /// Records `key`'s problem (or its absence) in the local watch, and
    /// returns the store write that reports it under the election lease
    /// (fenced), so that every agent's API shows it, when the store does not
    /// hold it yet. A failed store write is retried at the next reconcile.
    fn note_problem(&mut self, key: &ObjectKey, problem: Option<String>) -> Option<txns::Part> {
        let changed = match (&problem, self.problems.get(key)) {
            (Some(p), Some(old)) => p != old,
            (None, None) => false,
            _ => true,
        };
        if !changed && !self.problems_unsynced.contains(key) {
            return None;
        }
        if changed {
            match &problem {
                Some(p) => {
                    tracing::warn!(problem = %p, "replica set has a problem");
                    self.problems.insert(key.clone(), p.clone());
                }
                None => {
                    tracing::info!("replica set problem resolved");
                    self.problems.remove(key);
                }
            }
            self.sup
                .problems_tx
                .send_replace(Arc::new(self.problems.clone()));
        }
        let report = problem.map(|message| ReplicaSetProblem {
            message,
            reported_by: self.sup.node.clone(),
        });
        Some(txns::problem_part(key, report.as_ref(), self.lease))
    }

    /// Plans up to [`BATCH_OPS`] dirty sets on the current snapshot, one
    /// after another on a shared usage of the nodes (so they place pods as
    /// if each saw the ones before), then writes them together. `Some(stop)`
    /// when leadership turned out to be lost.
    async fn reconcile_batch(&mut self) -> Option<Stop> {
        let snap = self.current.clone();
        let index = self.pod_index.clone();
        let now = Instant::now();
        let grace = Duration::from_millis(self.sup.cfg.node_grace_ms);
        // This supervisor's own node is never lost: its agent is this
        // process. Its record is absent only while the agent (re)registers
        // after a restart, and replacing its pods then would restart every
        // pod of the host at once (mid-rollout: all steps in one).
        let me = &self.sup.node;
        let expired: BTreeSet<Name> = self
            .node_absent_since
            .iter()
            .filter(|(n, since)| *n != me && now.duration_since(**since) >= grace)
            .map(|(n, _)| n.clone())
            .collect();
        let mut usage = plan::SharedUsage::default();
        let mut writes: Vec<SetWrite> = Vec::new();
        let mut reports: Vec<(ObjectKey, txns::Part, bool)> = Vec::new();
        let mut ops = 0;
        let mut planned = 0usize;
        let t = Instant::now();
        let mut slice = Instant::now();
        let limit = self.pace.limit();
        while ops < limit
            && let Some((key, why)) = self.dirty.pop_first()
        {
            if slice.elapsed() >= PLAN_SLICE {
                tokio::task::yield_now().await;
                slice = Instant::now();
            }
            self.timers.remove(&key);
            let span = tracing::info_span!("reconcile", rs = %key_str(&key), reason = why);
            let _in = span.enter();
            let w = self.plan_set(&snap, &key, &index, &expired, &mut usage, &mut reports);
            planned += 1;
            if let Some(w) = w {
                ops += w.actions.len() + usize::from(w.rollout.is_some());
                writes.push(w);
            }
        }
        let plan_time = t.elapsed();
        let (sets, reported) = (writes.len(), reports.len());
        let before = self.last_write;
        let stop = self.write_batch(writes, reports).await;
        if ops > 0 && self.last_write > before {
            self.round = Some((Instant::now(), ops, self.last_write, self.slowest_txn));
        }
        if sets + reported > 0 {
            tracing::debug!(
                planned,
                sets,
                writes = ops,
                reports = reported,
                plan_ms = plan_time.as_millis() as u64,
                write_ms = (t.elapsed() - plan_time).as_millis() as u64,
                revision = snap.revision,
                "batch written"
            );
        }
        stop
    }

    /// Plans `key` on `snap`: its local state (failure backoff, problem,
    /// requeue) is updated here, its problem report pushed to `reports`,
    /// and its write returned when it has one.
    fn plan_set(
        &mut self,
        snap: &Arc<Snapshot>,
        key: &ObjectKey,
        index: &plan::PodIndex,
        expired: &BTreeSet<Name>,
        usage: &mut plan::SharedUsage,
        reports: &mut Vec<(ObjectKey, txns::Part, bool)>,
    ) -> Option<SetWrite> {
        let now = Instant::now();
        let grace = Duration::from_millis(self.sup.cfg.node_grace_ms);
        let me = &self.sup.node;
        let st = self.sets.entry(key.clone()).or_default();
        // A pod created since the failures began runs: the set is healthy.
        if st.failures > 0
            && st.probation.iter().any(|n| {
                snap.pod_statuses
                    .get(&(key.0.clone(), n.clone()))
                    .is_some_and(|s| s.phase == PodPhase::Running)
            })
        {
            tracing::info!(
                failures = st.failures,
                "a new pod runs; failure backoff reset"
            );
            st.reset_failures();
        }
        let hash = snap.replicasets.get(key).map(|rs| rs.template.hash());
        if st.failures > 0 && hash.is_some() && st.template_hash != hash {
            tracing::info!(
                failures = st.failures,
                "template changed; failure backoff reset"
            );
            st.reset_failures();
        }
        st.probation
            .retain(|n| snap.pods.contains_key(&(key.0.clone(), n.clone())));
        let replace_failed = st.next_failed_replace.is_none_or(|t| now >= t);
        let plan = {
            let mut suffix = random_suffix;
            let mut input = PlanInput {
                now_ms: now_ms(),
                replace_failed,
                expired_nodes: expired,
                suffix: &mut suffix,
                index: Some(index),
                usage: Some(usage),
                respread: plan::Respread {
                    allowed: st.respread_after.is_none_or(|t| now >= t),
                    surge: st.surge.clone(),
                },
            };
            plan::plan(snap, key, &mut input)
        };

        if !plan.exists && plan.actions.is_empty() && plan.rollout.is_none() {
            self.sets.remove(key);
            self.blocked.remove(key);
            self.timers.remove(key);
            if let Some(part) = self.note_problem(key, None) {
                // Not retried: the set is gone (and the report's lease ends
                // with this leader).
                reports.push((key.clone(), part, false));
            }
            self.problems_unsynced.remove(key);
            tracing::debug!("replica set gone and no pods left");
            return None;
        }

        let failed_msg = |msg: &str| {
            format!(
                "pods fail: {}",
                if msg.is_empty() {
                    "no message from the node"
                } else {
                    msg
                }
            )
        };
        if let Some((name, msg)) = plan.failed_replaced.first() {
            st.failures += 1;
            if st.failures == 1 {
                st.template_hash = hash;
            }
            let wait = failed_backoff(st.failures);
            st.next_failed_replace = Some(now + wait);
            st.last_failure = Some(failed_msg(msg));
            tracing::debug!(pod = %name, failures = st.failures, next_in = ?wait, "failed pod replaced");
        } else if let Some((_, msg)) = plan.failed_waiting.first() {
            st.last_failure = Some(failed_msg(msg));
        }
        if st.failures > 0 {
            st.probation.extend(plan.creates().map(|p| p.name.clone()));
        }
        match &plan.respread {
            Some(plan::RespreadStep::Started {
                pod,
                from,
                from_count,
                to,
                to_count,
            }) => {
                tracing::info!(%pod, %from, from_count, %to, to_count, "re-spreading: an extra pod on the least loaded node; one goes from the most crowded once it is ready");
                st.surge = Some(pod.clone());
            }
            Some(plan::RespreadStep::Settled) => {
                st.surge = None;
                st.respread_failures = 0;
            }
            Some(plan::RespreadStep::Failed { pod, why }) => {
                st.surge = None;
                st.respread_failures += 1;
                let wait = respread_backoff(st.respread_failures);
                st.respread_after = Some(now + wait);
                tracing::warn!(%pod, why, next_in = ?wait, "re-spreading failed: the extra pod goes; trying again later");
            }
            None => {}
        }
        let mut requeue: Option<Instant> = None;
        if !plan.failed_waiting.is_empty()
            && let Some(t) = st.next_failed_replace
        {
            requeue = Some(t);
        }
        if plan.waiting_on_absent_node > 0 {
            let soonest = self
                .node_absent_since
                .iter()
                .filter(|(n, _)| !expired.contains(*n) && *n != me)
                .map(|(_, since)| *since + grace)
                .min();
            if let Some(t) = soonest {
                requeue = Some(requeue.map_or(t, |r| r.min(t)));
            }
        }

        if plan.unscheduled > 0 {
            self.blocked.insert(key.clone());
        } else {
            self.blocked.remove(key);
        }
        if let Some(at) = plan.wake_at_ms {
            let t = now + Duration::from_millis(at.saturating_sub(now_ms()));
            requeue = Some(requeue.map_or(t, |r| r.min(t)));
        }
        let mut problem: Vec<String> = Vec::new();
        if let Some(u) = &plan.unschedulable {
            problem.push(u.clone());
        }
        if let Some(r) = &plan.rollout_state
            && matches!(r.state, RolloutState::Paused | RolloutState::RolledBack)
            && !r.message.is_empty()
        {
            problem.push(format!("rollout {}: {}", r.state, r.message));
        }
        let st = self.sets.get(key).expect("inserted above");
        if st.failures > 0 || !plan.failed_waiting.is_empty() {
            if let Some(f) = &st.last_failure {
                // No count in the text: it changes only when the failure
                // does, so it is logged once, not once per round.
                problem.push(format!(
                    "{f}; replacing them with backoff ({}s to {}s)",
                    FAILED_BACKOFF_MIN.as_secs(),
                    FAILED_BACKOFF_MAX.as_secs()
                ));
            }
        }
        let alone = st.alone;
        let problem = (!problem.is_empty()).then(|| problem.join("; "));
        if let Some(part) = self.note_problem(key, problem) {
            reports.push((key.clone(), part, true));
        }

        if plan.actions.is_empty() && plan.rollout.is_none() {
            tracing::debug!("nothing to do");
            if let Some(t) = requeue {
                self.timers.insert(key.clone(), t);
            }
            return None;
        }
        if let Some(r) = &plan.rollout_state
            && plan.rollout.is_some()
        {
            tracing::info!(revision = r.revision, target = r.target, state = %r.state, steps = r.steps, failures = r.failures, message = %r.message, "rollout");
        }
        Some(SetWrite {
            key: key.clone(),
            actions: plan.actions,
            rollout: plan.rollout,
            requeue,
            alone,
        })
    }

    /// Writes a batch: the sets' writes packed several to a transaction
    /// (a set written alone after a shared transaction of it failed, or one
    /// too big for one transaction, in its own), the problem reports in
    /// transactions of their own; at most [`TXNS_IN_FLIGHT`] at once. Each
    /// set is requeued as its plan asked, or shortly when its write failed.
    async fn write_batch(
        &mut self,
        writes: Vec<SetWrite>,
        reports: Vec<(ObjectKey, txns::Part, bool)>,
    ) -> Option<Stop> {
        if writes.is_empty() && reports.is_empty() {
            return None;
        }
        let fence = Compare::ModRevision(self.fence.0.clone(), self.fence.1);
        let mut jobs: Vec<Job> = Vec::new();
        let mut shared: Vec<(usize, txns::Part)> = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            let mut parts = txns::set_parts(&w.key, &w.actions, w.rollout.as_ref());
            if parts.len() == 1 && !w.alone {
                shared.push((i, parts.pop().expect("one part")));
            } else {
                // One after another, each only if the one before succeeded.
                let txns = parts
                    .into_iter()
                    .map(|p| txns::pack(&fence, vec![(i, p)], usize::MAX).remove(0).txn)
                    .collect();
                jobs.push(Job {
                    of: Of::Sets(vec![i]),
                    txns,
                });
            }
        }
        for p in txns::pack(&fence, shared, txns::MAX_TXN_OPS) {
            jobs.push(Job {
                of: Of::Sets(p.sets),
                txns: vec![p.txn],
            });
        }
        let report_parts: Vec<(usize, txns::Part)> = reports
            .iter()
            .enumerate()
            .map(|(i, (_, part, _))| (i, part.clone()))
            .collect();
        for p in txns::pack(&fence, report_parts, txns::MAX_TXN_OPS) {
            jobs.push(Job {
                of: Of::Reports(p.sets),
                txns: vec![p.txn],
            });
        }
        let store = self.sup.store.clone();
        let slowest = std::sync::Mutex::new(Duration::ZERO);
        let results: Vec<(Of, Result<Option<Revision>, StoreError>)> =
            futures::stream::iter(jobs.into_iter().map(|job| {
                let store = store.clone();
                let slowest = &slowest;
                async move {
                    let mut last = None;
                    for txn in job.txns {
                        let t = Instant::now();
                        let r = store.txn(txn).await;
                        if let Ok(mut s) = slowest.lock() {
                            *s = (*s).max(t.elapsed());
                        }
                        match r {
                            Ok(r) if r.succeeded => last = Some(r.revision),
                            Ok(_) => return (job.of, Ok(None)),
                            Err(e) => return (job.of, Err(e)),
                        }
                    }
                    (job.of, Ok(last))
                }
            }))
            .buffer_unordered(TXNS_IN_FLIGHT)
            .collect()
            .await;
        self.slowest_txn = slowest.into_inner().unwrap_or_default();

        let mut requeue: Vec<Option<Instant>> = writes.iter().map(|w| w.requeue).collect();
        let mut conflict = false;
        for (of, r) in results {
            match of {
                Of::Reports(ids) => {
                    for i in ids {
                        let (key, _, track) = &reports[i];
                        match &r {
                            Ok(Some(_)) => {
                                self.problems_unsynced.remove(key);
                            }
                            // A conflict: not the leader any more (the
                            // election monitor stops us); or the store is
                            // unreachable.
                            _ if *track => {
                                self.problems_unsynced.insert(key.clone());
                            }
                            _ => {}
                        }
                    }
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "writing replica set problem reports failed; retrying");
                    }
                    if let Ok(Some(rev)) = r {
                        self.last_write = self.last_write.max(rev);
                    }
                }
                Of::Sets(ids) => {
                    let shared = ids.len() > 1;
                    let retry = match &r {
                        Ok(Some(rev)) => {
                            self.last_write = self.last_write.max(*rev);
                            None
                        }
                        Ok(None) => {
                            conflict = true;
                            Some(CONFLICT_RETRY)
                        }
                        Err(_) => Some(ERROR_RETRY),
                    };
                    for i in ids {
                        let w = &writes[i];
                        let rs = key_str(&w.key);
                        match &r {
                            Ok(Some(_)) => {
                                log_written(&rs, &w.actions, &self.current);
                                if let Some(st) = self.sets.get_mut(&w.key) {
                                    st.alone = false;
                                }
                            }
                            Ok(None) => {
                                tracing::debug!(%rs, shared, "txn lost a race; retrying shortly");
                                if shared && let Some(st) = self.sets.get_mut(&w.key) {
                                    st.alone = true;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(%rs, error = %e, "writing pods failed; retrying")
                            }
                        }
                        if let Some(d) = retry {
                            let t = Instant::now() + d;
                            requeue[i] = Some(requeue[i].map_or(t, |r| r.min(t)));
                        }
                    }
                }
            }
        }
        for (w, t) in writes.iter().zip(requeue) {
            if let Some(t) = t {
                self.timers.insert(w.key.clone(), t);
            }
        }
        if conflict && let Some(stop) = self.check_fence().await {
            return Some(stop);
        }
        None
    }

    /// After a failed txn: is the election key still ours?
    async fn check_fence(&self) -> Option<Stop> {
        match self.sup.store.get(&self.fence.0).await {
            Ok(Some(kv)) if kv.mod_revision == self.fence.1 => None,
            Ok(_) => Some(Stop::Lost(
                "the election key changed (another leader)".into(),
            )),
            // Unknown: the election monitor decides.
            Err(_) => None,
        }
    }
}

/// One set's planned write.
struct SetWrite {
    key: ObjectKey,
    actions: Vec<Action>,
    rollout: Option<RolloutWrite>,
    /// When its plan asked to be planned again.
    requeue: Option<Instant>,
    /// Written in a transaction of its own ([`SetState::alone`]).
    alone: bool,
}

/// Whose writes a transaction holds: indices into the batch's sets or its
/// problem reports.
enum Of {
    Sets(Vec<usize>),
    Reports(Vec<usize>),
}

/// Transactions written one after another, each only if the one before
/// succeeded.
struct Job {
    of: Of,
    txns: Vec<Txn>,
}

/// Logs a set's written actions; a deleted pod with its status as the
/// plan saw it (why a surplus pod was chosen can be read back).
fn log_written(rs: &str, actions: &[Action], snap: &Snapshot) {
    for a in actions {
        match a {
            Action::Create(p) => {
                tracing::info!(%rs, pod = %p.name, node = %p.node, "pod created")
            }
            Action::Delete { pod, node, reason } => {
                let status = match snap.pod_statuses.get(pod) {
                    None => "none".to_owned(),
                    Some(s) if s.ready => format!("{:?}, ready", s.phase),
                    Some(s) => format!("{:?}, not ready", s.phase),
                };
                tracing::info!(%rs, pod = %pod.1, node = %node, %reason, status, "pod deleted")
            }
        }
    }
}
