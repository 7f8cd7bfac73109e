//! The pure part of the supervisor: from a snapshot and one replica set's
//! key, what to create and what to delete, and where the set's rollout
//! stands. No I/O, no clock, no randomness (pod names and the time come in
//! through [`PlanInput`]).
//!
//! **Rollouts.** Pods whose template hash is the rollout's target are
//! *new*, the others *old*. While a rollout is active (progressing or
//! rolling back), each step replaces at most `parallelism` old pods
//! (`stop-first`: delete, then create; `start-first`: create, and delete an
//! old pod for each new one that is ready), and the next step waits until
//! every new pod is *done* (ready, and up for `monitor_ms`) and `delay_ms`
//! has passed. A new pod that fails, or is not ready `ready_timeout_ms`
//! after it was created, is a failure; past `max_failure_ratio` the
//! `failure_action` is taken. The record of all this is
//! `rollouts/<ns>/<rs>` ([`Rollout`]), returned in [`Plan::rollout`].
//!
//! **Re-spreading.** A set left crowded on one node (its pods replaced
//! while a node was away, a scale down, a node back from a cut) is moved
//! back toward an even spread one pod at a time, without going below its
//! count of ready pods: an extra pod on the least loaded node that can
//! take one, then the surplus rule removes one from the most crowded node
//! once the extra pod is ready (`respread_start`, `respread_surge`).
//!
//! `schedule` picks the node for a new pod, and `dirty`
//! says which sets a snapshot change concerns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pier_model::{
    FailureAction, Name, ObjectKey, Pod, PodPhase, PodStatus, PodTemplate, ReplicaSet, Rollout,
    RolloutState, Snapshot, UpdateConfig, UpdateOrder,
};

mod dirty;
mod schedule;

pub use dirty::{all_sets, dirty};
pub use schedule::{NodeUsage, Usage, schedule};

/// Suffix length of a generated pod name: `<rs>-<5 random [a-z0-9]>`.
pub const POD_SUFFIX_LEN: usize = 5;

/// Why a pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// More pods than replicas.
    Surplus,
    /// Its PodStatus is Failed; a replacement is created in the same plan.
    Failed,
    /// Its node is gone from the snapshot (lease expired) for longer than the
    /// grace; a replacement is created in the same plan.
    NodeLost,
    /// Its replica set was deleted.
    Orphan,
    /// An old pod replaced by a rollout step.
    Rollout,
    /// A new pod of a rollout that was not ready by its deadline.
    NotReady,
    /// Still pending on a node that has not reached its dockerd for
    /// [`RUNTIME_DOWN_GRACE_MS`]; a replacement is created in the same plan.
    RuntimeDown,
}

/// [`pier_model::Node::RUNTIME_DOWN_GRACE_MS`].
pub const RUNTIME_DOWN_GRACE_MS: u64 = pier_model::Node::RUNTIME_DOWN_GRACE_MS;

impl std::fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeleteReason::Surplus => "surplus",
            DeleteReason::Failed => "failed",
            DeleteReason::NodeLost => "node lost",
            DeleteReason::Orphan => "replica set deleted",
            DeleteReason::Rollout => "replaced by rollout",
            DeleteReason::NotReady => "not ready by the rollout's deadline",
            DeleteReason::RuntimeDown => "pending on a node that cannot reach its dockerd",
        })
    }
}

/// One write the reconcile makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `pods/<ns>/<name>` if absent.
    Create(Box<Pod>),
    /// Delete `pods/<ns>/<name>`.
    Delete {
        pod: ObjectKey,
        node: Name,
        reason: DeleteReason,
    },
}

/// What the controller knows that the snapshot does not.
pub struct PlanInput<'a> {
    /// Unix milliseconds, stamped on new pods and used for rollout
    /// deadlines, monitors and delays.
    pub now_ms: u64,
    /// Failed pods may be replaced now (the replica set's backoff elapsed).
    /// When false they are kept, and counted as replicas, so that a set
    /// whose image does not exist does not crash-loop.
    pub replace_failed: bool,
    /// Nodes absent from the snapshot for longer than the grace. Pods on a
    /// node that is absent but not in this set are kept (and counted).
    pub expired_nodes: &'a BTreeSet<Name>,
    /// Makes a fresh 5-character suffix; called until the name is unused.
    pub suffix: &'a mut (dyn FnMut() -> String + Send),
    /// The snapshot's pods by set ([`PodIndex`]); `None` scans every pod.
    pub index: Option<&'a PodIndex>,
    /// Several sets planned on one snapshot share their nodes' usage: each
    /// plan places its pods on the usage the plans before it left, and
    /// leaves its own deletes and creates in it ([`SharedUsage`]). `None`:
    /// this plan alone, on the snapshot's usage.
    pub usage: Option<&'a mut SharedUsage>,
    /// The set's re-spread as the controller remembers it ([`Respread`]).
    pub respread: Respread,
}

/// What the controller remembers of a set's re-spread (the plan is
/// level-triggered, but which pod is a re-spread's extra one is not in
/// the snapshot). A leader that takes over without it treats the extra pod
/// as an ordinary surplus one, and may start the move again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Respread {
    /// A re-spread may start now (false within the backoff after one that
    /// failed, and in plans that must not start one).
    pub allowed: bool,
    /// The extra pod a re-spread created and that has not settled yet.
    pub surge: Option<Name>,
}

/// What a plan did about re-spreading ([`Plan::respread`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespreadStep {
    /// An extra pod was created on `to`, the least loaded node that can
    /// take one, because `from` holds `from_count` of the set's pods and
    /// `to` only `to_count` (at least 2 fewer). Once it is ready, the
    /// surplus rule removes one pod from the most crowded node.
    Started {
        pod: Name,
        from: Name,
        from_count: u32,
        to: Name,
        to_count: u32,
    },
    /// The extra pod is ready (its surplus pod is removed in this plan or
    /// the next), or it is gone.
    Settled,
    /// The extra pod failed, or was not ready `ready_timeout_ms` after it
    /// was created: it goes as surplus, and re-spreading backs off.
    Failed { pod: Name, why: String },
}

impl std::fmt::Debug for PlanInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanInput")
            .field("now_ms", &self.now_ms)
            .field("replace_failed", &self.replace_failed)
            .field("expired_nodes", &self.expired_nodes)
            .field("usage", &self.usage.is_some())
            .field("respread", &self.respread)
            .finish()
    }
}

/// The nodes' usage shared by the plans of several sets on one snapshot:
/// the snapshot's pods, minus the pods the plans so far delete, plus those
/// they create. So sets planned together, before any of their writes is in
/// the snapshot, place their pods as if planned one after another (the
/// spread, capacity, `max_per_node` and anti-affinity see the pods placed
/// by the sets before). Built from the snapshot only when a plan first
/// places a pod (an O(pods) walk, once per batch, not per set).
#[derive(Debug, Default)]
pub struct SharedUsage {
    built: Option<Usage>,
    /// The plans' changes while `built` is not built yet: (pod, added).
    pending: Vec<(Placed, bool)>,
}

/// What a pod takes on its node.
#[derive(Debug)]
struct Placed {
    node: Name,
    set: ObjectKey,
    resources: pier_model::Resources,
}

impl Placed {
    fn of(p: &Pod) -> Placed {
        Placed {
            node: p.node.clone(),
            set: (p.namespace.clone(), p.replicaset.clone()),
            resources: p.template.resources,
        }
    }
}

impl SharedUsage {
    fn apply(u: &mut Usage, p: &Placed, add: bool) {
        if add {
            u.add(&p.node, &p.set.0, &p.set.1, &p.resources);
        } else {
            u.sub(&p.node, &p.set.0, &p.set.1, &p.resources);
        }
    }

    fn record(&mut self, p: Placed, add: bool) {
        match &mut self.built {
            Some(u) => Self::apply(u, &p, add),
            None => self.pending.push((p, add)),
        }
    }

    fn get(&mut self, snap: &Snapshot) -> &mut Usage {
        let pending = &mut self.pending;
        self.built.get_or_insert_with(|| {
            let mut u = Usage::from_snapshot(snap, &BTreeSet::new());
            for (p, add) in pending.drain(..) {
                Self::apply(&mut u, &p, add);
            }
            u
        })
    }
}

/// The usage one plan schedules on: the shared one brought up to date with
/// this plan's actions so far, or (alone) the snapshot's minus this plan's
/// actions, built at first need.
struct UsageView<'u> {
    shared: Option<&'u mut SharedUsage>,
    local: Option<Usage>,
    /// `out.actions[..applied]` are in the usage.
    applied: usize,
}

impl<'u> UsageView<'u> {
    fn new(shared: Option<&'u mut SharedUsage>) -> Self {
        UsageView {
            shared,
            local: None,
            applied: 0,
        }
    }

    /// Records `actions[applied..]` in the shared usage (without building
    /// it), or in the local one when built.
    fn sync(&mut self, snap: &Snapshot, actions: &[Action]) {
        for a in &actions[self.applied..] {
            let (p, add) = match a {
                Action::Create(p) => (Placed::of(p), true),
                Action::Delete { pod, .. } => match snap.pods.get(pod) {
                    Some(p) => (Placed::of(p), false),
                    None => continue,
                },
            };
            match (&mut self.shared, &mut self.local) {
                (Some(s), _) => s.record(p, add),
                (None, Some(u)) => SharedUsage::apply(u, &p, add),
                (None, None) => {}
            }
        }
        self.applied = actions.len();
    }

    fn get(&mut self, snap: &Snapshot, actions: &[Action]) -> &mut Usage {
        if self.shared.is_none() && self.local.is_none() {
            // Alone: the snapshot's usage with every action so far in it.
            self.local = Some(Usage::from_snapshot(snap, &BTreeSet::new()));
            self.applied = 0;
        }
        self.sync(snap, actions);
        match (&mut self.shared, &mut self.local) {
            (Some(s), _) => s.get(snap),
            (None, Some(u)) => u,
            (None, None) => unreachable!("built above"),
        }
    }
}

/// What to do with `rollouts/<ns>/<rs>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutWrite {
    Put(Rollout),
    Delete,
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Replicas that no node can take now (the set stays short of its count).
    pub unscheduled: u32,
    /// Why they could not be placed, for a person.
    pub unschedulable: Option<String>,
    /// Failed pods replaced by this plan, with their status messages.
    pub failed_replaced: Vec<(Name, String)>,
    /// Failed pods kept because the backoff has not elapsed.
    pub failed_waiting: Vec<(Name, String)>,
    /// Pods kept although their node is absent (within the grace).
    pub waiting_on_absent_node: usize,
    /// The replica set exists.
    pub exists: bool,
    /// The rollout record to write with the actions, when it changed.
    pub rollout: Option<RolloutWrite>,
    /// The rollout's state after this plan (also when unchanged).
    pub rollout_state: Option<Rollout>,
    /// Unix ms when a rollout deadline, monitor or delay ends: plan again
    /// then.
    pub wake_at_ms: Option<u64>,
    /// A re-spread started, settled or failed in this plan.
    pub respread: Option<RespreadStep>,
}

impl Plan {
    pub fn creates(&self) -> impl Iterator<Item = &Pod> {
        self.actions.iter().filter_map(|a| match a {
            Action::Create(p) => Some(&**p),
            Action::Delete { .. } => None,
        })
    }
    pub fn deletes(&self) -> impl Iterator<Item = (&ObjectKey, DeleteReason)> {
        self.actions.iter().filter_map(|a| match a {
            Action::Delete { pod, reason, .. } => Some((pod, *reason)),
            Action::Create(_) => None,
        })
    }
    fn wake(&mut self, at: u64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(at, |w| w.min(at)));
    }
    fn delete(&mut self, p: &Pod, reason: DeleteReason) {
        self.actions.push(Action::Delete {
            pod: (p.namespace.clone(), p.name.clone()),
            node: p.node.clone(),
            reason,
        });
    }
}

/// How ready a pod is; surplus pods are deleted lowest class first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Readiness {
    Failed,
    NodeAbsent,
    Pending,
    RunningUnready,
    Ready,
}

fn readiness(status: Option<&PodStatus>) -> Readiness {
    match status {
        None => Readiness::Pending,
        Some(s) => match s.phase {
            PodPhase::Failed => Readiness::Failed,
            PodPhase::Pending => Readiness::Pending,
            PodPhase::Running if s.ready => Readiness::Ready,
            PodPhase::Running => Readiness::RunningUnready,
        },
    }
}

/// The pods of replica set `key` in the snapshot, by name (including those of
/// a deleted set).
/// The pods of each replica set, in the snapshot's key order, and how many
/// pods each node holds. Finding a set's pods by scanning every pod made a
/// full pass over S sets O(S × P): 4.9 s for 1,000 sets and 10,000 pods in
/// a dev build (issue 17's simulator). Built once ([`PodIndex::build`]) and
/// then kept in step with each new snapshot ([`PodIndex::update`]) from the
/// difference of the two snapshots' pods, which costs in proportion to the
/// pods that changed, not to all pods.
#[derive(Debug, Default, Clone)]
pub struct PodIndex {
    by_set: std::collections::HashMap<ObjectKey, BTreeMap<Name, Arc<Pod>>>,
    by_node: std::collections::HashMap<Name, usize>,
}

impl PodIndex {
    pub fn build(snap: &Snapshot) -> PodIndex {
        let mut ix = PodIndex::default();
        ix.update(&pier_model::Map::new(), &snap.pods);
        ix
    }

    /// Brings an index of `old` up to `new`.
    pub fn update(
        &mut self,
        old: &pier_model::Map<ObjectKey, Arc<Pod>>,
        new: &pier_model::Map<ObjectKey, Arc<Pod>>,
    ) {
        use pier_model::DiffItem;
        for d in old.diff(new) {
            match d {
                DiffItem::Add(k, p) => self.insert(k, p),
                DiffItem::Remove(k, p) => self.remove(k, p),
                DiffItem::Update {
                    old: (k, o),
                    new: (_, p),
                } => {
                    self.remove(k, o);
                    self.insert(k, p);
                }
            }
        }
    }

    fn insert(&mut self, k: &ObjectKey, p: &Arc<Pod>) {
        self.by_set
            .entry((k.0.clone(), p.replicaset.clone()))
            .or_default()
            .insert(k.1.clone(), p.clone());
        *self.by_node.entry(p.node.clone()).or_default() += 1;
    }

    fn remove(&mut self, k: &ObjectKey, p: &Arc<Pod>) {
        let set = (k.0.clone(), p.replicaset.clone());
        if let Some(m) = self.by_set.get_mut(&set) {
            m.remove(&k.1);
            if m.is_empty() {
                self.by_set.remove(&set);
            }
        }
        if let Some(n) = self.by_node.get_mut(&p.node) {
            *n -= 1;
            if *n == 0 {
                self.by_node.remove(&p.node);
            }
        }
    }

    pub fn pods_of(&self, key: &ObjectKey) -> Vec<&Arc<Pod>> {
        self.by_set
            .get(key)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }

    /// Every set that has pods (a deleted set's pods included).
    pub fn sets(&self) -> impl Iterator<Item = &ObjectKey> {
        self.by_set.keys()
    }

    /// Every node that holds pods.
    pub fn nodes(&self) -> impl Iterator<Item = &Name> {
        self.by_node.keys()
    }
}

pub fn pods_of<'a>(snap: &'a Snapshot, key: &ObjectKey) -> Vec<&'a Arc<Pod>> {
    snap.pods
        .iter()
        .filter(|((ns, _), p)| *ns == key.0 && p.replicaset == key.1)
        .map(|(_, p)| p)
        .collect()
}

/// The rollout record for `rs` as of now: `old` when it is about the
/// set's current revision, else a new rollout toward it.
fn rollout_record(rs: &ReplicaSet, old: Option<&Rollout>, pods: &[&Arc<Pod>], now: u64) -> Rollout {
    // An earlier set of the same name's record is not this set's.
    let old = old.filter(|r| r.is_of_set(rs.created_at));
    let hash = rs.template.hash();
    if let Some(r) = old
        && r.revision == rs.revision
        && r.hash == hash
    {
        return r.clone();
    }
    let from = match old {
        // The pods ran `target` in full: that is what a rollback returns to.
        Some(r) if matches!(r.state, RolloutState::Complete | RolloutState::RolledBack) => {
            Some(r.target)
        }
        // Mid-rollout: the last revision that ran in full, or (the set's
        // first rollout) the only earlier one.
        Some(r) => r.from.or(Some(r.target)),
        // No record (a set from before rollouts): the revision most old
        // pods run, when the history has it.
        None => {
            let mut by_hash: BTreeMap<&str, usize> = BTreeMap::new();
            for p in pods.iter().filter(|p| p.template_hash != hash) {
                *by_hash.entry(p.template_hash.as_str()).or_default() += 1;
            }
            by_hash
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .and_then(|(h, _)| rs.revision_of_hash(h))
        }
    };
    Rollout {
        revision: rs.revision,
        hash,
        target: rs.revision,
        from: from.filter(|f| *f != rs.revision),
        state: RolloutState::Progressing,
        message: String::new(),
        failures: 0,
        steps: 0,
        step_done_at: None,
        started_at: now,
        finished_at: None,
        set_created_at: rs.created_at,
    }
}

/// One pod that counts as a replica.
struct Active<'a> {
    readiness: Readiness,
    pod: &'a Arc<Pod>,
    /// On the rollout's target template.
    new: bool,
    /// New, ready, and up for the monitor period.
    done: bool,
}

/// The `k` pods of `pods` a scale down deletes, one at a time: the least
/// ready first; among equally ready ones, one on the node that holds the
/// most of them (so the pods left stay spread, as Kubernetes' ReplicaSet
/// does); then the newest; then by name. Without the node rule, scaling 3
/// pods on 2 hosts down to 2 could keep both on one host, and losing that
/// host would leave the service with no pod (found by the chaos run).
fn surplus<'p, 'a>(pods: &[&'p Active<'a>], k: usize) -> Vec<&'p Active<'a>> {
    let mut left: Vec<&Active<'_>> = pods.to_vec();
    let mut on_node: BTreeMap<&Name, usize> = BTreeMap::new();
    for a in &left {
        *on_node.entry(&a.pod.node).or_default() += 1;
    }
    let mut out = Vec::with_capacity(k);
    for _ in 0..k.min(left.len()) {
        let i = (0..left.len())
            .min_by(|&i, &j| {
                let (a, b) = (left[i], left[j]);
                a.readiness
                    .cmp(&b.readiness)
                    .then(on_node[&b.pod.node].cmp(&on_node[&a.pod.node]))
                    .then(b.pod.created_at.cmp(&a.pod.created_at))
                    .then(b.pod.name.cmp(&a.pod.name))
            })
            .expect("k is at most the pods left");
        let a = left.swap_remove(i);
        *on_node.get_mut(&a.pod.node).expect("counted above") -= 1;
        out.push(a);
    }
    out
}

/// Computes the writes that bring replica set `key` to its desired state in
/// `snap`. Level-triggered: it reads only the snapshot and `input`.
pub fn plan(snap: &Snapshot, key: &ObjectKey, input: &mut PlanInput<'_>) -> Plan {
    let shared = input.usage.take();
    let mut view = UsageView::new(shared);
    let out = plan_on(snap, key, input, &mut view);
    // Every delete and create of this plan, for the sets planned after it.
    view.sync(snap, &out.actions);
    input.usage = view.shared;
    out
}

fn plan_on(
    snap: &Snapshot,
    key: &ObjectKey,
    input: &mut PlanInput<'_>,
    view: &mut UsageView<'_>,
) -> Plan {
    let mut out = Plan::default();
    let index = input.index;
    let pods = match index {
        Some(ix) => ix.pods_of(key),
        None => pods_of(snap, key),
    };
    let now = input.now_ms;
    let Some(rs) = snap.replicasets.get(key) else {
        for p in pods {
            out.actions.push(Action::Delete {
                pod: (p.namespace.clone(), p.name.clone()),
                node: p.node.clone(),
                reason: DeleteReason::Orphan,
            });
        }
        if snap.rollouts.contains_key(key) {
            out.rollout = Some(RolloutWrite::Delete);
        }
        return out;
    };
    out.exists = true;
    let old_rec = snap.rollouts.get(key).map(|r| &**r);
    let mut rec = rollout_record(rs, old_rec, &pods, now);

    // The template pods should run: the set's, or on a rollback the earlier
    // revision's.
    let target: &PodTemplate = match rs.template_of(rec.target) {
        Some(t) => t,
        None => {
            if !rec.state.is_final() {
                rec.state = RolloutState::Paused;
                rec.message = format!(
                    "revision {} is no longer in the history; run `pier rollout undo` or set a new template",
                    rec.target
                );
                rec.finished_at = Some(now);
            }
            &rs.template
        }
    };
    let target_hash = target.hash();
    let active_rollout = !rec.state.is_final();
    let cfg: UpdateConfig = if rec.state == RolloutState::RollingBack {
        rs.rollback_config
    } else {
        rs.update_config
    };
    let done_at = |p: &Pod| -> u64 {
        let st = snap
            .pod_statuses
            .get(&(p.namespace.clone(), p.name.clone()))
            .and_then(|s| s.started_at)
            .unwrap_or(p.created_at);
        st.max(p.created_at).saturating_add(cfg.monitor_ms)
    };

    // Classify the existing pods.
    let mut active: Vec<Active<'_>> = Vec::new();
    let mut failing: u32 = 0;
    let mut first_failure: Option<String> = None;
    let mut timed_out: Vec<&Arc<Pod>> = Vec::new();
    let mut runtime_wake: Option<u64> = None;
    for p in pods.iter().copied() {
        let pk = (p.namespace.clone(), p.name.clone());
        let status = snap.pod_statuses.get(&pk).map(|s| &**s);
        let new = p.template_hash == target_hash;
        if !snap.nodes.contains_key(&p.node) {
            if input.expired_nodes.contains(&p.node) {
                out.delete(p, DeleteReason::NodeLost);
            } else {
                out.waiting_on_absent_node += 1;
                active.push(Active {
                    readiness: Readiness::NodeAbsent,
                    pod: p,
                    new,
                    done: false,
                });
            }
            continue;
        }
        let r = readiness(status);
        // Pending on a node whose dockerd is away: it may never start
        // there; after the grace it is replaced (no new pod goes there).
        if r == Readiness::Pending
            && let Some(since) = snap.nodes.get(&p.node).and_then(|n| n.runtime_down_since)
        {
            let at = since.saturating_add(RUNTIME_DOWN_GRACE_MS);
            if now >= at {
                out.delete(p, DeleteReason::RuntimeDown);
                continue;
            }
            runtime_wake = Some(runtime_wake.map_or(at, |w: u64| w.min(at)));
        }
        if r == Readiness::Failed {
            let msg = status.map(|s| s.message.clone()).unwrap_or_default();
            // A new pod its node stopped (a dockerd restart) is replaced,
            // but it is not a failure of the template the rollout is
            // judging.
            let counts = new && active_rollout && !status.is_some_and(|s| s.stopped_by_its_node());
            if counts && first_failure.is_none() {
                first_failure = Some(format!(
                    "pod {} failed: {}",
                    p.name,
                    if msg.is_empty() {
                        "no message from the node"
                    } else {
                        &msg
                    }
                ));
            }
            if input.replace_failed {
                out.delete(p, DeleteReason::Failed);
                out.failed_replaced.push((p.name.clone(), msg));
                if counts {
                    rec.failures += 1;
                }
            } else {
                out.failed_waiting.push((p.name.clone(), msg));
                active.push(Active {
                    readiness: r,
                    pod: p,
                    new,
                    done: false,
                });
                if counts {
                    failing += 1;
                }
            }
            continue;
        }
        let done = new && r == Readiness::Ready && now >= done_at(p);
        if new && active_rollout && r != Readiness::Ready {
            let deadline = p.created_at.saturating_add(cfg.ready_timeout_ms);
            if now >= deadline {
                if first_failure.is_none() {
                    first_failure = Some(format!(
                        "pod {} not ready {}s after it was created",
                        p.name,
                        cfg.ready_timeout_ms / 1000
                    ));
                }
                timed_out.push(p);
                continue;
            }
            out.wake(deadline);
        }
        if new && active_rollout && r == Readiness::Ready && !done {
            out.wake(done_at(p));
        }
        active.push(Active {
            readiness: r,
            pod: p,
            new,
            done,
        });
    }

    // Failures of the rollout's new pods.
    if active_rollout {
        let observed = rec.failures + failing + timed_out.len() as u32;
        let allowed = cfg.max_failure_ratio.get() * f64::from(rs.replicas.get());
        let exceeded = observed > 0 && f64::from(observed) > allowed;
        let why = first_failure.clone().unwrap_or_default();
        let action = match (exceeded, rec.state, cfg.failure_action) {
            (false, _, _) | (true, _, FailureAction::Continue) => None,
            // A failing rollback is not rolled back again.
            (true, RolloutState::RollingBack, _) => Some(FailureAction::Pause),
            (true, _, a) => Some(a),
        };
        match action {
            None => {
                // Under the limit (or `continue`): a pod past its deadline
                // is replaced, and counted.
                for p in timed_out.drain(..) {
                    out.delete(p, DeleteReason::NotReady);
                    rec.failures += 1;
                }
                if !why.is_empty() {
                    rec.message = why;
                }
            }
            Some(FailureAction::Rollback)
                if rec.from.is_some_and(|f| rs.template_of(f).is_some()) =>
            {
                let from = rec.from.expect("checked above");
                rec.message = format!(
                    "revision {} failed ({why}; {observed} of {} new pods failed); rolling back to revision {from}",
                    rec.revision, rs.replicas
                );
                rec.state = RolloutState::RollingBack;
                rec.target = from;
                rec.from = None;
                rec.failures = 0;
                rec.steps = 0;
                rec.step_done_at = None;
                // The next plan (the record's write wakes it) moves the pods.
                out.rollout_state = Some(rec.clone());
                out.rollout = Some(RolloutWrite::Put(rec));
                out.wake_at_ms = None;
                return out;
            }
            Some(a) => {
                let what = if rec.state == RolloutState::RollingBack {
                    format!("rollback to revision {}", rec.target)
                } else {
                    format!("rollout of revision {}", rec.revision)
                };
                let tail = if a == FailureAction::Rollback {
                    "; there is no earlier revision to roll back to"
                } else {
                    ""
                };
                rec.message = format!(
                    "{what} paused: {why} ({observed} of {} new pods failed){tail}; fix the template (`pier set image`) or run `pier rollout undo`",
                    rs.replicas
                );
                rec.state = RolloutState::Paused;
                rec.finished_at = Some(now);
                out.wake_at_ms = None;
            }
        }
        // Timed-out pods left (paused) stay as they are.
        for p in timed_out {
            active.push(Active {
                readiness: readiness(
                    snap.pod_statuses
                        .get(&(p.namespace.clone(), p.name.clone()))
                        .map(|s| &**s),
                ),
                pod: p,
                new: true,
                done: false,
            });
        }
    }
    let active_rollout = !rec.state.is_final();
    if !active_rollout {
        out.wake_at_ms = None;
    }
    if let Some(at) = runtime_wake {
        out.wake(at);
    }

    let want = rs.replicas.get() as usize;
    let surge_waiting = respread_surge(&mut out, &pods, &active, rs, &input.respread, now);
    // Least ready first, then newest first, then by name.
    let by_deletion_order = |a: &&Active<'_>, b: &&Active<'_>| {
        a.readiness
            .cmp(&b.readiness)
            .then(b.pod.created_at.cmp(&a.pod.created_at))
            .then(b.pod.name.cmp(&a.pod.name))
    };
    let old: Vec<&Active<'_>> = active.iter().filter(|a| !a.new).collect();
    let new: Vec<&Active<'_>> = active.iter().filter(|a| a.new).collect();
    let mut to_create = 0usize;
    // Old pods a start-first step may stop first when no node has room for
    // its new pods beside them (deletion order, least ready first).
    let mut in_place: Vec<&Arc<Pod>> = Vec::new();
    if !active_rollout || old.is_empty() {
        if active.len() > want {
            // A re-spread's extra pod still starting is kept out of the
            // surplus (and counts as one of it) until it is ready or late.
            let v: Vec<&Active<'_>> = active
                .iter()
                .filter(|a| surge_waiting.is_none_or(|s| a.pod.name != *s))
                .collect();
            let k = active.len() - want - usize::from(surge_waiting.is_some());
            for a in surplus(&v, k) {
                out.delete(a.pod, DeleteReason::Surplus);
            }
        } else {
            to_create = want - active.len();
        }
        if active_rollout {
            let done = new.iter().filter(|a| a.done).count();
            if to_create == 0 && done >= want && active.len() == want {
                rec.state = if rec.state == RolloutState::RollingBack {
                    RolloutState::RolledBack
                } else {
                    rec.message.clear();
                    RolloutState::Complete
                };
                rec.finished_at = Some(now);
                out.wake_at_ms = None;
            }
        }
    } else {
        let step = cfg.step(rs.replicas.get()) as usize;
        let new_ready = new
            .iter()
            .filter(|a| a.readiness == Readiness::Ready)
            .count();
        let in_flight = new.iter().filter(|a| !a.done).count();
        let mut old_sorted = old.clone();
        old_sorted.sort_by(by_deletion_order);
        let mut old_iter = old_sorted.into_iter();
        // Old pods made redundant: by ready new ones (start-first), or
        // beyond the count (stop-first, or after a scale down).
        let redundant = match cfg.order {
            UpdateOrder::StartFirst => (old.len() + new_ready).saturating_sub(want),
            UpdateOrder::StopFirst => (old.len() + new.len()).saturating_sub(want),
        }
        .min(old.len());
        for a in old_iter.by_ref().take(redundant) {
            out.delete(a.pod, DeleteReason::Rollout);
        }
        let mut old_left = old.len() - redundant;
        if new.len() > want {
            for a in surplus(&new, new.len() - want) {
                out.delete(a.pod, DeleteReason::Surplus);
            }
        }
        let new_kept = new.len().min(want);
        to_create = want.saturating_sub(old_left + new_kept);
        // Replicas short of the count (a pod lost, a scale up) are made
        // first; but a shortfall no node can take (max_per_node on every
        // node, anti-affinity) must not hold the rollout forever: the step
        // goes on, and the shortfall stays unplaced.
        let short_unplaceable = to_create > 0
            && old_left > 0
            && in_flight == 0
            && schedule(snap, rs, view.get(snap, &out.actions)).is_err();
        if old_left > 0 && in_flight == 0 && (to_create == 0 || short_unplaceable) {
            let mut go = true;
            if rec.steps > 0 && cfg.delay_ms > 0 {
                let since = *rec.step_done_at.get_or_insert(now);
                let at = since.saturating_add(cfg.delay_ms);
                if now < at {
                    out.wake(at);
                    go = false;
                }
            }
            if go {
                let k = step.min(old_left);
                if cfg.order == UpdateOrder::StopFirst {
                    for a in old_iter.by_ref().take(k) {
                        out.delete(a.pod, DeleteReason::Rollout);
                    }
                    old_left -= k;
                } else {
                    in_place = old_iter.by_ref().map(|a| a.pod).collect();
                }
                to_create += k;
                rec.steps += 1;
                rec.step_done_at = None;
            }
        }
        let _ = old_left;
    }

    if to_create > 0 {
        let mut taken: BTreeSet<Name> = BTreeSet::new();
        for i in 0..to_create {
            // The usage with this plan's deletes and creates so far.
            let usage = view.get(snap, &out.actions);
            let mut placed = schedule(snap, rs, usage);
            // Start-first with no room (max_per_node, anti-affinity, capacity
            // full with the old pods): rather than stall the rollout, this
            // pod replaces an old one in place, stop-first, and says so. Only
            // an old pod whose removal makes room is stopped.
            if let Err(why) = &placed {
                let room = in_place.iter().enumerate().find_map(|(j, o)| {
                    // Tried without `o`, then `o` put back: its delete
                    // below goes into the usage with the create.
                    usage.sub(&o.node, &o.namespace, &o.replicaset, &o.template.resources);
                    let n = schedule(snap, rs, usage).ok();
                    usage.add(&o.node, &o.namespace, &o.replicaset, &o.template.resources);
                    n.map(|n| (j, n))
                });
                if let Some((j, node)) = room {
                    let o = in_place.remove(j);
                    rec.message = format!(
                        "start-first: no node has room for a new pod beside the old ones ({why}); replaced {} in place (stop-first)",
                        o.name
                    );
                    out.delete(o, DeleteReason::Rollout);
                    placed = Ok(node);
                }
            }
            match placed {
                Ok(node) => {
                    let name = pod_name(snap, &key.0, &key.1, &taken, input.suffix);
                    taken.insert(name.clone());
                    out.actions.push(Action::Create(Box::new(Pod {
                        name,
                        namespace: key.0.clone(),
                        replicaset: key.1.clone(),
                        node,
                        template_hash: target_hash.clone(),
                        template: target.clone(),
                        created_at: now,
                    })));
                    if active_rollout {
                        out.wake(now.saturating_add(cfg.ready_timeout_ms));
                    }
                }
                Err(why) => {
                    out.unscheduled = (to_create - i) as u32;
                    out.unschedulable = Some(format!(
                        "cannot place {} of {} replicas: {why}",
                        to_create - i,
                        want
                    ));
                    break;
                }
            }
        }
    }
    if !active_rollout
        && out.actions.is_empty()
        && out.unscheduled == 0
        && surge_waiting.is_none()
        && input.respread.allowed
        && !matches!(out.respread, Some(RespreadStep::Failed { .. }))
        && active.len() == want
        && active.iter().all(|a| a.readiness == Readiness::Ready)
    {
        respread_start(&mut out, snap, rs, &active, view, target, now, input);
    }
    if old_rec != Some(&rec) {
        out.rollout = Some(RolloutWrite::Put(rec.clone()));
    }
    out.rollout_state = Some(rec);
    out
}

/// Where the re-spread's extra pod stands: records [`RespreadStep::Settled`]
/// or [`RespreadStep::Failed`] in `out`, and returns its name while it is
/// still starting within its deadline (the surplus waits for it).
fn respread_surge<'n>(
    out: &mut Plan,
    pods: &[&Arc<Pod>],
    active: &[Active<'_>],
    rs: &ReplicaSet,
    respread: &'n Respread,
    now: u64,
) -> Option<&'n Name> {
    let name = respread.surge.as_ref()?;
    if !pods.iter().any(|p| p.name == *name) {
        out.respread = Some(RespreadStep::Settled);
        return None;
    }
    let timeout = rs.update_config.ready_timeout_ms;
    let why = match active.iter().find(|a| a.pod.name == *name) {
        Some(a) if a.readiness == Readiness::Ready => {
            out.respread = Some(RespreadStep::Settled);
            return None;
        }
        Some(a) if a.readiness == Readiness::Failed => "it failed".to_owned(),
        Some(a) => {
            let deadline = a.pod.created_at.saturating_add(timeout);
            if now < deadline {
                out.wake(deadline);
                return Some(name);
            }
            format!("it was not ready {}s after it was created", timeout / 1000)
        }
        // Deleted by this plan: failed, or its node lost.
        None => "it failed or its node was lost".to_owned(),
    };
    out.respread = Some(RespreadStep::Failed {
        pod: name.clone(),
        why,
    });
    None
}

/// The re-spread's trigger (Kubernetes' topology spread with a maxSkew of
/// 1, by node, among the nodes that can take a pod): a set that asks to be
/// spread (`spread`, without `spread_by`), at its count, every pod ready,
/// no rollout under way, nothing else to do, whose most crowded node holds
/// at least 2 more of its pods than the node the scheduler would pick for
/// one more (which passes every placement rule: selector, constraints,
/// anti-affinity both ways, capacity, `max_per_node`, not held). Then one
/// extra pod is created there; when it is ready, the surplus rule takes
/// one from the most crowded node, so the set never has fewer ready pods
/// than its count. Each move lowers the sum of the squares of the pods per
/// node by at least 2, so moves cannot loop; one that fails backs off (the
/// controller).
#[allow(clippy::too_many_arguments)]
fn respread_start(
    out: &mut Plan,
    snap: &Snapshot,
    rs: &ReplicaSet,
    active: &[Active<'_>],
    view: &mut UsageView<'_>,
    target: &PodTemplate,
    now: u64,
    input: &mut PlanInput<'_>,
) {
    if !rs.placement.spread || rs.placement.spread_by.is_some() || active.len() < 2 {
        return;
    }
    let mut on_node: BTreeMap<&Name, u32> = BTreeMap::new();
    for a in active {
        *on_node.entry(&a.pod.node).or_default() += 1;
    }
    // The most crowded node; the first by name among equals.
    let Some((from, from_count)) = on_node
        .iter()
        .map(|(n, c)| (*n, *c))
        .reduce(|a, b| if b.1 > a.1 { b } else { a })
    else {
        return;
    };
    let Ok(to) = schedule(snap, rs, view.get(snap, &out.actions)) else {
        return;
    };
    let to_count = on_node.get(&to).copied().unwrap_or(0);
    if from_count < to_count + 2 {
        return;
    }
    let key = (rs.namespace.clone(), rs.name.clone());
    let name = pod_name(snap, &key.0, &key.1, &BTreeSet::new(), input.suffix);
    out.actions.push(Action::Create(Box::new(Pod {
        name: name.clone(),
        namespace: key.0,
        replicaset: key.1,
        node: to.clone(),
        template_hash: target.hash(),
        template: target.clone(),
        created_at: now,
    })));
    out.wake(now.saturating_add(rs.update_config.ready_timeout_ms));
    out.respread = Some(RespreadStep::Started {
        pod: name,
        from: from.clone(),
        from_count,
        to,
        to_count,
    });
}

/// A fresh pod name `<rs>-<suffix>` that no pod in the namespace has.
fn pod_name(
    snap: &Snapshot,
    ns: &pier_model::Namespace,
    rs: &Name,
    taken: &BTreeSet<Name>,
    suffix: &mut (dyn FnMut() -> String + Send),
) -> Name {
    // 63 - 1 - 5: the longest prefix that keeps the name an RFC 1123 label.
    let mut base: &str = rs.as_str();
    if base.len() > 63 - 1 - POD_SUFFIX_LEN {
        base = base[..63 - 1 - POD_SUFFIX_LEN].trim_end_matches('-');
    }
    loop {
        let s = suffix();
        let Ok(name) = Name::new(&format!("{base}-{s}")) else {
            continue;
        };
        if !taken.contains(&name) && !snap.pods.contains_key(&(ns.clone(), name.clone())) {
            return name;
        }
    }
}

#[cfg(test)]
mod tests;
