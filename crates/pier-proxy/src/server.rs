//! The [`Proxy`]: listeners that follow the snapshot, balancers rebuilt on
//! each change, drains, problems and stats.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use pier_model::{
    Cidr, EndpointKey, Name, ObjectKey, Protocol, Service, ServiceType, Snapshot, Stats,
};
use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol as Protocol_, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::affinity::Affinity;
use crate::balance::{Balancer, EpState, Route};
use crate::conn::{self, Ctx, PortTarget};
use crate::iface::Iface;
use crate::limit::ConnLimiter;
use crate::mesh::MeshConnector;
use crate::metrics::{Metrics, SvcMetrics};
use crate::{ProxyConfig, ProxyError};

/// Per-service problems on this node, for `describe svc`.
pub type Problems = BTreeMap<ObjectKey, String>;
/// Per-service traffic on this node, for the `stats/` keys.
pub type StatsMap = BTreeMap<ObjectKey, Stats>;

/// Backlog of every listener: bursts of short connections (64 at once in
/// the benchmark, thousands in tests) must not be refused.
const BACKLOG: i32 = 4096;

/// Where the proxy's listening sockets come from. Without one, the proxy
/// binds them itself. The agent's keeper (hitless restarts) supplies one
/// that hands out a socket it already holds, or shares a new one with it,
/// so that the sockets outlive this process.
pub trait ListenerSource: Send + Sync + std::fmt::Debug {
    /// A listener on `a`: one held already, else `bind(a)` (then shared).
    fn listen(
        &self,
        a: SocketAddr,
        bind: fn(SocketAddr) -> std::io::Result<std::net::TcpListener>,
    ) -> std::io::Result<std::net::TcpListener>;
    /// A UDP socket on `a` for a UDP service port: one held already, else
    /// `bind(a)` (then shared).
    fn listen_udp(
        &self,
        a: SocketAddr,
        bind: fn(SocketAddr) -> std::io::Result<std::net::UdpSocket>,
    ) -> std::io::Result<std::net::UdpSocket>;
    /// The listener on `a` is closed for good (its service port is gone):
    /// no copy of it may stay open anywhere.
    fn release(&self, proto: Protocol, a: SocketAddr);
}

/// Where a listener listens: TCP and UDP may share an address and port.
type ListenKey = (Protocol, SocketAddr);

/// The node-port refusal counter, by reason.
pub(crate) type RefusalCounter = prometheus_client::metrics::family::Family<
    [(&'static str, &'static str); 1],
    prometheus_client::metrics::counter::Counter,
>;

/// The L4 proxy of one node.
#[derive(Debug)]
pub struct Proxy {
    cfg: ProxyConfig,
    source: Option<Arc<dyn ListenerSource>>,
    ready: watch::Sender<bool>,
    node: Name,
    service_cidr: Cidr,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    mesh: Option<MeshConnector>,
    metrics: Metrics,
    problems: watch::Sender<Arc<Problems>>,
    stats: watch::Sender<Arc<StatsMap>>,
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        node: Name,
        service_cidr: Cidr,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        mesh: Option<MeshConnector>,
        registry: &mut Registry,
    ) -> Result<Proxy, ProxyError> {
        cfg.validate()?;
        crate::copy::set_pipe_size(cfg.pipe_size_kib as usize * 1024);
        let metrics = Metrics::new();
        metrics.register(registry);
        Ok(Proxy {
            cfg,
            source: None,
            ready: watch::channel(false).0,
            node,
            service_cidr,
            snapshot,
            mesh,
            metrics,
            problems: watch::channel(Arc::new(Problems::new())).0,
            stats: watch::channel(Arc::new(StatsMap::new())).0,
        })
    }

    /// Takes listening sockets from `source` instead of binding them.
    pub fn with_listener_source(mut self, source: Arc<dyn ListenerSource>) -> Proxy {
        self.source = Some(source);
        self
    }

    /// `true` once the first snapshot is reconciled: every listener it
    /// asks for is open (or failed, with a problem reported).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Per-service problems on this node (e.g. "node port 30080 is in use
    /// by another process"), for `describe svc`.
    pub fn problems(&self) -> watch::Receiver<Arc<Problems>> {
        self.problems.subscribe()
    }

    /// Per-service traffic stats, sampled every `stats_interval_ms`.
    pub fn stats(&self) -> watch::Receiver<Arc<StatsMap>> {
        self.stats.subscribe()
    }

    /// Runs until `cancel`: then stops accepting, lets open connections
    /// finish for up to `drain_timeout_ms`, and closes the rest.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), ProxyError> {
        let Proxy {
            cfg,
            source,
            ready,
            node,
            service_cidr,
            mut snapshot,
            mesh,
            metrics,
            problems,
            stats,
        } = self;
        let iface = if cfg.manage_iface {
            Some(Iface::open(&cfg.iface).await?)
        } else {
            None
        };
        let ctx = Arc::new(Ctx {
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            attempts: cfg.connect_attempts,
            eject_after: cfg.eject_after_failures,
            eject_base_ms: cfg.eject_base_ms,
            splice: cfg.splice,
            mesh,
            hard_stop: CancellationToken::new(),
        });
        let mut st = State {
            limiter: ConnLimiter::new(cfg.node_port_max_conns, cfg.node_port_max_conns_per_client),
            cfg: cfg.clone(),
            source,
            node,
            service_cidr,
            ctx: ctx.clone(),
            metrics,
            iface,
            ports: HashMap::new(),
            listeners: HashMap::new(),
            failed: HashMap::new(),
            draining: Vec::new(),
            vips: HashSet::new(),
            vips_gone: HashMap::new(),
            listen_tasks: TaskTracker::new(),
            conns: TaskTracker::new(),
            problems,
            stats,
            refused_direct: HashSet::new(),
        };
        st.adopt_existing_vips().await;

        let mut snap = snapshot.borrow_and_update().clone();
        st.reconcile(&snap).await;
        ready.send_replace(true);
        let mut retry = tokio::time::interval(Duration::from_millis(cfg.bind_retry_ms));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retry.reset();
        let mut sample = tokio::time::interval(Duration::from_millis(cfg.stats_interval_ms));
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // tokio's timer driver wakes its own thread through the eventfd
        // whenever a new timer is due sooner than its next wake-up: with
        // only 1 s connect timeouts pending, that is one write(2) and one
        // extra epoll round per connection. A 250 ms tick keeps an earlier
        // timer pending at all times, so connect timeouts never do that.
        let mut anchor = tokio::time::interval(Duration::from_millis(250));
        anchor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sender_alive = true;
        loop {
            let next = st.next_deadline();
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = snapshot.changed(), if sender_alive => {
                    if r.is_err() {
                        tracing::warn!("snapshot sender dropped; serving the last snapshot until shutdown");
                        sender_alive = false;
                        continue;
                    }
                    snap = snapshot.borrow_and_update().clone();
                    st.reconcile(&snap).await;
                }
                _ = retry.tick() => {
                    if !st.failed.is_empty() {
                        tracing::debug!(failed = st.failed.len(), "retrying failed binds");
                        st.reconcile(&snap).await;
                    }
                }
                _ = sample.tick() => st.sample_stats(),
                _ = anchor.tick() => {}
                _ = tokio::time::sleep_until(next) => st.expire().await,
            }
        }
        st.shutdown().await;
        Ok(())
    }
}

/// A service port (`.2` `None`: the service's VIP and node ports), or one
/// endpoint's share of it (`.2` the endpoint: its endpoint VIP, which
/// forwards to that endpoint only).
type PortKey = (ObjectKey, Name, Option<EndpointKey>);

/// The metrics label of a port key: the port's name, and `@<pod or id>`
/// for an endpoint VIP.
fn port_label(pk: &PortKey, snap: &Snapshot) -> String {
    match &pk.2 {
        None => pk.1.to_string(),
        Some(ek) => {
            let ep = snap.endpoints.get(&pk.0).and_then(|m| m.get(ek));
            let who = ep.and_then(|e| e.pod.as_ref()).unwrap_or(&ek.1);
            format!("{}@{who}", pk.1)
        }
    }
}

/// One service port's live state across snapshots.
#[derive(Debug)]
struct PortEntry {
    target: Arc<ArcSwap<PortTarget>>,
    /// The port's session-affinity table, kept across rebuilds while the
    /// service keeps the same affinity settings.
    affinity: Option<Arc<Affinity>>,
    m: SvcMetrics,
    service: Arc<str>,
    port_name: String,
    /// The service's drain timeout, for when the service itself is gone.
    drain: Duration,
    /// Every endpoint in the snapshot (ready or not), by key.
    eps: HashMap<EndpointKey, Arc<EpState>>,
}

#[derive(Debug)]
struct ListenerEntry {
    key: PortKey,
    cancel: CancellationToken,
    /// Ends once the listening socket is closed.
    task: tokio::task::JoinHandle<()>,
}

/// The reconciler's state; only the run loop touches it.
#[derive(Debug)]
struct State {
    cfg: ProxyConfig,
    source: Option<Arc<dyn ListenerSource>>,
    /// The caps on node-port connections, shared by every node port.
    limiter: ConnLimiter,
    node: Name,
    service_cidr: Cidr,
    ctx: Arc<Ctx>,
    metrics: Metrics,
    iface: Option<Iface>,
    ports: HashMap<PortKey, PortEntry>,
    listeners: HashMap<ListenKey, ListenerEntry>,
    /// Binds that failed: the service and the message shown for it.
    failed: HashMap<ListenKey, (ObjectKey, String)>,
    /// Removed endpoints whose connections may live until the deadline.
    draining: Vec<(Arc<EpState>, Instant)>,
    /// VIPs this proxy keeps on the interface.
    vips: HashSet<IpAddr>,
    /// VIPs no longer wanted, removed once their connections had the drain
    /// timeout to finish.
    vips_gone: HashMap<IpAddr, Instant>,
    listen_tasks: TaskTracker,
    conns: TaskTracker,
    problems: watch::Sender<Arc<Problems>>,
    stats: watch::Sender<Arc<StatsMap>>,
    /// Endpoint addresses refused by [`direct_allowed`], logged once.
    refused_direct: HashSet<SocketAddr>,
}

/// Whether the proxy may connect straight to `ip`: not a loopback,
/// link-local, unspecified, multicast or broadcast address (which reach the
/// host itself), unless `allow` lists it. A pod's address is none of these.
fn direct_allowed(ip: IpAddr, allow: &[Cidr]) -> bool {
    // Not the host's own addresses: a host-network pod's endpoint is one.
    pier_model::addr::address_kind_refusal(ip).is_none()
        || allow
            .iter()
            .any(|c| c.contains(ip) || c.contains(ip.to_canonical()))
}

fn service_label(k: &ObjectKey) -> String {
    format!("{}/{}", k.0, k.1)
}

impl State {
    fn drain_for(&self, svc: Option<&Service>) -> Duration {
        Duration::from_millis(
            svc.and_then(|s| s.drain_timeout_ms)
                .unwrap_or(self.cfg.drain_timeout_ms),
        )
    }

    /// Addresses left on the interface by an earlier run are adopted, so a
    /// restart removes the ones no longer wanted.
    async fn adopt_existing_vips(&mut self) {
        let Some(ifc) = &self.iface else { return };
        match ifc.addrs().await {
            Ok(a) => {
                let dns = self.service_cidr.nth(10);
                for (ip, _) in a {
                    if self.service_cidr.contains(ip) && Some(ip) != dns {
                        self.vips.insert(ip);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list interface addresses"),
        }
    }

    async fn reconcile(&mut self, snap: &Snapshot) {
        let now = Instant::now();
        let mut wanted_ports: HashSet<PortKey> = HashSet::new();
        let mut wanted_listeners: HashMap<ListenKey, PortKey> = HashMap::new();
        let mut wanted_vips: HashSet<IpAddr> = HashSet::new();
        let mut node_ports: HashSet<ListenKey> = HashSet::new();

        for (key, svc) in snap.services.iter() {
            // Endpoint VIPs: each forwards, on the endpoint's own ports, to
            // that endpoint only, so a pod name or SRV target that DNS
            // answers works from every host (over the mesh when remote).
            for (ek, ep) in snap.endpoints.get(key).into_iter().flat_map(|m| m.iter()) {
                let Some(addr) = ep.addr else { continue };
                if ep.is_static {
                    continue;
                }
                if self.cfg.manage_iface && !self.service_cidr.contains(addr) {
                    tracing::warn!(service = %service_label(key), endpoint = %ek.1, %addr, cidr = %self.service_cidr, "endpoint address outside the service CIDR; not served");
                    continue;
                }
                wanted_vips.insert(addr);
                for sp in &svc.ports {
                    let Some(port) = ep.port_for(sp) else {
                        continue;
                    };
                    let pk = (key.clone(), sp.name.clone(), Some(ek.clone()));
                    wanted_ports.insert(pk.clone());
                    self.update_port(snap, svc, &pk, now);
                    // Two service ports on one endpoint port: the first.
                    wanted_listeners
                        .entry((sp.protocol, SocketAddr::new(addr, port.get())))
                        .or_insert(pk);
                }
            }
            let Some(vip) = svc.vip else { continue };
            if self.cfg.manage_iface && !self.service_cidr.contains(vip) {
                tracing::warn!(service = %service_label(key), %vip, cidr = %self.service_cidr, "VIP outside the service CIDR; not served");
                continue;
            }
            wanted_vips.insert(vip);
            for sp in &svc.ports {
                let pk = (key.clone(), sp.name.clone(), None);
                wanted_ports.insert(pk.clone());
                self.update_port(snap, svc, &pk, now);
                wanted_listeners.insert(
                    (sp.protocol, SocketAddr::new(vip, sp.port.get())),
                    pk.clone(),
                );
                if svc.service_type == ServiceType::NodePort
                    && let Some(np) = sp.node_port
                {
                    let a = (
                        sp.protocol,
                        SocketAddr::new(self.cfg.node_port_addr, np.get()),
                    );
                    node_ports.insert(a);
                    if let Some(other) = wanted_listeners.insert(a, pk.clone())
                        && other != pk
                    {
                        tracing::warn!(addr = %a.1, a = %service_label(&other.0), b = %service_label(&pk.0), "two services claim one node port");
                    }
                }
            }
        }

        // Service ports gone: every endpoint drains.
        let gone: Vec<_> = self
            .ports
            .keys()
            .filter(|k| !wanted_ports.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(pe) = self.ports.remove(&k) {
                for (_, ep) in pe.eps {
                    self.start_drain(ep, now + pe.drain);
                }
                self.metrics.remove_service(&pe.service, &pe.port_name);
            }
        }

        // Listeners gone or moved to another service port.
        let stale: Vec<ListenKey> = self
            .listeners
            .iter()
            .filter(|(a, l)| wanted_listeners.get(a) != Some(&l.key))
            .map(|(a, _)| *a)
            .collect();
        for a in stale {
            if let Some(l) = self.listeners.remove(&a) {
                l.cancel.cancel();
                // Wait for the socket to close, so that the same address
                // can be bound again below (a VIP given to another service).
                if tokio::time::timeout(Duration::from_secs(1), l.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(addr = %a.1, proto = %a.0, "listener task did not end within 1 s");
                }
                if let Some(src) = &self.source {
                    src.release(a.0, a.1);
                }
                tracing::info!(addr = %a.1, proto = %a.0, service = %service_label(&l.key.0), port = %l.key.1, "listener removed");
            }
        }
        self.failed.retain(|a, _| wanted_listeners.contains_key(a));

        // VIPs on the interface, before binding.
        if self.iface.is_some() {
            for ip in &wanted_vips {
                self.vips_gone.remove(ip);
                if !self.vips.contains(ip) {
                    let r = match &self.iface {
                        Some(ifc) => ifc.add_addr(*ip).await,
                        None => Ok(()),
                    };
                    match r {
                        Ok(()) => {
                            self.vips.insert(*ip);
                        }
                        Err(e) => tracing::warn!(vip = %ip, error = %e, "cannot add VIP"),
                    }
                }
            }
            let drain = self.drain_for(None);
            for ip in self.vips.iter() {
                if !wanted_vips.contains(ip) {
                    self.vips_gone.entry(*ip).or_insert(now + drain);
                }
            }
        }

        // New listeners.
        let mut adds: Vec<(ListenKey, PortKey)> = wanted_listeners
            .into_iter()
            .filter(|(a, _)| !self.listeners.contains_key(a))
            .collect();
        adds.sort_by_key(|a| a.0);
        for (key, pk) in adds {
            let Some(pe) = self.ports.get(&pk) else {
                continue;
            };
            let (proto, a) = key;
            let cancel = CancellationToken::new();
            let limit = node_ports.contains(&key).then(|| Limit {
                limiter: self.limiter.clone(),
                refusals: self.metrics.node_port_refusals.clone(),
            });
            let started = match proto {
                Protocol::Tcp => {
                    let bound = match &self.source {
                        Some(src) => src.listen(a, bind),
                        None => bind(a),
                    };
                    bound.and_then(TcpListener::from_std).map(|l| {
                        self.listen_tasks.spawn(accept_loop(
                            l,
                            pe.target.clone(),
                            self.ctx.clone(),
                            self.conns.clone(),
                            cancel.clone(),
                            limit,
                        ))
                    })
                }
                Protocol::Udp => {
                    let bound = match &self.source {
                        Some(src) => src.listen_udp(a, bind_udp),
                        None => bind_udp(a),
                    };
                    bound.and_then(tokio::net::UdpSocket::from_std).map(|sock| {
                        self.listen_tasks.spawn(crate::udp::serve(
                            sock,
                            crate::udp::UdpListen {
                                target: pe.target.clone(),
                                ctx: self.ctx.clone(),
                                flows: self.conns.clone(),
                                cancel: cancel.clone(),
                                idle: Duration::from_millis(self.cfg.udp_idle_timeout_ms),
                                max_flows: self.cfg.udp_max_flows as usize,
                                limit: limit.map(|l| (l.limiter, l.refusals)),
                            },
                        ))
                    })
                }
            };
            match started {
                Ok(task) => {
                    if self.failed.remove(&key).is_some() {
                        tracing::info!(addr = %a, %proto, service = %service_label(&pk.0), "bind succeeded after earlier failure");
                    }
                    tracing::info!(addr = %a, %proto, service = %service_label(&pk.0), port = %pk.1, "listening");
                    self.listeners.insert(
                        key,
                        ListenerEntry {
                            key: pk,
                            cancel,
                            task,
                        },
                    );
                }
                Err(e) => {
                    let is_node_port = a.ip() == self.cfg.node_port_addr;
                    let msg = match (e.kind(), is_node_port) {
                        (std::io::ErrorKind::AddrInUse, true) => format!(
                            "node port {}/{proto} on {} is in use by another process; retried when the snapshot changes and every {} s",
                            a.port(),
                            a.ip(),
                            self.cfg.bind_retry_ms / 1000
                        ),
                        (std::io::ErrorKind::AddrInUse, false) => format!(
                            "{a}/{proto} is in use by another process; retried when the snapshot changes and every {} s",
                            self.cfg.bind_retry_ms / 1000
                        ),
                        _ => format!("cannot listen on {a}/{proto}: {e}"),
                    };
                    let prev = self.failed.insert(key, (pk.0.clone(), msg.clone()));
                    if prev.as_ref().map(|p| &p.1) != Some(&msg) {
                        tracing::error!(service = %service_label(&pk.0), port = %pk.1, addr = %a, error = %e, "{msg}");
                    }
                }
            }
        }
        self.publish_problems();
    }

    /// Rebuilds one service port's balancer from the snapshot.
    fn update_port(&mut self, snap: &Snapshot, svc: &Service, pk: &PortKey, now: Instant) {
        let sp = match svc.ports.iter().find(|p| p.name == pk.1) {
            Some(p) => p,
            None => return,
        };
        let drain = self.drain_for(Some(svc));
        let metrics = &self.metrics;
        let pe = self.ports.entry(pk.clone()).or_insert_with(|| {
            let service: Arc<str> = service_label(&pk.0).into();
            let port_name = port_label(pk, snap);
            let m = metrics.service(&service, &port_name);
            let t = PortTarget {
                service: service.clone(),
                m: m.clone(),
                bal: Balancer::new(svc.lb, svc.prefer_local, Vec::new()),
                proxy_protocol: svc.proxy_protocol,
                affinity: None,
            };
            PortEntry {
                target: Arc::new(ArcSwap::from_pointee(t)),
                affinity: None,
                m,
                service,
                port_name,
                drain,
                eps: HashMap::new(),
            }
        });
        let mut new_eps: HashMap<EndpointKey, Arc<EpState>> = HashMap::new();
        let mut ready = Vec::new();
        let mut removed = Vec::new();
        for ((node, id), ep) in snap.endpoints.get(&pk.0).into_iter().flat_map(|m| m.iter()) {
            if let Some((n, i)) = &pk.2
                && (n != node || i != id)
            {
                continue; // an endpoint VIP forwards to its endpoint only
            }
            if ep.is_static && *node != self.node {
                continue; // a static endpoint is used only by the node that checks it
            }
            let Some(port) = ep.port_for(sp) else {
                continue;
            };
            let addr = SocketAddr::new(ep.ip, port.get());
            let local = ep.is_static || *node == self.node;
            // Defence in depth behind the API and the agent: an endpoint
            // record (forged in the store, say) never sends this proxy
            // straight into the host's loopback or link-local services.
            if local && !direct_allowed(ep.ip, &self.cfg.direct_allow) {
                if self.refused_direct.insert(addr) {
                    tracing::warn!(service = %service_label(&pk.0), endpoint.node = %node, endpoint.addr = %addr,
                        "not proxying to an endpoint that reaches this host itself; list it in [network] static_endpoint_allow to allow it");
                }
                continue;
            }
            let route = if local || self.ctx.mesh.is_none() {
                Route::Direct
            } else {
                match snap.nodes.get(node) {
                    Some(n) if n.mesh_port != 0 => Route::Mesh {
                        peer: SocketAddr::new(n.addr, n.mesh_port),
                        node: node.clone(),
                    },
                    _ => Route::Direct,
                }
            };
            let key = (node.clone(), id.clone());
            let state = match pe.eps.remove(&key) {
                Some(old)
                    if old.addr == addr && old.route == route && !old.drain.is_cancelled() =>
                {
                    old.removed.store(false, Relaxed);
                    old
                }
                other => {
                    if let Some(old) = other {
                        removed.push(old);
                    }
                    let label = addr.to_string();
                    // A new endpoint behind a peer: warm that peer's pool
                    // now, so its first connection does not handshake.
                    if ep.ready
                        && let (Route::Mesh { peer, node }, Some(mesh)) = (&route, &self.ctx.mesh)
                    {
                        mesh.warm(*peer, node);
                    }
                    let m =
                        metrics.endpoint(&pe.service, &pe.port_name, &label, route.metric_label());
                    Arc::new(EpState::new(addr, route, local, m))
                }
            };
            if ep.ready {
                ready.push(state.clone());
            }
            new_eps.insert(key, state);
        }
        removed.extend(pe.eps.drain().map(|(_, v)| v));
        pe.eps = new_eps;
        pe.drain = drain;
        // The affinity table lives as long as the settings do.
        let timeout_ms = svc.session_affinity.map(|a| u64::from(a.timeout_s) * 1000);
        if pe.affinity.as_ref().map(|a| a.timeout_ms()) != timeout_ms {
            pe.affinity = svc
                .session_affinity
                .map(|a| Arc::new(Affinity::new(a.timeout_s)));
        }
        // Stable order: round-robin walks endpoints in key order.
        let t = PortTarget {
            service: pe.service.clone(),
            m: pe.m.clone(),
            bal: Balancer::new(svc.lb, svc.prefer_local, ready),
            proxy_protocol: svc.proxy_protocol,
            affinity: pe.affinity.clone(),
        };
        pe.target.store(Arc::new(t));
        for ep in removed {
            self.start_drain(ep, now + drain);
        }
    }

    fn start_drain(&mut self, ep: Arc<EpState>, deadline: Instant) {
        if ep.removed.swap(true, Relaxed) {
            return;
        }
        tracing::debug!(endpoint = %ep.addr, active = ep.outstanding(), "endpoint removed; draining");
        self.draining.push((ep, deadline));
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let d = self.draining.iter().map(|(_, d)| *d).min().unwrap_or(far);
        let v = self.vips_gone.values().min().copied().unwrap_or(far);
        // Idle drained endpoints are dropped within a second.
        let idle = if self.draining.is_empty() {
            far
        } else {
            Instant::now() + Duration::from_secs(1)
        };
        d.min(v).min(idle)
    }

    /// Ends drains whose time is up, drops drained endpoints with no
    /// connections left, and removes VIPs no longer wanted.
    async fn expire(&mut self) {
        let now = Instant::now();
        let metrics = &self.metrics;
        self.draining.retain(|(ep, deadline)| {
            if !ep.removed.load(Relaxed) {
                return false; // back in the snapshot
            }
            let idle = ep.outstanding() == 0;
            if idle || *deadline <= now {
                if !idle {
                    tracing::info!(endpoint = %ep.addr, active = ep.outstanding(), "drain timeout: closing remaining connections");
                }
                ep.drain.cancel();
                metrics.remove_endpoint(&ep.m);
                return false;
            }
            true
        });
        let due: Vec<IpAddr> = self
            .vips_gone
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            self.vips_gone.remove(&ip);
            if let Some(ifc) = &self.iface {
                match ifc.del_addr(ip).await {
                    Ok(()) => {
                        self.vips.remove(&ip);
                        tracing::info!(vip = %ip, "VIP removed");
                    }
                    Err(e) => tracing::warn!(vip = %ip, error = %e, "cannot remove VIP"),
                }
            }
        }
    }

    fn publish_problems(&self) {
        let mut p = Problems::new();
        for (k, msg) in self.failed.values() {
            p.entry(k.clone())
                .and_modify(|m: &mut String| {
                    m.push_str("; ");
                    m.push_str(msg);
                })
                .or_insert_with(|| msg.clone());
        }
        self.problems.send_if_modified(|cur| {
            if **cur == p {
                false
            } else {
                *cur = Arc::new(p);
                true
            }
        });
    }

    /// Closes every service port's and endpoint's window (their /metrics
    /// gauges) and publishes the per-service sums for the `stats/` keys.
    /// The sketches of a service's ports merge, so its p99 is over all its
    /// ports' traffic.
    fn sample_stats(&mut self) {
        let at = pier_model::now_ms();
        let now = std::time::Instant::now();
        let mut out = StatsMap::new();
        for (pk, pe) in &self.ports {
            if let Some(a) = &pe.affinity {
                a.sweep();
            }
            let s = out.entry(pk.0.clone()).or_default();
            let total = pe.m.total.get();
            let w = pe.m.sig.window(total, now);
            for ep in pe.eps.values() {
                ep.m.sig.window(ep.m.total.get(), now);
            }
            s.active += pe.m.active.get().max(0) as u64;
            s.total += total;
            s.connect_errors += pe.m.error_total();
            s.bytes_in += pe.m.bytes_in.get();
            s.bytes_out += pe.m.bytes_out.get();
            s.new_conns += w.new_conns;
            s.window_ms = s.window_ms.max(w.ms);
            s.connect.merge(&w.connect);
            s.first_byte.merge(&w.first_byte);
            s.at = at;
        }
        for s in out.values_mut() {
            s.connect_p99_us = s.connect.quantile(0.99).unwrap_or(0);
        }
        self.stats.send_replace(Arc::new(out));
    }

    async fn shutdown(mut self) {
        for (_, l) in self.listeners.drain() {
            l.cancel.cancel();
        }
        self.listen_tasks.close();
        self.listen_tasks.wait().await;
        self.conns.close();
        let grace = Duration::from_millis(self.cfg.drain_timeout_ms);
        if tokio::time::timeout(grace, self.conns.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.conns.len(),
                "shutdown grace period over; closing connections"
            );
            self.ctx.hard_stop.cancel();
            self.conns.wait().await;
        }
        self.sample_stats();
    }
}

/// Binds a listener with SO_REUSEADDR, TCP_NODELAY and keepalive (which
/// accepted sockets inherit).
fn bind(a: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol_::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    conn::tune(SockRef::from(&s))?;
    s.bind(&a.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Binds a UDP service port's socket.
fn bind_udp(a: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(a), Type::DGRAM, Some(Protocol_::UDP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.bind(&a.into())?;
    Ok(s.into())
}

/// A node port's caps and where its refusals are counted.
struct Limit {
    limiter: ConnLimiter,
    refusals: RefusalCounter,
}

async fn accept_loop(
    l: TcpListener,
    target: Arc<ArcSwap<PortTarget>>,
    ctx: Arc<Ctx>,
    conns: TaskTracker,
    cancel: CancellationToken,
    limit: Option<Limit>,
) {
    // Logged once per listener and reason, not per refused connection.
    let mut warned: [bool; 2] = [false; 2];
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => r,
        };
        match r {
            Ok((s, peer)) => {
                let slot = match limit.as_ref().map(|lm| lm.limiter.try_acquire(peer.ip())) {
                    None => None,
                    Some(Ok(slot)) => Some(slot),
                    Some(Err(why)) => {
                        let lm = limit.as_ref().expect("Some above");
                        lm.refusals.get_or_create(&[("reason", why.as_str())]).inc();
                        let i = why as usize;
                        if !warned[i] {
                            warned[i] = true;
                            tracing::warn!(client.addr = %peer, reason = why.as_str(), "node port: connection refused by a cap (node_port_max_conns, node_port_max_conns_per_client); logged once per listener");
                        }
                        crate::mesh::reset_on_close(&s);
                        continue;
                    }
                };
                let t = target.load_full();
                let ctx = ctx.clone();
                conns.spawn(async move {
                    conn::serve(ctx, t, s, peer).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}
