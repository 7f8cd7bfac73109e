//! `pier doctor`: checks this host's prerequisites for `pier agent`, and
//! prints the fix for each one that fails. It takes the same flags and
//! config file as `pier agent`, so it checks what the agent would bind and
//! use: dockerd (reachable, its API version), `ip` and iptables, splice(2)
//! and network namespaces, the DNS, API (and mesh) ports, the service CIDR
//! against the routing table, and the store.
//!
//! Exit status: 0 when every check passed, 1 when one failed, 64 for a bad
//! config (as `pier agent`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pier_model::Cidr;

use crate::daemon::config::{Config, StoreUrl, store_url};
use crate::daemon::{self, AgentArgs};

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
        netns(),
    ];
    v.extend(ports(cfg));
    v.push(service_cidr(cfg));
    v.push(store(cfg).await);
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

fn netns() -> Check {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A socket bound in this network namespace (from /proc/net).
#[derive(Debug, Clone)]
struct Bound {
    proto: Proto,
    addr: SocketAddr,
    inode: u64,
}

/// What the agent binds: (role, what to change instead, proto, address).
fn agent_binds(cfg: &Config) -> Vec<(&'static str, String, Proto, SocketAddr)> {
    let mut v = Vec::new();
    let dns_instead = "or serve DNS elsewhere: network.serve_dns_vip = false and network.dns_listen = [\"127.0.0.1:5353\"] (or --dns)".to_owned();
    if cfg.network.serve_dns_vip {
        // The DNS VIP: `.10` of the service CIDR (as the agent's allocator).
        if let Some(vip) = cfg.network.service_cidr.nth(10) {
            for p in [Proto::Udp, Proto::Tcp] {
                v.push(("DNS VIP", dns_instead.clone(), p, SocketAddr::new(vip, 53)));
            }
        }
    }
    for a in &cfg.network.dns_listen {
        for p in [Proto::Udp, Proto::Tcp] {
            v.push((
                "DNS",
                "or change network.dns_listen (or --dns)".to_owned(),
                p,
                *a,
            ));
        }
    }
    v.push((
        "API",
        "or give the API another address: [api] listen = \"127.0.0.1:7371\" (or --api)".to_owned(),
        Proto::Tcp,
        cfg.api.listen,
    ));
    if let Some(m) = &cfg.mesh {
        v.push((
            "mesh",
            "or change [mesh] listen (or --mesh)".to_owned(),
            Proto::Tcp,
            m.listen,
        ));
    }
    v
}

fn ports(cfg: &Config) -> Vec<Check> {
    let bound = match bound_sockets() {
        Ok(b) => b,
        Err(e) => {
            return vec![fail(
                "ports",
                format!("cannot read the socket tables: {e}"),
                "mount /proc (pier reads /proc/net/{tcp,udp}{,6})",
            )];
        }
    };
    // One line per port and role, e.g. "port 53 (DNS VIP)".
    let mut out: Vec<Check> = Vec::new();
    let mut seen: Vec<(u16, &str)> = Vec::new();
    let binds = agent_binds(cfg);
    for (role, instead, _, addr) in &binds {
        if seen.contains(&(addr.port(), *role)) {
            continue;
        }
        seen.push((addr.port(), *role));
        let name = format!("port {} ({role})", addr.port());
        let mine: Vec<_> = binds
            .iter()
            .filter(|(r, _, _, a)| r == role && a.port() == addr.port())
            .collect();
        let mut problems = Vec::new();
        let mut holders = Vec::new();
        for (_, _, proto, want) in &mine {
            for b in bound.iter().filter(|b| conflicts(b, *proto, *want)) {
                let who = holder(b.inode);
                problems.push(format!(
                    "{proto} {want} is taken: {} {} is held by {}",
                    b.proto,
                    b.addr,
                    who.as_deref().unwrap_or("an unknown process")
                ));
                if let Some(w) = who
                    && !holders.contains(&w)
                {
                    holders.push(w);
                }
            }
        }
        if problems.is_empty() {
            let what: Vec<String> = mine.iter().map(|(_, _, p, a)| format!("{p} {a}")).collect();
            out.push(ok(name, format!("free ({})", what.join(", "))));
        } else {
            problems.dedup();
            let pier_running = holders.iter().find(|h| h.starts_with("pier "));
            let fix = match pier_running {
                Some(h) => format!(
                    "a pier agent already runs ({h}): stop it first (`systemctl stop pier`, or kill its pid) {instead}"
                ),
                None if holders.is_empty() => {
                    format!("stop what holds the port (`ss -lntup` names it) {instead}")
                }
                None => format!("stop {} {instead}", holders.join(", ")),
            };
            out.push(fail(name, problems.join("; "), fix));
        }
    }
    out
}

/// Whether a socket `b` keeps the agent from binding `proto` `want`: same
/// protocol and port, a listening TCP socket or any UDP one, and the same
/// address or a wildcard on either side.
fn conflicts(b: &Bound, proto: Proto, want: SocketAddr) -> bool {
    if b.proto != proto || b.addr.port() != want.port() {
        return false;
    }
    let (have, want) = (b.addr.ip(), want.ip());
    have == want || have.is_unspecified() || want.is_unspecified()
}

/// Listening TCP and bound UDP sockets of this network namespace.
fn bound_sockets() -> std::io::Result<Vec<Bound>> {
    let mut v = Vec::new();
    for (file, proto, v6) in [
        ("/proc/net/tcp", Proto::Tcp, false),
        ("/proc/net/tcp6", Proto::Tcp, true),
        ("/proc/net/udp", Proto::Udp, false),
        ("/proc/net/udp6", Proto::Udp, true),
    ] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            // No IPv6 in this kernel: no v6 table.
            Err(e) if v6 && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        v.extend(parse_proc_net(&text, proto, v6));
    }
    Ok(v)
}

/// Parses a /proc/net/{tcp,udp}[6] table: TCP sockets in LISTEN (0A) and
/// every UDP socket that is not connected (07).
fn parse_proc_net(text: &str, proto: Proto, v6: bool) -> Vec<Bound> {
    let mut v = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let wanted_state = match proto {
            Proto::Tcp => "0A",
            Proto::Udp => "07",
        };
        if f[3] != wanted_state {
            continue;
        }
        let Some((a, p)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(p, 16) else {
            continue;
        };
        let ip = if v6 { parse_v6(a) } else { parse_v4(a) };
        let (Some(ip), Ok(inode)) = (ip, f[9].parse::<u64>()) else {
            continue;
        };
        // A v4-mapped v6 address is the v4 one; `::` also takes v4.
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let ip = if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            ip
        };
        v.push(Bound {
            proto,
            addr: SocketAddr::new(ip, port),
            inode,
        });
    }
    v
}

/// /proc/net's IPv4 address: 8 hex digits, the address in host byte order.
fn parse_v4(hex: &str) -> Option<IpAddr> {
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(n.to_le_bytes())))
}

/// /proc/net's IPv6 address: four 32-bit words, each in host byte order.
fn parse_v6(hex: &str) -> Option<IpAddr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let w = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// "NAME (pid N)" of the process holding the socket with this inode.
fn holder(inode: u64) -> Option<String> {
    let want = format!("socket:[{inode}]");
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    None
}

// ---- routes --------------------------------------------------------------

/// A route of the main table (/proc/net/route), IPv4.
#[derive(Debug, Clone)]
struct Route {
    iface: String,
    dst: Ipv4Addr,
    prefix: u8,
    reject: bool,
}

fn routes() -> std::io::Result<Vec<Route>> {
    Ok(parse_routes(&std::fs::read_to_string("/proc/net/route")?))
}

fn parse_routes(text: &str) -> Vec<Route> {
    const RTF_REJECT: u32 = 0x0200;
    let mut v = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(flags), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[3], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        v.push(Route {
            iface: f[0].to_owned(),
            dst: Ipv4Addr::from(dst.to_le_bytes()),
            prefix: u32::from_be_bytes(mask.to_le_bytes()).count_ones() as u8,
            // Blackhole routes have no device ("*"); unreachable and
            // prohibit ones also carry RTF_REJECT.
            reject: flags & RTF_REJECT != 0 || f[0] == "*",
        });
    }
    v
}

/// Whether two IPv4 prefixes share an address.
fn overlaps(a: Ipv4Addr, alen: u8, b: Ipv4Addr, blen: u8) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

/// The routes that would take traffic for `cidr` away from pier: every
/// route but the default one, pier's own interface, and reject routes
/// (blackhole, unreachable, prohibit: guards like tests/run.sh's).
fn conflicting_routes<'a>(cidr: &Cidr, iface: &str, routes: &'a [Route]) -> Vec<&'a Route> {
    let IpAddr::V4(net) = cidr.addr() else {
        return Vec::new();
    };
    routes
        .iter()
        .filter(|r| r.prefix > 0 && !r.reject && r.iface != iface)
        .filter(|r| overlaps(r.dst, r.prefix, net, cidr.prefix()))
        .collect()
}

fn service_cidr(cfg: &Config) -> Check {
    const NAME: &str = "service CIDR";
    let cidr = &cfg.network.service_cidr;
    if !cfg.proxy.manage_iface {
        return ok(
            NAME,
            format!("{cidr} (unprivileged: VIPs on loopback, no route needed)"),
        );
    }
    let routes = match routes() {
        Ok(r) => r,
        Err(e) => {
            return fail(
                NAME,
                format!("cannot read /proc/net/route: {e}"),
                "mount /proc",
            );
        }
    };
    let bad = conflicting_routes(cidr, &cfg.proxy.iface, &routes);
    if bad.is_empty() {
        return ok(NAME, format!("{cidr} overlaps no route"));
    }
    let list: Vec<String> = bad
        .iter()
        .map(|r| format!("{}/{} dev {}", r.dst, r.prefix, r.iface))
        .collect();
    let free = (200u8..=250).map(|b| Ipv4Addr::new(10, b, 0, 0)).find(|a| {
        conflicting_routes(&format!("{a}/16").parse().expect("CIDR"), "", &routes).is_empty()
    });
    let suggest = free.map_or(String::new(), |a| format!(", e.g. {a}/16"));
    fail(
        NAME,
        format!(
            "{cidr} overlaps {}: traffic for those addresses would not reach pier",
            list.join(", ")
        ),
        format!(
            "pick a service CIDR no route covers{suggest} (network.service_cidr or --service-cidr)"
        ),
    )
}

// ---- store ---------------------------------------------------------------

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
mod tests {
    use super::*;

    #[test]
    fn proc_net_tables_parse() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1CCA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1CCA 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4243 1\n";
        let b = parse_proc_net(tcp, Proto::Tcp, false);
        assert_eq!(b.len(), 1, "only the listening socket: {b:?}");
        assert_eq!(b[0].addr, "127.0.0.1:7370".parse::<SocketAddr>().unwrap());
        assert_eq!(b[0].inode, 4242);
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  1: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 77 2 0 0\n  2: 0000000000000000FFFF00000100007F:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 78 2 0 0\n";
        let b = parse_proc_net(udp6, Proto::Udp, true);
        assert_eq!(
            b[0].addr,
            "0.0.0.0:53".parse::<SocketAddr>().unwrap(),
            "`::` counts as every address"
        );
        assert_eq!(
            b[1].addr,
            "127.0.0.1:53".parse::<SocketAddr>().unwrap(),
            "v4-mapped is v4"
        );
    }

    #[test]
    fn a_wildcard_or_the_same_address_conflicts() {
        let b = |a: &str| Bound {
            proto: Proto::Udp,
            addr: a.parse().unwrap(),
            inode: 1,
        };
        let want: SocketAddr = "10.213.0.10:53".parse().unwrap();
        assert!(conflicts(&b("0.0.0.0:53"), Proto::Udp, want));
        assert!(conflicts(&b("10.213.0.10:53"), Proto::Udp, want));
        assert!(!conflicts(&b("127.0.0.53:53"), Proto::Udp, want));
        assert!(!conflicts(&b("0.0.0.0:5353"), Proto::Udp, want));
        assert!(!conflicts(&b("0.0.0.0:53"), Proto::Tcp, want));
    }

    #[test]
    fn routes_that_overlap_the_service_cidr() {
        // Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
        let text = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
*\t0000D50A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
docker0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
pier0\t0A00D50A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let routes = parse_routes(text);
        assert_eq!(routes.len(), 5);
        assert_eq!(routes[2].dst, Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(routes[2].prefix, 16);
        assert!(routes[2].reject);
        // 10.0.0.0/8 on docker0 covers 10.213.0.0/16; the default route,
        // the blackhole and pier0's own do not count.
        let c: Cidr = "10.213.0.0/16".parse().unwrap();
        let bad = conflicting_routes(&c, "pier0", &routes);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].iface, "docker0");
        let c: Cidr = "192.0.2.128/28".parse().unwrap();
        assert_eq!(conflicting_routes(&c, "pier0", &routes)[0].iface, "eth0");
        let c: Cidr = "172.31.0.0/16".parse().unwrap();
        assert!(conflicting_routes(&c, "pier0", &routes).is_empty());
    }
}
