//! N "hosts" on one machine, each a network namespace with its own dockerd,
//! joined by a bridge in a "switch" namespace (DESIGN.md, "Several Docker
//! hosts on one machine").
//!
//! ```text
//!   root netns: blackhole route for 10.214.K.0/24 (nothing leaves the box)
//!   <run>-<id>-sw:  br0 ── sw-<id>-1 ─veth─ eth0 10.214.K.1/24  (<run>-<id>-h1, dockerd, bip 172.30.1.1/24)
//!                     ├─── sw-<id>-2 ─veth─ eth0 10.214.K.2/24  (<run>-<id>-h2, ...)
//!                     └─── ...
//! ```
//!
//! `<id>` is `p<k><pid % 10000>` (short: it is part of interface names);
//! the namespaces also start with the run id (`pier_tests::run_id()`,
//! `PIER_TEST_RUN` under tests/run.sh), so that run.sh removes the
//! namespaces its own run left behind and no other run's.
//!
//! - Each dockerd is started with `nsenter --net=/run/netns/<host>` (so its
//!   cgroup mounts are the root mount namespace's, avoiding "Devices cgroup
//!   isn't mounted" under `ip netns exec`), with its own data-root,
//!   exec-root, pidfile, socket, `--bip`, `--cgroup-parent` and
//!   `--containerd-namespace`.
//! - A cut drops every frame from and to the host's switch port (ebtables
//!   on the switch bridge; the host keeps its carrier); `cut_pair` drops
//!   only the frames between two hosts.
//! - All traffic is sent from inside the host namespaces (`Host::exec`) or
//!   their containers, never from the root namespace.
//! - `Drop` tears everything down by PID and pidfile: containers, dockerd,
//!   orphaned shims and container processes (from their cgroups), the
//!   per-host cgroups, mounts, namespaces, the blackhole route, temp dirs.
//!
//! Needs root, iproute2, nsenter, ebtables, dockerd 20.10, etcd 3.4.

#![allow(dead_code)]

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Run a command, fail with its stderr when it fails.
fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Run a command during teardown: failures are printed, never raised.
fn best_effort(cmd: &mut Command) {
    match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if !o.status.success() => {
            let e = String::from_utf8_lossy(&o.stderr);
            if !e.contains("No such") && !e.contains("Cannot find") && !e.contains("not found") {
                eprintln!("netns teardown: {cmd:?}: {}", e.trim());
            }
        }
        Err(e) => eprintln!("netns teardown: {cmd:?}: {e}"),
        _ => {}
    }
}

/// Run `f` on a thread that has entered network namespace `netns` (only
/// that thread moves; the rest of the test stays in the root namespace).
/// Sockets `f` opens live in `netns`: this is how a test talks to a host
/// without ever sending from the root namespace.
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    in_netns_at(format!("/run/netns/{netns}"), f)
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
}

/// Start a thread in the network namespace at `path` (`/run/netns/<name>`,
/// or `/proc/<pid>/ns/net` for a container's) running `f`; the caller
/// joins it, or lets it run for the life of the process.
pub fn in_netns_at<T, F>(path: String, f: F) -> std::thread::JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    std::thread::spawn(move || {
        let ns = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns({path})"))?;
        f()
    })
}

/// Open `path` for appending, creating it if needed.
fn append(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).open(path)
}

fn ip() -> Command {
    Command::new("ip")
}

fn signal(pid: u32, sig: &str) {
    best_effort(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
    );
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// One simulated host.
#[derive(Debug)]
pub struct Host {
    /// 1-based.
    pub index: usize,
    /// The network namespace (`ip netns` name).
    pub netns: String,
    /// Its address on the switch.
    pub addr: Ipv4Addr,
    /// Its dockerd's socket.
    pub docker_sock: PathBuf,
    /// Its dockerd's `--bip` (the docker0 bridge inside the namespace).
    pub bip: String,
    /// Its per-host directory (data-root, logs, etcd data, certificates…).
    pub dir: PathBuf,
    exec_root: PathBuf,
    pidfile: PathBuf,
    cgroup_parent: String,
    containerd_ns: String,
    dockerd: Option<Child>,
    /// This host's etcd member (`Topology::start_etcd_cluster`): its PID
    /// and its command line, to start it again after a kill.
    etcd: Option<(u32, Vec<std::ffi::OsString>)>,
    /// Processes started in this host with `spawn`, killed in `Drop`.
    children: Vec<Child>,
    /// Workers whose keeper a test killed (`pier agent` orphans): stopped
    /// in `Drop` if no keeper adopted them.
    orphans: Vec<u32>,
}

impl Host {
    /// Run `f` in this host's network namespace (see [`in_netns`]).
    pub fn within<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        in_netns(&self.netns, f)
    }

    /// `ip netns exec <host> <args…>`: run a command inside this host.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        run(ip().args(["netns", "exec", &self.netns]).args(args))
    }

    /// A `Command` that runs `program` in this host's network namespace
    /// (with nsenter, so mounts stay the root namespace's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        c
    }

    /// Start a long-running process inside this host; it is killed (by PID)
    /// when the topology is dropped. Returns its PID.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<u32> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?} in {}", self.netns))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Note processes left running by a killed parent (a `pier agent`
    /// worker whose keeper was killed), to stop in `Drop`.
    pub fn note_orphans(&mut self, pids: &[u32]) {
        self.orphans.extend_from_slice(pids);
    }

    /// Stop a process started with `spawn` (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.swap_remove(i);
            stop_child(&mut c, Duration::from_secs(5));
        }
    }

    /// Start `pier agent <args…>` in this host, talking to this host's
    /// dockerd (`DOCKER_HOST`), logging to `<dir>/agent.log`. Killed (by
    /// PID) on drop. Returns its PID.
    pub fn spawn_agent(&mut self, pier: &Path, args: &[&str]) -> Result<u32> {
        // Appended to: an agent restarted by a test (the chaos run) keeps
        // the earlier runs' lines.
        let log = append(&self.dir.join("agent.log")).context("agent log")?;
        let mut c = self.command(pier);
        c.arg("agent")
            .args(args)
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.docker_sock.display()),
            )
            .stdout(log.try_clone().context("agent log")?)
            .stderr(log);
        self.spawn(c)
    }

    /// The agent's log so far (for failure messages).
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Issue this host's mesh certificate with `pier ca issue` into
    /// `<dir>/certs` (ca.pem, node.pem, node-key.pem); returns that dir.
    pub fn issue_certs(&self, pier: &Path, ca_dir: &Path, node: &str) -> Result<PathBuf> {
        let out = self.dir.join("certs");
        run(Command::new(pier)
            .args(["ca", "issue", node, "--ca"])
            .arg(ca_dir)
            .arg("--out")
            .arg(&out))?;
        Ok(out)
    }

    /// `docker -H unix://<this host's socket> <args…>`.
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.docker_sock.display()))
            .args(args))
    }

    /// Copy an image from the machine's dockerd into this host's dockerd.
    pub fn load_image(&self, image: &str) -> Result<()> {
        let save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("docker save")?;
        let stdout = save.stdout.context("docker save stdout")?;
        let out = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.docker_sock.display()))
            .args(["load", "-q"])
            .stdin(stdout)
            .output()
            .context("docker load")?;
        if !out.status.success() {
            bail!(
                "loading {image} into {}: {}",
                self.netns,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stop this host's dockerd (SIGTERM: it stops its containers, as
    /// `systemctl stop docker` without live-restore does); returns once it
    /// has exited. [`Host::start_dockerd`] starts it again.
    pub fn stop_dockerd(&mut self) {
        if let Some(mut c) = self.dockerd.take() {
            stop_child(&mut c, Duration::from_secs(30));
        }
    }

    /// SIGKILL this host's etcd member (started by `start_etcd_cluster`).
    pub fn kill_etcd(&mut self) -> Result<()> {
        let (pid, _) = self.etcd.as_ref().context("no etcd member on this host")?;
        let pid = *pid;
        signal(pid, "KILL");
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.swap_remove(i);
            let _ = c.wait();
        }
        Ok(())
    }

    /// Start this host's etcd member again with its first command line (its
    /// data dir is kept, so it rejoins as the same member).
    pub fn restart_etcd(&mut self) -> Result<()> {
        let (_, args) = self.etcd.take().context("no etcd member on this host")?;
        let log = append(&self.dir.join("etcd.log"))?;
        let mut c = self.command("etcd");
        c.args(&args).stdout(log.try_clone()?).stderr(log);
        let pid = self.spawn(c)?;
        self.etcd = Some((pid, args));
        Ok(())
    }

    /// Start this host's dockerd (its data-root kept); returns once it
    /// answers.
    pub fn start_dockerd(&mut self) -> Result<()> {
        for d in [self.dir.join("data"), self.exec_root.clone()] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let log = append(&self.dir.join("dockerd.log")).context("dockerd log")?;
        let mut cmd = self.command("dockerd");
        cmd.arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(&self.exec_root)
            .arg("--pidfile")
            .arg(&self.pidfile)
            .arg("--host")
            .arg(format!("unix://{}", self.docker_sock.display()))
            .arg("--bip")
            .arg(&self.bip)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--containerd-namespace")
            .arg(&self.containerd_ns)
            .arg("--containerd-plugins-namespace")
            .arg(format!("{}-plugins", self.containerd_ns))
            .arg("--userland-proxy=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dockerd log")?)
            .stderr(log);
        let child = cmd.spawn().context("spawning dockerd")?;
        self.dockerd = Some(child);
        // dockerd starts in under a second here; 30 s covers a loaded box.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok()
            {
                return Ok(());
            }
            if let Some(c) = self.dockerd.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "dockerd in {} exited ({st}); log: {}",
                        self.netns,
                        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("dockerd in {} did not answer within 30 s", self.netns);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn teardown(&mut self) {
        for mut c in self.children.drain(..) {
            stop_child(&mut c, Duration::from_secs(5));
        }
        // Orphans not adopted: SIGTERM, SIGKILL after 5 s.
        let orphans: Vec<u32> = self.orphans.drain(..).filter(|p| runs_pier(*p)).collect();
        for p in &orphans {
            signal(*p, "TERM");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while orphans.iter().any(|p| runs_pier(*p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in orphans {
            if runs_pier(p) {
                signal(p, "KILL");
            }
        }
        if self.dockerd.is_some() {
            // Containers first, so dockerd unmounts their layers itself.
            if let Ok(o) = self.docker(&["ps", "-aq"]) {
                let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if !ids.is_empty() {
                    let mut c = Command::new("docker");
                    c.arg("-H")
                        .arg(format!("unix://{}", self.docker_sock.display()))
                        .args(["rm", "-f"])
                        .args(&ids);
                    best_effort(&mut c);
                }
            }
        }
        // SIGTERM dockerd by its pidfile (or the child we spawned).
        let pid = fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .or_else(|| self.dockerd.as_ref().map(Child::id));
        if let Some(mut c) = self.dockerd.take() {
            stop_child(&mut c, Duration::from_secs(15));
        } else if let Some(pid) = pid {
            signal(pid, "TERM");
        }
        // Orphans: shims of this host's containerd namespace, and any
        // process still in this host's cgroups.
        for pid in procs_with_arg(&self.containerd_ns) {
            signal(pid, "KILL");
        }
        for pid in cgroup_procs(&self.cgroup_parent) {
            signal(pid, "KILL");
        }
        remove_cgroups(&self.cgroup_parent);
        unmount_under(&self.exec_root);
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.exec_root);
        best_effort(ip().args(["netns", "del", &self.netns]));
    }
}

fn stop_child(c: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    signal(c.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// PIDs whose command line contains `arg` as a whole argument.
fn procs_with_arg(arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            if cmd.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Every PID in `<controller>/<parent>/**/cgroup.procs`, over all controllers.
fn cgroup_procs(parent: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(ctrls) = fs::read_dir(CGROUP_ROOT) else {
        return pids;
    };
    for c in ctrls.flatten() {
        walk(&c.path().join(parent), &mut |dir| {
            if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        });
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Remove `<controller>/<parent>` cgroup folders, deepest first.
fn remove_cgroups(parent: &str) {
    let Ok(ctrls) = fs::read_dir(CGROUP_ROOT) else {
        return;
    };
    for c in ctrls.flatten() {
        let mut dirs = Vec::new();
        walk(&c.path().join(parent), &mut |d| dirs.push(d.to_owned()));
        for d in dirs.iter().rev() {
            // A cgroup folder is removed with rmdir even though it "contains"
            // control files.
            let _ = fs::remove_dir(d);
        }
    }
}

/// Pre-order walk of the directories under `root` (not following links).
fn walk(root: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(md) = fs::symlink_metadata(root) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    f(root);
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), f);
            }
        }
    }
}

/// Lazily unmount every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        best_effort(Command::new("umount").arg("-l").arg(p));
    }
}

/// The switch, the hosts, and everything to tear down.
#[derive(Debug)]
pub struct Topology {
    /// Short unique id (interface names are at most 15 characters).
    pub id: String,
    pub switch: String,
    pub hosts: Vec<Host>,
    /// `10.214.K.0/24`.
    pub subnet: String,
    root: tempfile::TempDir,
    blackhole: bool,
}

impl Topology {
    /// Create a switch and `n` hosts (1..=9) on `10.214.<k>.0/24`, each with
    /// its own dockerd. `k` keeps concurrent topologies apart (1..=250).
    pub fn new(n: usize, k: u8) -> Result<Topology> {
        if !(1..=9).contains(&n) {
            bail!("1 to 9 hosts, not {n}");
        }
        let id = format!("p{}{}", k, std::process::id() % 10_000);
        let subnet = format!("10.214.{k}.0/24");
        let root = tempfile::Builder::new()
            .prefix(&format!("pier-mh-{id}-"))
            .tempdir()
            .context("temp dir")?;
        let mut t = Topology {
            switch: format!("{}-{id}-sw", pier_tests::run_id()),
            id,
            hosts: Vec::new(),
            subnet,
            root,
            blackhole: false,
        };
        t.build(n, k)?; // on error, Drop tears down what was built
        Ok(t)
    }

    fn build(&mut self, n: usize, k: u8) -> Result<()> {
        // Nothing for the test subnet may leave the machine from the root
        // namespace, whatever a test does by mistake.
        // The route's metric is the owning test process's pid, so that a
        // route left by a process that died (kill -9, a crashed run) is
        // recognised and taken over instead of blocking every later run.
        let existing = run(ip().args(["route", "show", "exact", &self.subnet]))
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        if !existing.is_empty() {
            let owner = existing
                .strip_prefix("blackhole ")
                .and_then(|r| r.split_whitespace().skip_while(|w| *w != "metric").nth(1))
                .and_then(|m| m.parse::<u32>().ok());
            let alive =
                owner.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if owner.is_none() || alive {
                bail!(
                    "a route for {} already exists in the root namespace ({existing}); is another topology using k={k}?",
                    self.subnet
                );
            }
            eprintln!("multihost: removing {existing:?}, left by a dead test process");
            run(ip().args(["route", "del", "blackhole", &self.subnet]))?;
        }
        let metric = std::process::id().to_string();
        run(ip().args(["route", "add", "blackhole", &self.subnet, "metric", &metric]))?;
        self.blackhole = true;

        run(ip().args(["netns", "add", &self.switch]))?;
        run(ip().args(["-n", &self.switch, "link", "set", "lo", "up"]))?;
        run(ip().args(["-n", &self.switch, "link", "add", "br0", "type", "bridge"]))?;
        run(ip().args(["-n", &self.switch, "link", "set", "br0", "up"]))?;

        for i in 1..=n {
            let netns = format!("{}-{}-h{i}", pier_tests::run_id(), self.id);
            let dir = self.root.path().join(format!("h{i}"));
            fs::create_dir_all(&dir)?;
            // Short: unix socket paths under exec-root must stay < 108 bytes.
            let exec_root = PathBuf::from(format!("/run/pier-mh/{}-h{i}", self.id));
            let host = Host {
                index: i,
                netns: netns.clone(),
                addr: Ipv4Addr::new(10, 214, k, i as u8),
                docker_sock: exec_root.join("docker.sock"),
                bip: format!("172.30.{}.1/24", (usize::from(k) * 10 + i) % 250),
                pidfile: dir.join("docker.pid"),
                dir,
                exec_root,
                cgroup_parent: format!("pier-mh-{}-h{i}", self.id),
                containerd_ns: format!("pier-mh-{}-h{i}", self.id),
                dockerd: None,
                etcd: None,
                children: Vec::new(),
                orphans: Vec::new(),
            };
            self.hosts.push(host);
            run(ip().args(["netns", "add", &netns]))?;
            let sw_if = self.switch_if(i);
            run(ip().args([
                "link",
                "add",
                &sw_if,
                "netns",
                &self.switch,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns,
            ]))?;
            run(ip().args([
                "-n",
                &self.switch,
                "link",
                "set",
                &sw_if,
                "master",
                "br0",
                "up",
            ]))?;
            let cidr = format!("10.214.{k}.{i}/24");
            run(ip().args(["-n", &netns, "addr", "add", &cidr, "dev", "eth0"]))?;
            run(ip().args(["-n", &netns, "link", "set", "eth0", "up"]))?;
            run(ip().args(["-n", &netns, "link", "set", "lo", "up"]))?;
        }
        for h in &mut self.hosts {
            h.start_dockerd()?;
        }
        Ok(())
    }

    /// The switch-side veth of host `i` (1-based).
    pub fn switch_if(&self, i: usize) -> String {
        format!("sw-{}-{i}", self.id)
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    pub fn host_mut(&mut self, i: usize) -> &mut Host {
        &mut self.hosts[i - 1]
    }

    /// A mesh CA for this topology (`pier ca init`), in its temp dir.
    pub fn mesh_ca(&self, pier: &Path) -> Result<PathBuf> {
        let dir = self.root.path().join("mesh-ca");
        if !dir.join("ca.pem").exists() {
            run(Command::new(pier).args(["ca", "init"]).arg(&dir))?;
        }
        Ok(dir)
    }

    /// Cut host `i` off the switch: the bridge drops every frame from and
    /// to its port (ebtables), so the host keeps its link and routes and
    /// notices nothing but silence, and the heal takes effect at once.
    /// (Setting the switch side's link down, as before, also took the
    /// host's carrier, and after `link set up` frames passed only 0.8–0.9 s
    /// later: every cut lasted that much longer than recorded, and a short
    /// one cost its host its lease.)
    pub fn cut(&self, i: usize) -> Result<()> {
        self.port_rules("-A", i)
    }

    pub fn heal(&self, i: usize) -> Result<()> {
        self.port_rules("-D", i)
    }

    /// Adds (`-A`) or deletes (`-D`) the DROP rules of host `i`'s port.
    fn port_rules(&self, op: &str, i: usize) -> Result<()> {
        for dir in ["-i", "-o"] {
            self.drop_rule(op, &[dir, &self.switch_if(i)])?;
        }
        Ok(())
    }

    /// Adds or deletes (`op`) an ebtables DROP rule on the switch's
    /// FORWARD chain for the frames `matches` selects.
    fn drop_rule(&self, op: &str, matches: &[&str]) -> Result<()> {
        run(ip()
            .args(["netns", "exec", &self.switch, "ebtables", op, "FORWARD"])
            .args(matches)
            .args(["-j", "DROP"]))?;
        Ok(())
    }

    fn ebtables(&self, op: &str, a: usize, b: usize) -> Result<()> {
        for (x, y) in [(a, b), (b, a)] {
            self.drop_rule(op, &["-i", &self.switch_if(x), "-o", &self.switch_if(y)])?;
        }
        Ok(())
    }

    /// Drop everything between hosts `a` and `b` only (ebtables on br0).
    pub fn cut_pair(&self, a: usize, b: usize) -> Result<()> {
        self.ebtables("-A", a, b)
    }

    pub fn heal_pair(&self, a: usize, b: usize) -> Result<()> {
        self.ebtables("-D", a, b)
    }

    /// Start a 1-member etcd per host, forming one cluster, listening on the
    /// host's switch address (clients: :2379, peers: :2380) and on its
    /// loopback. Waits until the cluster is healthy. Returns the client URL
    /// list for `--store etcd://…`.
    pub fn start_etcd_cluster(&mut self) -> Result<String> {
        let cluster: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("{}=http://{}:2380", h.netns, h.addr))
            .collect();
        let cluster = cluster.join(",");
        let token = format!("pier-mh-{}", self.id);
        for h in &mut self.hosts {
            let data = h.dir.join("etcd");
            let log = append(&h.dir.join("etcd.log"))?;
            let mut c = h.command("etcd");
            c.arg("--name")
                .arg(&h.netns)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://{}:2379,http://127.0.0.1:2379", h.addr))
                .arg("--advertise-client-urls")
                .arg(format!("http://{}:2379", h.addr))
                .arg("--listen-peer-urls")
                .arg(format!("http://{}:2380", h.addr))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{}:2380", h.addr))
                .arg("--initial-cluster")
                .arg(&cluster)
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                // A member coming back from a partition must not depose
                // the leader with its inflated term (etcd 3.5's default).
                .arg("--pre-vote")
                .stdout(log.try_clone()?)
                .stderr(log);
            // The args after `nsenter --net=… -- etcd`.
            let args: Vec<std::ffi::OsString> =
                c.get_args().skip(3).map(|a| a.to_owned()).collect();
            let pid = h.spawn(c)?;
            h.etcd = Some((pid, args));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for h in &self.hosts {
            loop {
                let ok = h
                    .exec(&[
                        "etcdctl",
                        "--endpoints",
                        "http://127.0.0.1:2379",
                        "endpoint",
                        "health",
                    ])
                    .is_ok();
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "etcd in {} not healthy within 30 s; log: {}",
                        h.netns,
                        fs::read_to_string(h.dir.join("etcd.log")).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(self
            .hosts
            .iter()
            .map(|h| format!("{}:2379", h.addr))
            .collect::<Vec<_>>()
            .join(","))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.teardown();
        }
        best_effort(ip().args(["netns", "del", &self.switch]));
        if self.blackhole {
            let metric = std::process::id().to_string();
            best_effort(ip().args(["route", "del", "blackhole", &self.subnet, "metric", &metric]));
        }
        unmount_under(self.root.path());
        // Shared by concurrent topologies: removed only once empty.
        let _ = fs::remove_dir("/run/pier-mh");
    }
}

/// `pid` is alive (not a zombie) and runs the pier binary.
fn runs_pier(pid: u32) -> bool {
    let alive = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    alive
        && fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("pier"))
            .unwrap_or(false)
}
