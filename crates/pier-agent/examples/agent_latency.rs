//! Benchmark: time from Docker's `start` event to a ready endpoint visible in
//! another snapshot (a second reflector on the same store), and from `die`
//! to the endpoint's removal there, over N containers started one by one.
//!
//! ```text
//! cargo run --release -p pier-agent --example agent_latency -- [N] [--etcd]
//! ```
//!
//! Needs the shared dockerd and the `pier-test/httpd:latest` image. With
//! `--etcd` the store is a real etcd (pier_store::testing::EtcdServer),
//! otherwise the embedded store. Everything it creates carries
//! `pier.test-run=<id>` and is removed at the end.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use pier_model::{Name, Namespace, Snapshot};
use pier_store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "pier-test/httpd:latest";

fn docker(args: &[&str]) -> Result<String> {
    let o = Command::new("docker").args(args).output()?;
    if !o.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

async fn docker_async(args: &[&str]) -> Result<String> {
    let o = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await?;
    if !o.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

struct Cleanup {
    run: String,
    net: String,
}
impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(ids) = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=pier.test-run={}", self.run),
        ]) {
            let ids: Vec<&str> = ids.lines().collect();
            if !ids.is_empty() {
                let mut a = vec!["rm", "-f"];
                a.extend(ids);
                let _ = docker(&a);
            }
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

/// When each endpoint id was first seen ready, and first seen gone after
/// that, in the observer's snapshots (wall clock, ns).
#[derive(Default)]
struct Seen {
    ready_at: HashMap<String, i64>,
    gone_at: HashMap<String, i64>,
}

async fn observe(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    ns: Namespace,
    svc: Name,
    seen: Arc<Mutex<Seen>>,
) {
    loop {
        let t = now_ns();
        let ready: std::collections::HashSet<String> = rx
            .borrow_and_update()
            .endpoints_of(&ns, &svc)
            .filter(|e| e.ready)
            .map(|e| e.id.to_string())
            .collect();
        if let Ok(mut s) = seen.lock() {
            for id in &ready {
                s.ready_at.entry(id.clone()).or_insert(t);
            }
            let gone: Vec<String> = s
                .ready_at
                .keys()
                .filter(|id| !ready.contains(*id))
                .cloned()
                .collect();
            for id in gone {
                s.gone_at.entry(id).or_insert(t);
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn wait_entry(
    seen: &Arc<Mutex<Seen>>,
    limit: Duration,
    f: impl Fn(&Seen) -> Option<i64>,
) -> Result<i64> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = seen.lock().ok().and_then(|s| f(&s)) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("timed out");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if let Ok(f) = std::env::var("PIER_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_ansi(false)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(50);
    let use_etcd = args.iter().any(|a| a == "--etcd");
    let run = format!("bench{}", std::process::id());
    let net = format!("pier-{run}");
    docker(&[
        "network",
        "create",
        "--internal",
        "--label",
        &format!("pier.test-run={run}"),
        &net,
    ])?;
    let _cleanup = Cleanup {
        run: run.clone(),
        net: net.clone(),
    };

    let dir = tempfile::tempdir()?;
    let mut _etcd = None;
    let store: Arc<dyn Store> = if use_etcd {
        let e = pier_store::testing::EtcdServer::start()?;
        let s = pier_store::EtcdStore::connect(std::slice::from_ref(&e.endpoint)).await?;
        _etcd = Some(e);
        Arc::new(s)
    } else {
        Arc::new(pier_store::EmbeddedStore::open(&dir.path().join("store"))?)
    };
    let cancel = CancellationToken::new();
    let keeper = pier_store::lease::LeaseKeeper::start(
        store.clone(),
        pier_store::Ttl::from_secs(10)?,
        cancel.clone(),
    )
    .await?;
    let agent_reflector = pier_store::reflector::Reflector::spawn(store.clone(), cancel.clone());
    agent_reflector.synced().await;
    let observer = pier_store::reflector::Reflector::spawn(store.clone(), cancel.clone());
    observer.synced().await;

    let mut cfg = pier_agent::AgentConfig::default();
    cfg.filter_labels
        .insert("pier.test-run".into(), run.clone());
    let (ntx, _nrx) = watch::channel(Vec::new());
    let ctx = pier_agent::AgentContext {
        node: pier_model::Node {
            name: Name::new("bench")?,
            addr: "127.0.0.1".parse()?,
            mesh_port: 0,
            dns_addr: None,
            labels: Default::default(),
            capacity: Default::default(),
            version: "bench".into(),
            started_at: 0,
            refused: Vec::new(),
            runtime_down_since: None,
        },
        store: store.clone(),
        lease: keeper.subscribe(),
        snapshot: agent_reflector.subscribe(),
        alloc: pier_store::alloc::AllocConfig {
            service_cidr: "127.78.0.0/16".parse()?,
            service_cidr6: None,
            node_port_min: 30000,
            node_port_max: 30010,
        },
        dns_search: vec![],
        networks: ntx,
        local_targets: tokio::sync::watch::channel(Default::default()).0,
        static_allow: Vec::new(),
        names: pier_agent::NameLookup::new(
            pier_dns::lookup::Resolver::new(Vec::new(), Duration::from_secs(1)),
            &mut Default::default(),
        ),
    };
    let agent = tokio::spawn(pier_agent::run(cfg, ctx, cancel.clone()));

    // Docker's own event times (ns), by container id and action.
    let times: Arc<Mutex<HashMap<(String, String), i64>>> = Arc::default();
    let d = bollard::Docker::connect_with_defaults()?
        .negotiate_version()
        .await?;
    let mut filters = HashMap::new();
    filters.insert("label".to_owned(), vec![format!("pier.test-run={run}")]);
    filters.insert(
        "event".to_owned(),
        vec!["start".to_owned(), "kill".to_owned(), "die".to_owned()],
    );
    let mut ev = d.events(Some(bollard::query_parameters::EventsOptions {
        since: None,
        until: None,
        filters: Some(filters),
    }));
    let t2 = times.clone();
    let ev_task = tokio::spawn(async move {
        while let Some(Ok(e)) = ev.next().await {
            if let (Some(a), Some(id), Some(t)) =
                (e.action, e.actor.and_then(|a| a.id), e.time_nano)
                && let Ok(mut m) = t2.lock()
            {
                m.insert((id, a), t);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ns = Namespace::default();
    let svc = Name::new("bench")?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let obs_task = tokio::spawn(observe(observer.subscribe(), ns, svc, seen.clone()));
    let event_time = |id: &str, action: &str| -> Option<i64> {
        times
            .lock()
            .ok()
            .and_then(|m| m.get(&(id.to_owned(), action.to_owned())).copied())
    };
    let mut start_ms = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = docker_async(&[
            "run",
            "-d",
            "--pull",
            "never",
            "--network",
            &net,
            "--label",
            &format!("pier.test-run={run}"),
            "--label",
            "pier.service=bench",
            "--label",
            "pier.port=8080",
            IMAGE,
        ])
        .await?;
        let short = id[..12].to_owned();
        let ready = wait_entry(&seen, Duration::from_secs(20), |s| {
            s.ready_at.get(&short).copied()
        })
        .await
        .with_context(|| format!("container {i} never became ready"))?;
        let started = wait_entry(&seen, Duration::from_secs(5), |_| event_time(&id, "start"))
            .await
            .context("no start event seen")?;
        start_ms.push((ready - started) as f64 / 1e6);
        ids.push(id);
    }
    let mut die_ms = Vec::new();
    let mut kill_ms = Vec::new();
    for id in &ids {
        docker_async(&["kill", id]).await?;
        let short = id[..12].to_owned();
        let gone = wait_entry(&seen, Duration::from_secs(20), |s| {
            s.gone_at.get(&short).copied()
        })
        .await?;
        let killed = wait_entry(&seen, Duration::from_secs(5), |_| event_time(id, "kill")).await?;
        let died = wait_entry(&seen, Duration::from_secs(5), |_| event_time(id, "die")).await?;
        kill_ms.push((gone - killed) as f64 / 1e6);
        die_ms.push((gone - died) as f64 / 1e6);
    }
    println!(
        "store={} containers={n}",
        if use_etcd { "etcd" } else { "embedded" }
    );
    println!(
        "start event -> ready endpoint in another snapshot: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        pct(&mut start_ms, 0.50),
        pct(&mut start_ms, 0.99),
        pct(&mut start_ms, 1.0)
    );
    println!(
        "die event -> endpoint removed in another snapshot (negative: removed on the kill event, before die): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        pct(&mut die_ms, 0.50),
        pct(&mut die_ms, 0.99),
        pct(&mut die_ms, 1.0)
    );
    println!(
        "kill event -> endpoint removed in another snapshot: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        pct(&mut kill_ms, 0.50),
        pct(&mut kill_ms, 0.99),
        pct(&mut kill_ms, 1.0)
    );
    cancel.cancel();
    let _ = agent.await;
    ev_task.abort();
    obs_task.abort();
    Ok(())
}
