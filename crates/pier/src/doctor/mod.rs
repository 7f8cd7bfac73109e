//! `pier doctor`: checks this host's prerequisites for `pier agent`, and
//! prints the fix for each one that fails. It takes the same flags and
//! config file as `pier agent`, so it checks what the agent would bind and
//! use: dockerd (reachable, its API version), `ip` and iptables, splice(2)
//! and network namespaces, the DNS, API (and mesh and relay) ports, the
//! service CIDR against the routing table, the store, and each watch relay
//! in `store.relays`.
//!
//! Exit status: 0 when every check passed, 1 when one failed, 64 for a bad
//! config (as `pier agent`).
//!
//! The ports check is in `ports`, the service CIDR check in `routes`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::daemon::config::{Config, StoreUrl, store_url};
use crate::daemon::{self, AgentArgs};

mod ports;
mod routes;

use ports::ports;
use routes::service_cidr;

/// The oldest Docker API pier is tested with: Debian 12's dockerd 20.10.
const MIN_DOCKER_API: (u32, u32) = (1, 41);
const DOCKER_SOCK: &str = "/var/run/docker.sock";
const TIMEOUT: Duration = Duration::from_secs(3);

/// One check's outcome.
#[derive(Debug)]
pub enum Outcome {
    Ok(String),
    Fail { problem: String, fix: String },
}

#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
}

fn ok(name: impl Into<String>, what: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        outcome: Outcome::Ok(what.into()),
    }
}

fn fail(name: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        outcome: Outcome::Fail {
            problem: problem.into(),
            fix: fix.into(),
        },
    }
}

/// `pier doctor [agent flags]`: runs every check, prints one line each
/// (and the fix under a failure), returns the exit code.
pub async fn run(args: AgentArgs) -> i32 {
    let source = match &args.config {
        Some(p) => format!("config {}", p.display()),
        None => "built-in defaults and flags (no --config)".to_owned(),
    };
    let cfg = match daemon::doctor_config(&args) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL  config: {e}");
            println!(
                "      fix: correct the config or the flags (config/pier.toml documents every key)"
            );
            return 64;
        }
    };
    println!("pier doctor: checking this host for `pier agent` ({source})");
    let checks = run_checks(&cfg).await;
    let mut failed = 0;
    for c in &checks {
        match &c.outcome {
            Outcome::Ok(what) => println!("ok    {}: {what}", c.name),
            Outcome::Fail { problem, fix } => {
                failed += 1;
                println!("FAIL  {}: {problem}", c.name);
                println!("      fix: {fix}");
            }
        }
    }
    if failed == 0 {
        println!("all {} checks passed", checks.len());
        0
    } else {
        println!("{failed} of {} checks failed", checks.len());
        1
    }
}

pub async fn run_checks(cfg: &Config) -> Vec<Check> {
    let mut v = vec![
        dockerd(),
        command("ip", &["-V"], "apt-get install iproute2"),
        command(
            "iptables",
            &["--version"],
            "apt-get install iptables (dockerd programs its NAT and published ports with it)",
        ),
        splice(cfg),
        netns(cfg),
    ];
    v.extend(ports(cfg));
    v.push(service_cidr(cfg));
    v.push(store(cfg).await);
    v.extend(relays(cfg).await);
    v
}

// ---- dockerd ----------------------------------------------------------

fn dockerd() -> Check {
    const NAME: &str = "dockerd";
    let host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("unix://{DOCKER_SOCK}"));
    let start = if find_in_path("dockerd").is_some() {
        "start dockerd (`systemctl start docker`, or `dockerd &` where systemd does not run)"
    } else {
        "install and start dockerd (`apt-get install docker.io`)"
    };
    let fix = format!("{start}, or point DOCKER_HOST at a running one");
    let body = match docker_get(&host, "/version") {
        Ok(b) => b,
        Err(e) => return fail(NAME, format!("cannot reach dockerd at {host}: {e}"), fix),
    };
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                NAME,
                format!("{host} answered /version with something that is not JSON ({e})"),
                format!("check that DOCKER_HOST ({host}) is dockerd's socket"),
            );
        }
    };
    let version = v["Version"].as_str().unwrap_or("?");
    let api = v["ApiVersion"].as_str().unwrap_or("");
    match parse_api(api) {
        Some(a) if a >= MIN_DOCKER_API => {
            ok(NAME, format!("dockerd {version}, API {api}, at {host}"))
        }
        Some(_) => fail(
            NAME,
            format!(
                "dockerd {version} at {host} serves API {api}; pier needs {}.{} or later",
                MIN_DOCKER_API.0, MIN_DOCKER_API.1
            ),
            "upgrade dockerd (Debian 12's docker.io 20.10 serves API 1.41)",
        ),
        None => fail(
            NAME,
            format!("dockerd at {host} reported no API version ({body:.80})"),
            "check that DOCKER_HOST points at dockerd",
        ),
    }
}

fn parse_api(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A plain HTTP/1.0 GET to dockerd (unix:// or tcp://), the body on a 200.
fn docker_get(host: &str, path: &str) -> Result<String, String> {
    let req = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
    let mut resp = Vec::new();
    if let Some(sock) = host.strip_prefix("unix://") {
        let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("no socket at {sock} (dockerd is not running)"),
            std::io::ErrorKind::ConnectionRefused => {
                format!("nothing listens on {sock} (connection refused: dockerd is not running)")
            }
            std::io::ErrorKind::PermissionDenied => {
                format!("permission denied on {sock} (run as root)")
            }
            _ => format!("{sock}: {e}"),
        })?;
        s.set_read_timeout(Some(TIMEOUT)).ok();
        s.set_write_timeout(Some(TIMEOUT)).ok();
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        let addr = addr.trim_end_matches('/');
        let sa = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to no address"))?;
        let mut s = TcpStream::connect_timeout(&sa, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
        s.set_read_timeout(Some(TIMEOUT)).ok();
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    } else {
        return Err("DOCKER_HOST must be unix://PATH or tcp://HOST:PORT".into());
    }
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer is not HTTP")?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET {path} answered {status:?}"));
    }
    Ok(body.to_owned())
}

// ---- commands ----------------------------------------------------------

fn find_in_path(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn command(cmd: &str, version_args: &[&str], fix: &str) -> Check {
    let Some(p) = find_in_path(cmd) else {
        return fail(cmd, format!("`{cmd}` is not on PATH"), fix);
    };
    match std::process::Command::new(&p).args(version_args).output() {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            let line = out.lines().next().unwrap_or("").trim().to_owned();
            ok(cmd, format!("{} ({line})", p.display()))
        }
        Ok(o) => fail(
            cmd,
            format!(
                "`{} {}` failed: {}",
                p.display(),
                version_args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            fix,
        ),
        Err(e) => fail(cmd, format!("cannot run {}: {e}", p.display()), fix),
    }
}

// ---- kernel features ---------------------------------------------------

fn splice(cfg: &Config) -> Check {
    const NAME: &str = "splice";
    if !cfg.proxy.splice {
        return ok(NAME, "not used (proxy.splice = false)");
    }
    let fix = "set proxy.splice = false in the config (the proxy then copies through user space)";
    match try_splice(cfg.proxy.pipe_size_kib) {
        Ok(what) => ok(NAME, what),
        Err(e) => fail(NAME, e, fix),
    }
}

/// Moves 4 bytes socket → pipe → socket over loopback, as the proxy does,
/// after sizing the pipe as the proxy would.
fn try_splice(pipe_size_kib: u32) -> Result<String, String> {
    use rustix::pipe::{SpliceFlags, fcntl_setpipe_size, pipe, splice};
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    let mut a = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| format!("connect: {e}"))?;
    let (b, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    a.set_read_timeout(Some(TIMEOUT)).ok();
    let (r, w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut sized = String::new();
    if pipe_size_kib > 0 {
        let want = pipe_size_kib as usize * 1024;
        let got = fcntl_setpipe_size(&w, want).map_err(|e| {
            format!("F_SETPIPE_SZ to {pipe_size_kib} KiB (proxy.pipe_size_kib): {e}")
        })?;
        sized = format!(", pipe sized to {} KiB", got / 1024);
    }
    a.write_all(b"pier").map_err(|e| e.to_string())?;
    let n = splice(&b, None, &w, None, 4, SpliceFlags::empty())
        .map_err(|e| format!("splice(socket -> pipe): {e}"))?;
    let m = splice(&r, None, &b, None, n, SpliceFlags::empty())
        .map_err(|e| format!("splice(pipe -> socket): {e}"))?;
    let mut back = [0u8; 4];
    a.read_exact(&mut back[..m])
        .map_err(|e| format!("reading the spliced bytes: {e}"))?;
    if &back[..m] != b"pier" || m != 4 {
        return Err(format!("splice moved {m} bytes: {:?}", &back[..m]));
    }
    Ok(format!("4 bytes moved socket -> pipe -> socket{sized}"))
}

fn netns(cfg: &Config) -> Check {
    const NAME: &str = "network namespaces";
    if !Path::new("/proc/self/ns/net").exists() {
        return fail(
            NAME,
            "/proc/self/ns/net is missing: this kernel has no network namespaces",
            "use a kernel built with CONFIG_NET_NS (every Debian kernel is); dockerd gives each container one",
        );
    }
    // A new namespace on a thread of its own: the thread's namespace goes
    // with the thread, the rest of the process stays where it is.
    let r = std::thread::spawn(|| nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET))
        .join()
        .unwrap_or(Err(nix::errno::Errno::EINVAL));
    match r {
        Ok(()) => ok(NAME, "a new one was made and dropped"),
        // The agent makes none itself (dockerd, as root, makes the
        // containers'); only pier0 needs privilege, and --unprivileged
        // makes no pier0.
        Err(nix::errno::Errno::EPERM) if !cfg.proxy.manage_iface => ok(
            NAME,
            "this user may not make one (EPERM); not needed with --unprivileged (dockerd makes the containers')",
        ),
        Err(nix::errno::Errno::EPERM) => fail(
            NAME,
            "not allowed to make one (EPERM)",
            "run as root (pier and dockerd need CAP_SYS_ADMIN and CAP_NET_ADMIN); in a container, run it privileged",
        ),
        Err(e) => fail(
            NAME,
            format!("unshare(CLONE_NEWNET) failed: {e}"),
            "check the kernel's network namespace support (CONFIG_NET_NS) and the limit in /proc/sys/user/max_net_namespaces",
        ),
    }
}

// ---- ports -------------------------------------------------------------

async fn store(cfg: &Config) -> Check {
    const NAME: &str = "store";
    match store_url(&cfg.store.url) {
        Ok(StoreUrl::Embedded) => {
            let dir = cfg.network.data_dir.join("store");
            match writable(&dir) {
                Ok(at) => ok(
                    NAME,
                    format!(
                        "embedded, under {} ({} is writable)",
                        dir.display(),
                        at.display()
                    ),
                ),
                Err(e) => fail(
                    NAME,
                    format!("embedded store under {}: {e}", dir.display()),
                    "run as root, or choose a writable directory with --data-dir (network.data_dir)",
                ),
            }
        }
        Ok(StoreUrl::Etcd(eps)) => {
            let security = match cfg.etcd_security() {
                Ok(s) => s,
                Err(e) => return fail(NAME, e.0, "fix the [store] files named above"),
            };
            match tokio::time::timeout(
                Duration::from_secs(10),
                pier_store::EtcdStore::connect_with(&eps, &security),
            )
            .await
            {
                Ok(Ok(_)) => ok(NAME, format!("etcd at {} answers", eps.join(","))),
                Ok(Err(e)) => fail(
                    NAME,
                    format!("etcd at {}: {e}", eps.join(",")),
                    "start etcd, or correct store.url (etcd://HOST:PORT,...) and open TCP 2379 to it",
                ),
                Err(_) => fail(
                    NAME,
                    format!("etcd at {} did not answer within 10 s", eps.join(",")),
                    "start etcd, or correct store.url (etcd://HOST:PORT,...) and open TCP 2379 to it",
                ),
            }
        }
        Err(e) => fail(NAME, e.0, "set store.url to `embedded` or etcd://HOST:PORT"),
    }
}

/// Each relay of `store.relays`, asked for a list as the agent asks it:
/// TCP, TLS with this node's mesh certificate, then the relay's first
/// answer. The agent falls back to etcd when none answers, so a failure
/// here is slower convergence and load on etcd, not an outage.
async fn relays(cfg: &Config) -> Vec<Check> {
    use pier_store::relay::wire::{self, Frame, Op};
    use tokio::io::AsyncWriteExt;
    let Some(mesh) = cfg.mesh.as_ref().filter(|_| !cfg.store.relays.is_empty()) else {
        return Vec::new();
    };
    let node = match cfg.node_name() {
        Ok(n) => n,
        Err(e) => return vec![fail("watch relays", e.0, "set node.name or pass --node")],
    };
    let mut reg = prometheus_client::registry::Registry::default();
    let dialer = match pier_proxy::relay_tls::RelayDialer::new(mesh, node, &mut reg) {
        Ok(d) => d,
        Err(e) => {
            return vec![fail(
                "watch relays",
                format!("mesh: {e}"),
                "fix the [mesh] files named above",
            )];
        }
    };
    let mut out = Vec::new();
    for addr in &cfg.store.relays {
        let name = format!("watch relay {addr}");
        let asked = tokio::time::timeout(Duration::from_secs(10), async {
            let (mut s, relay_node) = dialer.dial(addr).await?;
            let hello = Frame::Hello {
                version: wire::VERSION,
                op: Op::List,
            };
            s.write_all(&wire::encode(&hello)).await?;
            let first = wire::read_frame(&mut s).await?;
            Ok::<_, std::io::Error>((relay_node, first))
        })
        .await;
        out.push(match asked {
            Ok(Ok((relay, Frame::Kvs(_) | Frame::ListEnd { .. }))) => {
                ok(name, format!("node {relay} serves the store"))
            }
            Ok(Ok((relay, Frame::Error { message }))) => fail(
                name,
                format!("node {relay} answers but does not serve the store now: {message}"),
                "check that relay's agent log (its etcd watch); meanwhile this agent uses the other relays or etcd",
            ),
            Ok(Ok((relay, other))) => fail(
                name,
                format!("node {relay} answered {other:?} to a list"),
                "run the same pier version on the relay and here",
            ),
            Ok(Err(e)) => fail(
                name,
                e.to_string(),
                format!(
                    "start the agent with [relay] listen = \"{addr}\" on that host (or correct store.relays), open TCP {} to it, and give both hosts certificates of the same mesh CA",
                    addr.rsplit_once(':').map_or("7444", |(_, p)| p)
                ),
            ),
            Err(_) => fail(
                name,
                "no answer within 10 s".to_owned(),
                "check that the address is the relay's [relay] listen and that the host is reachable",
            ),
        });
    }
    out
}

/// Whether the agent could create and write `dir`: the nearest existing
/// ancestor takes a test file. Returns that ancestor.
fn writable(dir: &Path) -> Result<PathBuf, String> {
    let mut at = dir;
    while !at.exists() {
        at = at
            .parent()
            .ok_or_else(|| format!("no existing parent of {}", dir.display()))?;
    }
    if !at.is_dir() {
        return Err(format!("{} is not a directory", at.display()));
    }
    let probe = at.join(format!(".pier-doctor-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write in {}: {e}", at.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(at.to_path_buf())
}

#[cfg(test)]
mod tests;
