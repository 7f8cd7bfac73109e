//! The scale simulator (issue 17): many simulated hosts on a 3-member etcd
//! cluster on this machine, running pier's own code for what a host does
//! with the store, with synthetic endpoints in place of Docker.
//!
//! ```text
//! cargo run --release -p pier-supervisor --example sim -- \
//!     --hosts 1000 --endpoints 100 --services 10000 --reflectors 4
//! ```
//! (`--hosts 20 --endpoints 10 --services 50 --reflectors 2` is a smoke run
//! of a few seconds; `--pods N --sets M` size the supervisor step.)
//!
//! What runs, per simulated host: its own lease (`LeaseKeeper`, pier's),
//! its node record and its endpoints written under it with `Store::put`, in
//! the order an agent writes them (endpoints, then the node record). Hosts
//! share `--clients` etcd connections (default 1 per 50 hosts) instead of
//! one each. Only `--reflectors` of them also run pier's `Reflector` (with
//! the agent's hold policy), each on its own connection: a full snapshot
//! per simulated host would not fit in this machine's memory, and
//! `--watches` more plain watches on `keys::ROOT` (drained, not decoded)
//! stand in for the other hosts' watch load on etcd.
//!
//! Each connection starts on the member its name hashes to
//! (`EtcdStore::connect_spread`, as agents do); `SIM_FIRST=1` starts every
//! one on the first member, as agents did before. `SIM_SCAN=1` plans
//! without the pod index (every pod scanned per set, as before).
//! `SIM_TXN=N` registers a host in transactions of N keys instead of one
//! put per key (an experiment; agents put one key at a time).
//! `SIM_METRICS_MS=2000` prints, every 2 s on stderr, what changed on each
//! member (apply backlog, slow applies, leases revoked, puts, deletes,
//! watch events, slow watchers, pending events, backend commit and WAL
//! fsync time, CPU, bytes sent) and the simulator's own CPU;
//! `SIM_LOGDIR=dir` keeps the members' (and proxies') logs there.
//! `--proxies N` starts N `etcd grpc-proxy` relays (each with its own data
//! dir in the run's temp dir, stopped with the members) and connects the
//! watchers through them, the `i`-th reflector and plain watch through
//! proxy i % N: the proxy coalesces the watchers of one range into one
//! watcher on a member. The hosts' leases and writes, the reflectors'
//! own leases and the supervisor still go to the members (through the
//! proxy a keepalive is answered only at the proxy's own renewal pace;
//! `SIM_PROXY_ALL=1` sends the hosts' connections through it too).
//! `--relays N` starts N of pier's own watch relays (`pier_store::relay`)
//! in this process, on a runtime of their own (2 threads named `relay`,
//! whose CPU time is reported), each on its own etcd connection (spread
//! over the members) and served on a loopback port (plain TCP,
//! `TcpDial`); the reflectors list and watch through `relayed(..)`, the
//! `i`-th starting at relay i % N (and moving to the next when it fails),
//! and the plain watches are streams from relay i % N that are framed but
//! not decoded (each follows the revision and resumes from it when cut
//! off): they stand in for other hosts, which decode their own streams on
//! their own cores (`SIM_RELAY_DECODE=1` decodes them here, through
//! `relayed`). The reflectors' leases, barriers and writes, the hosts and
//! the supervisor stay on the members. etcd then has N watchers of the
//! whole prefix instead of one per watcher.
//! `--prefill 1` (with `--rs`) writes the sets' pods itself, placed
//! round-robin over the live hosts as the leader would, so that the host
//! loss is reached without the leader's scheduling time (about 130 pods/s
//! at 1,000 nodes in a dev build); the loss then waits until the leader
//! has written every set's rollout record and is idle.
//!
//! Steps, each printed with the load average:
//! 1. start etcd (3 members, own ports and data dirs in a temp dir);
//! 2. cold start: every host grants its lease and registers at once
//!    (`--jitter-ms` spreads the starts): time and write rate;
//! 3. the reflectors list at once (the herd of lists): time to sync, and
//!    the process's RSS growth per reflector (a host's snapshot memory);
//! 4. propagation: `--probes` endpoint puts (a ready flip), each timed to
//!    the moment every reflector's snapshot shows it;
//! 5. host loss: 10 % of the hosts stop renewing (as if dead): time until
//!    every reflector has dropped their endpoints;
//!    5b. with `--rs N --replicas R`: pier's supervisor (leader on the
//!    first reflector's snapshot) runs N sets of R pods on the live hosts,
//!    whose simulated runtimes (one task, 64 puts in flight) mark each
//!    new pod Running under its host's lease (of the moment: a status
//!    lost with a lease is written again); then 10 % more hosts stop
//!    renewing: the time until their pods are replaced and Running, and
//!    the other hosts' leases lost meanwhile (the supervisor's writes must
//!    not delay their keepalives past the TTL);
//! 6. etcd's own figures from each member's /metrics (CPU seconds, RSS, db
//!    size, watchers, proposals committed; LeaseKeepAlive streams opened
//!    and keepalives received, summed over the members);
//! 7. the supervisor: one full reconcile pass (`plan::plan` for every set)
//!    on a snapshot of `--pods` pods in `--sets` sets over the hosts.
//!
//! Everything it starts is stopped and removed at the end, also on error
//! (the etcd children by their handles, the temp dir).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use pier_model::{
    DiffItem, Endpoint, EndpointPort, Name, Namespace, Node, PortNum, Snapshot, keys,
};
use pier_store::lease::LeaseKeeper;
use pier_store::reflector::{HoldPolicy, Reflector};
use pier_store::relay::{Relay, RelayOptions, TcpDial, relayed};
use pier_store::{EtcdStore, Store, Ttl};
use pier_supervisor::plan::{PlanInput, PodIndex, SharedUsage, plan};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Args {
    hosts: usize,
    endpoints: usize,
    services: usize,
    reflectors: usize,
    watches: usize,
    clients: usize,
    probes: usize,
    jitter_ms: u64,
    ttl: u32,
    pods: usize,
    sets: usize,
    /// Step 5b: replica sets run by pier's supervisor (0: skipped).
    rs: usize,
    replicas: usize,
    /// Step 5b: the simulator writes the sets' pods and statuses itself
    /// (placed round-robin, as the leader would place them), so that the
    /// host loss is reached without the leader's scheduling time.
    prefill: bool,
    /// `etcd grpc-proxy` relays between the hosts and the members (0: none).
    proxies: usize,
    /// pier's watch relays in this process (0: none).
    relays: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        hosts: 100,
        endpoints: 100,
        services: 1000,
        reflectors: 4,
        watches: 0,
        clients: 0,
        probes: 200,
        jitter_ms: 0,
        ttl: 5,
        pods: 100_000,
        sets: 10_000,
        rs: 0,
        replicas: 10,
        prefill: false,
        proxies: 0,
        relays: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v: u64 = it
            .next()
            .with_context(|| format!("{k} needs a value"))?
            .parse()
            .with_context(|| format!("{k} takes a number"))?;
        let u = v as usize;
        match k.as_str() {
            "--hosts" => a.hosts = u,
            "--endpoints" => a.endpoints = u,
            "--services" => a.services = u,
            "--reflectors" => a.reflectors = u,
            "--watches" => a.watches = u,
            "--clients" => a.clients = u,
            "--probes" => a.probes = u,
            "--jitter-ms" => a.jitter_ms = v,
            "--ttl" => a.ttl = v as u32,
            "--pods" => a.pods = u,
            "--sets" => a.sets = u,
            "--rs" => a.rs = u,
            "--replicas" => a.replicas = u,
            "--prefill" => a.prefill = v != 0,
            "--proxies" => a.proxies = u,
            "--relays" => a.relays = u,
            _ => bail!("unknown option {k} (see the example's doc comment)"),
        }
    }
    if a.clients == 0 {
        a.clients = a.hosts.div_ceil(50).max(1);
    }
    if a.proxies > 0 && a.relays > 0 {
        bail!("--proxies and --relays are two ways of relaying the watches: give one");
    }
    if a.hosts == 0 || a.services == 0 || a.sets == 0 || a.reflectors == 0 {
        bail!("--hosts, --services, --sets and --reflectors must be at least 1");
    }
    Ok(a)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn rss_mb(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .map(|kb: f64| kb / 1024.0)
        .unwrap_or(0.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A 3-member etcd cluster on loopback, with `--proxies` gRPC proxies in
/// front of it; the members and proxies are killed on drop.
struct Cluster {
    /// The members, then the proxies.
    children: Vec<Child>,
    /// The members' client addresses.
    clients: Vec<String>,
    /// The proxies' listen addresses (empty: the hosts talk to the members).
    proxies: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // SIM_LOGDIR=dir keeps the members' logs (m0.log …) there.
        if let Some(dir) = std::env::var_os("SIM_LOGDIR") {
            let logs = (0..3)
                .map(|i| format!("m{i}.log"))
                .chain((0..self.proxies.len()).map(|i| format!("p{i}.log")));
            for f in logs {
                let _ = std::fs::copy(
                    self._dir.path().join(&f),
                    std::path::Path::new(&dir).join(&f),
                );
            }
        }
    }
}

impl Cluster {
    fn start(proxies: usize) -> Result<Cluster> {
        let bin = std::env::var("PIER_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut c = Cluster {
            children: Vec::new(),
            clients: ports
                .iter()
                .map(|(c, _)| format!("127.0.0.1:{c}"))
                .collect(),
            proxies: Vec::new(),
            _dir: dir,
        };
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let data = c._dir.path().join(format!("m{i}"));
            let log = std::fs::File::create(c._dir.path().join(format!("m{i}.log")))?;
            let child = Command::new(&bin)
                .arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{cp}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{cp}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{pp}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{pp}"
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=pier-sim")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {bin} (PIER_ETCD_BIN)"))?;
            c.children.push(child);
        }
        // `--proxies N`: etcd's own gRPC proxy, which serves KV, lease and
        // watch calls, forwarding them to the members and coalescing the
        // watchers of one range into one watcher on a member. A list page
        // (5,000 keys) can exceed its default 1.5 MiB reply limit.
        for i in 0..proxies {
            let port = free_port()?;
            let data = c._dir.path().join(format!("p{i}"));
            let log = std::fs::File::create(c._dir.path().join(format!("p{i}.log")))?;
            let child = Command::new(&bin)
                .args(["grpc-proxy", "start"])
                // Proxy i lists member i % 3 first: a proxy keeps its
                // watchers on the first member it reaches.
                .arg(format!("--endpoints={}", rotated(&c.clients, i).join(",")))
                .arg(format!("--listen-addr=127.0.0.1:{port}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg("--max-send-bytes=67108864")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {bin} grpc-proxy (PIER_ETCD_BIN)"))?;
            c.children.push(child);
            c.proxies.push(format!("127.0.0.1:{port}"));
        }
        Ok(c)
    }

    /// Where a client connects: the `i`-th proxy round-robin, or the members.
    fn endpoints_for(&self, i: usize) -> Vec<String> {
        if self.proxies.is_empty() {
            self.clients.clone()
        } else {
            vec![self.proxies[i % self.proxies.len()].clone()]
        }
    }

    /// The proxies' CPU seconds and RSS (MB), from /proc.
    fn proxy_usage(&self) -> Vec<(f64, f64)> {
        self.children[3..]
            .iter()
            .map(|c| {
                let pid = c.id().to_string();
                (proc_cpu_s(&pid), rss_mb(&pid))
            })
            .collect()
    }

    /// Scrapes one of etcd's own metrics from every member.
    fn metric(&self, name: &str) -> Vec<f64> {
        self.clients
            .iter()
            .map(|a| scrape(a, name).unwrap_or(f64::NAN))
            .collect()
    }
}

/// `v` starting at its `i % len`-th element.
fn rotated(v: &[String], i: usize) -> Vec<String> {
    let mut v = v.to_vec();
    let n = v.len().max(1);
    v.rotate_left(i % n);
    v
}

/// Sums the samples of `name` on `addr`'s /metrics (plain HTTP/1.0).
fn scrape(addr: &str, name: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let mut sum = 0.0;
    for l in body.lines() {
        // `name` may hold the first labels: `m{a="b"` matches `m{a="b",c="d"} 1`.
        if l.starts_with(name) && l[name.len()..].starts_with([' ', '{', ',', '}']) {
            sum += l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Ok(sum)
}

/// Sums the samples of each of `names` on `addr`'s /metrics, in one scrape.
fn scrape_many(addr: &str, names: &[&str]) -> Result<Vec<f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let mut out = vec![0.0; names.len()];
    for l in body.lines() {
        for (i, name) in names.iter().enumerate() {
            if l.starts_with(name) && l[name.len()..].starts_with([' ', '{', ',', '}']) {
                out[i] += l
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    Ok(out)
}

/// This process's CPU time (user + system), in seconds.
fn self_cpu_s() -> f64 {
    proc_cpu_s("self")
}

/// A process's CPU time (user + system), in seconds.
fn proc_cpu_s(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the command name's closing parenthesis: fields 14 and 15
            // (utime, stime) are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// What the sampler reads from each member (`SIM_METRICS_MS`).
const SAMPLED: &[&str] = &[
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_slow_apply_total",
    "etcd_server_leader_changes_seen_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_mvcc_events_total",
    "etcd_debugging_mvcc_slow_watcher_total",
    "etcd_debugging_mvcc_pending_events_total",
    "etcd_disk_backend_commit_duration_seconds_sum",
    "etcd_disk_wal_fsync_duration_seconds_sum",
    "process_cpu_seconds_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_server_is_leader",
    "etcd_debugging_mvcc_put_total",
    "etcd_debugging_mvcc_delete_total",
    "etcd_server_slow_read_indexes_total",
];

/// Every `SIM_METRICS_MS` ms (0 or unset: off), one line per member on
/// stderr with what changed since the last sample: the apply backlog
/// (committed − applied), slow applies, leader changes, leases revoked,
/// watch events and slow watchers, backend commit and WAL fsync time, CPU,
/// bytes sent to clients. Stops when `stop` is set.
fn sampler(clients: Vec<String>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let every = std::env::var("SIM_METRICS_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if every == 0 {
        return;
    }
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut prev: Vec<Vec<f64>> = vec![vec![0.0; SAMPLED.len()]; clients.len()];
        let mut sim_cpu = self_cpu_s();
        while !stop.load(Ordering::Relaxed) {
            for (m, addr) in clients.iter().enumerate() {
                let Ok(v) = scrape_many(addr, SAMPLED) else {
                    eprintln!("   metrics m{m}: no answer");
                    continue;
                };
                let d = |i: usize| v[i] - prev[m][i];
                if m == 0 {
                    let cpu = self_cpu_s();
                    eprintln!(
                        "   metrics t={:.0}s sim process: cpu {:.2} s, RSS {:.0} MB",
                        t0.elapsed().as_secs_f64(),
                        cpu - sim_cpu,
                        rss_mb("self")
                    );
                    sim_cpu = cpu;
                }
                eprintln!(
                    "   metrics t={:.0}s m{m}{}: behind {:.0}, applied +{:.0}, slow_apply +{:.0}, leader_changes {:.0}, revoked +{:.0}, puts +{:.0}, deletes +{:.0}, events +{:.0}, slow_watchers {:.0}, pending_events {:.0}, watchers {:.0}, commit {:.0} ms, fsync {:.0} ms, cpu {:.2} s, sent {:.1} MB, slow_readidx +{:.0} [load {}]",
                    t0.elapsed().as_secs_f64(),
                    if v[13] > 0.0 { "*" } else { "" },
                    v[0] - v[1],
                    d(1),
                    d(2),
                    v[3],
                    d(4),
                    d(14),
                    d(15),
                    d(5),
                    v[6],
                    v[7],
                    v[12],
                    d(8) * 1e3,
                    d(9) * 1e3,
                    d(10),
                    d(11) / 1048576.0,
                    d(16),
                    load()
                );
                prev[m] = v;
            }
            std::thread::sleep(Duration::from_millis(every));
        }
    });
}

fn name(s: &str) -> Name {
    Name::new(s).expect("a valid generated name")
}

/// Host `h`'s `j`-th endpoint: (key, value).
fn endpoint(a: &Args, h: usize, j: usize, ready: bool) -> (String, Vec<u8>) {
    let ns = Namespace::default();
    let s = (h * a.endpoints + j) % a.services;
    let svc = name(&format!("svc-{s}"));
    let node = name(&format!("host-{h}"));
    let id = name(&format!("c{j:03}"));
    let ep = Endpoint {
        service: svc.clone(),
        namespace: ns.clone(),
        node: node.clone(),
        id: id.clone(),
        pod: None,
        hostname: None,
        ip: IpAddr::from([10, (h / 256) as u8 + 64, (h % 256) as u8, j as u8 + 2]),
        ports: vec![EndpointPort {
            name: name("http"),
            port: PortNum::new(8080).expect("port"),
            protocol: Default::default(),
        }],
        ready,
        is_static: false,
        // Endpoint VIPs (claimed per endpoint by its agent) are not simulated.
        addr: None,
    };
    (
        keys::endpoint(&ns, &svc, &node, &id),
        pier_model::encode(&ep),
    )
}

fn node_record(h: usize) -> (String, Vec<u8>) {
    let n = name(&format!("host-{h}"));
    let rec: Node = serde_json::from_value(serde_json::json!({
        "name": n.as_str(),
        "addr": format!("10.{}.{}.1", h / 256 + 64, h % 256),
        "version": "sim",
    }))
    .expect("a node record");
    (keys::node(&n), pier_model::encode(&rec))
}

/// Keys per write with `SIM_TXN=N` (up to 128, etcd's `--max-txn-ops`);
/// 1 (one put per key, as the agent writes) without it.
fn txn_ops() -> usize {
    std::env::var("SIM_TXN")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 128)
}

/// A host's keys in the units it writes them in, in order (the node
/// record last): one put per key as the agent does, or with `SIM_TXN=N`
/// transactions of N keys (an experiment: see BENCHMARKS.md).
fn units(keys: Vec<(String, Vec<u8>)>) -> Vec<Vec<(String, Vec<u8>)>> {
    let n = txn_ops();
    keys.chunks(n).map(<[_]>::to_vec).collect()
}

/// Writes one unit under `lease`: a put for one key, else a transaction.
async fn write_unit(
    store: &dyn Store,
    unit: &[(String, Vec<u8>)],
    lease: pier_store::LeaseId,
) -> Result<(), pier_store::StoreError> {
    WRITES.fetch_add(1, Ordering::Relaxed);
    match unit {
        [(k, v)] => store.put(k, v.clone(), Some(lease)).await.map(|_| ()),
        _ => {
            let txn = pier_store::Txn {
                success: unit
                    .iter()
                    .map(|(key, value)| pier_store::TxnOp::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease: Some(lease),
                    })
                    .collect(),
                ..Default::default()
            };
            store.txn(txn).await.map(|_| ())
        }
    }
}

/// One simulated host: its lease and its keys, as an agent writes them.
async fn register(
    a: &Args,
    h: usize,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
) -> Result<LeaseKeeper> {
    if a.jitter_ms > 0 {
        let j = (h as u64 * 7919) % a.jitter_ms;
        tokio::time::sleep(Duration::from_millis(j)).await;
    }
    let ttl = Ttl::from_secs(a.ttl)?;
    let keeper = loop {
        match LeaseKeeper::start(store.clone(), ttl, cancel.clone()).await {
            Ok(k) => break k,
            Err(e) => {
                GRANT_RETRIES.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("lease grant failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let mut leases = keeper.subscribe();
    // As an agent does: a lease lost mid-way (expired under load) is
    // re-granted by the keeper, and every key written again under it.
    'again: loop {
        let lease = *leases
            .wait_for(|l| l.is_some())
            .await
            .context("lease keeper stopped")?;
        let lease = lease.context("no lease")?;
        let mut keys: Vec<(String, Vec<u8>)> =
            (0..a.endpoints).map(|j| endpoint(a, h, j, true)).collect();
        keys.push(node_record(h));
        for unit in units(keys) {
            loop {
                match write_unit(&*store, &unit, lease).await {
                    Ok(_) => break,
                    Err(pier_store::StoreError::LeaseNotFound(_)) => {
                        LEASES_LOST.fetch_add(1, Ordering::Relaxed);
                        let _ = leases.wait_for(|l| *l != Some(lease)).await;
                        continue 'again;
                    }
                    Err(e) => {
                        PUT_RETRIES.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("put failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        // Later losses: write everything again under the new lease.
        let (a2, store2) = (a.clone(), store.clone());
        tokio::spawn(async move {
            let mut last = Some(lease);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = leases.changed() => if r.is_err() { return },
                }
                let Some(l) = *leases.borrow_and_update() else {
                    continue;
                };
                if Some(l) == last {
                    continue;
                }
                last = Some(l);
                LEASES_LOST.fetch_add(1, Ordering::Relaxed);
                let mut keys: Vec<(String, Vec<u8>)> = (0..a2.endpoints)
                    .map(|j| endpoint(&a2, h, j, true))
                    .collect();
                keys.push(node_record(h));
                for unit in units(keys) {
                    if write_unit(&*store2, &unit, l).await.is_err() {
                        PUT_RETRIES.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        return Ok(keeper);
    }
}

/// Retries a store call that an overloaded etcd refused or left
/// unanswered, for up to 60 s (the figures count what it cost).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, pier_store::StoreError>>,
{
    let t0 = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                PUT_RETRIES.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{what}, retried for 60 s")),
        }
    }
}

static LEASES_LOST: AtomicUsize = AtomicUsize::new(0);
static GRANT_RETRIES: AtomicUsize = AtomicUsize::new(0);
static PUT_RETRIES: AtomicUsize = AtomicUsize::new(0);
/// Write requests sent by the hosts' registrations (puts or txns).
static WRITES: AtomicUsize = AtomicUsize::new(0);

fn endpoint_count(s: &Snapshot) -> usize {
    s.endpoints.values().map(|m| m.len()).sum()
}

/// Waits until every reflector's snapshot passes `f`; the time each took.
/// Times are from `t0`.
async fn until_all(
    refl: &[Reflector],
    within: Duration,
    t0: Instant,
    f: impl Fn(&Snapshot) -> bool + Clone + Send + Sync + 'static,
) -> Result<Vec<Duration>> {
    let mut set = JoinSet::new();
    for r in refl {
        let mut rx = r.subscribe();
        let f = f.clone();
        set.spawn(async move {
            tokio::time::timeout(within, rx.wait_for(|s| f(s)))
                .await
                .map(|_| t0.elapsed())
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r?.context("timed out waiting for the reflectors")?);
    }
    Ok(out)
}

/// `--relays N`: pier's watch relays, on a runtime of their own in this
/// process (so that their CPU time can be told apart: its threads are
/// named `relay`).
struct Relays {
    rt: Option<tokio::runtime::Runtime>,
    relays: Vec<Arc<Relay>>,
    addrs: Vec<String>,
}

impl Relays {
    async fn start(a: &Args, cluster: &Cluster, cancel: &CancellationToken) -> Result<Relays> {
        let mut r = Relays {
            rt: None,
            relays: Vec::new(),
            addrs: Vec::new(),
        };
        if a.relays == 0 {
            return Ok(r);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("relay")
            .enable_all()
            .build()?;
        // Kept in `r` at once: dropped in this async context (on an error
        // below) a runtime would panic; `Relays`' drop shuts it down.
        let rt = r.rt.insert(rt).handle().clone();
        let t0 = Instant::now();
        for i in 0..a.relays {
            let eps = cluster.clients.clone();
            let cancel = cancel.child_token();
            // Connected and served on the relays' runtime, so that their
            // connection's tasks run there too.
            let (relay, addr) = rt
                .spawn(async move {
                    let sec = pier_store::EtcdSecurity::default();
                    let key = format!("relay-{i}");
                    let store = retry("relay connect", || {
                        EtcdStore::connect_spread(&eps, &sec, &key)
                    })
                    .await?;
                    let relay =
                        Relay::start(Arc::new(store), RelayOptions::default(), cancel.clone());
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = listener.local_addr()?.to_string();
                    let r = relay.clone();
                    tokio::spawn(async move {
                        loop {
                            let (sock, peer) = tokio::select! {
                                _ = cancel.cancelled() => return,
                                a = listener.accept() => match a {
                                    Ok(a) => a,
                                    Err(_) => continue,
                                },
                            };
                            let _ = sock.set_nodelay(true);
                            tokio::spawn(r.clone().serve(sock, peer.to_string()));
                        }
                    });
                    anyhow::Ok((relay, addr))
                })
                .await??;
            r.relays.push(relay);
            r.addrs.push(addr);
        }
        while !r.relays.iter().all(|x| x.stats().live) {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the relays did not sync in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "   + {} watch relays (pier_store::relay) in this process on {}: synced in {:.2} s",
            a.relays,
            r.addrs.join(", "),
            t0.elapsed().as_secs_f64()
        );
        Ok(r)
    }

    /// `store`, listing and watching through the relays from relay
    /// `i % N` (unchanged without relays).
    fn wrap(&self, store: Arc<dyn Store>, i: usize) -> Arc<dyn Store> {
        if self.addrs.is_empty() {
            return store;
        }
        relayed(store, rotated(&self.addrs, i), Arc::new(TcpDial))
    }

    /// The relays' CPU (their runtime's threads) and each one's state.
    fn report(&self, wall: f64) {
        if self.relays.is_empty() {
            return;
        }
        let cpu = threads_cpu_s("relay");
        println!(
            "6. relays: CPU {cpu:.1} s over the run ({:.0} %, their runtime's threads); this process's RSS {:.0} MB (the relays' share is not separable: see their bytes below)",
            100.0 * cpu / wall,
            rss_mb("self")
        );
        println!(
            "6. relays: plain watches cut off and resumed {}",
            DRAIN_CUTS.load(Ordering::Relaxed)
        );
        for (i, r) in self.relays.iter().enumerate() {
            let s = r.stats();
            println!(
                "6. relay r{i}: {} clients, revision {}, {} keys ({:.1} MB of keys and values), history {} events ({:.1} MB) from revision {}, live {}",
                s.clients,
                s.revision,
                s.keys,
                s.map_bytes as f64 / 1048576.0,
                s.history_events,
                s.history_bytes as f64 / 1048576.0,
                s.history_from,
                s.live
            );
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Times a plain watch through a relay was cut off (and resumed).
static DRAIN_CUTS: AtomicUsize = AtomicUsize::new(0);

/// A plain watch through relay `addr`, from `from`: reads the frames,
/// decoding only an `Events` frame's revision, and resumes from the next
/// one when the connection ends (a `Compacted` ends it).
async fn drain_relay(addr: String, from: pier_store::Revision, cancel: CancellationToken) {
    use pier_store::relay::wire;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut next = from;
    let mut body = Vec::new();
    loop {
        let run = async {
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            s.set_nodelay(true)?;
            let hello = wire::encode(&wire::Frame::Hello {
                version: wire::VERSION,
                op: wire::Op::Watch { from: next },
            });
            s.write_all(&hello).await?;
            let mut r = tokio::io::BufReader::with_capacity(1 << 16, s);
            loop {
                let len = r.read_u32().await? as usize;
                if len == 0 || len > wire::MAX_FRAME {
                    return Err(std::io::Error::other("bad frame length"));
                }
                body.resize(len, 0);
                r.read_exact(&mut body).await?;
                if let Some(rev) = wire::events_revision(&body) {
                    next = rev + 1;
                } else if wire::is_compacted(&body) {
                    return Ok(true);
                }
            }
        };
        let compacted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = run => r,
        };
        if matches!(compacted, Ok(true)) {
            eprintln!(
                "   a plain watch through {addr} fell behind the relay's history (Compacted)"
            );
            return;
        }
        DRAIN_CUTS.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CPU time (user + system, seconds) of this process's threads named
/// `name`.
fn threads_cpu_s(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| proc_cpu_s(&format!("self/task/{}", t.file_name().to_string_lossy())))
        .sum()
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    // RUST_LOG=pier_supervisor=debug shows the leader's batches (stderr).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    println!("sim {a:?}");
    println!("load at start: {}", load());
    let cluster = Cluster::start(a.proxies)?;
    // Stopped by a signal, the members go too (and their data dir), as on
    // a normal end: a run stopped early must leave no etcd behind.
    {
        let pids: Vec<String> = cluster
            .children
            .iter()
            .map(|c| c.id().to_string())
            .collect();
        let dir = cluster._dir.path().to_owned();
        let nproxies = cluster.proxies.len();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = Command::new("kill").args(["-9"]).args(&pids).status();
            if let Some(logs) = std::env::var_os("SIM_LOGDIR") {
                let names = (0..3)
                    .map(|i| format!("m{i}.log"))
                    .chain((0..nproxies).map(|i| format!("p{i}.log")));
                for f in names {
                    let _ = std::fs::copy(dir.join(&f), std::path::Path::new(&logs).join(&f));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!(
                "stopped by a signal: etcd members (and proxies) killed, {} removed",
                dir.display()
            );
            std::process::exit(130);
        });
    }
    let mut clients: Vec<Arc<dyn Store>> = Vec::new();
    let t_up = Instant::now();
    // SIM_FIRST=1: every client starts on the first member (as before
    // `connect_spread`).
    let first = std::env::var("SIM_FIRST").is_ok_and(|v| v == "1");
    // With `--proxies N`, the `i`-th connection of each kind goes through
    // proxy i % N.
    let connect = |key: String, i: usize| {
        let eps = cluster.endpoints_for(i);
        async move {
            let sec = pier_store::EtcdSecurity::default();
            if first {
                EtcdStore::connect_with(&eps, &sec).await
            } else {
                EtcdStore::connect_spread(&eps, &sec, &key).await
            }
        }
    };
    // Only the watchers (the reflectors' lists and watches, the plain
    // watches) go through the proxies; the hosts' leases and writes, the
    // reflectors' own leases and the supervisor go to the members
    // directly: through the proxy a keepalive is answered at the proxy's
    // own renewal pace (TTL/3), later than pier's TTL/4 attempt timeout,
    // and the hosts' leases expired at rest (BENCHMARKS.md, Scale).
    // SIM_PROXY_ALL=1 sends the hosts' connections through them too.
    let proxy_all = a.proxies > 0 && std::env::var("SIM_PROXY_ALL").is_ok_and(|v| v == "1");
    let direct = |key: String| {
        let eps = cluster.clients.clone();
        async move {
            let sec = pier_store::EtcdSecurity::default();
            EtcdStore::connect_spread(&eps, &sec, &key).await
        }
    };
    for c in 0..a.clients {
        loop {
            let r = if proxy_all {
                connect(format!("client-{c}"), c).await
            } else {
                direct(format!("client-{c}")).await
            };
            match r {
                Ok(s) => {
                    // A member with no leader yet refuses; wait for one.
                    if s.list(keys::ROOT).await.is_ok() {
                        clients.push(Arc::new(s));
                        break;
                    }
                }
                Err(e) if t_up.elapsed() > Duration::from_secs(30) => {
                    bail!("etcd cluster not up in 30 s: {e}")
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "1. etcd: 3 members up in {:.1} s; {} client connection(s) for {} hosts{}",
        t_up.elapsed().as_secs_f64(),
        clients.len(),
        a.hosts,
        if a.proxies > 0 {
            format!(", through {} grpc-proxy relay(s)", a.proxies)
        } else {
            String::new()
        }
    );
    let cancel = CancellationToken::new();
    let relays = Relays::start(&a, &cluster, &cancel).await?;
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    sampler(cluster.clients.clone(), sampling.clone());
    let cpu0 = cluster.metric("process_cpu_seconds_total");
    let props0 = cluster.metric("etcd_server_proposals_committed_total");

    // 2. Cold start: every host at once.
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    let mut host_cancel = Vec::new();
    for h in 0..a.hosts {
        let c = cancel.child_token();
        host_cancel.push(c.clone());
        let store = clients[h % clients.len()].clone();
        let a2 = a.clone();
        set.spawn(async move { (h, register(&a2, h, store, c).await) });
    }
    let mut keepers = vec![None; a.hosts];
    while let Some(r) = set.join_next().await {
        let (h, k) = r?;
        keepers[h] = Some(k.with_context(|| format!("host-{h} registration"))?);
    }
    let took = t0.elapsed();
    let writes = a.hosts * (a.endpoints + 1);
    println!(
        "2. cold start: {} hosts registered ({} endpoints, {} keys in {} write requests{}, {} leases) in {:.2} s: {:.0} keys/s; leases lost mid-way {}, grants retried {}, writes retried {} [load {}]",
        a.hosts,
        a.hosts * a.endpoints,
        writes,
        WRITES.load(Ordering::Relaxed),
        match txn_ops() {
            1 => ", one put per key".to_owned(),
            n => format!(", txns of up to {n} keys (SIM_TXN)"),
        },
        a.hosts,
        took.as_secs_f64(),
        writes as f64 / took.as_secs_f64(),
        LEASES_LOST.load(Ordering::Relaxed),
        GRANT_RETRIES.load(Ordering::Relaxed),
        PUT_RETRIES.load(Ordering::Relaxed),
        load()
    );

    // 3. The reflectors list at once.
    let rss0 = rss_mb("self");
    let t0 = Instant::now();
    let mut refl = Vec::new();
    let mut refl_leases = Vec::new();
    for r in 0..a.reflectors {
        let s: Arc<dyn Store> =
            Arc::new(retry("connect", || connect(format!("host-{r}"), r)).await?);
        let ttl = Ttl::from_secs(a.ttl)?;
        // Through the relays: lists and watches of the whole prefix go to
        // them, the barrier and the lease to the member.
        let s = relays.wrap(s, r);
        let ks: Arc<dyn Store> = if a.proxies > 0 {
            Arc::new(retry("connect", || direct(format!("host-{r}"))).await?)
        } else {
            s.clone()
        };
        let k = retry("reflector lease", || {
            LeaseKeeper::start(ks.clone(), ttl, cancel.child_token())
        })
        .await?;
        refl.push(Reflector::spawn_with_hold(
            s,
            cancel.child_token(),
            k.health(),
            HoldPolicy::for_ttl(Ttl::from_secs(a.ttl)?),
            &Name::new(&format!("host-{r}"))?,
        ));
        refl_leases.push(k);
    }
    let total = a.hosts * a.endpoints;
    let mut synced = until_all(&refl, Duration::from_secs(600), t0, move |s| {
        endpoint_count(s) == total
    })
    .await?;
    synced.sort();
    let rss1 = rss_mb("self");
    println!(
        "3. {} reflectors listed at once: all synced in {:.2} s (first {:.2} s); RSS +{:.0} MB, {:.0} MB per host snapshot [load {}]",
        a.reflectors,
        synced.last().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        synced[0].as_secs_f64(),
        rss1 - rss0,
        (rss1 - rss0) / a.reflectors as f64,
        load()
    );
    let mut drains = JoinSet::new();
    // With relays, the plain watches stand in for other hosts: by default
    // they only frame the relay's stream (following its revision, as a
    // client resumes), decoding nothing, since a host decodes its own
    // stream on its own cores; SIM_RELAY_DECODE=1 decodes every event
    // here, through `relayed`, as a reflector's watch does.
    let relay_decode = std::env::var("SIM_RELAY_DECODE").is_ok_and(|v| v == "1");
    if a.watches > 0 {
        let rev = retry("list", || clients[0].list(keys::prefix::NODES))
            .await?
            .revision;
        for i in 0..a.watches {
            if !relays.addrs.is_empty() && !relay_decode {
                let addr = relays.addrs[i % relays.addrs.len()].clone();
                drains.spawn(drain_relay(addr, rev + 1, cancel.clone()));
                continue;
            }
            // Through the relays a watch needs no connection of its own to
            // etcd: it shares a host connection for what is not relayed.
            let s: Arc<dyn Store> = if relays.addrs.is_empty() {
                Arc::new(retry("connect", || connect(format!("watch-{i}"), i)).await?)
            } else {
                relays.wrap(clients[i % clients.len()].clone(), i)
            };
            let mut w = retry("watch", || s.watch(keys::ROOT, rev + 1)).await?;
            let c = cancel.clone();
            drains.spawn(async move {
                loop {
                    tokio::select! {
                        _ = c.cancelled() => return,
                        i = w.next() => if i.is_none() { return },
                    }
                }
            });
        }
        println!("   + {} plain watches on the whole prefix", a.watches);
    }

    // 4. Propagation.
    let mut lat = Vec::new();
    let mut worst = Vec::new();
    for i in 0..a.probes {
        let h = (i * 7919) % a.hosts;
        let j = (i * 31) % a.endpoints.max(1);
        let (k, v) = endpoint(&a, h, j, i % 2 == 1);
        let lease = keepers[h].as_ref().and_then(|k| k.current());
        let t0 = Instant::now();
        let c = &clients[h % clients.len()];
        let rev = retry("probe put", || c.put(&k, v.clone(), lease)).await?;
        let mut per = until_all(&refl, Duration::from_secs(30), t0, move |s| {
            s.revision >= rev
        })
        .await?;
        per.sort();
        worst.push(*per.last().expect("reflectors"));
        lat.extend(per);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort();
    worst.sort();
    println!(
        "4. propagation over {} puts: put -> one reflector p50 {:.1} / p99 {:.1} / max {:.1} ms; -> every reflector p50 {:.1} / p99 {:.1} / max {:.1} ms [load {}]",
        a.probes,
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0)),
        ms(pct(&worst, 0.5)),
        ms(pct(&worst, 0.99)),
        ms(pct(&worst, 1.0)),
        load()
    );

    // 5. Host loss: 10 % stop renewing.
    let lost: Vec<usize> = (0..a.hosts).filter(|h| h % 10 == 3).collect();
    let gone: BTreeSet<Name> = lost.iter().map(|h| name(&format!("host-{h}"))).collect();
    let t0 = Instant::now();
    for h in &lost {
        host_cancel[*h].cancel();
    }
    let g = gone.clone();
    let mut marked = until_all(&refl, Duration::from_secs(120), t0, move |s| {
        !s.nodes.keys().any(|n| g.contains(n))
            && !s
                .endpoints
                .values()
                .any(|m| m.keys().any(|(n, _)| g.contains(n)))
    })
    .await?;
    marked.sort();
    println!(
        "5. {} hosts lost (10 %): their endpoints gone from every reflector {:.2} s after (lease TTL {} s; first {:.2} s) [load {}]",
        lost.len(),
        marked.last().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        a.ttl,
        marked[0].as_secs_f64(),
        load()
    );

    // 5b. The supervisor on the simulated hosts.
    if a.rs > 0 {
        let lost2: BTreeSet<usize> = (0..a.hosts).filter(|h| h % 10 == 7).collect();
        let leader: Arc<dyn Store> = if a.proxies > 0 {
            Arc::new(retry("connect", || direct("leader".into())).await?)
        } else {
            clients[0].clone()
        };
        supervised(
            &a,
            &clients,
            leader,
            &refl,
            &keepers,
            &lost,
            &lost2,
            &host_cancel,
        )
        .await?;
    }

    // 6. etcd.
    let wall = t_up.elapsed().as_secs_f64();
    let cpu1 = cluster.metric("process_cpu_seconds_total");
    let props1 = cluster.metric("etcd_server_proposals_committed_total");
    let rss = cluster.metric("process_resident_memory_bytes");
    let db = cluster.metric("etcd_mvcc_db_total_size_in_bytes");
    let watchers = cluster.metric("etcd_debugging_mvcc_watcher_total");
    let keys_total = cluster.metric("etcd_debugging_mvcc_keys_total");
    let leader_changes = cluster.metric("etcd_server_leader_changes_seen_total");
    let ka_streams = cluster.metric("grpc_server_started_total{grpc_method=\"LeaseKeepAlive\"");
    let ka_msgs = cluster.metric("grpc_server_msg_received_total{grpc_method=\"LeaseKeepAlive\"");
    for i in 0..3 {
        println!(
            "6. etcd m{i}: CPU {:.1} s over the run ({:.0} %), RSS {:.0} MB, db {:.1} MB, watchers {}, keys {}, leader changes seen {}, proposals committed {:.0} ({:.0}/s)",
            cpu1[i] - cpu0[i],
            100.0 * (cpu1[i] - cpu0[i]) / wall,
            rss[i] / 1048576.0,
            db[i] / 1048576.0,
            watchers[i],
            keys_total[i],
            leader_changes[i],
            props1[i] - props0[i],
            (props1[i] - props0[i]) / wall
        );
    }
    println!(
        "6. etcd, all members: LeaseKeepAlive streams opened {:.0}, keepalives received {:.0} ({:.0}/s)",
        ka_streams.iter().sum::<f64>(),
        ka_msgs.iter().sum::<f64>(),
        ka_msgs.iter().sum::<f64>() / wall
    );
    for (i, (cpu, rss)) in cluster.proxy_usage().into_iter().enumerate() {
        println!(
            "6. grpc-proxy p{i}: CPU {cpu:.1} s over the run ({:.0} %), RSS {rss:.0} MB",
            100.0 * cpu / wall
        );
    }

    relays.report(wall);

    sampling.store(true, Ordering::Relaxed);
    cancel.cancel();
    while drains.join_next().await.is_some() {}
    drop(keepers);
    drop(refl_leases);

    drop(relays);

    // 7. The supervisor's full pass.
    supervisor_pass(&a)?;
    drop(cluster);
    Ok(())
}

/// Whether every set `set-0..rs` has `replicas` Running, ready pods, none
/// on a host in `not_on`.
fn all_running(s: &Snapshot, a: &Args, not_on: &BTreeSet<Name>) -> bool {
    // Cheap first: this runs on every snapshot while the step waits.
    if s.pod_statuses.len() < a.rs * a.replicas {
        return false;
    }
    let mut per: std::collections::HashMap<&Name, usize> = std::collections::HashMap::new();
    for (k, p) in s.pods.iter() {
        let ok = s
            .pod_statuses
            .get(k)
            .is_some_and(|st| st.ready && st.phase == pier_model::PodPhase::Running);
        if ok && !not_on.contains(&p.node) {
            *per.entry(&p.replicaset).or_default() += 1;
        }
    }
    per.len() == a.rs && per.values().all(|n| *n == a.replicas)
}

/// Step 5b: `a.rs` sets of `a.replicas` run by pier's supervisor (leader
/// on reflector 0's snapshot); each live host's "runtime" marks its pods
/// Running at once (a podstatus under its lease, written by one task for
/// all hosts, from reflector 0's snapshot). Then 10 % more hosts (`lost2`)
/// stop renewing: the time until their pods are replaced and Running.
#[allow(clippy::too_many_arguments)]
async fn supervised(
    a: &Args,
    clients: &[Arc<dyn Store>],
    leader_store: Arc<dyn Store>,
    refl: &[Reflector],
    keepers: &[Option<LeaseKeeper>],
    lost: &[usize],
    lost2: &BTreeSet<usize>,
    host_cancel: &[CancellationToken],
) -> Result<()> {
    let ns = Namespace::default();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let dead: Arc<std::sync::Mutex<BTreeSet<Name>>> = Arc::new(std::sync::Mutex::new(
        lost.iter().map(|h| name(&format!("host-{h}"))).collect(),
    ));
    // The runtime: one task for every host.
    {
        let mut rx = refl[0].subscribe();
        let store = clients[0].clone();
        // Each host's keeper: a status goes under the host's lease of the
        // moment (a host whose lease expired and was granted again writes
        // its statuses again, as an agent does).
        let keepers: Vec<Option<LeaseKeeper>> = keepers.to_vec();
        let dead = dead.clone();
        let c = cancel.clone();
        let ns = ns.clone();
        tokio::spawn(async move {
            // Statuses written, and when: one missing from the snapshot
            // (its lease expired) is written again after 2 s.
            let mut done: std::collections::HashMap<Name, Instant> =
                std::collections::HashMap::new();
            // The pods that may need a status, kept from the difference of
            // each snapshot with the one before (as an agent's runtime sees
            // only its own changes), not by scanning every pod each time.
            let mut pending: BTreeSet<pier_model::ObjectKey> = BTreeSet::new();
            let mut prev = Arc::new(Snapshot::default());
            loop {
                let snap = rx.borrow_and_update().clone();
                for d in prev.pods.diff(&snap.pods) {
                    match d {
                        DiffItem::Add(k, _) | DiffItem::Update { new: (k, _), .. } => {
                            pending.insert(k.clone());
                        }
                        DiffItem::Remove(k, _) => {
                            pending.remove(k);
                        }
                    }
                }
                for d in prev.pod_statuses.diff(&snap.pod_statuses) {
                    match d {
                        DiffItem::Add(k, _) | DiffItem::Update { new: (k, _), .. } => {
                            pending.remove(k);
                        }
                        // A status gone with its lease: write it again.
                        DiffItem::Remove(k, _) => {
                            if snap.pods.contains_key(k) {
                                pending.insert(k.clone());
                            }
                        }
                    }
                }
                pending.retain(|k| snap.pods.contains_key(k) && !snap.pod_statuses.contains_key(k));
                prev = snap.clone();
                let dead_now = dead.lock().map(|d| d.clone()).unwrap_or_default();
                let todo: Vec<_> = pending
                    .iter()
                    .filter_map(|k| snap.pods.get(k))
                    .filter(|p| {
                        done.get(&p.name)
                            .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
                            && !dead_now.contains(&p.node)
                    })
                    .cloned()
                    .collect();
                // The hosts' runtimes work in parallel: up to 64 puts in flight.
                let mut puts = JoinSet::new();
                for p in todo {
                    while puts.len() >= 64 {
                        if let Some(Ok((n, true))) = puts.join_next().await {
                            done.insert(n, Instant::now());
                        }
                    }
                    let h: usize = p.node.as_str()["host-".len()..].parse().unwrap_or(0);
                    let st = serde_json::json!({"name": p.name.as_str(), "node": p.node.as_str(),
                        "phase": "Running", "ready": true, "started_at": pier_model::now_ms()});
                    let key = keys::pod_status(&ns, &p.name);
                    let lease = keepers.get(h).and_then(|k| k.as_ref()?.current());
                    let store = store.clone();
                    puts.spawn(async move {
                        let ok = store
                            .put(&key, st.to_string().into_bytes(), lease)
                            .await
                            .is_ok();
                        (p.name.clone(), ok)
                    });
                }
                while let Some(r) = puts.join_next().await {
                    if let Ok((n, true)) = r {
                        done.insert(n, Instant::now());
                    }
                }
                tokio::select! {
                    _ = c.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        });
    }
    if a.prefill {
        write_sets(a, &clients[0]).await?;
        prefill(a, &clients[0], lost).await?;
        let want = a.rs * a.replicas;
        let t = Instant::now();
        until_all(&refl[..1], Duration::from_secs(1200), t, move |s| {
            s.pods.len() >= want
        })
        .await?;
        let a2 = a.clone();
        let none = BTreeSet::new();
        let up = until_all(&refl[..1], Duration::from_secs(1200), t, move |s| {
            all_running(s, &a2, &none)
        })
        .await?;
        println!(
            "5b. prefill: {} pods and their statuses written by the simulator, all Running after {:.2} s [load {}]",
            want,
            up[0].as_secs_f64(),
            load()
        );
    }
    let cfg = pier_supervisor::SupervisorConfig::default();
    let sup = pier_supervisor::Supervisor::new(
        cfg.clone(),
        name("host-0"),
        leader_store,
        refl[0].subscribe(),
    )?;
    let leader = sup.is_leader();
    tokio::spawn(sup.run(cancel.child_token()));
    tokio::time::timeout(Duration::from_secs(120), leader.clone().wait_for(|l| *l))
        .await
        .context("no supervisor leader in 120 s")??;
    // The supervisor's writes must not starve the hosts' keepalives (as
    // registration in transactions did): leases lost from here on, and
    // times the leader lost its own election lease, are counted.
    let lost0 = LEASES_LOST.load(Ordering::Relaxed);
    let leader_lost = Arc::new(AtomicUsize::new(0));
    {
        let mut l = leader.clone();
        let n = leader_lost.clone();
        let c = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    r = l.changed() => if r.is_err() { return },
                }
                if !*l.borrow_and_update() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let t0 = Instant::now();
    if !a.prefill {
        write_sets(a, &clients[0]).await?;
    }
    let want = a.rs * a.replicas;
    // 100,000 pods at 1,000 hosts take about 12 min in a dev build on this
    // shared machine (the scheduler: every node scored per pod): the waits
    // below allow 40 and 20 min.
    // Progress on stderr every 15 s (pods written, Running), so that a run
    // stopped early still shows its rate.
    {
        let r = refl[0].clone();
        let c = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                }
                let s = r.snapshot();
                eprintln!(
                    "   5b progress at {:.0} s: {} pods, {} statuses; process RSS {:.0} MB [load {}]",
                    t0.elapsed().as_secs_f64(),
                    s.pods.len(),
                    s.pod_statuses.len(),
                    rss_mb("self"),
                    load()
                );
            }
        });
    }
    let written = until_all(&refl[..1], Duration::from_secs(2400), t0, move |s| {
        s.pods.len() >= want
    })
    .await?;
    let none = BTreeSet::new();
    let a2 = a.clone();
    let up = until_all(&refl[..1], Duration::from_secs(2400), t0, move |s| {
        all_running(s, &a2, &none)
    })
    .await?;
    println!(
        "5b. supervisor: {} sets × {} = {} pods written by the leader in {:.2} s, all Running (simulated runtime) in {:.2} s; hosts' leases lost meanwhile {} [load {}]",
        a.rs,
        a.replicas,
        want,
        written[0].as_secs_f64(),
        up[0].as_secs_f64(),
        LEASES_LOST.load(Ordering::Relaxed) - lost0,
        load()
    );
    // The leader writes a rollout record per set with its first pods (the
    // prefill does not): the loss starts once every set has one, with the
    // leader idle.
    let sets = a.rs;
    let t1 = Instant::now();
    until_all(&refl[..1], Duration::from_secs(600), t1, move |s| {
        s.rollouts.len() >= sets
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "5b. every set has its rollout record {:.2} s later; the leader idle, 10 % more hosts stop renewing [load {}]",
        t1.elapsed().as_secs_f64(),
        load()
    );
    let lost1 = LEASES_LOST.load(Ordering::Relaxed);
    let gone: BTreeSet<Name> = lost2.iter().map(|h| name(&format!("host-{h}"))).collect();
    let on_lost = refl[0]
        .snapshot()
        .pods
        .values()
        .filter(|p| gone.contains(&p.node))
        .count();
    let t0 = Instant::now();
    if let Ok(mut d) = dead.lock() {
        d.extend(gone.iter().cloned());
    }
    for h in lost2 {
        host_cancel[*h].cancel();
    }
    let g = gone.clone();
    let marked = until_all(&refl[..1], Duration::from_secs(120), t0, move |s| {
        !s.nodes.keys().any(|n| g.contains(n))
    })
    .await?;
    // Written: no pod left on a lost host, every set at its count again.
    let g = gone.clone();
    let want2 = want;
    let rewritten = until_all(&refl[..1], Duration::from_secs(1200), t0, move |s| {
        s.pods.len() == want2 && !s.pods.values().any(|p| g.contains(&p.node))
    })
    .await?;
    let a2 = a.clone();
    let g = gone.clone();
    let replaced = until_all(&refl[..1], Duration::from_secs(1200), t0, move |s| {
        all_running(s, &a2, &g)
    })
    .await
    .with_context(|| {
        format!(
            "hosts' leases lost since the hosts were lost: {}",
            LEASES_LOST.load(Ordering::Relaxed) - lost1
        )
    })?;
    println!(
        "5b. {} more hosts lost (10 %), {} pods on them: marked (node records gone) after {:.2} s, replacements written after {:.2} s, replaced and Running after {:.2} s (node_grace_ms {}) [load {}]",
        lost2.len(),
        on_lost,
        marked[0].as_secs_f64(),
        rewritten[0].as_secs_f64(),
        replaced[0].as_secs_f64(),
        cfg.node_grace_ms,
        load()
    );
    println!(
        "5b. hosts' leases lost while their pods were replaced {} (the lost hosts' own not counted); supervisor leadership lost {} time(s) in step 5b",
        LEASES_LOST.load(Ordering::Relaxed) - lost1,
        leader_lost.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The sets `set-0..rs` in txns of 100 (as one `pier apply` of many would),
/// so that the leader, not this loop, bounds how fast their pods are
/// written.
async fn write_sets(a: &Args, store: &Arc<dyn Store>) -> Result<()> {
    let ns = Namespace::default();
    let sets: Vec<usize> = (0..a.rs).collect();
    for chunk in sets.chunks(100) {
        let success: Vec<pier_store::TxnOp> = chunk
            .iter()
            .map(|r| pier_store::TxnOp::Put {
                key: keys::replicaset(&ns, &name(&format!("set-{r}"))),
                value: set_json(a, *r).to_string().into_bytes(),
                lease: None,
            })
            .collect();
        retry("replica set txn", || {
            store.txn(pier_store::Txn {
                compares: vec![],
                success: success.clone(),
                failure: vec![],
            })
        })
        .await?;
    }
    Ok(())
}

fn set_json(a: &Args, r: usize) -> serde_json::Value {
    serde_json::json!({"name": format!("set-{r}"),
        "template": {"image": "sim:1"}, "replicas": a.replicas})
}

/// `--prefill 1`: the sets' pods written by the simulator, as the leader
/// would write them (same records; placed round-robin over the hosts not
/// in `lost`, so a set's pods are on distinct hosts), in transactions of
/// 128 puts, 2 in flight (the leader's pace). The runtime task marks them
/// Running as it does the leader's.
async fn prefill(a: &Args, store: &Arc<dyn Store>, lost: &[usize]) -> Result<()> {
    let ns = Namespace::default();
    let live: Vec<usize> = (0..a.hosts).filter(|h| !lost.contains(h)).collect();
    let mut ops = Vec::with_capacity(a.rs * a.replicas);
    let mut i = 0usize;
    for r in 0..a.rs {
        let rs: pier_model::ReplicaSet = serde_json::from_value(set_json(a, r))?;
        let hash = rs.template.hash();
        for p in 0..a.replicas {
            let node = name(&format!("host-{}", live[i % live.len()]));
            i += 1;
            let pod = pier_model::Pod {
                name: name(&format!("set-{r}-p{p:03}")),
                namespace: ns.clone(),
                replicaset: rs.name.clone(),
                node,
                template_hash: hash.clone(),
                template: rs.template.clone(),
                created_at: pier_model::now_ms(),
            };
            ops.push(pier_store::TxnOp::Put {
                key: keys::pod(&ns, &pod.name),
                value: pier_model::encode(&pod),
                lease: None,
            });
        }
    }
    let txns: Vec<Vec<pier_store::TxnOp>> = ops.chunks(128).map(<[_]>::to_vec).collect();
    let results: Vec<Result<()>> = futures::stream::iter(txns.into_iter().map(|success| {
        let store = store.clone();
        async move {
            retry("prefill txn", || {
                store.txn(pier_store::Txn {
                    compares: vec![],
                    success: success.clone(),
                    failure: vec![],
                })
            })
            .await
            .map(|_| ())
        }
    }))
    .buffer_unordered(2)
    .collect()
    .await;
    results.into_iter().collect()
}

/// One leader's pass over every set on a snapshot of `a.pods` pods.
fn supervisor_pass(a: &Args) -> Result<()> {
    let ns = Namespace::default();
    let mut snap = Snapshot::default();
    let per = a.pods / a.sets;
    let template = serde_json::json!({"image": "sim:1", "ports": [{"name": "http", "port": 8080}]});
    {
        let nodes = &mut snap.nodes;
        for h in 0..a.hosts {
            let (_, v) = node_record(h);
            nodes.insert(
                name(&format!("host-{h}")),
                Arc::new(pier_model::decode(&keys::node(&name("x")), &v)?),
            );
        }
    }
    let mut hash = String::new();
    for s in 0..a.sets {
        let rs: pier_model::ReplicaSet = serde_json::from_value(serde_json::json!({
            "name": format!("set-{s}"), "template": template, "replicas": per,
        }))?;
        hash = rs.template.hash();
        snap.replicasets
            .insert((ns.clone(), rs.name.clone()), Arc::new(rs));
    }
    let mut i = 0usize;
    for s in 0..a.sets {
        for p in 0..per {
            let pn = format!("set-{s}-{p:05}");
            let node = format!("host-{}", i % a.hosts);
            i += 1;
            let pod: pier_model::Pod = serde_json::from_value(serde_json::json!({
                "name": pn, "replicaset": format!("set-{s}"), "node": node,
                "template_hash": hash, "template": template, "created_at": 1,
            }))?;
            let st: pier_model::PodStatus = serde_json::from_value(serde_json::json!({
                "name": pn, "node": node, "phase": "Running", "ready": true, "started_at": 1,
            }))?;
            snap.pods.insert((ns.clone(), name(&pn)), Arc::new(pod));
            snap.pod_statuses
                .insert((ns.clone(), name(&pn)), Arc::new(st));
        }
    }
    let expired = BTreeSet::new();
    let mut n = 0u32;
    let mut suffix = move || {
        n += 1;
        format!("{n:05}")
    };
    let keys: Vec<_> = snap.replicasets.keys().cloned().collect();
    let t0 = Instant::now();
    // As the controller does: the index once per snapshot (--scan: none).
    let index =
        (!std::env::var("SIM_SCAN").is_ok_and(|v| v == "1")).then(|| PodIndex::build(&snap));
    let mut one = Duration::ZERO;
    let mut actions = 0usize;
    // As the leader plans a batch: the sets share the nodes' usage.
    let mut usage = SharedUsage::default();
    for (k_i, k) in keys.iter().enumerate() {
        let t = Instant::now();
        let mut input = PlanInput {
            now_ms: pier_model::now_ms(),
            replace_failed: true,
            expired_nodes: &expired,
            suffix: &mut suffix,
            index: index.as_ref(),
            usage: Some(&mut usage),
            respread: Default::default(),
        };
        let p = plan(&snap, k, &mut input);
        actions += p.actions.len();
        if k_i == 0 {
            one = t.elapsed();
        }
    }
    println!(
        "7. supervisor ({}): a full pass over {} sets, {} pods on {} nodes: {:.2} s ({:.2} ms for one set; {} actions) [load {}]",
        if index.is_some() {
            "pods indexed by set"
        } else {
            "SIM_SCAN=1: every pod scanned per set"
        },
        a.sets,
        snap.pods.len(),
        a.hosts,
        t0.elapsed().as_secs_f64(),
        ms(one),
        actions,
        load()
    );
    Ok(())
}
