//! Test harness: a per-test Docker network and run id with cleanup, a real
//! store with a lease keeper and a reflector, and an in-process agent.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pier_agent::{AgentConfig, AgentContext, AgentError};
use pier_model::{Cidr, Endpoint, Name, Node, Snapshot};
use pier_store::lease::LeaseKeeper;
use pier_store::reflector::Reflector;
use pier_store::{Store, Ttl};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const IMAGE: &str = "pier-test/httpd:latest";

/// Every log line of this test process, so tests can assert on warnings.
pub fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

struct LogWriter;
impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = logs().lock() {
            l.extend_from_slice(buf);
        }
        if std::env::var_os("PIER_TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("PIER_TEST_LOG")
                    .unwrap_or_else(|_| "info,pier_agent=debug".into()),
            )
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

pub fn log_text() -> String {
    logs()
        .lock()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default()
}

/// A unique id per call in this process.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{}x{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        nanos % 100_000
    )
}

pub fn docker_at(host: Option<&str>, args: &[&str]) -> Result<Output> {
    let mut c = Command::new("docker");
    if let Some(h) = host {
        c.args(["-H", h]);
    }
    let out = c
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running docker")?;
    Ok(out)
}

pub fn docker_ok_at(host: Option<&str>, args: &[&str]) -> Result<String> {
    let out = docker_at(host, args)?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Build the test image if it is missing (same recipe as tests/images).
pub fn ensure_image() -> Result<()> {
    static ONCE: OnceLock<Result<(), String>> = OnceLock::new();
    ONCE.get_or_init(|| {
        if docker_at(None, &["image", "inspect", IMAGE])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            return Ok(());
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/images/build.sh");
        match Command::new(script).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{script} failed: {s}")),
            Err(e) => Err(format!("{script}: {e}")),
        }
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A run id, an `--internal` network, and cleanup of everything labelled
/// with the run id, on a dockerd (`host` None is the shared one).
#[derive(Debug)]
pub struct TestDocker {
    pub run: String,
    pub net: String,
    pub host: Option<String>,
}

impl TestDocker {
    pub fn new() -> Result<TestDocker> {
        Self::on(None)
    }

    pub fn on(host: Option<String>) -> Result<TestDocker> {
        ensure_image()?;
        let run = unique("pa");
        let net = format!("pier-{run}");
        let d = TestDocker { run, net, host };
        d.ok(&[
            "network",
            "create",
            "--internal",
            "--label",
            &format!("pier.test-run={}", d.run),
            &d.net,
        ])?;
        Ok(d)
    }

    pub fn ok(&self, args: &[&str]) -> Result<String> {
        docker_ok_at(self.host.as_deref(), args)
    }

    pub fn run_label(&self) -> (String, String) {
        ("pier.test-run".into(), self.run.clone())
    }

    pub fn filter(&self) -> pier_model::Labels {
        [self.run_label()].into_iter().collect()
    }

    /// `docker run -d` of the test image with these labels on the test network.
    pub fn run_container(&self, labels: &[(&str, &str)], extra: &[&str]) -> Result<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--pull".into(),
            "never".into(),
            "--network".into(),
            self.net.clone(),
            "--label".into(),
            format!("pier.test-run={}", self.run),
        ];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(IMAGE.into());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&a)
    }

    pub fn ip(&self, id: &str) -> Result<IpAddr> {
        let s = self.ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            id,
        ])?;
        s.split_whitespace()
            .next()
            .context("container has no IP")?
            .parse()
            .context("parsing the container IP")
    }

    pub fn labelled(&self) -> Vec<String> {
        self.ok(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=pier.test-run={}", self.run),
        ])
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
    }
}

impl Drop for TestDocker {
    fn drop(&mut self) {
        let ids = self.labelled();
        if !ids.is_empty() {
            let mut a = vec!["rm", "-f"];
            a.extend(ids.iter().map(String::as_str));
            let _ = docker_at(self.host.as_deref(), &a);
        }
        let _ = docker_at(self.host.as_deref(), &["network", "rm", &self.net]);
    }
}

pub fn node(name: &str) -> Node {
    Node {
        name: Name::new(name).expect("valid node name"),
        addr: "127.0.0.1".parse().expect("ip"),
        mesh_port: 0,
        dns_addr: None,
        labels: Default::default(),
        capacity: Default::default(),
        version: "test".into(),
        started_at: 0,
        refused: Vec::new(),
        runtime_down_since: None,
    }
}

pub fn alloc() -> pier_store::alloc::AllocConfig {
    pier_store::alloc::AllocConfig {
        service_cidr: "127.77.0.0/16".parse::<Cidr>().expect("cidr"),
        service_cidr6: None,
        node_port_min: 30000,
        node_port_max: 30100,
    }
}

pub fn agent_config(d: &TestDocker) -> AgentConfig {
    AgentConfig {
        resync_interval_ms: 2_000,
        filter_labels: d.filter(),
        pod_labels: d.filter(),
        pod_network: Some(d.net.clone()),
        ..AgentConfig::default()
    }
}

/// A store with a lease keeper and a reflector (the "other" snapshot).
pub struct StoreEnv {
    pub store: Arc<dyn Store>,
    pub keeper: LeaseKeeper,
    pub keeper_cancel: CancellationToken,
    pub reflector: Reflector,
    pub reflector_cancel: CancellationToken,
    pub _dir: Option<tempfile::TempDir>,
}

impl StoreEnv {
    pub async fn embedded(ttl: u32) -> Result<StoreEnv> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> =
            Arc::new(pier_store::EmbeddedStore::open(&dir.path().join("store"))?);
        Self::with(store, ttl, Some(dir)).await
    }

    pub async fn with(
        store: Arc<dyn Store>,
        ttl: u32,
        dir: Option<tempfile::TempDir>,
    ) -> Result<StoreEnv> {
        let keeper_cancel = CancellationToken::new();
        let keeper =
            LeaseKeeper::start(store.clone(), Ttl::from_secs(ttl)?, keeper_cancel.clone()).await?;
        let reflector_cancel = CancellationToken::new();
        let reflector = Reflector::spawn(store.clone(), reflector_cancel.clone());
        tokio::time::timeout(Duration::from_secs(10), reflector.synced())
            .await
            .context("reflector did not sync")?;
        Ok(StoreEnv {
            store,
            keeper,
            keeper_cancel,
            reflector,
            reflector_cancel,
            _dir: dir,
        })
    }

    pub fn snapshot(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.reflector.subscribe()
    }
}

impl Drop for StoreEnv {
    fn drop(&mut self) {
        self.keeper_cancel.cancel();
        self.reflector_cancel.cancel();
    }
}

thread_local! {
    /// `[network] static_endpoint_allow` for the agents this thread starts
    /// next (see [`allow_static`]).
    static STATIC_ALLOW: std::cell::RefCell<Vec<Cidr>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Let the agents this thread starts from now on register static endpoints
/// in `cidrs` (as `[network] static_endpoint_allow` does).
pub fn allow_static(cidrs: &[&str]) {
    STATIC_ALLOW
        .with(|a| *a.borrow_mut() = cidrs.iter().map(|c| c.parse().expect("CIDR")).collect());
}

/// An agent running in this process.
pub struct InProcAgent {
    pub cancel: CancellationToken,
    pub handle: Option<JoinHandle<Result<(), AgentError>>>,
    pub networks: watch::Receiver<Vec<Cidr>>,
}

impl InProcAgent {
    pub fn start(env: &StoreEnv, node_name: &str, cfg: AgentConfig) -> InProcAgent {
        Self::start_with(env, node_name, cfg, env.keeper.subscribe())
    }

    pub fn start_with(
        env: &StoreEnv,
        node_name: &str,
        cfg: AgentConfig,
        lease: watch::Receiver<Option<pier_store::LeaseId>>,
    ) -> InProcAgent {
        let (ntx, nrx) = watch::channel(Vec::new());
        let ctx = AgentContext {
            node: node(node_name),
            store: env.store.clone(),
            lease,
            snapshot: env.snapshot(),
            alloc: alloc(),
            dns_search: vec![
                "default.svc.pier.internal".into(),
                "svc.pier.internal".into(),
            ],
            networks: ntx,
            local_targets: watch::channel(Default::default()).0,
            static_allow: STATIC_ALLOW.with(|a| a.borrow().clone()),
            // No test here gives a static endpoint by name.
            names: pier_agent::NameLookup::new(
                pier_dns::lookup::Resolver::new(Vec::new(), std::time::Duration::from_secs(1)),
                &mut Default::default(),
            ),
        };
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(pier_agent::run(cfg, ctx, cancel.clone()));
        InProcAgent {
            cancel,
            handle: Some(handle),
            networks: nrx,
        }
    }

    /// Graceful stop; returns the agent's result.
    pub async fn stop(mut self) -> Result<()> {
        self.cancel.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .context("agent did not stop")??
                .context("agent failed")?;
        }
        Ok(())
    }

    /// A crash: the task is aborted with no deregistration.
    /// Waits until the task is gone before `Drop` fires `cancel`: a task
    /// still being polled on another worker would otherwise see the cancel
    /// and begin its graceful deregistration.
    pub async fn abort(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for InProcAgent {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Wait until `f` returns `Some` on the current snapshot, up to `limit`.
pub async fn wait_snap<T>(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&Snapshot) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f(&rx.borrow_and_update()) {
            return Ok(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed()).await;
    }
}

/// The endpoints of one service in a snapshot, by id.
pub fn endpoints(s: &Snapshot, svc: &str) -> BTreeMap<String, Endpoint> {
    let (Ok(ns), Ok(name)) = (pier_model::Namespace::new("default"), Name::new(svc)) else {
        return BTreeMap::new();
    };
    s.endpoints_of(&ns, &name)
        .map(|e| (e.id.to_string(), (**e).clone()))
        .collect()
}

pub fn short(id: &str) -> String {
    id[..12].to_owned()
}

/// Probe `ip:port` with a TCP connect until it answers (our own check, the
/// same as the agent's), returning when it first passed.
pub async fn tcp_until_open(ip: IpAddr, port: u16, limit: Duration) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect((ip, port)),
        )
        .await
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{ip}:{port} never answered");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
