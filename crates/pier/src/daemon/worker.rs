//! The agent proper: every subsystem under one root cancellation token,
//! one function per job.
//!
//! Start order: data dir → API socket → store → node lease → reflector
//! (synced) → pier0 (so the DNS VIP can be bound) → DNS → mesh → proxy →
//! agent → supervisor → stats → API; then "ready" to the keeper once the
//! proxy has opened the listeners of the synced snapshot.
//!
//! Two ways to stop:
//! - **Shutdown** (SIGTERM/SIGINT): stop accepting API requests, stop
//!   leading, deregister (the agent deletes its endpoints, the lease is
//!   revoked), let proxied connections drain for a grace period, stop hard,
//!   remove pier0.
//! - **Handoff** (SIGUSR2 from the keeper, an upgrade): stop the API, the
//!   supervisor, the agent (without deregistering), the stats writer, the
//!   lease renewals (without revoking) and the reflector, close the store,
//!   and keep serving DNS, the proxy and the mesh from the last snapshot
//!   while the successor starts. Its SIGTERM then stops accepting and
//!   drains, and leaves the keys and pier0 to the successor.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use pier_model::{Cidr, Name, Node};
use pier_store::alloc::AllocConfig;
use pier_store::lease::LeaseKeeper;
use pier_store::reflector::{HoldPolicy, Reflector};
use pier_store::{Store, Ttl};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::config::{Config, StoreUrl, store_url};
use super::fdpass::Request;
use super::sockets::Sockets;
use super::{StoreRefused, default_addr, now_ms};

/// The longest a new worker's mesh listener waits for its agent's first
/// view of the endpoints it may relay to (see `start_data_plane`).
const LOCAL_VIEW_WAIT: Duration = Duration::from_secs(5);

/// The control plane: what talks to the store. A handoff stops all of it.
struct Control {
    store: Arc<dyn Store>,
    lease: LeaseKeeper,
    lease_cancel: CancellationToken,
    reflector: Reflector,
    reflector_cancel: CancellationToken,
    /// The watch relay this agent serves (`[relay]`).
    relay: Option<super::relay::Serving>,
}

/// The tasks a handoff stops, with their tokens.
struct Stoppable {
    cancel: CancellationToken,
    done: JoinHandle<()>,
}

/// The data plane's tokens: stopped last, after the drain.
struct DataPlane {
    dns: CancellationToken,
    mesh: CancellationToken,
    proxy: CancellationToken,
    proxy_ready: watch::Receiver<bool>,
    /// The mesh listener accepts (true at once without a mesh).
    mesh_accepting: watch::Receiver<bool>,
    problems: watch::Receiver<Arc<pier_proxy::Problems>>,
    stats: watch::Receiver<Arc<pier_proxy::StatsMap>>,
    mesh_port: u16,
}

pub(super) async fn run(mut cfg: Config, sockets: Sockets) -> Result<()> {
    let sockets = Arc::new(sockets);
    let root = CancellationToken::new();
    let handoff = CancellationToken::new();
    let tasks = TaskTracker::new();
    let node_name = cfg.node_name().map_err(|e| anyhow::anyhow!(e.0))?;
    prepare_data_dir(&mut cfg)?;
    let cidr = cfg.network.service_cidr;
    let alloc = AllocConfig {
        service_cidr: cidr,
        service_cidr6: cfg.network.service_cidr6,
        node_port_min: cfg.network.node_port_min,
        node_port_max: cfg.network.node_port_max,
    };
    let mut registry = Registry::with_prefix("pier");
    watch_signals(&root, &handoff, sockets.has_keeper());
    let orphan = Arc::new(super::orphan::Orphan {
        path: super::orphan::socket_path(&cfg.network.data_dir),
        root: root.clone(),
        handoff: handoff.clone(),
        listening: Default::default(),
    });
    if sockets.has_keeper() {
        sockets
            .start(orphan.clone())
            .context("reading the keeper's socket")?;
    }

    // The API socket first of the listeners, so that a taken port fails
    // fast (the keeper may hold it already).
    let api_listener = sockets
        .tcp(cfg.api.listen, || {
            std::net::TcpListener::bind(cfg.api.listen)
        })
        .and_then(tokio::net::TcpListener::from_std)
        .with_context(|| {
            format!(
                "binding the API on {} (is another pier agent running?)",
                cfg.api.listen
            )
        })?;

    let mut ctl = start_control(&cfg, &node_name, &root, &sockets, &mut registry).await?;
    // The data plane serves the synced snapshot from its first accept: a
    // successor (upgrade, restart) never answers from an empty one.
    tokio::select! {
        _ = ctl.reflector.synced() => {}
        _ = root.cancelled() => anyhow::bail!("stopped before the store was read"),
    }
    // The agent's container networks (for the DNS ACL) and its ready
    // endpoints (all the mesh relays to).
    let (networks_tx, networks_rx) = watch::channel(Vec::<Cidr>::new());
    let (local_targets_tx, local_targets_rx) =
        watch::channel(Arc::new(pier_proxy::mesh::LocalTargets::new()));
    let dns_vip = alloc.dns_vip().filter(|_| cfg.network.serve_dns_vip);
    let dp = start_data_plane(
        &cfg,
        &node_name,
        &ctl,
        &sockets,
        &tasks,
        &mut registry,
        dns_vip,
        networks_rx,
        local_targets_rx,
    )
    .await?;
    let node_addr = cfg.node.addr.unwrap_or_else(default_addr);
    // Static endpoints given by name are looked up where DNS forwards.
    let names = pier_agent::NameLookup::new(
        pier_dns::lookup::Resolver::from_config(&cfg.dns),
        &mut registry,
    );
    let agent = start_agent(
        &cfg,
        &node_name,
        node_addr,
        dp.mesh_port,
        &ctl,
        &alloc,
        networks_tx,
        local_targets_tx,
        names,
        &handoff,
    );
    let supervisor = start_supervisor(&cfg, &node_name, &ctl)?;
    let stats = {
        let cancel = CancellationToken::new();
        let done = tokio::spawn(pier_agent::write_stats(
            ctl.store.clone(),
            node_name.clone(),
            dp.stats.clone(),
            ctl.lease.subscribe(),
            cancel.clone(),
        ));
        Stoppable { cancel, done }
    };
    let api = start_api(
        &cfg,
        &node_name,
        node_addr,
        &ctl,
        &dp,
        alloc,
        registry,
        api_listener,
    );
    info!(addr = %cfg.api.listen, node = %node_name, "pier agent running");
    let mut proxy_ready = dp.proxy_ready.clone();
    let mut mesh_accepting = dp.mesh_accepting.clone();
    tokio::select! {
        r = async {
            proxy_ready.wait_for(|r| *r).await?;
            mesh_accepting.wait_for(|r| *r).await.map(|_| ())
        } => if r.is_ok() {
            sockets.notify(Request::Ready);
        },
        _ = root.cancelled() => {}
    }

    tokio::select! {
        _ = root.cancelled() => {
            orphan.leave();
            shutdown(&cfg, ctl, [api, supervisor, stats], agent, &dp, &tasks).await;
            return Ok(());
        }
        _ = handoff.cancelled() => {}
    }
    // The watch relay serves on, as the data plane does, until the
    // successor serves: its clients then move to the successor's relay
    // (synced before it said READY) instead of to etcd meanwhile.
    let relay = ctl.relay.take();
    hand_off(ctl, [api, supervisor, stats], agent).await;
    sockets.notify(Request::Released);
    root.cancelled().await;
    info!("successor serving: stopping accepting and draining");
    if let Some(r) = relay {
        r.stop().await;
    }
    stop_data_plane(&dp, &tasks).await;
    info!("pier agent stopped (handed off)");
    Ok(())
}

/// The data dir (0700, or 0710 with [api] token_group) and the API token
/// in it, made on first start; before anything is bound.
fn prepare_data_dir(cfg: &mut Config) -> Result<()> {
    use pier_api::token;
    let gid = match &cfg.api.token_group {
        Some(g) => Some(token::resolve_group(g).map_err(|e| anyhow::anyhow!(e))?),
        None => None,
    };
    let dir = &cfg.network.data_dir;
    token::prepare_data_dir(dir, gid).map_err(|e| anyhow::anyhow!(e))?;
    if cfg.api.token.is_none() && !cfg.api.insecure_no_auth {
        let t = token::ensure(dir, gid).map_err(|e| anyhow::anyhow!(e))?;
        info!(path = %token::token_path(dir).display(), "API token ready; the CLI on this host reads it");
        cfg.api.token = Some(t);
    }
    Ok(())
}

/// SIGTERM/SIGINT cancel `root`; under a keeper, SIGUSR2 cancels
/// `handoff`.
fn watch_signals(root: &CancellationToken, handoff: &CancellationToken, keeper: bool) {
    let root = root.clone();
    tokio::spawn(async move {
        super::wait_signal().await;
        info!("shutdown requested");
        root.cancel();
    });
    if !keeper {
        return;
    }
    let handoff = handoff.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::user_defined2()) {
            Ok(mut s) => {
                s.recv().await;
                info!("handing off to a successor (upgrade)");
                handoff.cancel();
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGUSR2; upgrades will not hand off"),
        }
    });
}

async fn open_store(cfg: &Config, cancel: &CancellationToken) -> Result<Arc<dyn Store>> {
    match store_url(&cfg.store.url).map_err(|e| anyhow::anyhow!(e.0))? {
        StoreUrl::Embedded => {
            let dir = cfg.network.data_dir.join("store");
            // A predecessor handing off closes it within moments.
            let mut tries = 0;
            loop {
                match pier_store::EmbeddedStore::open(&dir) {
                    Ok(s) => {
                        info!(dir = %dir.display(), "using the embedded store");
                        return Ok(Arc::new(s));
                    }
                    Err(e)
                        if tries < 50 && std::env::var_os(super::keeper::WORKER_ENV).is_some() =>
                    {
                        tries += 1;
                        if tries == 1 {
                            info!(error = %e, "embedded store busy; waiting for the predecessor to close it");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("opening the embedded store under {}", dir.display())
                        });
                    }
                }
            }
        }
        StoreUrl::Etcd(eps) => {
            let security = cfg.etcd_security().map_err(|e| StoreRefused(e.0))?;
            let mut delay = Duration::from_millis(200);
            loop {
                // Agents start on different members (by node name), so that
                // a cluster's watches and keepalives are not all on the first.
                let spread = cfg.node.name.as_deref().unwrap_or_default();
                match pier_store::EtcdStore::connect_spread(&eps, &security, spread).await {
                    Ok(s) => {
                        info!(
                            endpoints = ?eps,
                            tls = security.tls.is_some(),
                            user = security.user.as_ref().map(|u| u.name()),
                            "connected to etcd"
                        );
                        return Ok(Arc::new(s));
                    }
                    // Refused, not unreachable: say what to fix and stop.
                    Err(pier_store::StoreError::Invalid(m)) => {
                        return Err(StoreRefused(format!(
                            "{m} (store.url, store.ca/cert/key, store.user/password_file)"
                        ))
                        .into());
                    }
                    Err(e) => {
                        let hint = if security.tls.is_none() {
                            " (if etcd serves TLS, write store.url as etcds://HOST:PORT and set store.ca)"
                        } else {
                            ""
                        };
                        warn!(endpoints = ?eps, error = %e, "etcd not reachable yet; retrying{hint}");
                        tokio::select! {
                            _ = cancel.cancelled() => anyhow::bail!("cancelled while connecting to etcd {eps:?}: {e}"),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

/// Store (through watch relays, or serving one, as configured), node
/// lease, reflector.
async fn start_control(
    cfg: &Config,
    node: &Name,
    root: &CancellationToken,
    sockets: &Sockets,
    registry: &mut Registry,
) -> Result<Control> {
    let store = open_store(cfg, root).await?;
    let (store, relay) = super::relay::wrap_store(cfg, node, store, sockets, registry)?;
    let ttl = Ttl::from_secs(cfg.store.lease_ttl_secs)?;
    let lease_cancel = CancellationToken::new();
    let lease = LeaseKeeper::start(store.clone(), ttl, lease_cancel.clone())
        .await
        .context("granting the node lease")?;
    let reflector_cancel = CancellationToken::new();
    let reflector = Reflector::spawn_with_hold(
        store.clone(),
        reflector_cancel.clone(),
        lease.health(),
        HoldPolicy::for_ttl(ttl),
        node,
    );
    Ok(Control {
        store,
        lease,
        lease_cancel,
        reflector,
        reflector_cancel,
        relay,
    })
}

/// A DNS address's UDP socket and TCP listener, through the keeper.
fn bind_dns(
    sockets: &Sockets,
    addrs: &[SocketAddr],
) -> Result<(Vec<tokio::net::UdpSocket>, Vec<tokio::net::TcpListener>)> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for a in addrs {
        udp.push(
            sockets
                .udp(*a, || std::net::UdpSocket::bind(a))
                .and_then(tokio::net::UdpSocket::from_std)
                .map_err(|e| {
                    let what = dns_bind_error(a, "udp", &e);
                    anyhow::Error::new(e).context(what)
                })?,
        );
        tcp.push(
            sockets
                .tcp(*a, || std::net::TcpListener::bind(a))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| {
                    let what = dns_bind_error(a, "tcp", &e);
                    anyhow::Error::new(e).context(what)
                })?,
        );
    }
    Ok((udp, tcp))
}

/// What failed when DNS could not bind `a`, and for a port below 1024
/// refused for want of privilege (an agent run without root, as
/// `--unprivileged` allows) the way round it.
fn dns_bind_error(a: &SocketAddr, proto: &str, e: &std::io::Error) -> String {
    let mut s = format!("binding DNS on {proto} {a}");
    if e.kind() == std::io::ErrorKind::PermissionDenied && a.port() < 1024 {
        s.push_str(
            " (a port below 1024 needs root or CAP_NET_BIND_SERVICE; without them, serve DNS on a high port instead of the DNS VIP: [network] serve_dns_vip = false and dns_listen = [\"127.0.0.1:5353\"] in the config)",
        );
    }
    s
}

/// The service CIDRs pier0 holds unreachable routes for: the IPv4 one and,
/// dual stack, the IPv6 one.
fn service_cidrs(cfg: &Config) -> Vec<Cidr> {
    std::iter::once(cfg.network.service_cidr)
        .chain(cfg.network.service_cidr6)
        .collect()
}

/// Waits for the agent's first complete local view (Docker listed, the
/// store synced), at most [`LOCAL_VIEW_WAIT`]; `false` when cancelled
/// first.
async fn first_local_view(
    view: &mut watch::Receiver<Arc<pier_proxy::mesh::LocalTargets>>,
    cancel: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = tokio::time::timeout(LOCAL_VIEW_WAIT, view.changed()) => true,
        _ = cancel.cancelled() => false,
    }
}

/// pier0, DNS, the mesh listener and the proxy.
#[allow(clippy::too_many_arguments)]
async fn start_data_plane(
    cfg: &Config,
    node_name: &Name,
    ctl: &Control,
    sockets: &Arc<Sockets>,
    tasks: &TaskTracker,
    registry: &mut Registry,
    dns_vip: Option<IpAddr>,
    networks_rx: watch::Receiver<Vec<Cidr>>,
    local_targets_rx: watch::Receiver<Arc<pier_proxy::mesh::LocalTargets>>,
) -> Result<DataPlane> {
    let cidr = cfg.network.service_cidr;
    let snapshot = ctl.reflector.subscribe();
    // pier0 and its addresses, before DNS binds the DNS VIP on it.
    pier_proxy::setup_iface(
        &cfg.proxy,
        &service_cidrs(cfg),
        &dns_vip.into_iter().collect::<Vec<_>>(),
    )
    .await
    .context("setting up the pier0 interface (run as root, or pass --unprivileged)")?;

    // DNS.
    let mut dns_addrs: Vec<SocketAddr> = cfg.network.dns_listen.clone();
    dns_addrs.extend(dns_vip.map(|v| SocketAddr::new(v, 53)));
    let dns = CancellationToken::new();
    if !dns_addrs.is_empty() {
        let (udp, tcp) = bind_dns(sockets, &dns_addrs)?;
        let server =
            pier_dns::DnsServer::new(cfg.dns.clone(), snapshot.clone(), networks_rx, registry)
                .context("starting DNS")?;
        info!(addrs = ?dns_addrs, "DNS listening");
        let c = dns.clone();
        let mut first_view = local_targets_rx.clone();
        tasks.spawn(async move {
            // The ACL answers containers on the networks the agent lists
            // from Docker, so DNS reads its sockets once the agent has
            // announced its first complete view (Docker listed, networks
            // published; bounded by LOCAL_VIEW_WAIT, should Docker not
            // answer). Until then a successor's queries are answered by the
            // old worker (an upgrade, an adoption) or wait in the socket's
            // buffer (a crash), instead of being REFUSED to every container.
            if !first_local_view(&mut first_view, &c).await {
                return;
            }
            if let Err(e) = server.serve(udp, tcp, c).await {
                error!(error = %e, "DNS server stopped");
            }
        });
    }

    // Mesh.
    let mut mesh_connector = None;
    let mut mesh_port = 0u16;
    let mesh = CancellationToken::new();
    let (mesh_accepting_tx, mesh_accepting) = watch::channel(cfg.mesh.is_none());
    if let Some(mc) = &cfg.mesh {
        let mut first_view = local_targets_rx.clone();
        let server = pier_proxy::mesh::MeshServer::new(
            mc,
            node_name.clone(),
            snapshot.clone(),
            local_targets_rx,
            registry,
        )
        .context("loading the mesh certificates")?;
        let listener = sockets
            .tcp(mc.listen, || std::net::TcpListener::bind(mc.listen))
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("binding the mesh on {}", mc.listen))?;
        mesh_port = listener.local_addr()?.port();
        mesh_connector = Some(
            pier_proxy::mesh::MeshConnector::new(mc, node_name.clone(), registry)
                .context("loading the mesh client certificate")?,
        );
        let c = mesh.clone();
        tasks.spawn(async move {
            // The mesh relays only to what this worker's agent found ready in
            // its own Docker, so it accepts once the agent has announced its
            // first complete view (bounded by LOCAL_VIEW_WAIT, should Docker
            // or the store not answer). Until then a successor's connections
            // are taken by the old worker (an upgrade) or wait in the
            // keeper's backlog (a crash), instead of being refused as not in
            // the local view.
            if !first_local_view(&mut first_view, &c).await {
                return;
            }
            mesh_accepting_tx.send_replace(true);
            if let Err(e) = server.serve(listener, c).await {
                error!(error = %e, "mesh listener stopped");
            }
        });
    }

    // Proxy.
    let proxy = CancellationToken::new();
    let server = pier_proxy::Proxy::new(
        pier_proxy::ProxyConfig {
            direct_allow: cfg.network.static_endpoint_allow.clone(),
            ..cfg.proxy.clone()
        },
        node_name.clone(),
        cidr,
        snapshot,
        mesh_connector,
        registry,
    )
    .context("starting the proxy")?
    .with_service_cidr6(cfg.network.service_cidr6)
    .with_listener_source(sockets.clone());
    let dp = DataPlane {
        dns,
        mesh,
        proxy: proxy.clone(),
        proxy_ready: server.ready(),
        mesh_accepting,
        problems: server.problems(),
        stats: server.stats(),
        mesh_port,
    };
    tasks.spawn(async move {
        if let Err(e) = server.run(proxy).await {
            error!(error = %e, "proxy stopped");
        }
    });
    Ok(dp)
}

#[allow(clippy::too_many_arguments)]
fn start_agent(
    cfg: &Config,
    node_name: &Name,
    node_addr: IpAddr,
    mesh_port: u16,
    ctl: &Control,
    alloc: &AllocConfig,
    networks: watch::Sender<Vec<Cidr>>,
    local_targets: watch::Sender<Arc<pier_proxy::mesh::LocalTargets>>,
    names: pier_agent::NameLookup,
    handoff: &CancellationToken,
) -> Stoppable {
    let dns_vip = alloc.dns_vip();
    let node = Node {
        name: node_name.clone(),
        addr: node_addr,
        mesh_port,
        dns_addr: if cfg.network.serve_dns_vip {
            dns_vip
        } else {
            None
        },
        labels: cfg.node.labels.clone(),
        capacity: cfg.node.capacity,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: now_ms(),
        refused: Vec::new(),
        runtime_down_since: None,
    };
    let domain = cfg.dns.domain.trim_end_matches('.').to_owned();
    let ctx = pier_agent::AgentContext {
        node,
        store: ctl.store.clone(),
        lease: ctl.lease.subscribe(),
        snapshot: ctl.reflector.subscribe(),
        alloc: alloc.clone(),
        // As Kubernetes: a pod finds `db` in its own namespace (`default.`
        // becomes the pod's namespace, see `dns_search_for`), `db.other`
        // in another.
        dns_search: vec![
            format!("{}.svc.{domain}", pier_model::DEFAULT_NAMESPACE),
            format!("svc.{domain}"),
            domain.clone(),
        ],
        networks,
        local_targets,
        static_allow: cfg.network.static_endpoint_allow.clone(),
        names,
    };
    let cancel = CancellationToken::new();
    let (c, h) = (cancel.clone(), handoff.clone());
    let cfg_agent = cfg.agent.clone();
    let done = tokio::spawn(async move {
        if let Err(e) = pier_agent::run_with_handoff(cfg_agent, ctx, c, h).await {
            error!(error = %e, "agent stopped");
        }
    });
    Stoppable { cancel, done }
}

/// Any agent can run it; exactly one leads.
fn start_supervisor(cfg: &Config, node_name: &Name, ctl: &Control) -> Result<Stoppable> {
    let supervisor = pier_supervisor::Supervisor::new(
        cfg.supervisor.clone(),
        node_name.clone(),
        ctl.store.clone(),
        ctl.reflector.subscribe(),
    )
    .context("starting the supervisor")?;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let done = tokio::spawn(async move {
        if let Err(e) = supervisor.run(c).await {
            error!(error = %e, "supervisor stopped");
        }
    });
    Ok(Stoppable { cancel, done })
}

#[allow(clippy::too_many_arguments)]
fn start_api(
    cfg: &Config,
    node_name: &Name,
    node_addr: IpAddr,
    ctl: &Control,
    dp: &DataPlane,
    alloc: AllocConfig,
    registry: Registry,
    listener: tokio::net::TcpListener,
) -> Stoppable {
    let (store_ready_tx, store_ready) = watch::channel(false);
    // The reflector synced before the data plane started.
    store_ready_tx.send_replace(true);
    let dns_ready = watch::channel(true).1;
    let state = pier_api::ApiState {
        store: ctl.store.clone(),
        snapshot: ctl.reflector.subscribe(),
        alloc,
        node: node_name.clone(),
        registry: Arc::new(registry),
        readiness: vec![
            ("store", store_ready),
            ("dns", dns_ready),
            ("proxy", dp.proxy_ready.clone()),
        ],
        // The supervisor's reports reach every agent's API through the
        // store (`problems/…` keys in the snapshot); the proxy's are local.
        problems: vec![dp.problems.clone()],
        host_names: vec![node_name.to_string(), node_addr.to_string()],
        static_endpoint_allow: cfg.network.static_endpoint_allow.clone(),
        dns_domain: cfg.dns.domain.trim_end_matches('.').to_owned(),
    };
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let api_cfg = cfg.api.clone();
    let done = tokio::spawn(async move {
        // The sender lives as long as the API: /readyz reads it.
        let _keep = store_ready_tx;
        if let Err(e) = pier_api::serve(api_cfg, listener, state, c).await {
            error!(error = %e, "API stopped");
        }
    });
    Stoppable { cancel, done }
}

/// Cancels each and waits for it, up to `limit` for all.
async fn stop_all(what: impl IntoIterator<Item = Stoppable>, limit: Duration) {
    let mut handles = Vec::new();
    for s in what {
        s.cancel.cancel();
        handles.push(s.done);
    }
    let all = async {
        for h in handles {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        warn!("some tasks did not stop within {} s", limit.as_secs());
    }
}

/// Shutdown in three steps: stop accepting API requests and stop leading;
/// deregister; drain the data plane, stop hard, remove pier0.
async fn shutdown(
    cfg: &Config,
    ctl: Control,
    api_sup_stats: [Stoppable; 3],
    agent: Stoppable,
    dp: &DataPlane,
    tasks: &TaskTracker,
) {
    // 1. The API, the supervisor and the stats writer.
    stop_all(api_sup_stats, Duration::from_secs(5)).await;
    // 2. Deregister: the agent deletes this node's endpoints; then the lease
    //    goes, taking the node record and pod statuses with it. Containers
    //    keep running.
    agent.cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(5), agent.done)
        .await
        .is_err()
    {
        warn!("agent did not finish deregistering within 5 s");
    }
    if let Err(e) = ctl.lease.revoke().await {
        warn!(error = %e, "revoking the node lease failed; it will expire after its TTL");
    }
    ctl.lease_cancel.cancel();
    // 3. The proxy drains its connections up to its own deadline.
    ctl.reflector_cancel.cancel();
    if let Some(r) = ctl.relay {
        r.stop().await;
    }
    stop_data_plane(dp, tasks).await;
    if let Err(e) = pier_proxy::teardown_iface(&cfg.proxy, &service_cidrs(cfg)).await {
        warn!(error = %e, "removing the pier0 interface failed");
    }
    info!("pier agent stopped");
}

/// Stops accepting (the listening sockets stay open in the keeper and the
/// successor), lets connections drain, then stops hard.
async fn stop_data_plane(dp: &DataPlane, tasks: &TaskTracker) {
    dp.proxy.cancel();
    dp.mesh.cancel();
    dp.dns.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within 10 s; stopping hard");
    }
}

/// Stops everything that talks to the store, without deregistering or
/// revoking, and closes the store, so a successor can open it.
async fn hand_off(ctl: Control, api_sup_stats: [Stoppable; 3], agent: Stoppable) {
    stop_all(api_sup_stats, Duration::from_secs(5)).await;
    // The handoff token is already cancelled: the agent keeps its keys.
    stop_all([agent], Duration::from_secs(5)).await;
    ctl.lease_cancel.cancel();
    ctl.reflector_cancel.cancel();
    let Control {
        store,
        lease,
        reflector,
        ..
    } = ctl;
    drop(lease);
    drop(reflector);
    // Wait for the last other holder (the reflector's and the lease's
    // tasks, API connections) to let go; the store closes with the last.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if Arc::strong_count(&store) > 1 {
        warn!("the store is still in use after 5 s; the successor waits for it");
    }
    drop(store);
    info!("store closed; serving from the last snapshot until the successor is ready");
}

#[cfg(test)]
mod tests {
    use super::dns_bind_error;

    /// A non-root agent refused port 53 is told how to serve DNS anyway;
    /// other failures are named as they are.
    #[test]
    fn dns_bind_error_says_how_to_run_without_root() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let low = "127.213.0.10:53".parse().unwrap();
        let s = dns_bind_error(&low, "udp", &denied);
        assert!(
            s.starts_with("binding DNS on udp 127.213.0.10:53 (")
                && s.contains("CAP_NET_BIND_SERVICE")
                && s.contains("serve_dns_vip = false")
                && s.contains("dns_listen"),
            "{s}"
        );
        let high = "127.0.0.1:5353".parse().unwrap();
        assert_eq!(
            dns_bind_error(&high, "tcp", &denied),
            "binding DNS on tcp 127.0.0.1:5353"
        );
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert_eq!(
            dns_bind_error(&low, "udp", &in_use),
            "binding DNS on udp 127.213.0.10:53"
        );
    }
}
