//! The [`Proxy`]: listeners that follow the snapshot, balancers rebuilt on
//! each change, drains, problems and stats.
//!
//! This module holds the handle and its run loop; `state` what the proxy
//! holds and how it follows the snapshot, `listen` the sockets and the
//! accept loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pier_model::{Cidr, Name, ObjectKey, Protocol, Snapshot, Stats};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::Ctx;
use crate::iface::Iface;
use crate::limit::ConnLimiter;
use crate::mesh::MeshConnector;
use crate::metrics::Metrics;
use crate::{ProxyConfig, ProxyError};

mod listen;
mod state;

use state::State;

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
    service_cidr6: Option<Cidr>,
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
            service_cidr6: None,
            snapshot,
            mesh,
            metrics,
            problems: watch::channel(Arc::new(Problems::new())).0,
            stats: watch::channel(Arc::new(StatsMap::new())).0,
        })
    }

    /// Dual stack: serves services' IPv6 VIPs (`Service.vip6`) from this
    /// IPv6 service CIDR too. Without it, an IPv6 VIP is not served.
    pub fn with_service_cidr6(mut self, cidr6: Option<Cidr>) -> Proxy {
        self.service_cidr6 = cidr6;
        self
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
            service_cidr6,
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
            service_cidr6,
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
