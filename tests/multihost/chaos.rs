//! The chaos run (issue 17, section 5): 3 hosts, each with its own dockerd,
//! etcd member and `pier agent` (the mesh on), a replica set `web` exposed
//! on a VIP and a node port, and for a bounded time:
//!
//! - **faults**, one at a time, chosen from a seed (`CHAOS_SEED`; printed):
//!   a pod kill (`docker kill` of one of `web`'s containers), an agent
//!   `kill -9` and restart, a dockerd restart (SIGTERM, which stops its
//!   containers, as `systemctl restart docker` without live-restore), an
//!   etcd member `kill -9` and restart, a host cut off the switch and
//!   healed. Each lasts 1 to 6 s (the time before the restart or the
//!   heal); then the run waits for the cluster to converge (below), up to
//!   [`CONVERGE_LIMIT`], and 0.5 to 2 s more;
//! - **clients**, one thread in each host's namespace, alternate HTTP GETs
//!   to the VIP and to that host's node port, 10 a second at most, each
//!   logged with its start, end and result (the pod that answered, or the
//!   error); bounded by the run's deadline and a count;
//! - **a writer** scales `web` (2 to 4) and sets node labels through a
//!   random host's API (`pier scale`, `pier label`), every 1.5 s, each
//!   write logged with whether it was acknowledged;
//! - **a monitor** per host polls its API (5 times a second): `/readyz`,
//!   nodes, `web`'s endpoints, pods and desired count.
//!
//! "Converged" is: every agent ready (store fresh), every host sees the 3
//! nodes ready, `web` has exactly its desired count of pods and all are
//! running and ready, every host's ready endpoints of `web` are those
//! pods, and the containers running on the dockerds are those pods (no
//! orphan left on a healed host); after an etcd fault, also the member's
//! `endpoint health`.
//!
//! The checker then reports, and fails the test on:
//! - a failed request that no fault explains: a cut explains the failures
//!   of requests that overlap it (from the cut to convergence after the
//!   heal); a pod kill and a dockerd stop explain the requests in flight
//!   when they struck (from the fault's start to the moment its command
//!   returned): the connection to the killed process is gone. An agent
//!   kill explains nothing (`kill -9` of the keeper leaves its worker, the
//!   data plane, serving until the restarted agent adopts it), nor does an
//!   etcd member kill. The report counts each cause;
//! - a stale endpoint: a request answered by a pod that had left the ready
//!   endpoints of the client's host (for good) more than [`STALE_SLACK`]
//!   before the request started;
//! - a lost write: for the replica count and each node label, the value at
//!   the end must be the last acknowledged one, or one written after it
//!   without acknowledgement (an unacknowledged write may have landed);
//! - a fault after which the cluster did not converge within
//!   [`CONVERGE_LIMIT`] (the run stops there);
//! - in the documented runs (`chaos_ten_minutes`; `chaos_run` with
//!   `CHAOS_GOALS=1`), also a fault after which it converged later than
//!   [`CONVERGE_BOUND`], the goal of 2 lease TTLs. `chaos_run` in
//!   CI reports such a miss but passes on it: it is a time, and times are
//!   measured in the documented runs on a quiet machine (RELIABILITY.md),
//!   not asserted on a CI machine whose load no test controls. Everything
//!   else it asserts: no unexplained failure, no stale answer, no lost
//!   write, convergence after every fault.
//!
//! It also prints the time `web` spent below and above its desired count
//! after each fault. The results are in RELIABILITY.md.
//!
//! `CHAOS_SECS` (default 60, or 600 for `chaos_ten_minutes`) is the time
//! faults are started in; `CHAOS_RELAYS=1` runs it on the watch relay
//! topology (h1 serves `[relay]`, h2 and h3 list and watch through it, as
//! in `relay.rs`), where an agent kill, a cut or an etcd fault on h1 is
//! also one of the relay; `CHAOS_FAULTS` (say `dockerd,cut`) limits the
//! kinds; on a failure (or with `CHAOS_KEEP_LOGS=1`) the hosts' logs are
//! kept in `$TMPDIR/pier-chaos-<seed>/` (`.2`, `.3`… when that exists;
//! `PIER_LOG` reaches the agents,
//! e.g. `info,pier_proxy=debug`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::http_get_auth;
use serde_json::Value;

use crate::cluster::{API, Cluster, LEASE_TTL, POD_PORT};
use crate::netns;

/// The topology number (`10.214.13.0/24`).
const K: u8 = 13;
const HOSTS: usize = 3;
/// How long the run waits for convergence after a fault before it stops
/// injecting and fails.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
/// The goal: convergence within 2 lease TTLs after each fault ends.
const CONVERGE_BOUND: Duration = Duration::from_secs(2 * LEASE_TTL.as_secs());
/// A request that starts this long after its host's snapshot (as its API
/// showed it) lost a pod's endpoint for good, yet is answered by that pod,
/// is stale. The API and the proxy take the same snapshot, a few ms apart.
const STALE_SLACK: Duration = Duration::from_millis(100);
const MONITOR_EVERY: Duration = Duration::from_millis(200);
/// etcd expires leases in a sweep every 0.5 s; with room.
const LEASE_EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// 60 s of faults, in CI (tests/run.sh runs the workspace's tests): every
/// check but the 2-TTL convergence goal, which it reports (`CHAOS_GOALS=1`
/// enforces it too).
#[test]
fn chaos_run() -> Result<()> {
    let goals = match std::env::var("CHAOS_GOALS").as_deref() {
        Ok("1") => Goals::Enforced,
        Ok("0") | Err(_) => Goals::Reported,
        Ok(v) => anyhow::bail!("CHAOS_GOALS={v:?}: 1 (enforce the 2-TTL convergence goal) or 0"),
    };
    chaos(secs_from_env(60)?, goals)
}

/// The documented 10-minute run: `CHAOS_SECS` (default 600) of faults.
#[test]
#[ignore = "10 minutes: run with --ignored (RELIABILITY.md)"]
fn chaos_ten_minutes() -> Result<()> {
    chaos(secs_from_env(600)?, Goals::Enforced)
}

/// Whether a convergence slower than [`CONVERGE_BOUND`] fails the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goals {
    Enforced,
    /// Reported in the output, not failed on (CI: see the module doc).
    Reported,
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn secs_from_env(default: u64) -> Result<Duration> {
    let s = match std::env::var("CHAOS_SECS") {
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=86_400).contains(s))
            .with_context(|| format!("CHAOS_SECS={v:?}: a number of seconds, 1 to 86400"))?,
        Err(_) => default,
    };
    Ok(Duration::from_secs(s))
}

/// splitmix64: enough randomness for choosing faults, reproducible from
/// the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    PodKill,
    AgentKill,
    DockerdRestart,
    EtcdKill,
    Cut,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::PodKill,
        Kind::AgentKill,
        Kind::DockerdRestart,
        Kind::EtcdKill,
        Kind::Cut,
    ];
    /// The short name `CHAOS_FAULTS` takes.
    fn short(self) -> &'static str {
        match self {
            Kind::PodKill => "pod",
            Kind::AgentKill => "agent",
            Kind::DockerdRestart => "dockerd",
            Kind::EtcdKill => "etcd",
            Kind::Cut => "cut",
        }
    }

    /// `CHAOS_FAULTS` (a comma-separated list of `pod`, `agent`,
    /// `dockerd`, `etcd`, `cut`), every kind when unset.
    fn from_env() -> Result<Vec<Kind>> {
        let Ok(v) = std::env::var("CHAOS_FAULTS") else {
            return Ok(Kind::ALL.to_vec());
        };
        v.split(',')
            .map(|w| {
                Kind::ALL
                    .into_iter()
                    .find(|k| k.short() == w.trim())
                    .with_context(|| {
                        format!(
                            "CHAOS_FAULTS={v:?}: {w:?} is not one of pod, agent, dockerd, etcd, cut"
                        )
                    })
            })
            .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Kind::PodKill => "pod kill",
            Kind::AgentKill => "agent kill -9, restart",
            Kind::DockerdRestart => "dockerd restart",
            Kind::EtcdKill => "etcd member kill -9, restart",
            Kind::Cut => "host cut, heal",
        }
    }
}

/// One injected fault; times are since the run's start.
#[derive(Debug, Clone)]
struct Fault {
    kind: Kind,
    host: usize,
    detail: String,
    start: Duration,
    /// When the kill, the stop or the cut had been done (the command
    /// returned).
    hit: Duration,
    /// When it ended: the restart or the heal (the kill, for a pod kill).
    end: Duration,
    /// How long after `end` the cluster converged (`None`: not within
    /// [`CONVERGE_LIMIT`]).
    converged: Option<Duration>,
}

impl Fault {
    /// Until when this fault explains what it explains: convergence after
    /// it ended (or the limit).
    fn explains_until(&self) -> Duration {
        self.end + self.converged.unwrap_or(CONVERGE_LIMIT)
    }
}

#[derive(Debug, Clone)]
struct Req {
    host: usize,
    target: &'static str,
    start: Duration,
    end: Duration,
    /// The pod that answered, or what went wrong.
    result: std::result::Result<String, String>,
}

/// One poll of one host's API.
#[derive(Debug, Clone, Default)]
struct Sample {
    at: Duration,
    /// Whether every read answered.
    ok: bool,
    readyz: u16,
    nodes: BTreeMap<String, bool>,
    labels: BTreeMap<String, BTreeMap<String, String>>,
    /// `web`'s ready endpoints, by pod.
    eps: BTreeSet<String>,
    /// `web`'s pods, and those running and ready.
    pods: BTreeSet<String>,
    ready_pods: BTreeSet<String>,
    desired: Option<u64>,
}

#[derive(Debug, Clone)]
enum WriteOp {
    Scale(u64),
    Label {
        node: String,
        key: String,
        val: String,
    },
}

#[derive(Debug, Clone)]
struct WriteRec {
    at: Duration,
    host: usize,
    op: WriteOp,
    acked: bool,
    err: String,
}

/// What the threads share.
struct Shared {
    t0: Instant,
    stop: AtomicBool,
    stop_writes: AtomicBool,
    /// Clients whose first request was answered (they log from then on).
    warm: std::sync::atomic::AtomicUsize,
    samples: Vec<Mutex<Vec<Sample>>>,
}

impl Shared {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }
    fn latest(&self, i: usize) -> Option<Sample> {
        self.samples[i - 1].lock().unwrap().last().cloned()
    }
}

/// What a thread needs of a host, without the cluster.
#[derive(Clone)]
struct HostInfo {
    index: usize,
    netns: String,
    addr: IpAddr,
    token_file: PathBuf,
    config: PathBuf,
}

fn hosts(c: &Cluster) -> Vec<HostInfo> {
    c.topo
        .hosts
        .iter()
        .map(|h| HostInfo {
            index: h.index,
            netns: h.netns.clone(),
            addr: h.addr.into(),
            token_file: h.dir.join("pier-data").join("api-token"),
            config: h.dir.join("pier.toml"),
        })
        .collect()
}

fn chaos(secs: Duration, goals: Goals) -> Result<()> {
    let seed = match std::env::var("CHAOS_SEED") {
        Ok(s) => s
            .parse::<u64>()
            .with_context(|| format!("CHAOS_SEED={s:?}: a decimal u64"))?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    eprintln!(
        "chaos: CHAOS_SEED={seed} CHAOS_SECS={} load average {}",
        secs.as_secs(),
        loadavg()
    );
    let kinds = Kind::from_env()?;
    let relays = match std::env::var("CHAOS_RELAYS").as_deref() {
        Ok("1") => true,
        Ok("0") | Err(_) => false,
        Ok(v) => {
            anyhow::bail!("CHAOS_RELAYS={v:?}: 1 (h1 a watch relay, h2 and h3 through it) or 0")
        }
    };
    let mut rng = Rng(seed);
    let mut c = if relays {
        eprintln!(
            "chaos: CHAOS_RELAYS=1: h1 serves a watch relay, h2 and h3 list and watch through it"
        );
        Cluster::start_with(K, HOSTS, crate::relay::h1_relays)?
    } else {
        Cluster::start(K, HOSTS)?
    };
    c.cli(
        1,
        &[
            "run",
            "web",
            "--image",
            pier_tests::TEST_IMAGE,
            "--port",
            "8080",
            "--replicas",
            "3",
            "--wait",
            "--timeout",
            "60s",
        ],
    )?;
    c.cli(
        1,
        &[
            "expose", "rs", "web", "--port", "8080", "--type", "NodePort",
        ],
    )?;
    let svc = c.cli_json(1, &["get", "svc", "web"])?;
    let svc = svc.first().context("service web")?;
    let vip: IpAddr = svc["vip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("web's VIP in {svc}"))?;
    let node_port = svc["ports"][0]["node_port"]
        .as_u64()
        .with_context(|| format!("web's node port in {svc}"))? as u16;
    eprintln!("chaos: web on {vip}:{POD_PORT} and node port {node_port}");

    let infos = hosts(&c);
    let pier = c.pier.clone();
    eprintln!(
        "chaos: t0 (times below are since) = {:.3} s since the epoch (agents' logs are in UTC)",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64()
    );
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        stop_writes: AtomicBool::new(false),
        warm: std::sync::atomic::AtomicUsize::new(0),
        samples: (0..HOSTS).map(|_| Mutex::new(Vec::new())).collect(),
    });
    // Threads in the hosts' namespaces: monitors and clients.
    let mut monitors = Vec::new();
    let mut clients = Vec::new();
    // Every client's request count is bounded: 10 a second over the run and
    // its last convergence, with room.
    let max_reqs = (secs.as_secs() + 2 * CONVERGE_LIMIT.as_secs()) * 10 + 100;
    for h in &infos {
        let (sh2, h2) = (sh.clone(), h.clone());
        monitors.push(netns::in_netns_at(
            format!("/run/netns/{}", h.netns),
            move || monitor(&sh2, &h2),
        ));
        let (sh2, h2) = (sh.clone(), h.clone());
        let targets = [
            ("vip", SocketAddr::new(vip, POD_PORT)),
            ("nodeport", SocketAddr::new(h.addr, node_port)),
        ];
        clients.push(netns::in_netns_at(
            format!("/run/netns/{}", h.netns),
            move || Ok(client(&sh2, h2.index, targets, max_reqs)),
        ));
    }
    let writer = {
        let (sh2, infos2, pier2) = (sh.clone(), infos.clone(), pier.clone());
        let wseed = rng.next();
        std::thread::spawn(move || writer(&sh2, &infos2, &pier2, wseed))
    };

    // Before the first fault: converged, with every client answered.
    let start_ok = wait_converged(&sh, None, &c, Duration::ZERO).is_some()
        && pier_tests::eventually(Duration::from_secs(30), "every client answered", || {
            Ok((sh.warm.load(Ordering::SeqCst) == HOSTS).then_some(()))
        })
        .is_ok();
    let result = (|| -> Result<(Vec<Fault>, bool, Result<()>)> {
        ensure!(
            start_ok,
            "the cluster did not converge before the first fault{}",
            c.logs()
        );
        let mut faults = Vec::new();
        let mut injected = Ok(());
        let deadline = sh.now() + secs;
        let mut all_converged = true;
        while sh.now() < deadline {
            let mut f = match inject(&mut c, &kinds, &mut rng, &sh) {
                Ok(f) => f,
                Err(e) => {
                    // Still check and report what ran.
                    eprintln!("chaos: injecting a fault failed: {e:#}");
                    injected = Err(e);
                    break;
                }
            };
            let n = faults.len() + 1;
            let etcd = (f.kind == Kind::EtcdKill).then_some(f.host);
            // A cut host's lease may still expire after the heal (its
            // last renewal was before the cut): its fate is known only a
            // TTL (and etcd's 0.5 s expiry sweep) after the cut began, so
            // convergence is not judged before then.
            let not_before = match f.kind {
                Kind::Cut => f.start + LEASE_TTL + LEASE_EXPIRY_SLACK,
                _ => Duration::ZERO,
            };
            f.converged =
                wait_converged(&sh, etcd, &c, not_before).map(|at| at.saturating_sub(f.end));
            eprintln!(
                "chaos: fault {n} at {:.1}s: {} on h{} ({}), {:.1}s, converged after {}",
                f.start.as_secs_f64(),
                f.kind.name(),
                f.host,
                f.detail,
                (f.end - f.start).as_secs_f64(),
                f.converged.map_or("NO (limit)".to_owned(), |d| format!(
                    "{:.2}s",
                    d.as_secs_f64()
                ))
            );
            let ok = f.converged.is_some();
            faults.push(f);
            if !ok {
                all_converged = false;
                eprintln!("chaos: not converged; stopping the faults{}", c.logs());
                break;
            }
            std::thread::sleep(rng.millis(500, 2000));
        }
        Ok((faults, all_converged, injected))
    })();
    // The writes stop first, so that the monitors' last samples (2 s
    // later) show the last acknowledged one; then everything stops.
    sh.stop_writes.store(true, Ordering::SeqCst);
    let writes = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    std::thread::sleep(Duration::from_secs(2));
    sh.stop.store(true, Ordering::SeqCst);
    let mut reqs = Vec::new();
    for t in clients {
        reqs.extend(t.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    for t in monitors {
        t.join()
            .map_err(|_| anyhow::anyhow!("monitor panicked"))??;
    }
    let (faults, all_converged, injected) = result?;
    let store = store_view(&c).context("reading the writes back from etcd")?;
    let samples: Vec<Vec<Sample>> = sh
        .samples
        .iter()
        .map(|m| m.lock().unwrap().clone())
        .collect();
    let mut report = check(seed, secs, &faults, &reqs, &samples, &store, &writes);
    match goals {
        Goals::Enforced => report.problems.append(&mut report.goal_misses),
        Goals::Reported if !report.goal_misses.is_empty() => eprintln!(
            "chaos: {} convergence(s) slower than the 2-TTL goal, reported, not failed on (CHAOS_GOALS=1 fails on them)",
            report.goal_misses.len()
        ),
        Goals::Reported => {}
    }
    // What the supervisor did, from the agents' logs (every agent may have
    // led it at some point).
    let log_count = |needle: &[&str]| -> usize {
        c.topo
            .hosts
            .iter()
            .map(|h| {
                h.agent_log()
                    .lines()
                    .filter(|l| needle.iter().all(|n| l.contains(n)))
                    .count()
            })
            .sum()
    };
    eprintln!(
        "{}\nThe supervisor replaced {} pods as failed, created {}; the rollout was paused {} times.\nload average at the end: {}",
        report.text,
        log_count(&["pod deleted", "reason=failed"]),
        log_count(&["pod created"]),
        log_count(&["rollout revision=", "state=paused"]),
        loadavg()
    );
    if injected.is_err()
        || !all_converged
        || !report.problems.is_empty()
        || std::env::var_os("CHAOS_KEEP_LOGS").is_some()
    {
        keep_logs(&c, seed);
    }
    injected?;
    ensure!(
        all_converged,
        "a fault was not followed by convergence within {CONVERGE_LIMIT:?}"
    );
    ensure!(
        report.problems.is_empty(),
        "chaos run (CHAOS_SEED={seed}) broke its goals:\n{}",
        report.problems.join("\n")
    );
    Ok(())
}

/// Copy every host's agent, dockerd and etcd log to
/// `$TMPDIR/pier-chaos-<seed>/` (the topology's own dir goes with it), or
/// `pier-chaos-<seed>.<n>/` when an earlier run of the same seed kept its
/// logs there (a replay must not overwrite the run it replays).
fn keep_logs(c: &Cluster, seed: u64) {
    let tmp = std::env::temp_dir();
    let dir = (1..)
        .map(|n| match n {
            1 => tmp.join(format!("pier-chaos-{seed}")),
            n => tmp.join(format!("pier-chaos-{seed}.{n}")),
        })
        .find(|d| !d.exists())
        .expect("an unused name");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("chaos: cannot keep the logs in {}: {e}", dir.display());
        return;
    }
    for h in &c.topo.hosts {
        for f in ["agent.log", "dockerd.log", "etcd.log"] {
            let to = dir.join(format!("h{}-{f}", h.index));
            if let Err(e) = std::fs::copy(h.dir.join(f), &to) {
                eprintln!("chaos: copying {f} of h{}: {e}", h.index);
            }
        }
    }
    eprintln!("chaos: the hosts' logs are in {}", dir.display());
}

/// The replica count of `web` and the node label overlays, read straight
/// from etcd (host 1's member), as a [`Sample`].
fn store_view(c: &Cluster) -> Result<Sample> {
    use pier_model::{Name, Namespace, keys};
    let get = |key: &str| -> Result<Option<Value>> {
        let out = c.topo.host(1).exec(&[
            "etcdctl",
            "--endpoints",
            "http://127.0.0.1:2379",
            "get",
            key,
            "--print-value-only",
        ])?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if v.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_str(&v).with_context(|| format!("{key}: {v}"))?,
        ))
    };
    let mut s = Sample {
        ok: true,
        ..Sample::default()
    };
    let rs = get(&keys::replicaset(&Namespace::default(), &Name::new("web")?))?;
    s.desired = rs.and_then(|v| v["replicas"].as_u64());
    for i in 1..=HOSTS {
        let node = format!("h{i}");
        let labels = get(&keys::node_labels(&Name::new(&node)?))?
            .and_then(|v| v["labels"].as_object().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect();
        s.labels.insert(node, labels);
    }
    Ok(s)
}

/// Inject one fault, chosen with `rng`, and end it; returns it with its
/// times (not yet `converged`).
fn inject(c: &mut Cluster, kinds: &[Kind], rng: &mut Rng, sh: &Shared) -> Result<Fault> {
    let kind = kinds[rng.below(kinds.len())];
    let mut host = 1 + rng.below(HOSTS);
    let hold = rng.millis(1000, 6000);
    let start = sh.now();
    let hit;
    let mut detail = format!("down {:.1}s", hold.as_secs_f64());
    match kind {
        Kind::PodKill => {
            // A pod of `web` on the chosen host, or on the next one that has
            // one.
            let mut victim = None;
            for k in 0..HOSTS {
                let i = 1 + (host - 1 + k) % HOSTS;
                let out = c.topo.host(i).docker(&[
                    "ps",
                    "--filter",
                    "label=pier.replicaset=web",
                    "--format",
                    "{{.Names}}",
                ])?;
                let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if !names.is_empty() {
                    victim = Some((i, names[rng.below(names.len())].clone()));
                    break;
                }
            }
            let (i, name) = victim.context("no pod of web runs on any host")?;
            host = i;
            // It may have stopped since `docker ps` (an orphan removed after
            // a heal): that is no fault of the cluster's.
            if let Err(e) = c.topo.host(i).docker(&["kill", &name]) {
                let e = format!("{e:#}");
                ensure!(
                    e.contains("is not running") || e.contains("No such container"),
                    "{e}"
                );
                detail = format!("{name}: gone before the kill");
            }
            hit = sh.now();
            // pier names a pod's container `pier-<ns>-<pod>`.
            if detail.starts_with("down") {
                detail = name
                    .strip_prefix("pier-default-")
                    .unwrap_or(&name)
                    .to_owned();
            }
        }
        Kind::AgentKill => {
            c.kill_agent(host)?;
            hit = sh.now();
            std::thread::sleep(hold);
            c.restart_agent(host)?;
        }
        Kind::DockerdRestart => {
            c.topo.host_mut(host).stop_dockerd();
            hit = sh.now();
            std::thread::sleep(hold);
            c.topo.host_mut(host).start_dockerd()?;
        }
        Kind::EtcdKill => {
            c.topo.host_mut(host).kill_etcd()?;
            hit = sh.now();
            std::thread::sleep(hold);
            c.topo.host_mut(host).restart_etcd()?;
        }
        Kind::Cut => {
            c.topo.cut(host)?;
            hit = sh.now();
            std::thread::sleep(hold);
            c.topo.heal(host)?;
        }
    }
    Ok(Fault {
        kind,
        host,
        detail,
        start,
        hit,
        end: sh.now(),
        converged: None,
    })
}

/// Whether the latest samples of every host show the converged state.
fn converged(s: &[Sample]) -> bool {
    let Some(first) = s.first() else {
        return false;
    };
    s.iter().all(|x| {
        x.ok && x.readyz == 200
            && x.nodes.len() == HOSTS
            && x.nodes.values().all(|r| *r)
            && x.desired.is_some_and(|d| x.pods.len() as u64 == d)
            && x.ready_pods == x.pods
            && x.eps == x.pods
            && x.pods == first.pods
    })
}

/// Wait (up to [`CONVERGE_LIMIT`]) until every host's monitor has sampled
/// the converged state after now (and after `not_before`, since the run's
/// start); returns when (since the run's start).
/// `etcd`: a host whose etcd member must also report itself healthy.
fn wait_converged(
    sh: &Shared,
    etcd: Option<usize>,
    c: &Cluster,
    not_before: Duration,
) -> Option<Duration> {
    let from = sh.now().max(not_before);
    let limit = Instant::now() + CONVERGE_LIMIT;
    let mut etcd_ok = etcd.is_none();
    while Instant::now() < limit {
        if !etcd_ok {
            let i = etcd.unwrap_or(1);
            etcd_ok = c
                .topo
                .host(i)
                .exec(&[
                    "etcdctl",
                    "--endpoints",
                    "http://127.0.0.1:2379",
                    "--command-timeout",
                    "1s",
                    "endpoint",
                    "health",
                ])
                .is_ok();
        }
        let latest: Vec<Sample> = (1..=HOSTS).filter_map(|i| sh.latest(i)).collect();
        if etcd_ok
            && latest.len() == HOSTS
            && latest.iter().all(|s| s.at > from)
            && converged(&latest)
            && containers_are(c, &latest[0].pods)
        {
            // The last of the samples that showed it.
            return latest.iter().map(|s| s.at).max();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Whether the running containers of `web` on all hosts are exactly
/// `pods` (no orphan left running, none missing).
fn containers_are(c: &Cluster, pods: &BTreeSet<String>) -> bool {
    let mut running = BTreeSet::new();
    for h in &c.topo.hosts {
        let Ok(out) = h.docker(&[
            "ps",
            "--filter",
            "label=pier.replicaset=web",
            "--format",
            "{{.Label \"pier.pod\"}}",
        ]) else {
            return false;
        };
        for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if !running.insert(p.to_owned()) {
                return false;
            }
        }
    }
    running == *pods
}

/// Poll host `h`'s API until told to stop.
fn monitor(sh: &Shared, h: &HostInfo) -> Result<()> {
    let api: SocketAddr = API.parse()?;
    while !sh.stop.load(Ordering::SeqCst) {
        let mut s = Sample {
            at: sh.now(),
            ..Sample::default()
        };
        let token = std::fs::read_to_string(&h.token_file).unwrap_or_default();
        let token = token.trim().to_owned();
        let get = |path: &str| -> Option<Value> {
            match http_get_auth(&api, path, Some(&token)) {
                Ok((200, body)) => serde_json::from_str(&body).ok(),
                _ => None,
            }
        };
        s.readyz = pier_tests::http_get(&api, "/readyz").map_or(0, |r| r.0);
        let nodes = get("/api/v1/nodes");
        let eps = get("/api/v1/namespaces/default/endpoints/web");
        let pods = get("/api/v1/namespaces/default/pods");
        let rs = get("/api/v1/namespaces/default/replicasets/web");
        if let (
            Some(Value::Array(nodes)),
            Some(Value::Array(eps)),
            Some(Value::Array(pods)),
            Some(rs),
        ) = (nodes, eps, pods, rs)
        {
            s.ok = true;
            for n in &nodes {
                let name = n["name"].as_str().unwrap_or_default().to_owned();
                s.nodes
                    .insert(name.clone(), n["ready"].as_bool().unwrap_or(false));
                let labels = n["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                s.labels.insert(name, labels);
            }
            for e in &eps {
                if e["ready"] == true {
                    s.eps
                        .insert(e["pod"].as_str().unwrap_or("(no pod)").to_owned());
                }
            }
            for p in pods.iter().filter(|p| p["replicaset"] == "web") {
                let name = p["name"].as_str().unwrap_or_default().to_owned();
                if p["phase"] == "Running" && p["ready"] == true {
                    s.ready_pods.insert(name.clone());
                }
                s.pods.insert(name);
            }
            s.desired = rs["replicas"].as_u64();
        }
        sh.samples[h.index - 1].lock().unwrap().push(s);
        std::thread::sleep(MONITOR_EVERY);
    }
    Ok(())
}

/// One HTTP/1.0 GET of `/`: the pod that answered (the test image serves
/// its hostname, which is the pod's name), or the error.
fn request(addr: SocketAddr) -> std::result::Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = body.trim();
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "answer {:?}",
            head.lines().next().unwrap_or("(empty)")
        ));
    }
    if body.is_empty() || body.contains(char::is_whitespace) {
        return Err(format!("body {body:?}"));
    }
    Ok(body.to_owned())
}

/// Alternate requests to `targets` from host `host`'s namespace (this
/// thread is in it) until told to stop or `max` requests.
fn client(
    sh: &Shared,
    host: usize,
    targets: [(&'static str, SocketAddr); 2],
    max: u64,
) -> Vec<Req> {
    // Warm up (not logged): until both targets answer once (the service
    // was just exposed), at most 30 s.
    let warm_until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < warm_until
        && !targets.iter().all(|(_, a)| request(*a).is_ok())
        && !sh.stop.load(Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    sh.warm.fetch_add(1, Ordering::SeqCst);
    let mut out = Vec::new();
    for n in 0..max {
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        let (target, addr) = targets[(n % 2) as usize];
        let start = sh.now();
        let result = request(addr);
        out.push(Req {
            host,
            target,
            start,
            end: sh.now(),
            result,
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

/// `pier <args…>` on host `h`, bounded by 20 s; `Err` with its stderr.
fn cli(pier: &PathBuf, h: &HostInfo, args: &[&str]) -> std::result::Result<(), String> {
    let out = Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", h.netns))
        .arg("--")
        .arg(pier)
        .arg("--config")
        .arg(&h.config)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Scale `web` and label nodes through random hosts' APIs until told to
/// stop; every write is logged, acknowledged or not.
fn writer(sh: &Shared, hosts: &[HostInfo], pier: &PathBuf, seed: u64) -> Result<Vec<WriteRec>> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut n = 0u64;
    // Bounded by the stop flag, and by count.
    while !sh.stop_writes.load(Ordering::SeqCst) && n < 100_000 {
        n += 1;
        let h = &hosts[rng.below(hosts.len())];
        let op = if n % 2 == 0 {
            WriteOp::Scale(2 + rng.below(3) as u64)
        } else {
            WriteOp::Label {
                node: format!("h{}", 1 + rng.below(HOSTS)),
                key: format!("chaos{}", rng.below(4)),
                val: format!("w{n}"),
            }
        };
        let at = sh.now();
        let r = match &op {
            WriteOp::Scale(k) => cli(
                pier,
                h,
                &["scale", "rs", "web", "--replicas", &k.to_string()],
            ),
            WriteOp::Label { node, key, val } => {
                cli(pier, h, &["label", "node", node, &format!("{key}={val}")])
            }
        };
        out.push(WriteRec {
            at,
            host: h.index,
            op,
            acked: r.is_ok(),
            err: r.err().unwrap_or_default(),
        });
        std::thread::sleep(Duration::from_millis(1500));
    }
    Ok(out)
}

struct Report {
    text: String,
    problems: Vec<String>,
    /// Convergences slower than [`CONVERGE_BOUND`].
    goal_misses: Vec<String>,
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

/// The checker: everything from the logs the threads kept.
fn check(
    seed: u64,
    run: Duration,
    faults: &[Fault],
    reqs: &[Req],
    samples: &[Vec<Sample>],
    store: &Sample,
    writes: &[WriteRec],
) -> Report {
    let mut problems = Vec::new();
    let mut goal_misses = Vec::new();
    let mut t = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        t,
        "\n## chaos run: CHAOS_SEED={seed}, CHAOS_SECS={}",
        run.as_secs()
    );

    // 1. Failed requests and what explains them.
    let explain = |r: &Req| -> Option<&'static str> {
        for f in faults {
            let overlaps = r.start <= f.explains_until() && r.end >= f.start;
            let in_flight = r.start <= f.hit && r.end >= f.start;
            match f.kind {
                Kind::Cut if overlaps => return Some("a cut"),
                // An agent kill explains nothing: `kill -9` of the keeper
                // leaves its worker serving (an orphan, adopted by the
                // restarted agent), and the keeper holds no connection.
                Kind::PodKill | Kind::DockerdRestart if in_flight => {
                    return Some("in flight to a pod being killed");
                }
                _ => {}
            }
        }
        None
    };
    // The fault a time falls in: the last one started before it.
    let during = |at: Duration| faults.iter().rposition(|f| f.start <= at).map(|i| i + 1);
    let mut per_fault: BTreeMap<usize, (usize, usize, usize)> = BTreeMap::new();
    let (mut failed, mut explained) = (0, 0);
    let mut why_counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for r in reqs {
        let n = during(r.start).unwrap_or(0);
        let e = per_fault.entry(n).or_default();
        e.0 += 1;
        if let Err(err) = &r.result {
            failed += 1;
            e.1 += 1;
            match explain(r) {
                Some(why) => {
                    explained += 1;
                    *why_counts.entry(why).or_default() += 1;
                }
                None => {
                    e.2 += 1;
                    unexplained.push(format!(
                        "h{} {} at {:.2}s..{:.2}s (during fault {n}): {err}",
                        r.host,
                        r.target,
                        r.start.as_secs_f64(),
                        r.end.as_secs_f64()
                    ));
                }
            }
        }
    }

    // 2. Stale endpoints: answered by a pod whose endpoint had left the
    // client host's snapshot for good.
    let mut stale = Vec::new();
    for (hi, ss) in samples.iter().enumerate() {
        let ok: Vec<&Sample> = ss.iter().filter(|s| s.ok).collect();
        let mut gone_at: BTreeMap<&str, Duration> = BTreeMap::new();
        let all: BTreeSet<&str> = ok
            .iter()
            .flat_map(|s| s.eps.iter().map(String::as_str))
            .collect();
        for pod in all {
            let last = ok.iter().rposition(|s| s.eps.contains(pod));
            if let Some(l) = last
                && let Some(next) = ok.get(l + 1)
            {
                gone_at.insert(pod, next.at);
            }
        }
        for r in reqs.iter().filter(|r| r.host == hi + 1) {
            if let Ok(pod) = &r.result
                && let Some(g) = gone_at.get(pod.as_str())
                && r.start > *g + STALE_SLACK
            {
                stale.push(format!(
                    "h{} {} at {:.2}s answered by {pod}, gone from h{}'s endpoints at {:.2}s",
                    r.host,
                    r.target,
                    r.start.as_secs_f64(),
                    hi + 1,
                    g.as_secs_f64()
                ));
            }
        }
    }

    // 3. Acknowledged writes, against the final state on every host.
    let mut lost = Vec::new();
    // Each host's last view, and etcd itself.
    let mut finals: Vec<(String, &Sample)> = samples
        .iter()
        .enumerate()
        .filter_map(|(i, ss)| Some((format!("h{}", i + 1), ss.iter().rev().find(|s| s.ok)?)))
        .collect();
    finals.push(("etcd".to_owned(), store));
    type Reg = (String, String);
    let mut regs: BTreeMap<Reg, Vec<(String, bool)>> = BTreeMap::new();
    for w in writes {
        let (reg, v) = match &w.op {
            WriteOp::Scale(k) => (("rs".to_owned(), "web".to_owned()), k.to_string()),
            WriteOp::Label { node, key, val } => ((node.clone(), key.clone()), val.clone()),
        };
        regs.entry(reg).or_default().push((v, w.acked));
    }
    for ((a, b), hist) in &regs {
        let Some(last_ack) = hist.iter().rposition(|(_, acked)| *acked) else {
            continue;
        };
        let allowed: BTreeSet<&str> = hist[last_ack..].iter().map(|(v, _)| v.as_str()).collect();
        for (who, f) in &finals {
            let got = if a == "rs" {
                f.desired.map(|d| d.to_string())
            } else {
                f.labels.get(a).and_then(|l| l.get(b)).cloned()
            };
            if !got.as_deref().is_some_and(|g| allowed.contains(g)) {
                lost.push(format!(
                    "{a}/{b}: {who} shows {got:?}, the last acknowledged write was {:?} (allowed {allowed:?})",
                    hist[last_ack].0
                ));
            }
        }
    }
    let acked = writes.iter().filter(|w| w.acked).count();

    // 4. Below and above the desired count, on a merged timeline of the
    // hosts' fresh views.
    let mut timeline: Vec<&Sample> = samples
        .iter()
        .flatten()
        .filter(|s| s.ok && s.readyz == 200 && s.desired.is_some())
        .collect();
    timeline.sort_by_key(|s| s.at);
    let mut below: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut above: BTreeMap<usize, Duration> = BTreeMap::new();
    for w in timeline.windows(2) {
        let (s, next) = (w[0], w[1]);
        let d = s.desired.unwrap_or_default() as usize;
        let dt = next.at - s.at;
        let n = during(s.at).unwrap_or(0);
        if s.ready_pods.len() < d {
            *below.entry(n).or_default() += dt;
        }
        if s.pods.len() > d {
            *above.entry(n).or_default() += dt;
        }
    }

    // The table.
    let _ = writeln!(
        t,
        "\n| # | at s | fault | host | detail | lasted s | converged s after its end | requests | failed | unexplained | below desired s | above desired s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut worst: BTreeMap<&str, Duration> = BTreeMap::new();
    for (i, f) in faults.iter().enumerate() {
        let n = i + 1;
        let (rq, fl, un) = per_fault.get(&n).copied().unwrap_or_default();
        let conv = f.converged.map_or("not converged".to_owned(), secs);
        if let Some(cv) = f.converged {
            let w = worst.entry(f.kind.name()).or_default();
            *w = (*w).max(cv);
            if cv > CONVERGE_BOUND {
                goal_misses.push(format!(
                    "fault {n} ({} on h{}): converged {:.2}s after it ended, more than 2 lease TTLs ({CONVERGE_BOUND:?})",
                    f.kind.name(),
                    f.host,
                    cv.as_secs_f64()
                ));
            }
        }
        let _ = writeln!(
            t,
            "| {n} | {} | {} | h{} | {} | {} | {conv} | {rq} | {fl} | {un} | {} | {} |",
            secs(f.start),
            f.kind.name(),
            f.host,
            f.detail,
            secs(f.end - f.start),
            secs(below.get(&n).copied().unwrap_or_default()),
            secs(above.get(&n).copied().unwrap_or_default()),
        );
    }
    let _ = writeln!(t, "\nWorst convergence by fault kind (s after it ended):");
    for k in Kind::ALL {
        let count = faults.iter().filter(|f| f.kind == k).count();
        let _ = writeln!(
            t,
            "- {}: {count} faults, worst {}",
            k.name(),
            worst
                .get(k.name())
                .map_or("-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()))
        );
    }
    let _ = writeln!(
        t,
        "\nTotals: {} faults; {} requests, {failed} failed, {explained} explained ({why_counts:?}), {} unexplained; {} stale answers; {} writes, {acked} acknowledged, {} lost; below desired {}s, above desired {}s in all",
        faults.len(),
        reqs.len(),
        unexplained.len(),
        stale.len(),
        writes.len(),
        lost.len(),
        secs(below.values().sum()),
        secs(above.values().sum()),
    );
    for u in unexplained.iter().take(40) {
        let _ = writeln!(t, "unexplained failure: {u}");
    }
    for s in stale.iter().take(20) {
        let _ = writeln!(t, "stale: {s}");
    }
    for w in writes.iter().filter(|w| !w.acked).take(20) {
        let _ = writeln!(
            t,
            "not acknowledged: {:?} through h{} at {:.2}s: {}",
            w.op,
            w.host,
            w.at.as_secs_f64(),
            w.err
        );
    }
    for l in &lost {
        let _ = writeln!(t, "lost: {l}");
    }
    if !unexplained.is_empty() {
        problems.push(format!(
            "{} failed requests no cut explains (first: {})",
            unexplained.len(),
            unexplained[0]
        ));
    }
    if !stale.is_empty() {
        problems.push(format!(
            "{} stale answers (first: {})",
            stale.len(),
            stale[0]
        ));
    }
    if !lost.is_empty() {
        problems.push(format!("{} acknowledged writes lost: {lost:?}", lost.len()));
    }
    if reqs.iter().filter(|r| r.result.is_ok()).count() < reqs.len() / 2 {
        problems.push("fewer than half the requests succeeded".to_owned());
    }
    for m in &goal_misses {
        let _ = writeln!(t, "goal missed: {m}");
    }
    Report {
        text: t,
        problems,
        goal_misses,
    }
}
