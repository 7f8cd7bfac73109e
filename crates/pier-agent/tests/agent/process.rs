//! Tests that need the agent in its own process: `kill -9` of the agent,
//! and a dockerd of its own (`DOCKER_HOST` is per process) restarted under
//! the agent. The child is this test binary running `child_agent`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pier_store::Store;
use pier_store::testing::EtcdServer;
use serde::{Deserialize, Serialize};

use crate::harness::*;

#[derive(Debug, Serialize, Deserialize)]
struct ChildCfg {
    etcd: String,
    node: String,
    run: String,
    net: String,
    ttl: u32,
}

/// Not a test: the agent process that the tests below start and kill.
/// Run on its own (no `PIER_AGENT_CHILD`, e.g. by `--ignored`) it fails,
/// so that it is never counted as a pass.
#[test]
#[ignore = "helper process for the process tests, not a test"]
fn child_agent() {
    let raw = std::env::var("PIER_AGENT_CHILD").unwrap_or_else(|_| {
        panic!(
            "child_agent is the process tests' agent, not a test: they start it with PIER_AGENT_CHILD set; run them instead (cargo test -p pier-agent --test agent process::)"
        )
    });
    let c: ChildCfg = serde_json::from_str(&raw).expect("PIER_AGENT_CHILD is JSON");
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,pier_agent=debug")
        .with_ansi(false)
        .try_init();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let r: Result<()> = rt.block_on(async move {
        let store: Arc<dyn Store> =
            Arc::new(pier_store::EtcdStore::connect(std::slice::from_ref(&c.etcd)).await?);
        let env = StoreEnv::with(store, c.ttl, None).await?;
        let mut cfg = pier_agent::AgentConfig {
            resync_interval_ms: 2_000,
            // The restart test's containers say `pier.health=none` (see there).
            allow_health_none: true,
            ..Default::default()
        };
        cfg.filter_labels
            .insert("pier.test-run".into(), c.run.clone());
        cfg.pod_labels = cfg.filter_labels.clone();
        cfg.pod_network = Some(c.net.clone());
        let mut agent = InProcAgent::start(&env, &c.node, cfg);
        eprintln!("CHILD AGENT UP");
        // Runs until killed.
        if let Some(h) = agent.handle.take() {
            h.await??;
        }
        Ok(())
    });
    if let Err(e) = r {
        eprintln!("child agent failed: {e:#}");
        std::process::exit(1);
    }
}

struct ChildAgent {
    child: Child,
    log: PathBuf,
}

impl ChildAgent {
    fn spawn(cfg: &ChildCfg, docker_host: Option<&str>, dir: &Path) -> Result<ChildAgent> {
        let log = dir.join(format!("agent-{}.log", cfg.node));
        let f = std::fs::File::create(&log)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "--ignored",
            "--exact",
            "process::child_agent",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PIER_AGENT_CHILD", serde_json::to_string(cfg)?)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f);
        match docker_host {
            Some(h) => cmd.env("DOCKER_HOST", h),
            None => cmd.env_remove("DOCKER_HOST"),
        };
        Ok(ChildAgent {
            child: cmd.spawn().context("spawning the child agent")?,
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as `kill -9`.
    fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_agent_its_node_and_endpoints_go_after_the_lease_ttl() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let etcd = EtcdServer::start()?;
    let store: Arc<dyn Store> =
        Arc::new(pier_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?);
    let env = StoreEnv::with(store, 10, None).await?;
    let mut snap = env.snapshot();
    let dir = tempfile::tempdir()?;
    let ttl = 2;
    let cfg = ChildCfg {
        etcd: etcd.endpoint.clone(),
        node: "k9".into(),
        run: d.run.clone(),
        net: d.net.clone(),
        ttl,
    };
    let mut child = ChildAgent::spawn(&cfg, None, dir.path())?;
    let id = d.run_container(&[("pier.service", "web"), ("pier.port", "8080")], &[])?;
    let r = wait_snap(
        &mut snap,
        Duration::from_secs(20),
        "node and ready endpoint",
        |s| {
            (s.nodes.contains_key("k9")
                && endpoints(s, "web")
                    .get(&short(&id))
                    .is_some_and(|e| e.ready))
            .then_some(())
        },
    )
    .await;
    if let Err(e) = r {
        bail!("{e}\nchild log:\n{}", child.log());
    }
    child.kill9()?;
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let s = snap.borrow();
        ensure!(
            s.nodes.contains_key("k9") && endpoints(&s, "web").contains_key(&short(&id)),
            "keys vanished at once: this would not prove the lease expiry"
        );
    }
    wait_snap(
        &mut snap,
        Duration::from_secs(ttl as u64 + 6),
        "lease expiry",
        |s| (!s.nodes.contains_key("k9") && endpoints(s, "web").is_empty()).then_some(()),
    )
    .await?;
    let took = killed.elapsed();
    ensure!(
        took >= Duration::from_millis(300),
        "gone too soon: {took:?}"
    );
    tracing::info!(
        took_ms = took.as_millis() as u64,
        "keys expired after kill -9"
    );
    Ok(())
}

/// A dockerd of its own: data-root, exec-root, pidfile, socket, no default
/// bridge and no iptables, so it touches nothing of the shared one.
struct OwnDockerd {
    dir: PathBuf,
    child: Option<Child>,
    id: String,
}

impl OwnDockerd {
    fn start(id: &str) -> Result<OwnDockerd> {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = PathBuf::from(format!("/tmp/pdk-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut d = OwnDockerd {
            dir,
            child: None,
            id: id.to_owned(),
        };
        d.spawn()?;
        Ok(d)
    }

    fn host(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    fn spawn(&mut self) -> Result<()> {
        let dir = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dockerd.log"))?;
        // In a network namespace of its own: a dockerd started with
        // `--bridge=none` deletes any `docker0` it can see, which would take
        // the shared daemon's default bridge away from every other test.
        let child = Command::new("unshare")
            .args(["--net", "dockerd"])
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(self.host())
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .args(["--containerd-namespace", &format!("pier-{}", self.id)])
            .args([
                "--containerd-plugins-namespace",
                &format!("pier-{}-p", self.id),
            ])
            .args(["--shutdown-timeout", "2", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if docker_at(Some(&self.host()), &["version"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "own dockerd did not start: {}",
                    std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM by pid (a clean stop that kills the containers) and wait.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for OwnDockerd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_restarted_under_the_agent_then_registry_matches_docker_again() -> Result<()> {
    init_tracing();
    ensure_image()?;
    let mut dockerd = OwnDockerd::start(&unique("r"))?;
    let host = dockerd.host();
    // Load the test image into the new daemon.
    let save = Command::new("docker")
        .args(["save", IMAGE])
        .stdout(Stdio::piped())
        .spawn()?;
    let load = Command::new("docker")
        .args(["-H", &host, "load", "-q"])
        .stdin(save.stdout.context("docker save stdout")?)
        .output()?;
    ensure!(
        load.status.success(),
        "docker load: {}",
        String::from_utf8_lossy(&load.stderr)
    );

    let d = TestDocker::on(Some(host.clone()))?;
    let etcd = EtcdServer::start()?;
    let store: Arc<dyn Store> =
        Arc::new(pier_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?);
    let env = StoreEnv::with(store, 10, None).await?;
    let mut snap = env.snapshot();
    let dir = tempfile::tempdir()?;
    let cfg = ChildCfg {
        etcd: etcd.endpoint.clone(),
        node: "dr".into(),
        run: d.run.clone(),
        net: d.net.clone(),
        ttl: 5,
    };
    let child = ChildAgent::spawn(&cfg, Some(&host), dir.path())?;
    // `none`: this daemon's containers live in its own network namespace,
    // out of the agent's reach for a TCP check.
    let labels = [
        ("pier.service", "web"),
        ("pier.port", "8080"),
        ("pier.health", "none"),
    ];
    let comes_back = d.run_container(&labels, &["--init", "--restart", "always"])?;
    let stays_down = d.run_container(&labels, &["--init"])?;
    let r = wait_snap(&mut snap, Duration::from_secs(20), "both ready", |s| {
        let e = endpoints(s, "web");
        (e.get(&short(&comes_back)).is_some_and(|e| e.ready)
            && e.get(&short(&stays_down)).is_some_and(|e| e.ready))
        .then_some(())
    })
    .await;
    if let Err(e) = r {
        bail!("{e}\nchild log:\n{}", child.log());
    }

    dockerd.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    dockerd.spawn()?;
    let r = wait_snap(
        &mut snap,
        Duration::from_secs(30),
        "registry to match docker",
        |s| {
            let e = endpoints(s, "web");
            (e.get(&short(&comes_back)).is_some_and(|e| e.ready)
                && !e.contains_key(&short(&stays_down)))
            .then_some(())
        },
    )
    .await;
    if let Err(e) = r {
        bail!("{e}\nchild log:\n{}", child.log());
    }
    let ip = d.ip(&comes_back)?;
    let ep_ip = endpoints(&snap.borrow(), "web")
        .get(&short(&comes_back))
        .map(|e| e.ip)
        .context("endpoint missing")?;
    ensure!(
        ep_ip == ip,
        "endpoint ip {ep_ip} != container ip {ip} after restart"
    );
    // Events flow again.
    let fresh = d.run_container(&labels, &["--init"])?;
    wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "a new container after the restart",
        |s| {
            endpoints(s, "web")
                .get(&short(&fresh))
                .filter(|e| e.ready)
                .cloned()
        },
    )
    .await
    .with_context(|| format!("child log:\n{}", child.log()))?;
    ensure!(child.log().contains("reconnect") || child.log().contains("lost dockerd"));
    drop(child);
    drop(d);
    Ok(())
}
