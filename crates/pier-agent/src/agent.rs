//! The agent's one task: it owns the container map, the health checks and
//! what it has written, and after every input recomputes the keys this node
//! should have (level-triggered) and writes the difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

    snap: Arc<Snapshot>,
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
            lease_rx: ctx.lease,
            snapshot_rx: ctx.snapshot,
            alloc: ctx.alloc,
            dns_search: ctx.dns_search,
            networks: ctx.networks,
            static_allow: ctx.static_allow,
            host_addrs: host_addrs(),
            static_warned: HashSet::new(),
            local_targets: ctx.local_targets,
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

    async fn on_docker(&mut self, m: DockerMsg) {
        match m {
            DockerMsg::Up(d) => {
                info!("connected to dockerd");
                self.docker = Some(d);
                self.resync_docker(true);
            }
            DockerMsg::Down(why) => {
                warn!(error = %why, "dockerd connection lost; keeping registrations until it is back");
                self.docker = None;
            }
            DockerMsg::Event(ev) => self.on_event(*ev).await,
        }
    }

    /// Start a full list + inspect in the background, so events keep
    /// flowing while a host with many containers is listed. Its result is
    /// merged in [`Self::on_resync`].
    fn resync_docker(&mut self, force: bool) {
        let Some(d) = self.docker.clone() else { return };
        if self.resync_running && !force {
            return;
        }
        self.resync_running = true;
        self.resync_gen += 1;
        let generation = self.resync_gen;
        let seq = self.event_seq;
        let filter = self.cfg.filter_labels.clone();
        let node = self.node.name.to_string();
        let pod_network = self.cfg.pod_network.clone();
        let host_ip = self.host_ip();
        let tx = self.op_tx.clone();
        let cancel = self.tasks_cancel.clone();
        self.spawn(async move {
            let work = async {
                let list = docker::list(&d, &filter, &node, pod_network.as_deref(), host_ip).await;
                let nets = docker::networks(&d).await;
                (list, nets)
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                (list, nets) = work => {
                    let _ = tx.send(OpMsg::Resync { generation, seq, list, nets });
                }
            }
        });
    }

    fn on_resync(
        &mut self,
        generation: u64,
        seq: u64,
        list: Result<HashMap<String, Container>, AgentError>,
        nets: Result<HashMap<String, docker::Net>, AgentError>,
    ) {
        if generation != self.resync_gen {
            return;
        }
        self.resync_running = false;
        match list {
            Ok(map) => {
                let map = merge_listed(map, &self.containers, &self.touched, seq);
                self.touched.clear();
                debug!(containers = map.len(), "docker resync");
                self.containers = map;
                self.docker_synced = true;
            }
            Err(e) => warn!(error = %e, "docker resync failed; will retry"),
        }
        match nets {
            Ok(nets) => {
                self.docker_nets = merge_listed(nets, &self.docker_nets, &self.nets_touched, seq);
                self.nets_touched.clear();
                self.publish_networks();
            }
            Err(e) => warn!(error = %e, "listing docker networks failed"),
        }
    }

    /// Give the DNS ACL the subnets of every network, if they changed.
    fn publish_networks(&mut self) {
        for (id, n) in &self.docker_nets {
            if let Some(driver) = &n.lan_driver
                && self.lan_warned.insert(id.clone())
            {
                info!(network.id = %id, %driver,
                    "DNS does not answer this network's containers: a {driver} network is usually the LAN itself; add its CIDR to [dns] allow to answer them");
            }
        }
        let nets = docker::all_subnets(&self.docker_nets);
        self.networks.send_if_modified(|v| {
            if *v != nets {
                debug!(subnets = ?nets, "docker networks changed");
                *v = nets;
                true
            } else {
                false
            }
        });
    }

    /// A network event: `create` and a `connect` to a network not yet known
    /// inspect it and add its subnets; `destroy` removes them. Either way the
    /// ACL has them before a container on the network can send a query (a
    /// container joins its networks before its process starts).
    async fn on_network_event(&mut self, verb: &str, id: String) {
        match verb {
            "create" | "connect" => {
                if verb == "connect" && self.docker_nets.contains_key(&id) {
                    return;
                }
                let Some(d) = self.docker.clone() else { return };
                match docker::inspect_network(&d, &id).await {
                    Ok(Some(net)) => {
                        self.touch_net(&id);
                        debug!(network.id = %id, subnets = ?net.subnets, "docker network added");
                        self.docker_nets.insert(id, net);
                    }
                    Ok(None) => {
                        self.touch_net(&id);
                        self.docker_nets.remove(&id);
                    }
                    Err(e) => {
                        warn!(network.id = %id, error = %e, "inspecting a new network failed; the next resync repairs it");
                        return;
                    }
                }
            }
            "destroy" => {
                self.touch_net(&id);
                if self.docker_nets.remove(&id).is_none() {
                    return;
                }
                debug!(network.id = %id, "docker network removed");
            }
            _ => return,
        }
        self.publish_networks();
    }

    fn touch_net(&mut self, id: &str) {
        self.event_seq += 1;
        self.nets_touched.insert(id.to_owned(), self.event_seq);
    }

    fn touch(&mut self, id: &str) {
        self.event_seq += 1;
        self.touched.insert(id.to_owned(), self.event_seq);
    }

    async fn inspect_into_map(&mut self, id: &str) {
        let Some(d) = self.docker.clone() else { return };
        match docker::inspect(&d, id, self.cfg.pod_network.as_deref(), self.host_ip()).await {
            Ok(Some(c)) => {
                self.touch(id);
                self.containers.insert(c.id.clone(), c);
            }
            Ok(None) => {
                self.touch(id);
                self.containers.remove(id);
            }
            Err(e) => {
                warn!(container.id = id, error = %e, "inspect failed; the next resync repairs it");
            }
        }
    }

    async fn on_event(&mut self, ev: EventMessage) {
        let action = ev.action.unwrap_or_default();
        let Some(actor) = ev.actor else { return };
        let Some(id) = actor.id else { return };
        // Actions carry suffixes (`health_status: healthy`, `exec_start: sh`):
        // match on the prefix.
        let verb = action.split(':').next().unwrap_or("").trim();
        if ev.typ == Some(bollard::models::EventMessageTypeEnum::NETWORK) {
            debug!(network.id = %id, action = %action, "docker network event");
            return self.on_network_event(verb, id).await;
        }
        debug!(container.id = %id, action = %action, "docker event");
        match verb {
            "start" | "unpause" | "restart" | "rename" | "update" => {
                self.inspect_into_map(&id).await;
            }
            "die" => {
                self.touch(&id);
                if let Some(c) = self.containers.get_mut(&id) {
                    c.running = false;
                    c.exit_code = actor
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get("exitCode"))
                        .and_then(|s| s.parse().ok())
                        .or(c.exit_code);
                }
            }
            "kill" | "stop" | "pause" => {
                self.touch(&id);
                if let Some(c) = self.containers.get_mut(&id) {
                    c.held = true;
                    // A terminating signal is followed by `die` (or, if the
                    // process ignores it, the next resync brings the
                    // endpoint back); any other signal is looked at again soon.
                    let signal = actor
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get("signal"))
                        .map(String::as_str)
                        .unwrap_or("");
                    let terminating = matches!(
                        signal,
                        "9" | "15" | "2" | "3" | "SIGKILL" | "SIGTERM" | "SIGINT" | "SIGQUIT"
                    );
                    if verb == "kill" && !terminating {
                        let tx = self.op_tx.clone();
                        let cancel = self.tasks_cancel.clone();
                        self.spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = tokio::time::sleep(KILL_RECHECK) => {
                                    let _ = tx.send(OpMsg::Recheck(id));
                                }
                            }
                        });
                    }
                }
            }
            "destroy" => {
                self.touch(&id);
                self.containers.remove(&id);
            }
            "health_status" => {
                let status = action.split_once(':').map(|x| x.1.trim()).unwrap_or("");
                if self.containers.contains_key(&id) {
                    self.touch(&id);
                }
                if let Some(c) = self.containers.get_mut(&id) {
                    c.docker_healthy = Some(status == "healthy");
                }
            }
            _ => {}
        }
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

    /// Recompute the keys this node should have, start and stop health
    /// checks and pod containers, and write the difference.
    async fn reconcile(&mut self) {
        let me = self.node.name.clone();
        let snap = self.snap.clone();
        let synced = self.snapshot_synced();
        let d = desired::endpoints(&desired::View {
            me: &me,
            snap: &snap,
            synced,
            docker_synced: self.docker_synced,
            containers: &self.containers,
            policy: spec::LabelPolicy {
                namespaces: &self.cfg.label_namespaces,
                allow_health_none: self.cfg.allow_health_none,
            },
            health: self.health_defaults(),
            service_cidr: &self.alloc.service_cidr,
            host_addrs: &self.host_addrs,
            static_allow: &self.static_allow,
            now_ms: now_ms(),
        });
        let desired::Endpoints {
            targets,
            endpoints,
            container_ready,
            missing_services,
            mut refused,
            notes,
        } = d;
        for n in notes {
            self.note(n);
        }
        self.sync_checks(targets);

        // This node's endpoints the store has as ready, by key and address.
        let was_ready: HashSet<(String, std::net::IpAddr)> = snap
            .endpoints
            .iter()
            .flat_map(|((ns, svc), m)| {
                m.iter()
                    .filter(|((node, _), e)| *node == me && e.ready)
                    .map(move |((node, id), e)| (keys::endpoint(ns, svc, node, id), e.ip))
            })
            .collect();
        let is_ready = |key: &str, ip, r: &Ready, checks: &HashMap<String, Check>| match r {
            Ready::Fixed(b) => *b,
            Ready::Check(k) => checks.get(k).is_some_and(|c| {
                c.ready || (!c.settled && was_ready.contains(&(key.to_owned(), ip)))
            }),
        };

        self.note_refusals(&mut refused);
        let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        want.insert(keys::node(&me), encode(&self.node));
        // The mesh listener relays only to these: what this agent found
        // in its own Docker and saw ready, never what the store says.
        let mut local = HashSet::new();
        for (key, mut ep, r) in endpoints {
            ep.ready = is_ready(&key, ep.ip, &r, &self.checks);
            if !ep.is_static {
                ep.addr = self.endpoint_addr(&key, &ep).await;
                if let Some(ip) = ep.addr {
                    want.insert(
                        keys::vip_alloc(ip),
                        encode(&pier_model::Allocation {
                            namespace: ep.namespace.clone(),
                            service: ep.service.clone(),
                            endpoint: Some((ep.node.clone(), ep.id.clone())),
                        }),
                    );
                }
            }
            if ep.ready && !ep.is_static {
                let svc = snap.service(&ep.namespace, &ep.service);
                let svc = svc
                    .map(|s| &**s)
                    .or_else(|| missing_services.get(&(ep.namespace.clone(), ep.service.clone())));
                local_targets_of(&ep, svc, &mut local);
            }
            want.insert(key, encode(&ep));
        }
        // The first complete view is announced even when it is empty: a
        // successor's mesh listener waits for it before it accepts.
        let first_view = synced && self.docker_synced && !self.local_view_sent;
        self.local_view_sent |= first_view;
        self.local_targets.send_if_modified(|cur| {
            let changed = **cur != local;
            if changed {
                *cur = Arc::new(local);
            }
            changed || first_view
        });

        // The pod runtime.
        if synced && self.docker_synced {
            self.pod_errors
                .retain(|k, _| snap.pods.get(k).is_some_and(|p| p.node == me));
            let plan = desired::pods(
                &desired::PodView {
                    me: &me,
                    snap: &snap,
                    containers: &self.containers,
                    pod_errors: &self.pod_errors,
                    starting: &self.starting,
                    removing: &self.removing,
                    container_ready: &container_ready,
                },
                |r| match r {
                    Ready::Fixed(b) => *b,
                    Ready::Check(k) => self.checks.get(k).is_some_and(|c| c.ready),
                },
            );
            for st in plan.statuses {
                let (Some(name), ns) = (&st.name, &st.namespace) else {
                    continue;
                };
                want.insert(keys::pod_status(ns, name), encode(&st));
            }
            for pod in plan.start {
                self.spawn_start(pod);
            }
            for id in plan.remove {
                self.spawn_remove(id);
            }
        }

        if synced {
            for (k, svc) in missing_services {
                if self.services_created.contains(&k) {
                    continue;
                }
                let r = tokio::time::timeout(
                    STORE_TIMEOUT,
                    pier_store::writes::create_service(&*self.store, &self.alloc, svc, true),
                )
                .await;
                match r {
                    Ok(Ok(s)) => {
                        info!(service = %s.name, namespace = %s.namespace, vip = ?s.vip, "created service for a labelled container");
                        self.services_created.insert(k);
                    }
                    Ok(Err(pier_store::writes::WriteError::AlreadyExists(_))) => {
                        self.services_created.insert(k);
                    }
                    Ok(Err(e)) => {
                        warn!(service = %k.1, namespace = %k.0, error = %e, "creating a service failed; will retry");
                        self.dirty = true;
                    }
                    Err(_) => {
                        warn!(service = %k.1, namespace = %k.0, "creating a service timed out; will retry");
                        self.dirty = true;
                    }
                }
            }
        }

        self.write(want, synced && self.docker_synced).await;
    }

    /// The endpoint VIP of the endpoint at `key`: the one it holds, or a
    /// new claim (`writes::claim_endpoint_addr`, under the node lease).
    /// `None` while there is no lease or the claim fails (retried at the
    /// next reconcile); the endpoint is written without one meanwhile, and
    /// DNS leaves it out of pod names and SRV records.
    async fn endpoint_addr(&mut self, key: &str, ep: &Endpoint) -> Option<std::net::IpAddr> {
        if let Some(ip) = self.ep_addrs.get(key) {
            return Some(*ip);
        }
        let lease = self.lease?;
        if self.need_reset {
            return None;
        }
        let r = tokio::time::timeout(
            STORE_TIMEOUT,
            pier_store::writes::claim_endpoint_addr(
                &*self.store,
                &self.alloc,
                &ep.namespace,
                &ep.service,
                &ep.node,
                &ep.id,
                lease,
            ),
        )
        .await;
        match r {
            Ok(Ok(ip)) => {
                debug!(endpoint = %key, addr = %ip, "claimed an endpoint address");
                self.ep_addrs.insert(key.to_owned(), ip);
                let value = encode(&pier_model::Allocation {
                    namespace: ep.namespace.clone(),
                    service: ep.service.clone(),
                    endpoint: Some((ep.node.clone(), ep.id.clone())),
                });
                self.written
                    .insert(keys::vip_alloc(ip), (value, Some(lease)));
                Some(ip)
            }
            Ok(Err(e)) => {
                warn!(endpoint = %key, error = %e, "claiming an endpoint address failed; will retry");
                self.dirty = true;
                None
            }
            Err(_) => {
                warn!(endpoint = %key, "claiming an endpoint address timed out; will retry");
                self.dirty = true;
                None
            }
        }
    }

    /// Log a note of [`desired::endpoints`] once per container or static
    /// endpoint.
    fn note(&mut self, n: desired::Note) {
        match n {
            desired::Note::BadLabel {
                container,
                name,
                error: e,
            } => {
                if self.warned.insert(container.clone()) {
                    warn!(container.name = %name, container.id = %short(&container),
                        label = %e.label, value = %e.value, error = %e.why,
                        "skipping container with a bad label");
                }
            }
            desired::Note::CheckNeedsPort { container, name } => {
                if self.warned.insert(container.clone()) {
                    warn!(container.name = %name, container.id = %short(&container),
                        label = pier_model::labels::HEALTH, error = "the check needs a port; add pier.port",
                        "skipping container with a bad label");
                }
            }
            desired::Note::StaticRefused {
                key,
                service,
                addr,
                why,
            } => {
                if self.static_warned.insert((key, addr)) {
                    warn!(service = %service.1, namespace = %service.0, address = %addr,
                        reason = %why, "ignoring a static endpoint; list it in [network] static_endpoint_allow to allow it");
                }
            }
        }
    }

    /// Put this reconcile's refusals on the node record (sorted, at most
    /// [`pier_model::Node::MAX_REFUSED`]) and log each new one once.
    fn note_refusals(&mut self, refused: &mut Vec<pier_model::Refusal>) {
        refused.sort();
        refused.dedup();
        let now: HashSet<(String, String)> = refused
            .iter()
            .map(|r| (r.id.clone(), r.reason.clone()))
            .collect();
        for r in refused.iter() {
            if !self
                .refused_logged
                .contains(&(r.id.clone(), r.reason.clone()))
            {
                warn!(container.name = %r.container, container.id = %r.id, namespace = %r.namespace,
                    service = ?r.service.as_ref().map(|s| s.as_str()), reason = %r.reason,
                    "refused a labelled container");
            }
        }
        self.refused_logged = now;
        refused.truncate(pier_model::Node::MAX_REFUSED);
        self.node.refused = std::mem::take(refused);
    }

    fn sync_checks(&mut self, targets: HashMap<String, Target>) {
        self.checks.retain(|k, c| {
            let keep = targets.get(k) == Some(&c.target);
            if !keep {
                c.cancel.cancel();
            }
            keep
        });
        for (k, t) in targets {
            if self.checks.contains_key(&k) {
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            let cancel = self.tasks_cancel.child_token();
            self.spawn(health::run(
                k.clone(),
                generation,
                t.clone(),
                self.health_tx.clone(),
                cancel.clone(),
            ));
            self.checks.insert(
                k,
                Check {
                    target: t,
                    generation,
                    ready: false,
                    settled: false,
                    cancel,
                },
            );
        }
    }

    fn pod_settings(&self) -> PodSettings {
        let mut extra = self.cfg.filter_labels.clone();
        extra.extend(self.cfg.pod_labels.clone());
        PodSettings {
            node: self.node.name.to_string(),
            extra_labels: extra,
            network: self.cfg.pod_network.clone(),
            registry: self.cfg.registry.clone(),
            dns: self.node.dns_addr,
            dns_search: self.dns_search.clone(),
        }
    }

    fn spawn_start(&mut self, pod: Arc<Pod>) {
        let Some(d) = self.docker.clone() else { return };
        let key = (pod.namespace.clone(), pod.name.clone());
        self.starting.insert(key.clone());
        let settings = self.pod_settings();
        let tx = self.op_tx.clone();
        let cancel = self.tasks_cancel.clone();
        info!(pod = %pod.name, namespace = %pod.namespace, image = %pod.template.image, "starting pod");
        self.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = docker::start_pod(&d, &pod, &settings) => {
                    let _ = tx.send(OpMsg::PodStarted { pod: key, result: r });
                }
            }
        });
    }

    /// Stop and remove a pod container that is no longer wanted, after
    /// [`DEREGISTER_DELAY`]: its endpoint was left out of this reconcile's
    /// write, so proxies stop choosing it before it goes.
    fn spawn_remove(&mut self, id: String) {
        let Some(d) = self.docker.clone() else { return };
        self.removing.insert(id.clone());
        let tx = self.op_tx.clone();
        let cancel = self.tasks_cancel.clone();
        self.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = async {
                    tokio::time::sleep(DEREGISTER_DELAY).await;
                    docker::remove_pod_container(&d, &id).await
                } => {
                    let _ = tx.send(OpMsg::Removed { id, result: r });
                }
            }
        });
    }

    /// Write what differs from `written`. Deletes only once both Docker and
    /// the store have been seen in full, so a restart does not flap
    /// endpoints of containers that are still running.
    async fn write(&mut self, desired: BTreeMap<String, Vec<u8>>, may_delete: bool) {
        let Some(lease) = self.lease else { return };
        self.dirty = false;
        if may_delete {
            let mut stale: Vec<String> = self
                .written
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .cloned()
                .collect();
            // Endpoints before their addresses, so an address is free only
            // once no endpoint record names it.
            stale.sort_by_key(|k| k.starts_with(keys::prefix::VIP_ALLOCS));
            let mut failed = false;
            for k in stale {
                let is_alloc = k.starts_with(keys::prefix::VIP_ALLOCS);
                if is_alloc && failed {
                    continue;
                }
                match timed(self.store.delete(&k)).await {
                    Ok(_) => {
                        debug!(key = %k, "deleted");
                        self.written.remove(&k);
                        if is_alloc && let Ok(Key::VipAlloc(ip)) = Key::parse(&k) {
                            self.ep_addrs.retain(|_, a| *a != ip);
                        }
                    }
                    Err(e) => {
                        warn!(key = %k, error = %e, "store delete failed; will retry");
                        self.dirty = true;
                        failed = true;
                    }
                }
            }
        }
        // The node's record goes last, and only once everything else is
        // written: other hosts' reflectors take its return as the end of a
        // re-registration and then drop the endpoints they held for it
        // (`pier_store::reflector` hold), so it must not come before them.
        let node_key = keys::node(&self.node.name);
        let mut desired = desired;
        let node_rec = desired.remove_entry(&node_key);
        for (k, v) in desired.into_iter().chain(node_rec) {
            if self
                .written
                .get(&k)
                .is_some_and(|(wv, wl)| *wv == v && *wl == Some(lease))
            {
                continue;
            }
            if k == node_key && self.dirty {
                break;
            }
            match timed(self.store.put(&k, v.clone(), Some(lease))).await {
                Ok(_) => {
                    debug!(key = %k, "written");
                    self.written.insert(k, (v, Some(lease)));
                }
                Err(e) => {
                    warn!(key = %k, error = %e, "store put failed; will retry");
                    self.dirty = true;
                }
            }
        }
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

/// The `ip:port`s of a ready endpoint: its ports, or the service's target
/// ports when it names none (as `Endpoint::port_for` falls back).
fn local_targets_of(ep: &Endpoint, svc: Option<&Service>, out: &mut HashSet<SocketAddr>) {
    if ep.ports.is_empty() {
        for sp in svc.iter().flat_map(|s| s.ports.iter()) {
            out.insert(SocketAddr::new(ep.ip, sp.target_port.get()));
        }
    } else {
        for p in &ep.ports {
            out.insert(SocketAddr::new(ep.ip, p.port.get()));
        }
    }
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

/// The result of a full list, merged with what events said while it ran:
/// an entry an event touched after the list started (`touched[id] > seq`)
/// keeps the event's state (present in `current` or gone), everything else
/// is as listed.
fn merge_listed<V: Clone>(
    mut listed: HashMap<String, V>,
    current: &HashMap<String, V>,
    touched: &HashMap<String, u64>,
    seq: u64,
) -> HashMap<String, V> {
    for (id, s) in touched {
        if *s > seq {
            match current.get(id) {
                Some(v) => {
                    listed.insert(id.clone(), v.clone());
                }
                None => {
                    listed.remove(id);
                }
            }
        }
    }
    listed
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

#[cfg(test)]
mod merge_tests {
    use super::merge_listed;
    use std::collections::HashMap;

    fn m(kv: &[(&str, u32)]) -> HashMap<String, u32> {
        kv.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn events_after_the_list_started_win_and_older_ones_do_not() {
        // The list started at seq 5. Since then: "new" was created (7), "gone"
        // destroyed (6), "changed" updated to 2 (8). "old" was touched at 3,
        // before the list, so the list's view of it stands.
        let listed = m(&[("gone", 1), ("changed", 1), ("old", 9), ("kept", 1)]);
        let current = m(&[("new", 1), ("changed", 2), ("old", 4)]);
        let touched: HashMap<String, u64> = [("new", 7), ("gone", 6), ("changed", 8), ("old", 3)]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        let got = merge_listed(listed, &current, &touched, 5);
        assert_eq!(
            got,
            m(&[("new", 1), ("changed", 2), ("old", 9), ("kept", 1)])
        );
    }
}
