//! The agent's one task: it owns the container map, the health checks and
//! what it has written, and after every input recomputes the keys this node
//! should have (level-triggered) and writes the difference. Here: its state,
//! its loop, health reports, operations and shutdown; what Docker says
//! (`inputs`); the effects of the pure `desired` step: health checks, pod
//! starts and removals, the store writes (`effects`).

mod effects;
mod inputs;
mod names;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::EventMessage;
use pier_model::keys::{self, Key};
use pier_model::{
    Endpoint, Node, ObjectKey, Pod, PodStatus, Service, Snapshot, decode, encode, now_ms,
};
use pier_store::{LeaseId, Store, StoreError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::desired::{self, Ready};
use crate::docker::{self, Container, DockerMsg, PodSettings};
use crate::health::{self, Report, Target};
use crate::spec;
use crate::{AgentConfig, AgentContext, AgentError};

/// Bound on one store call, so a hung store cannot stall Docker events;
/// a failed write is retried every [`RETRY`].
const STORE_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(500);
/// How long a pod whose start found dockerd unreachable waits before it is
/// tried again, when no reconnect to dockerd comes first (a blip the
/// Docker task did not see as a disconnect).
const DOCKERD_WAIT: Duration = Duration::from_secs(5);
/// After a `kill` event, look again this much later: a signal that did not
/// end the container gives it back its endpoint.
const KILL_RECHECK: Duration = Duration::from_secs(1);
/// How long shutdown spends deleting endpoints and waiting for tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// A pod container that is no longer wanted loses its endpoint first; it is
/// stopped this long after, once every proxy has seen the endpoint go, so
/// that no new connection reaches a dying process and requests under way
/// finish (1 s: the store round trip is milliseconds; short requests end
/// well within it).
const DEREGISTER_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum OpMsg {
    PodStarted {
        pod: ObjectKey,
        /// The container's id.
        result: Result<String, docker::PodError>,
    },
    Removed {
        id: String,
        result: Result<(), AgentError>,
    },
    Recheck(String),
    /// A static endpoint name's lookup ended.
    Looked {
        name: String,
        result: Result<pier_dns::lookup::Addresses, pier_dns::lookup::LookupError>,
    },
    Resync {
        generation: u64,
        seq: u64,
        list: Result<HashMap<String, Container>, AgentError>,
        nets: Result<HashMap<String, docker::Net>, AgentError>,
    },
}

#[derive(Debug)]
struct Check {
    target: Target,
    generation: u64,
    ready: bool,
    /// The check has given its first verdict. Until then an endpoint the
    /// store already has as ready (written by this node's previous process:
    /// an upgrade or a restart) stays ready, so a takeover has no gap.
    settled: bool,
    cancel: CancellationToken,
}

pub(crate) struct Agent {
    cfg: AgentConfig,
    node: Node,
    store: Arc<dyn Store>,
    lease_rx: watch::Receiver<Option<LeaseId>>,
    snapshot_rx: watch::Receiver<Arc<Snapshot>>,
    alloc: pier_store::alloc::AllocConfig,
    dns_search: Vec<String>,
    networks: watch::Sender<Vec<pier_model::Cidr>>,
    static_allow: Vec<pier_model::Cidr>,
    /// This host's own addresses (read at start and at every resync), which
    /// no static endpoint may name.
    host_addrs: Vec<std::net::IpAddr>,
    /// Static endpoints already warned about, by (service key, address).
    static_warned: HashSet<(String, SocketAddr)>,
    local_targets: watch::Sender<Arc<HashSet<SocketAddr>>>,
    name_lookup: crate::NameLookup,
    /// The static endpoint names held, by `names::normal`.
    names: HashMap<String, names::NameState>,

    snap: Arc<Snapshot>,
    /// This node's pods in the last snapshot reconciled on.
    node_pods: desired::NodePods,
    lease: Option<LeaseId>,
    docker: Option<Docker>,
    docker_synced: bool,
    /// Whether the first complete local view went to the mesh listener.
    local_view_sent: bool,
    resync_running: bool,
    resync_gen: u64,
    /// Bumped by every event that changes the container map; a resync
    /// result keeps the entries touched after it started.
    event_seq: u64,
    touched: HashMap<String, u64>,
    containers: HashMap<String, Container>,
    /// Docker's networks by id with their subnets, published (as one
    /// list) to the DNS ACL; `nets_touched` is `touched` for networks.
    docker_nets: HashMap<String, docker::Net>,
    nets_touched: HashMap<String, u64>,
    /// LAN-driver networks already logged.
    lan_warned: HashSet<String>,
    /// Containers already warned about, so a bad label warns once.
    warned: HashSet<String>,
    /// The (container id, reason) refusals already logged.
    refused_logged: HashSet<(String, String)>,
    checks: HashMap<String, Check>,
    next_generation: u64,
    /// What this agent believes is in the store for its node.
    written: BTreeMap<String, (Vec<u8>, Option<LeaseId>)>,
    /// The endpoint VIP (`Endpoint.addr`) this node holds for each of its
    /// endpoints, by endpoint key: claimed by [`Agent::reconcile`], read
    /// back from the store by [`Agent::reset`], released once the endpoint
    /// is deleted.
    ep_addrs: HashMap<String, std::net::IpAddr>,
    need_reset: bool,
    dirty: bool,
    starting: HashSet<ObjectKey>,
    /// Pods whose start found dockerd unreachable, and when: not started
    /// again until dockerd is back (`DockerMsg::Up`) or
    /// [`DOCKERD_WAIT`] has passed.
    pod_waiting: HashMap<ObjectKey, Instant>,
    removing: HashSet<String>,
    pod_errors: HashMap<ObjectKey, String>,
    services_created: HashSet<ObjectKey>,

    tracker: TaskTracker,
    tasks_cancel: CancellationToken,
    health_tx: mpsc::UnboundedSender<Report>,
    health_rx: Option<mpsc::UnboundedReceiver<Report>>,
    op_tx: mpsc::UnboundedSender<OpMsg>,
    op_rx: Option<mpsc::UnboundedReceiver<OpMsg>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.node.name)
            .field("containers", &self.containers.len())
            .field("written", &self.written.len())
            .finish()
    }
}

impl Agent {
    pub(crate) fn new(cfg: AgentConfig, ctx: AgentContext) -> Agent {
        let mut node = ctx.node;
        if node.started_at == 0 {
            node.started_at = now_ms();
        }
        let (health_tx, health_rx) = mpsc::unbounded_channel();
        let (op_tx, op_rx) = mpsc::unbounded_channel();
        let snap = ctx.snapshot.borrow().clone();
        Agent {
            cfg,
            node,
            store: ctx.store,
            snap,
            node_pods: desired::NodePods::default(),
            lease_rx: ctx.lease,
            snapshot_rx: ctx.snapshot,
            alloc: ctx.alloc,
            dns_search: ctx.dns_search,
            networks: ctx.networks,
            static_allow: ctx.static_allow,
            host_addrs: host_addrs(),
            static_warned: HashSet::new(),
            local_targets: ctx.local_targets,
            name_lookup: ctx.names,
            names: HashMap::new(),
            lease: None,
            docker: None,
            docker_synced: false,
            local_view_sent: false,
            resync_running: false,
            resync_gen: 0,
            event_seq: 0,
            touched: HashMap::new(),
            containers: HashMap::new(),
            docker_nets: HashMap::new(),
            nets_touched: HashMap::new(),
            lan_warned: HashSet::new(),
            warned: HashSet::new(),
            refused_logged: HashSet::new(),
            checks: HashMap::new(),
            next_generation: 0,
            written: BTreeMap::new(),
            ep_addrs: HashMap::new(),
            need_reset: true,
            dirty: false,
            starting: HashSet::new(),
            pod_waiting: HashMap::new(),
            removing: HashSet::new(),
            pod_errors: HashMap::new(),
            services_created: HashSet::new(),
            tracker: TaskTracker::new(),
            tasks_cancel: CancellationToken::new(),
            health_tx,
            health_rx: Some(health_rx),
            op_tx,
            op_rx: Some(op_rx),
        }
    }

    pub(crate) async fn run(
        mut self,
        cancel: CancellationToken,
        handoff: CancellationToken,
    ) -> Result<(), AgentError> {
        let (dtx, mut drx) = mpsc::channel(1024);
        self.spawn(docker::connection_loop(
            self.cfg.filter_labels.clone(),
            dtx,
            self.tasks_cancel.clone(),
        ));
        let mut health_rx = self.health_rx.take().expect("taken once");
        let mut op_rx = self.op_rx.take().expect("taken once");
        let mut resync = tokio::time::interval(Duration::from_millis(self.cfg.resync_interval_ms));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.lease = *self.lease_rx.borrow_and_update();
        self.snap = self.snapshot_rx.borrow_and_update().clone();
        let (mut lease_open, mut snap_open) = (true, true);
        info!(node = %self.node.name, "agent started");
        loop {
            let next_lookup = self.next_lookup();
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(m) = drx.recv() => self.on_docker(m).await,
                Some(r) = health_rx.recv() => self.on_health(r),
                Some(o) = op_rx.recv() => self.on_op(o).await,
                r = self.lease_rx.changed(), if lease_open => match r {
                    Ok(()) => {
                        let l = *self.lease_rx.borrow_and_update();
                        if l != self.lease {
                            info!(lease = ?l, "lease changed; writing this node's keys again");
                            self.lease = l;
                            self.written.clear();
                            self.need_reset = true;
                        }
                    }
                    Err(_) => lease_open = false,
                },
                r = self.snapshot_rx.changed(), if snap_open => match r {
                    Ok(()) => {
                        let s = self.snapshot_rx.borrow_and_update().clone();
                        if self.snap.stale_since_ms.is_some() && s.stale_since_ms.is_none() {
                            info!("store reachable again; resyncing");
                            self.need_reset = true;
                        }
                        self.snap = s;
                    }
                    Err(_) => snap_open = false,
                },
                _ = resync.tick() => {
                    self.host_addrs = host_addrs();
                    self.resync_docker(false);
                    self.need_reset = true;
                }
                _ = retry.tick(), if self.dirty => {}
                _ = tokio::time::sleep_until(next_lookup.unwrap_or_else(tokio::time::Instant::now)),
                    if next_lookup.is_some() => self.start_lookups(),
            }
            while let Ok(r) = health_rx.try_recv() {
                self.on_health(r);
            }
            if self.need_reset && self.lease.is_some() {
                self.reset().await;
            }
            self.reconcile().await;
        }
        if handoff.is_cancelled() {
            self.stop_for_handoff().await;
        } else {
            self.shutdown().await;
        }
        Ok(())
    }

    /// Every task is owned by the tracker and carries the agent's span.
    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(f.in_current_span());
    }

    fn host_ip(&self) -> std::net::IpAddr {
        self.node.addr
    }

    fn on_health(&mut self, r: Report) {
        if let Some(c) = self.checks.get_mut(&r.key)
            && c.generation == r.generation
        {
            debug!(health.key = %r.key, ready = r.ready, "readiness changed");
            c.ready = r.ready;
            c.settled = true;
        }
    }

    async fn on_op(&mut self, o: OpMsg) {
        match o {
            OpMsg::PodStarted { pod, result } => {
                match result {
                    Ok(id) => {
                        info!(pod = %pod.1, namespace = %pod.0, container.id = %id, "pod container started");
                        self.inspect_into_map(&id).await;
                    }
                    Err(e) if e.dockerd_unreachable() => {
                        // Not the pod's fault: it stays pending (not failed,
                        // so not replaced with a backoff) and starts again
                        // when dockerd is back.
                        warn!(pod = %pod.1, namespace = %pod.0, error = %e, "dockerd unreachable; the pod stays pending until it answers");
                        self.pod_waiting.insert(pod.clone(), Instant::now());
                    }
                    Err(e) => {
                        warn!(pod = %pod.1, namespace = %pod.0, error = %e, "pod could not be started");
                        self.pod_errors.insert(pod.clone(), e.to_string());
                    }
                }
                self.starting.remove(&pod);
            }
            OpMsg::Removed { id, result } => {
                self.removing.remove(&id);
                match result {
                    Ok(()) => {
                        info!(container.id = %id, "removed the container of a pod that is gone or moved");
                        self.touch(&id);
                        self.containers.remove(&id);
                    }
                    Err(e) => {
                        warn!(container.id = %id, error = %e, "removing a pod container failed; will retry")
                    }
                }
            }
            OpMsg::Resync {
                generation,
                seq,
                list,
                nets,
            } => self.on_resync(generation, seq, list, nets),
            OpMsg::Looked { name, result } => self.on_looked(name, result),
            OpMsg::Recheck(id) => {
                if self.containers.get(&id).is_some_and(|c| c.held) {
                    self.inspect_into_map(&id).await;
                }
            }
        }
    }

    fn snapshot_synced(&self) -> bool {
        self.snap.revision > 0 || self.snap.synced_at_ms > 0
    }

    /// Load what the store holds for this node, so the next reconcile
    /// rewrites what differs (new lease, changed value) and deletes what no
    /// longer exists (a container that died while the agent was away).
    async fn reset(&mut self) {
        let me = self.node.name.clone();
        let store = self.store.clone();
        let res: Result<(BTreeMap<_, _>, HashMap<_, _>), StoreError> = async {
            let mut w = BTreeMap::new();
            let mut addrs = HashMap::new();
            for (ep, ip, kv) in timed(pier_store::writes::endpoint_addrs_of(&*store, &me)).await? {
                addrs.insert(ep, ip);
                w.insert(kv.key, (kv.value, kv.lease));
            }
            let eps = timed(store.list(keys::prefix::ENDPOINTS)).await?;
            for kv in eps.kvs {
                if let Ok(Key::Endpoint { node, .. }) = Key::parse(&kv.key)
                    && node == me
                {
                    w.insert(kv.key, (kv.value, kv.lease));
                }
            }
            let sts = timed(store.list(keys::prefix::POD_STATUSES)).await?;
            for kv in sts.kvs {
                match decode::<PodStatus>(&kv.key, &kv.value) {
                    Ok(st) if st.node.as_ref() == Some(&me) => {
                        w.insert(kv.key, (kv.value, kv.lease));
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "skipping a pod status that does not parse"),
                }
            }
            if let Some(kv) = timed(store.get(&keys::node(&me))).await? {
                w.insert(kv.key, (kv.value, kv.lease));
            }
            Ok((w, addrs))
        }
        .await;
        match res {
            Ok((w, addrs)) => {
                self.written = w;
                self.ep_addrs = addrs;
                self.need_reset = false;
            }
            Err(e) => {
                warn!(error = %e, "reading this node's keys from the store failed; will retry");
                self.dirty = true;
            }
        }
    }

    fn health_defaults(&self) -> (u64, u64) {
        (
            self.cfg.default_health_interval_ms,
            self.cfg.default_health_timeout_ms,
        )
    }

    /// Stop every task and leave this node's keys in the store: a successor
    /// process (an upgrade) writes them again under its own lease, and
    /// the local targets stay as they are for the mesh until it stops.
    async fn stop_for_handoff(self) {
        info!("agent stopping for a successor: endpoints stay registered");
        self.tasks_cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("agent tasks did not stop in time");
        }
    }

    /// Deregister this node's endpoints and stop every task. Containers are
    /// left running; the caller revokes the lease.
    async fn shutdown(mut self) {
        info!("agent stopping: deregistering endpoints");
        self.local_targets.send_replace(Arc::new(HashSet::new()));
        self.tasks_cancel.cancel();
        let eps: Vec<String> = self
            .written
            .keys()
            .filter(|k| k.starts_with(keys::prefix::ENDPOINTS))
            .cloned()
            .collect();
        let store = self.store.clone();
        let del = async {
            for k in eps {
                if let Err(e) = store.delete(&k).await {
                    warn!(key = %k, error = %e, "deregistering an endpoint failed");
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, del).await.is_err() {
            warn!("deregistering endpoints timed out; the lease takes them");
        }
        self.written.clear();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("agent tasks did not stop in time");
        }
    }
}

/// This host's own addresses (of the agent's network namespace); empty,
/// with a warning, when they cannot be read.
fn host_addrs() -> Vec<std::net::IpAddr> {
    pier_model::addr::host_addrs().unwrap_or_else(|error| {
        warn!(%error, "cannot list this host's addresses; static endpoints are checked without them");
        Vec::new()
    })
}

/// The 12 hex digits Docker shows of a container id.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(STORE_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {STORE_TIMEOUT:?}"
        ))),
    }
}
