//! pier's end-to-end harness: the test image, a `pier agent` child process
//! with its own config, the CLI, a raw HTTP client, and Docker cleanup by
//! run id. Scenarios live in `e2e/`.
//!
//! Every agent a test starts gets a unique node name, API port, data dir,
//! pier0-like interface name, service CIDR slice and node-port range, and
//! only sees containers labelled with its run id, so tests can run in
//! parallel on one dockerd without seeing each other.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod browser;
pub mod load;

/// The image every scenario runs: busybox httpd serving its hostname on 8080.
pub const TEST_IMAGE: &str = "pier-test/httpd:latest";

/// A unique id for this test process, shared by everything it labels.
pub fn run_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::env::var("PIER_TEST_RUN").unwrap_or_else(|_| {
            format!(
                "t{}{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_micros())
                    .unwrap_or(0)
            )
        })
    })
    .clone()
}

/// `docker ARGS`, its stdout when it succeeds, else an error with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes a Docker network (after its containers) even when the test fails.
#[derive(Debug)]
pub struct NetGuard(pub String);

impl Drop for NetGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

/// A small unique number per agent in this process, for names and ranges.
fn next_slot() -> u32 {
    static SLOT: AtomicU32 = AtomicU32::new(0);
    SLOT.fetch_add(1, Ordering::SeqCst) + (std::process::id() % 50) * 4
}

/// The `pier.test-image` label of the image tests/images/build.sh makes
/// now (2: with /bin/udp-echo).
const TEST_IMAGE_VERSION: &str = "2";

/// Build the test image if it is missing or older than this version
/// (tests/run.sh builds it first).
pub fn ensure_test_image() -> Result<()> {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "-f",
            "{{index .Config.Labels \"pier.test-image\"}}",
            TEST_IMAGE,
        ])
        .stderr(Stdio::null())
        .output()
        .context("running docker")?;
    if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == TEST_IMAGE_VERSION {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/build.sh");
    let st = Command::new(&script)
        .status()
        .context("running images/build.sh")?;
    if !st.success() {
        bail!("{} failed", script.display());
    }
    Ok(())
}

/// The `pier` binary next to this test binary (built by `cargo test --workspace`
/// or `cargo build -p pier`).
pub fn pier_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PIER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/debug/deps/e2e-HASH → target/debug/pier
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("locating the target dir")?;
    let p = dir.join("pier");
    if !p.exists() {
        bail!(
            "{} is missing: build it first with `cargo build -p pier` (tests/run.sh does)",
            p.display()
        );
    }
    Ok(p)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Options of one test agent.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// `embedded` or `etcd://…`.
    pub store: String,
    pub node: String,
    /// Extra TOML appended to the generated config.
    pub extra_toml: String,
}

/// The e2e scenarios that start an agent take turns: several time a
/// Docker start or hold connections against a bound (the demo's step 8: a
/// replacement within 2 s), and side by side on a loaded 2-core machine
/// each one's containers wait on dockerd behind the other's. None proves
/// more by overlapping another.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits for the e2e scenarios before this one to finish; the next waits
/// for the guard to drop. [`Scenario`] takes it for its agent.
pub fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One e2e scenario's agent ([`AgentProc`], through `Deref`), started once
/// the test image is built and the scenarios before it are done; the next
/// one starts after this one's agent is stopped.
#[derive(Debug)]
pub struct Scenario {
    // Dropped first: the agent stops before the next scenario starts.
    agent: AgentProc,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Scenario {
    pub fn start(opts: AgentOpts) -> Result<Scenario> {
        let turn = take_turn();
        ensure_test_image()?;
        Ok(Scenario {
            agent: AgentProc::start(opts)?,
            _turn: turn,
        })
    }

    /// [`Scenario::start`] with a dual-stack agent
    /// ([`AgentProc::start_dual_stack`]).
    pub fn start_dual_stack(opts: AgentOpts) -> Result<Scenario> {
        let turn = take_turn();
        ensure_test_image()?;
        Ok(Scenario {
            agent: AgentProc::start_dual_stack(opts)?,
            _turn: turn,
        })
    }

    /// [`Scenario::start`] on the embedded store.
    pub fn embedded(node: &str, extra_toml: &str) -> Result<Scenario> {
        Scenario::start(AgentOpts {
            store: "embedded".into(),
            node: node.into(),
            extra_toml: extra_toml.into(),
        })
    }
}

impl std::ops::Deref for Scenario {
    type Target = AgentProc;
    fn deref(&self) -> &AgentProc {
        &self.agent
    }
}

impl std::ops::DerefMut for Scenario {
    fn deref_mut(&mut self) -> &mut AgentProc {
        &mut self.agent
    }
}

/// A service made by [`AgentProc::run_and_expose`].
#[derive(Debug, Clone, Copy)]
pub struct Exposed {
    pub vip: std::net::IpAddr,
    /// Its first port's node port, for `--type NodePort`.
    pub node_port: Option<u16>,
}

impl Exposed {
    /// The VIP's port 8080.
    pub fn vip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.vip, 8080)
    }
}

/// A `pier agent` child process. Dropping it stops the process (SIGTERM,
/// then SIGKILL) and removes the containers of this run.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Option<Child>,
    pub api: String,
    pub node: String,
    pub dir: tempfile::TempDir,
    pub service_cidr: String,
    /// The IPv6 service CIDR of a dual-stack agent
    /// ([`AgentProc::start_dual_stack`]), in fd5e:7e57::/32 (guarded by a
    /// blackhole route in tests/run.sh, as 10.213.0.0/16 is).
    pub service_cidr6: Option<String>,
    pub iface: String,
    pub node_port_min: u16,
    pub run_label: String,
    pub log: PathBuf,
    config: PathBuf,
    /// Workers left behind by [`AgentProc::kill_keeper`]: stopped on drop
    /// if no keeper adopted them.
    orphans: Vec<u32>,
}

impl AgentProc {
    pub fn start(opts: AgentOpts) -> Result<AgentProc> {
        Self::start_with(opts, false)
    }

    /// An agent with an IPv6 service CIDR too (`fd5e:7e57:0:SLOT::/112`).
    pub fn start_dual_stack(opts: AgentOpts) -> Result<AgentProc> {
        Self::start_with(opts, true)
    }

    fn start_with(opts: AgentOpts, dual_stack: bool) -> Result<AgentProc> {
        let slot = next_slot() % 200;
        let dir = tempfile::tempdir()?;
        let api_port = free_port();
        let api = format!("http://127.0.0.1:{api_port}");
        // 10.213.0.0/16 is guarded by a blackhole route (tests/run.sh); each
        // agent takes a /24 of it, and never the one a real agent would use.
        let service_cidr = format!("10.213.{}.0/24", 20 + slot);
        let service_cidr6 = dual_stack.then(|| format!("fd5e:7e57:0:{}::/112", 20 + slot));
        let iface = format!("pt{}{}", std::process::id() % 10000, slot);
        let node_port_min = 30000 + (slot as u16) * 10;
        let run_label = format!("{}-{}", run_id(), slot);
        let log = dir.path().join("agent.log");
        let config = dir.path().join("pier.toml");
        let toml = format!(
            r#"
[node]
name = "{node}"
addr = "127.0.0.1"

[store]
url = "{store}"
lease_ttl_secs = 3

[network]
service_cidr = "{service_cidr}"
{cidr6}
node_port_min = {node_port_min}
node_port_max = {node_port_max}
data_dir = "{data}"

[api]
listen = "127.0.0.1:{api_port}"

[proxy]
iface = "{iface}"

[agent]
filter_labels = {{ "pier.test-run" = "{run_label}" }}
pod_labels = {{ "pier.test-run" = "{run_label}" }}
{extra}
"#,
            node = opts.node,
            store = opts.store,
            node_port_max = node_port_min + 9,
            data = dir.path().join("data").display(),
            extra = opts.extra_toml,
            cidr6 = service_cidr6
                .as_ref()
                .map(|c| format!("service_cidr6 = \"{c}\""))
                .unwrap_or_default(),
        );
        std::fs::write(&config, toml)?;
        let mut a = AgentProc {
            child: None,
            api,
            node: opts.node,
            dir,
            service_cidr,
            service_cidr6,
            iface,
            node_port_min,
            run_label,
            log,
            config,
            orphans: Vec::new(),
        };
        a.spawn()?;
        Ok(a)
    }

    /// Start (or restart) the process and wait for /readyz.
    pub fn spawn(&mut self) -> Result<()> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(pier_bin()?)
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("PIER_LOG", "info,pier=debug")
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawning pier agent")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!(
                    "pier agent exited with {st} during start-up:\n{}",
                    self.log_tail()
                );
            }
            if let Ok((200, _)) = http_get(&self.api_addr(), "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pier agent not ready after 30 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api
            .trim_start_matches("http://")
            .parse()
            .expect("api addr")
    }

    /// Stop with SIGTERM and wait (graceful shutdown).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("pier agent did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// SIGKILL to the keeper and its workers, no cleanup by the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let workers = load::children(c.id());
            let _ = c.kill();
            let _ = c.wait();
            for w in workers {
                signal(w, "KILL");
            }
        }
        for w in std::mem::take(&mut self.orphans) {
            if is_pier(w) {
                signal(w, "KILL");
            }
        }
    }

    /// `kill -9` of the keeper alone (the process a user starts): its
    /// workers serve on as orphans until a new `pier agent` adopts them
    /// ([`AgentProc::spawn`]) or the drop stops them. Returns the keeper's
    /// PID and its workers'.
    pub fn kill_keeper(&mut self) -> Result<(u32, Vec<u32>)> {
        let mut c = self.child.take().context("agent not running")?;
        let workers = load::children(c.id());
        c.kill()?;
        c.wait()?;
        self.orphans.extend(&workers);
        Ok((c.id(), workers))
    }

    /// Run the CLI against this agent as a user on its host would: `pier
    /// --config FILE`, which finds the API address in the config and reads
    /// the token the agent made in its data dir.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(pier_bin()?)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("PIER_SERVER")
            .env_remove("PIER_TOKEN")
            .env_remove("PIER_CONFIG")
            .output()
            .context("running the pier CLI")?;
        Ok(out)
    }

    /// The agent's API token, read from its data dir as `PIER_TOKEN=$(cat
    /// DATA_DIR/api-token)` would.
    pub fn token(&self) -> Result<String> {
        let p = self.dir.path().join("data").join("api-token");
        let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(t.trim().to_owned())
    }

    /// The agent's DNS VIP: the 10th address of its service CIDR (a /24).
    pub fn dns_vip(&self) -> Result<std::net::IpAddr> {
        let net = self
            .service_cidr
            .strip_suffix(".0/24")
            .context("test agents have a /24")?;
        Ok(format!("{net}.10").parse()?)
    }

    /// A GET of the agent's API with its token.
    pub fn api_get(&self, path: &str) -> Result<(u16, String)> {
        http_get_auth(&self.api_addr(), path, Some(&self.token()?))
    }

    /// Run the CLI and insist on success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "pier {} failed ({}): {}\nagent log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let s = self.cli_ok(&a)?;
        serde_json::from_str(&s)
            .with_context(|| format!("parsing JSON from pier {}: {s}", a.join(" ")))
    }

    /// `pier run NAME --image TEST_IMAGE --port 8080 RUN…`, then
    /// `pier expose rs NAME --port 8080 EXPOSE…`: the e2e scenarios'
    /// replica set behind a service. Returns the service's VIP and node
    /// port.
    pub fn run_and_expose(&self, name: &str, run: &[&str], expose: &[&str]) -> Result<Exposed> {
        let mut args = vec!["run", name, "--image", TEST_IMAGE, "--port", "8080"];
        args.extend_from_slice(run);
        self.cli_ok(&args)?;
        let mut args = vec!["expose", "rs", name, "--port", "8080"];
        args.extend_from_slice(expose);
        self.cli_ok(&args)?;
        let svc = self.cli_json(&["get", "svc", name])?;
        let vip = svc[0]["vip"]
            .as_str()
            .with_context(|| format!("service {name} has no VIP: {svc}"))?
            .parse()?;
        let node_port = match svc[0]["ports"][0]["node_port"].as_u64() {
            Some(p) => Some(u16::try_from(p).with_context(|| format!("node port {p}"))?),
            None => None,
        };
        Ok(Exposed { vip, node_port })
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.stop().is_err() {
            self.kill9();
        }
        // Orphans no keeper adopted: SIGTERM (they deregister and exit),
        // SIGKILL after 20 s.
        let orphans: Vec<u32> = std::mem::take(&mut self.orphans)
            .into_iter()
            .filter(|p| is_pier(*p))
            .collect();
        for p in &orphans {
            signal(*p, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while orphans.iter().any(|p| is_pier(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in orphans {
            if is_pier(p) {
                signal(p, "KILL");
            }
        }
        remove_labelled("pier.test-run", &self.run_label);
        // The agent removes its interface on a clean stop; make sure.
        let _ = Command::new("ip")
            .args(["link", "del", &self.iface])
            .stderr(Stdio::null())
            .status();
    }
}

/// `pid` is alive and runs the pier binary (not a PID reused since).
fn is_pier(pid: u32) -> bool {
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    alive
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("pier"))
            .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Remove every container and network carrying `label=value`.
pub fn remove_labelled(label: &str, value: &str) {
    let filter = format!("label={label}={value}");
    if let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    if let Ok(out) = Command::new("docker")
        .args(["network", "ls", "-q", "--filter", &filter])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker")
                .args(["network", "rm", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A plain HTTP/1.0 GET with a 2 s bound; returns the status and body.
pub fn http_get(addr: &SocketAddr, path: &str) -> Result<(u16, String)> {
    http_get_auth(addr, path, None)
}

/// [`http_get`] with a bearer token (the agent's API needs one).
pub fn http_get_auth(addr: &SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// Sends `msg` on the connected UDP socket `c` up to `tries` times, waiting
/// `wait` for an answer each time, to a test image's `udp-echo` (which
/// answers `HOSTNAME:DATAGRAM`): the answering host's name, or `None`
/// when nothing (or only ICMP unreachable) came back.
pub fn udp_ask(
    c: &std::net::UdpSocket,
    msg: &str,
    tries: u32,
    wait: Duration,
) -> Result<Option<String>> {
    c.set_read_timeout(Some(wait))?;
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        c.send(msg.as_bytes())?;
        match c.recv(&mut buf) {
            Ok(n) => {
                let s = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (host, echoed) = s.split_once(':').context("HOST:DATAGRAM")?;
                anyhow::ensure!(echoed == msg, "sent {msg:?}, got {s:?}");
                return Ok(Some(host.to_owned()));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// After the pod `killed` (which held the flow on `c`) was killed at
/// `killed_at`: waits up to 10 s for the same socket to be answered by
/// another `echo-` pod, then checks that 5 more datagrams stay on it.
/// Returns that pod and how long the move took; `context` is added to a
/// failure (an agent's log, say).
pub fn udp_flow_moves_off(
    c: &std::net::UdpSocket,
    killed: &str,
    killed_at: std::time::Instant,
    context: impl FnOnce() -> String,
) -> Result<(String, Duration)> {
    let mut moved = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        if let Some(h) = udp_ask(c, "after", 1, Duration::from_millis(100))?
            && h != killed
        {
            moved = Some(h);
            break;
        }
    }
    let took = killed_at.elapsed();
    let moved = moved.with_context(|| {
        format!(
            "the flow stayed on the killed pod {killed} for 10 s\n{}",
            context()
        )
    })?;
    anyhow::ensure!(moved.starts_with("echo-"), "moved to {moved}");
    for i in 0..5 {
        let got = udp_ask(c, &format!("n{i}"), 3, Duration::from_millis(500))?;
        anyhow::ensure!(
            got.as_deref() == Some(moved.as_str()),
            "then went to {got:?}"
        );
    }
    Ok((moved, took))
}

/// Poll `f` every 50 ms until it returns `Some`, or fail after `limit`.
pub fn eventually<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}; last error: {last_err:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
