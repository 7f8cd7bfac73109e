//! `pier agent`: load and validate config, then wire every subsystem under
//! one root cancellation token.
//!
//! Start order: store → node lease → reflector → pier0 (so the DNS VIP can be
//! bound) → DNS → mesh → proxy → agent → supervisor → API. Shutdown is the
//! reverse in three steps: stop accepting (API), deregister (the agent
//! deletes its endpoints, the lease is revoked), then let proxied
//! connections drain for a grace period before stopping hard.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use pier_model::{Cidr, Node};
use pier_store::alloc::AllocConfig;
use pier_store::{Store, Ttl};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub mod config;

use self::config::{Config, StoreUrl, store_url};

/// `pier agent` flags. Each overrides the same setting in the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Config file (TOML); see config/pier.toml for every option.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name (RFC 1123 label). Required, here or in the config.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// `embedded` (the default: one host) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// API listen address (default 127.0.0.1:7370).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<SocketAddr>,
    /// Extra DNS listen address (the DNS VIP on pier0 is served too).
    #[arg(long, value_name = "ADDR")]
    pub dns: Option<SocketAddr>,
    /// mTLS mesh listen address (needs [mesh] certificates in the config).
    #[arg(long, value_name = "ADDR")]
    pub mesh: Option<SocketAddr>,
    /// The CIDR VIPs come from (default 10.213.0.0/16).
    #[arg(long, value_name = "CIDR")]
    pub service_cidr: Option<String>,
    /// Where the embedded store and other state live (default /var/lib/pier).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's address for other hosts.
    #[arg(long, value_name = "IP")]
    pub addr: Option<IpAddr>,
    /// No privileges: no pier0, VIPs from 127.0.0.0/8 (sets the service CIDR
    /// to 127.213.0.0/16 unless given).
    #[arg(long)]
    pub unprivileged: bool,
    /// Leave pier0 and its addresses in place on shutdown.
    #[arg(long)]
    pub keep_iface: bool,
    /// Serve the API without a token (development only; loopback only;
    /// logged as a warning). By default the agent makes a token in its data
    /// dir (api-token) and the CLI on this host reads it.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// Exit code for bad config (EX_USAGE), before anything is bound.
const EXIT_CONFIG: i32 = 64;

fn build_config(args: &AgentArgs) -> Result<Config, String> {
    finish_config(apply_args(args)?)
}

/// The config `pier doctor` checks: the agent's, except that a node name
/// is not needed to check a host.
pub(crate) fn doctor_config(args: &AgentArgs) -> Result<Config, String> {
    let mut cfg = apply_args(args)?;
    if cfg.node.name.is_none() {
        cfg.node.name = Some("doctor".into());
    }
    finish_config(cfg)
}

/// The config file (or the defaults) with the flags applied.
fn apply_args(args: &AgentArgs) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.0)?,
        None => Config::default(),
    };
    if let Some(n) = &args.node {
        cfg.node.name = Some(n.clone());
    }
    if let Some(s) = &args.store {
        cfg.store.url = s.clone();
    }
    if let Some(a) = args.api {
        cfg.api.listen = a;
    }
    if let Some(d) = args.dns {
        cfg.network.dns_listen.push(d);
    }
    if let Some(a) = args.addr {
        cfg.node.addr = Some(a);
    }
    if args.unprivileged {
        cfg.proxy.manage_iface = false;
        if args.service_cidr.is_none() {
            cfg.network.service_cidr = "127.213.0.0/16".parse().expect("valid CIDR");
        }
    }
    if let Some(c) = &args.service_cidr {
        cfg.network.service_cidr = c
            .parse::<Cidr>()
            .map_err(|e| format!("--service-cidr: {e}"))?;
    }
    if let Some(d) = &args.data_dir {
        cfg.network.data_dir = d.clone();
    }
    if args.keep_iface {
        cfg.proxy.keep_iface = true;
    }
    if let Some(m) = args.mesh {
        match &mut cfg.mesh {
            Some(mc) => mc.listen = m,
            None => {
                return Err(
                    "--mesh needs a [mesh] section with ca, cert and key in the config (make them with `pier ca init` and `pier ca issue`)"
                        .into(),
                );
            }
        }
    }
    if args.insecure_no_auth {
        cfg.api.insecure_no_auth = true;
    }
    if let Ok(t) = std::env::var("PIER_TOKEN")
        && !t.is_empty()
        && cfg.api.token.is_none()
        && !cfg.api.insecure_no_auth
    {
        cfg.api.token = Some(t);
    }
    Ok(cfg)
}

/// Validates the whole config, then the mesh files.
fn finish_config(cfg: Config) -> Result<Config, String> {
    cfg.validate().map_err(|e| e.0)?;
    if !cfg.proxy.manage_iface
        && !cfg
            .network
            .service_cidr
            .contains(IpAddr::from([127, 0, 0, 1]))
        && !matches!(cfg.network.service_cidr.addr(), IpAddr::V4(a) if a.octets()[0] == 127)
    {
        return Err(format!(
            "network.service_cidr {} must lie in 127.0.0.0/8 when pier0 is not managed (--unprivileged)",
            cfg.network.service_cidr
        ));
    }
    // The files last: a missing, expired or foreign certificate, or an
    // open password file, stops the agent here, before anything is bound.
    cfg.etcd_security().map_err(|e| e.0)?;
    cfg.check_mesh().map_err(|e| e.0)?;
    Ok(cfg)
}

/// etcd refused the agent (a wrong password, a refused or untrusted
/// certificate): the config is wrong, and retrying will not help.
#[derive(Debug)]
struct StoreRefused(String);

impl std::fmt::Display for StoreRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreRefused {}

/// The source address of the default route, found without sending anything:
/// connecting a UDP socket only selects a route.
fn default_addr() -> IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Runs the agent until SIGINT/SIGTERM. Returns the process exit code.
pub async fn run(args: AgentArgs) -> i32 {
    init_tracing();
    let cfg = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pier agent: {e}");
            return EXIT_CONFIG;
        }
    };
    match run_config(cfg).await {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<StoreRefused>().is_some() => {
            error!(error = %format!("{e:#}"), "pier agent: etcd refused it");
            eprintln!("pier agent: {e:#}");
            EXIT_CONFIG
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "pier agent failed");
            eprintln!("pier agent: {e:#}");
            1
        }
    }
}

async fn open_store(cfg: &Config, cancel: &CancellationToken) -> Result<Arc<dyn Store>> {
    match store_url(&cfg.store.url).map_err(|e| anyhow::anyhow!(e.0))? {
        StoreUrl::Embedded => {
            let dir = cfg.network.data_dir.join("store");
            let s = pier_store::EmbeddedStore::open(&dir)
                .with_context(|| format!("opening the embedded store under {}", dir.display()))?;
            info!(dir = %dir.display(), "using the embedded store");
            Ok(Arc::new(s))
        }
        StoreUrl::Etcd(eps) => {
            let security = cfg.etcd_security().map_err(|e| StoreRefused(e.0))?;
            let mut delay = Duration::from_millis(200);
            loop {
                match pier_store::EtcdStore::connect_with(&eps, &security).await {
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

async fn bind_dns(
    addrs: &[SocketAddr],
) -> Result<(Vec<tokio::net::UdpSocket>, Vec<tokio::net::TcpListener>)> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for a in addrs {
        udp.push(
            tokio::net::UdpSocket::bind(a)
                .await
                .with_context(|| format!("binding DNS on udp {a}"))?,
        );
        tcp.push(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding DNS on tcp {a}"))?,
        );
    }
    Ok((udp, tcp))
}

async fn run_config(mut cfg: Config) -> Result<()> {
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    let node_name = cfg.node_name().map_err(|e| anyhow::anyhow!(e.0))?;
    // The data dir (0700, or 0710 with [api] token_group) and the API
    // token in it, made on first start; before anything is bound.
    {
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
    }
    let cidr = cfg.network.service_cidr;
    let alloc = AllocConfig {
        service_cidr: cidr,
        node_port_min: cfg.network.node_port_min,
        node_port_max: cfg.network.node_port_max,
    };
    let dns_vip = alloc.dns_vip();
    let mut registry = Registry::with_prefix("pier");

    // Signals cancel the root token.
    {
        let root = root.clone();
        tokio::spawn(async move {
            wait_signal().await;
            info!("shutdown requested");
            root.cancel();
        });
    }

    // Bind the API first of the listeners so that a taken port fails fast.
    let api_listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .with_context(|| {
            format!(
                "binding the API on {} (is another pier agent running?)",
                cfg.api.listen
            )
        })?;

    let store = open_store(&cfg, &root).await?;
    let ttl = Ttl::from_secs(cfg.store.lease_ttl_secs)?;
    let lease_cancel = CancellationToken::new();
    let lease = pier_store::lease::LeaseKeeper::start(store.clone(), ttl, lease_cancel.clone())
        .await
        .context("granting the node lease")?;

    let reflector_cancel = CancellationToken::new();
    let reflector = pier_store::reflector::Reflector::spawn_with_health(
        store.clone(),
        reflector_cancel.clone(),
        lease.health(),
    );
    let snapshot = reflector.subscribe();

    // pier0 and its addresses, before DNS binds the DNS VIP on it.
    let mut extra_addrs = Vec::new();
    if cfg.network.serve_dns_vip
        && let Some(v) = dns_vip
    {
        extra_addrs.push(v);
    }
    pier_proxy::setup_iface(&cfg.proxy, cidr, &extra_addrs)
        .await
        .context("setting up the pier0 interface (run as root, or pass --unprivileged)")?;

    let (networks_tx, networks_rx) = watch::channel(Vec::<Cidr>::new());
    // The agent's own view of its ready endpoints: all the mesh relays to.
    let (local_targets_tx, local_targets_rx) =
        watch::channel(Arc::new(pier_proxy::mesh::LocalTargets::new()));
    let (dns_ready_tx, dns_ready) = watch::channel(false);
    let (proxy_ready_tx, proxy_ready) = watch::channel(false);
    let (store_ready_tx, store_ready) = watch::channel(false);

    // DNS.
    let mut dns_addrs: Vec<SocketAddr> = cfg.network.dns_listen.clone();
    if cfg.network.serve_dns_vip
        && let Some(v) = dns_vip
    {
        dns_addrs.push(SocketAddr::new(v, 53));
    }
    let dns_cancel = root.child_token();
    if !dns_addrs.is_empty() {
        let (udp, tcp) = bind_dns(&dns_addrs).await?;
        let server = pier_dns::DnsServer::new(
            cfg.dns.clone(),
            snapshot.clone(),
            networks_rx.clone(),
            &mut registry,
        )
        .context("starting DNS")?;
        info!(addrs = ?dns_addrs, "DNS listening");
        let c = dns_cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(udp, tcp, c).await {
                error!(error = %e, "DNS server stopped");
            }
        });
    }
    let _ = dns_ready_tx.send(true);

    // Mesh.
    let mut mesh_connector = None;
    let mut mesh_port = 0u16;
    let mesh_cancel = CancellationToken::new();
    if let Some(mc) = &cfg.mesh {
        let server = pier_proxy::mesh::MeshServer::new(
            mc,
            node_name.clone(),
            snapshot.clone(),
            local_targets_rx,
            &mut registry,
        )
        .context("loading the mesh certificates")?;
        let listener = tokio::net::TcpListener::bind(mc.listen)
            .await
            .with_context(|| format!("binding the mesh on {}", mc.listen))?;
        mesh_port = listener.local_addr()?.port();
        mesh_connector = Some(
            pier_proxy::mesh::MeshConnector::new(mc, node_name.clone(), &mut registry)
                .context("loading the mesh client certificate")?,
        );
        let c = mesh_cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, c).await {
                error!(error = %e, "mesh listener stopped");
            }
        });
    }

    // Proxy.
    let proxy_cancel = CancellationToken::new();
    let proxy = pier_proxy::Proxy::new(
        pier_proxy::ProxyConfig {
            direct_allow: cfg.network.static_endpoint_allow.clone(),
            ..cfg.proxy.clone()
        },
        node_name.clone(),
        cidr,
        snapshot.clone(),
        mesh_connector,
        &mut registry,
    )
    .context("starting the proxy")?;
    let proxy_problems = proxy.problems();
    let proxy_stats = proxy.stats();
    {
        let c = proxy_cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = proxy.run(c).await {
                error!(error = %e, "proxy stopped");
            }
        });
    }
    let _ = proxy_ready_tx.send(true);

    // Agent.
    let node_addr = cfg.node.addr.unwrap_or_else(default_addr);
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
    };
    let domain = cfg.dns.domain.trim_end_matches('.').to_owned();
    let agent_cancel = CancellationToken::new();
    let agent_done = {
        let ctx = pier_agent::AgentContext {
            node,
            store: store.clone(),
            lease: lease.subscribe(),
            snapshot: snapshot.clone(),
            alloc: alloc.clone(),
            dns_search: vec![format!("svc.{domain}"), domain.clone()],
            networks: networks_tx,
            local_targets: local_targets_tx,
            static_allow: cfg.network.static_endpoint_allow.clone(),
        };
        let c = agent_cancel.clone();
        let cfg_agent = cfg.agent.clone();
        tasks.spawn(async move {
            if let Err(e) = pier_agent::run(cfg_agent, ctx, c).await {
                error!(error = %e, "agent stopped");
            }
        })
    };

    // Supervisor: any agent can run it; exactly one leads.
    let sup_cancel = root.child_token();
    let supervisor = pier_supervisor::Supervisor::new(
        cfg.supervisor.clone(),
        node_name.clone(),
        store.clone(),
        snapshot.clone(),
    )
    .context("starting the supervisor")?;
    tasks.spawn({
        let c = sup_cancel.clone();
        async move {
            if let Err(e) = supervisor.run(c).await {
                error!(error = %e, "supervisor stopped");
            }
        }
    });

    // Proxy stats → stats/ keys, under the node lease, when they change.
    {
        let (s, n, c) = (store.clone(), node_name.clone(), root.child_token());
        let lease_rx = lease.subscribe();
        tasks.spawn(write_stats(s, n, proxy_stats, lease_rx, c));
    }

    // Readiness of the store: the first full list applied.
    {
        let r = reflector.clone();
        tasks.spawn(async move {
            r.synced().await;
            let _ = store_ready_tx.send(true);
        });
    }

    // API.
    let api_cancel = CancellationToken::new();
    let state = pier_api::ApiState {
        store: store.clone(),
        snapshot: snapshot.clone(),
        alloc,
        node: node_name.clone(),
        registry: Arc::new(registry),
        readiness: vec![
            ("store", store_ready),
            ("dns", dns_ready),
            ("proxy", proxy_ready),
        ],
        // The supervisor's reports reach every agent's API through the
        // store (`problems/…` keys in the snapshot); the proxy's are local.
        problems: vec![proxy_problems],
        host_names: vec![node_name.to_string(), node_addr.to_string()],
        static_endpoint_allow: cfg.network.static_endpoint_allow.clone(),
    };
    info!(addr = %cfg.api.listen, node = %node_name, "pier agent running");
    {
        let c = api_cancel.clone();
        let api_cfg = cfg.api.clone();
        tasks.spawn(async move {
            if let Err(e) = pier_api::serve(api_cfg, api_listener, state, c).await {
                error!(error = %e, "API stopped");
            }
        });
    }

    root.cancelled().await;

    // 1. Stop accepting API requests and stop leading.
    api_cancel.cancel();
    sup_cancel.cancel();
    // 2. Deregister: the agent deletes this node's endpoints; then the lease
    //    goes, taking the node record and pod statuses with it. Containers
    //    keep running.
    agent_cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(5), agent_done)
        .await
        .is_err()
    {
        warn!("agent did not finish deregistering within 5 s");
    }
    if let Err(e) = lease.revoke().await {
        warn!(error = %e, "revoking the node lease failed; it will expire after its TTL");
    }
    lease_cancel.cancel();
    // 3. Stop the proxy (it drains its connections up to its own deadline)
    //    and everything else, then stop hard after the grace period.
    proxy_cancel.cancel();
    mesh_cancel.cancel();
    dns_cancel.cancel();
    reflector_cancel.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within 10 s; stopping hard");
    }
    if let Err(e) = pier_proxy::teardown_iface(&cfg.proxy, cidr).await {
        warn!(error = %e, "removing the pier0 interface failed");
    }
    info!("pier agent stopped");
    Ok(())
}

async fn write_stats(
    store: Arc<dyn Store>,
    node: pier_model::Name,
    mut stats: watch::Receiver<
        Arc<std::collections::BTreeMap<pier_model::ObjectKey, pier_model::Stats>>,
    >,
    lease: watch::Receiver<Option<pier_store::LeaseId>>,
    cancel: CancellationToken,
) {
    let mut last: std::collections::BTreeMap<pier_model::ObjectKey, pier_model::Stats> =
        Default::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = stats.changed() => if r.is_err() { return },
        }
        let Some(lease_id) = *lease.borrow() else {
            continue;
        };
        let cur = stats.borrow_and_update().clone();
        for ((ns, svc), st) in cur.iter() {
            if !st.worth_writing(last.get(&(ns.clone(), svc.clone()))) {
                continue;
            }
            let key = pier_model::keys::stats(ns, svc, &node);
            if let Err(e) = store
                .put(&key, pier_model::encode(st), Some(lease_id))
                .await
            {
                tracing::debug!(key = %key, error = %e, "writing proxy stats failed; will retry on the next sample");
                continue;
            }
            last.insert((ns.clone(), svc.clone()), st.clone());
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs to stderr; `PIER_LOG` (or `RUST_LOG`) sets the filter, default
/// `info`; `PIER_LOG_FORMAT=json` switches to JSON lines.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PIER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("pier agent: PIER_LOG={filter:?} does not parse ({e}); using info");
        EnvFilter::new("info")
    });
    // Colours only on a terminal: a log file or journald gets plain text.
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let r = if std::env::var("PIER_LOG_FORMAT").as_deref() == Ok("json") {
        b.json().try_init()
    } else {
        b.try_init()
    };
    if let Err(e) = r {
        eprintln!("pier agent: tracing already initialised: {e}");
    }
}
