//! The load generator of `scripts/bench-relay.sh` (run it through the
//! script, which starts etcd and the relay agent and says how to build):
//! N watchers of the whole store (`keys::ROOT`) through a real relay agent
//! (TLS with a mesh node certificate, `Frame::Hello { op: Watch }`, as an
//! agent with `store.relays` watches) or on etcd itself (one
//! `EtcdStore::connect` and `Store::watch` each, on its own connection,
//! as each host has its own), in interleaved rounds (relay, direct, relay,
//! direct, ...), while one writer puts `--rate` keys a second for
//! `--secs` seconds. Per round: the delivery latency (a put's send time
//! to its event's arrival at a watcher) p50 / p99 / max over every
//! (watcher, revision) pair, the events lost, the CPU seconds of the relay
//! agent's worker, of etcd and of this process over the round, and etcd's
//! watchers (`etcd_debugging_mvcc_watcher_total`) with the N open.
//!
//! ```sh
//! relay_bench --etcd 127.0.0.1:P --relay 127.0.0.1:R --certs DIR \
//!     --node bench-client --keeper PID --etcd-pid PID \
//!     [--sizes 50,200,500] [--rounds 3] [--rate 200] [--secs 10]
//! ```
//!
//! `--certs` is a directory written by `pier ca issue <--node> --ca CA`.
//! The writer's keys are `stats` records of a service that does not exist
//! (`/pier/v1/stats/bench/relay-bench/nNNN`, 100 keys written in turn):
//! the agent's reflector takes a stats key without decoding it, and only
//! the API reads them, on request. Every loop is bounded in count and
//! time; addresses must be loopback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pier_model::{Name, keys};
use pier_proxy::relay_tls::RelayDialer;
use pier_proxy::tls::MeshConfig;
use pier_store::relay::wire::{self, Frame, Op};
use pier_store::{EtcdStore, Store, WatchEvent, WatchItem};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Where the writer puts: a kind the reflector skips without decoding.
const PREFIX: &str = "/pier/v1/stats/bench/relay-bench/";
/// Distinct keys, written in turn (the store stays small).
const KEYS: usize = 100;
/// Dials or etcd connects in flight at once while the watchers open.
const OPENING: usize = 16;
/// How long all N watchers may take to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after the last put every watcher has to see it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Puts in flight at once (the writer is open-loop at its rate).
const IN_FLIGHT: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Relay,
    Direct,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Relay => "relay",
            Kind::Direct => "direct",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    etcd: String,
    relay: String,
    certs: PathBuf,
    node: String,
    keeper: u32,
    etcd_pid: u32,
    sizes: Vec<usize>,
    rounds: usize,
    rate: u32,
    secs: u32,
    value_bytes: usize,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        etcd: String::new(),
        relay: String::new(),
        certs: PathBuf::new(),
        node: "bench-client".into(),
        keeper: 0,
        etcd_pid: 0,
        sizes: vec![50, 200, 500],
        rounds: 3,
        rate: 200,
        secs: 10,
        value_bytes: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--etcd" => a.etcd = v,
            "--relay" => a.relay = v,
            "--certs" => a.certs = v.into(),
            "--node" => a.node = v,
            "--keeper" => a.keeper = v.parse()?,
            "--etcd-pid" => a.etcd_pid = v.parse()?,
            "--sizes" => {
                a.sizes = v
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--rounds" => a.rounds = v.parse()?,
            "--rate" => a.rate = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--value-bytes" => a.value_bytes = v.parse()?,
            _ => return Err(format!("unknown option {k}").into()),
        }
    }
    for (what, addr) in [("--etcd", &a.etcd), ("--relay", &a.relay)] {
        let sa: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| format!("{what} {addr:?}: {e} (IP:PORT)"))?;
        if !sa.ip().is_loopback() {
            return Err(format!("{what} {addr}: loopback only").into());
        }
    }
    if a.keeper == 0 || a.etcd_pid == 0 {
        return Err("--keeper and --etcd-pid are required".into());
    }
    if a.rounds == 0 || a.rate == 0 || a.secs == 0 || a.sizes.is_empty() {
        return Err("--rounds, --rate, --secs and --sizes must be positive".into());
    }
    if a.sizes.iter().any(|&n| n == 0 || n > 5000) || a.rate > 5000 || a.secs > 120 {
        return Err("sizes 1..=5000, rate at most 5000/s, secs at most 120".into());
    }
    Ok(a)
}

// ---- /proc and /metrics ----

/// A process's CPU time (user + system) in seconds; `None` once it is gone.
fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis: utime and stime are
    // the 12th and 13th fields (14 and 15 of the line), in USER_HZ (100).
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// The keeper's child (its worker), from /proc/PID/task/*/children.
fn worker_of(keeper: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{keeper}/task")).ok()?;
    let mut kids = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            kids.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    kids.sort_unstable();
    kids.first().copied()
}

/// Sums the samples of `name` on etcd's /metrics (plain HTTP/1.0).
async fn scrape(addr: &str, name: &str) -> Result<f64, Error> {
    use tokio::io::AsyncReadExt;
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    })
    .await??;
    let mut sum = 0.0;
    for l in body.lines() {
        if l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) {
            sum += l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Ok(sum)
}

// ---- watchers ----

/// What one watcher hands back at the end of its round.
struct Seen {
    /// (revision, arrival) of each bench put, in arrival order.
    arrivals: Vec<(i64, Instant)>,
    /// Disconnected / Resumed / anything but events and progress.
    anomalies: Vec<String>,
}

/// Shared between a round's watchers and the round.
struct Shared {
    /// The highest bench revision each watcher has seen.
    highest: Vec<AtomicI64>,
    stop: CancellationToken,
    gate: Semaphore,
    capacity: usize,
}

fn record(events: &[WatchEvent], now: Instant, seen: &mut Seen, highest: &AtomicI64) {
    for e in events {
        if let WatchEvent::Put(kv) = e
            && kv.key.starts_with(PREFIX)
        {
            seen.arrivals.push((kv.mod_revision, now));
            highest.fetch_max(kv.mod_revision, Ordering::Relaxed);
        }
    }
}

/// One host's watch through the relay: dial with the node certificate,
/// `Hello { Watch { from: 0 } }`, then frames until the round stops.
async fn relay_watcher(
    i: usize,
    dialer: Arc<RelayDialer>,
    addr: String,
    sh: Arc<Shared>,
    ready: mpsc::Sender<Result<(), String>>,
) -> Seen {
    let mut seen = Seen {
        arrivals: Vec::with_capacity(sh.capacity),
        anomalies: Vec::new(),
    };
    let opened = async {
        let _slot = sh.gate.acquire().await.map_err(|e| e.to_string())?;
        let (mut s, _) = dialer.dial(&addr).await.map_err(|e| e.to_string())?;
        let hello = Frame::Hello {
            version: wire::VERSION,
            op: Op::Watch { from: 0 },
        };
        s.write_all(&wire::encode(&hello))
            .await
            .map_err(|e| e.to_string())?;
        let f = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut s))
            .await
            .map_err(|_| "no answer to the Hello within 10 s".to_string())?
            .map_err(|e| e.to_string())?;
        match f {
            Frame::Opened { .. } => Ok(s),
            other => Err(format!("expected Opened, got {other:?}")),
        }
    }
    .await;
    let Some(mut s) = announce(ready, opened).await else {
        return seen;
    };
    loop {
        let f = tokio::select! {
            _ = sh.stop.cancelled() => break,
            f = wire::read_frame(&mut s) => f,
        };
        let now = Instant::now();
        match f {
            Ok(Frame::Events { events, .. }) => record(&events, now, &mut seen, &sh.highest[i]),
            Ok(Frame::Progress { .. }) => {}
            Ok(f @ (Frame::Disconnected { .. } | Frame::Resumed)) => {
                seen.anomalies.push(format!("{f:?}"));
            }
            Ok(other) => {
                seen.anomalies.push(format!("ended: {other:?}"));
                break;
            }
            Err(e) => {
                seen.anomalies.push(format!("ended: {e}"));
                break;
            }
        }
    }
    seen
}

/// Tells the round whether a watcher opened (it waits for all of them
/// before the writer starts); what was opened, or `None`.
async fn announce<T>(
    ready: mpsc::Sender<Result<(), String>>,
    opened: Result<T, String>,
) -> Option<T> {
    let (said, got) = match opened {
        Ok(t) => (Ok(()), Some(t)),
        Err(e) => (Err(e), None),
    };
    let _ = ready.send(said).await;
    got
}

/// One host's watch on etcd itself, on its own connection.
async fn direct_watcher(
    i: usize,
    etcd: String,
    sh: Arc<Shared>,
    ready: mpsc::Sender<Result<(), String>>,
) -> Seen {
    let mut seen = Seen {
        arrivals: Vec::with_capacity(sh.capacity),
        anomalies: Vec::new(),
    };
    let opened = async {
        let _slot = sh.gate.acquire().await.map_err(|e| e.to_string())?;
        let store = EtcdStore::connect(&[etcd])
            .await
            .map_err(|e| e.to_string())?;
        let w = store
            .watch(keys::ROOT, 0)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((store, w))
    }
    .await;
    let Some((_store, mut w)) = announce(ready, opened).await else {
        return seen;
    };
    loop {
        let item = tokio::select! {
            _ = sh.stop.cancelled() => break,
            item = w.next() => item,
        };
        let now = Instant::now();
        match item {
            Some(Ok(WatchItem::Events { events, .. })) => {
                record(&events, now, &mut seen, &sh.highest[i])
            }
            Some(Ok(other)) => seen.anomalies.push(format!("{other:?}")),
            Some(Err(e)) => {
                seen.anomalies.push(format!("ended: {e}"));
                break;
            }
            None => {
                seen.anomalies.push("ended".into());
                break;
            }
        }
    }
    seen
}

// ---- the writer ----

/// Puts `total` keys at `rate` a second (open loop, at most [`IN_FLIGHT`]
/// in flight); returns each put's (revision, send time) and how long the
/// puts took from the first send to the last answer.
async fn write(
    store: Arc<EtcdStore>,
    rate: u32,
    total: usize,
    value_bytes: usize,
) -> Result<(Vec<(i64, Instant)>, Duration), Error> {
    let pad = "x".repeat(value_bytes.saturating_sub(24));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut puts = JoinSet::new();
    let mut out = Vec::with_capacity(total);
    let start = Instant::now();
    for i in 0..total {
        tick.tick().await;
        while puts.len() >= IN_FLIGHT {
            if let Some(r) = puts.join_next().await {
                out.push(r??);
            }
        }
        let store = store.clone();
        let key = format!("{PREFIX}n{:03}", i % KEYS);
        let value = format!(r#"{{"seq":{i},"pad":"{pad}"}}"#).into_bytes();
        puts.spawn(async move {
            let sent = Instant::now();
            let rev = store.put(&key, value, None).await?;
            Ok::<_, pier_store::StoreError>((rev, sent))
        });
    }
    while let Some(r) = puts.join_next().await {
        out.push(r??);
    }
    Ok((out, start.elapsed()))
}

// ---- a round ----

#[derive(Debug, Clone)]
struct RoundResult {
    kind: Kind,
    n: usize,
    puts: usize,
    put_secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    lost: usize,
    anomalies: usize,
    worker_cpu: f64,
    etcd_cpu: f64,
    self_cpu: f64,
    window_s: f64,
    etcd_watchers: f64,
}

struct Ctx {
    args: Args,
    dialer: Arc<RelayDialer>,
    writer: Arc<EtcdStore>,
    baseline_watchers: f64,
}

async fn round(ctx: &Ctx, kind: Kind, n: usize) -> Result<RoundResult, Error> {
    let a = &ctx.args;
    let total = (a.rate * a.secs) as usize;
    let sh = Arc::new(Shared {
        highest: (0..n).map(|_| AtomicI64::new(0)).collect(),
        stop: CancellationToken::new(),
        gate: Semaphore::new(OPENING),
        capacity: total + 16,
    });
    let (ready_tx, mut ready_rx) = mpsc::channel(n);
    let mut watchers = JoinSet::new();
    for i in 0..n {
        let (sh, ready) = (sh.clone(), ready_tx.clone());
        match kind {
            Kind::Relay => {
                watchers.spawn(relay_watcher(
                    i,
                    ctx.dialer.clone(),
                    a.relay.clone(),
                    sh,
                    ready,
                ));
            }
            Kind::Direct => {
                watchers.spawn(direct_watcher(i, a.etcd.clone(), sh, ready));
            }
        }
    }
    drop(ready_tx);
    // Every watcher open (or failed) before the first put.
    let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
        let (mut ok, mut failed) = (0usize, Vec::new());
        while let Some(r) = ready_rx.recv().await {
            match r {
                Ok(()) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    })
    .await;
    let stop_all = |sh: &Shared| sh.stop.cancel();
    let (ok, failed) = match opened {
        Ok(x) => x,
        Err(_) => {
            stop_all(&sh);
            watchers.shutdown().await;
            return Err(format!(
                "{n} {} watchers did not open within {OPEN_TIMEOUT:?}",
                kind.name()
            )
            .into());
        }
    };
    if !failed.is_empty() {
        stop_all(&sh);
        watchers.shutdown().await;
        return Err(format!(
            "{} of {n} {} watchers failed to open ({ok} opened), e.g.: {}",
            failed.len(),
            kind.name(),
            failed[0]
        )
        .into());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = a.etcd.clone();
    let etcd_watchers = scrape(&metrics, "etcd_debugging_mvcc_watcher_total").await?;
    let worker = worker_of(a.keeper).ok_or("the keeper has no worker")?;
    let cpu = |pid| cpu_s(pid).unwrap_or(f64::NAN);
    let me = std::process::id();
    let (w0, e0, s0, t0) = (cpu(worker), cpu(a.etcd_pid), cpu(me), Instant::now());
    let (puts, put_time) = write(ctx.writer.clone(), a.rate, total, a.value_bytes).await?;
    let last = puts.iter().map(|p| p.0).max().unwrap_or(0);
    // Every watcher has the last put (bounded by DRAIN_TIMEOUT).
    let drained = Instant::now();
    while drained.elapsed() < DRAIN_TIMEOUT
        && sh.highest.iter().any(|h| h.load(Ordering::Relaxed) < last)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (w1, e1, s1, window) = (cpu(worker), cpu(a.etcd_pid), cpu(me), t0.elapsed());
    if worker_of(a.keeper) != Some(worker) {
        return Err(
            format!("the relay agent's worker changed during the round (was {worker})").into(),
        );
    }
    stop_all(&sh);
    let mut seen = Vec::with_capacity(n);
    while let Some(s) = watchers.join_next().await {
        seen.push(s?);
    }
    // Latencies over every (watcher, revision) pair.
    let sent: HashMap<i64, Instant> = puts.iter().copied().collect();
    let mut lat_us: Vec<u64> = Vec::with_capacity(n * total);
    let (mut lost, mut anomalies) = (0usize, 0usize);
    let mut first_anomaly = None;
    for s in &seen {
        let mut got = std::collections::HashSet::with_capacity(total);
        for &(rev, at) in &s.arrivals {
            if let Some(&t) = sent.get(&rev)
                && got.insert(rev)
            {
                lat_us.push(at.saturating_duration_since(t).as_micros() as u64);
            }
        }
        lost += total - got.len();
        anomalies += s.anomalies.len();
        if first_anomaly.is_none() {
            first_anomaly = s.anomalies.first().cloned();
        }
    }
    if let Some(e) = first_anomaly {
        eprintln!(
            "   {} n={n}: {anomalies} watch anomalies, e.g. {e}",
            kind.name()
        );
    }
    lat_us.sort_unstable();
    let pct = |p: usize| -> f64 {
        if lat_us.is_empty() {
            return f64::NAN;
        }
        lat_us[(lat_us.len() * p / 100).min(lat_us.len() - 1)] as f64 / 1000.0
    };
    let r = RoundResult {
        kind,
        n,
        puts: puts.len(),
        put_secs: put_time.as_secs_f64(),
        p50_ms: pct(50),
        p99_ms: pct(99),
        max_ms: lat_us.last().map_or(f64::NAN, |&v| v as f64 / 1000.0),
        lost,
        anomalies,
        worker_cpu: w1 - w0,
        etcd_cpu: e1 - e0,
        self_cpu: s1 - s0,
        window_s: window.as_secs_f64(),
        etcd_watchers,
    };
    drop(seen);
    // The watchers' etcd watches (direct) are gone before the next round.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(15) {
        match scrape(&metrics, "etcd_debugging_mvcc_watcher_total").await {
            Ok(w) if w <= ctx.baseline_watchers => break,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(r)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_round(r: &RoundResult, i: usize) {
    println!(
        "round {i} n={} {:<6} latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms, lost {}, anomalies {}, \
         cpu over {:.1} s: worker {:.2} s, etcd {:.2} s, loadgen {:.2} s (CPU 0 {:.0} % busy); \
         etcd watchers {:.0}; {} puts in {:.2} s",
        r.n,
        r.kind.name(),
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.lost,
        r.anomalies,
        r.window_s,
        r.worker_cpu,
        r.etcd_cpu,
        r.self_cpu,
        100.0 * (r.etcd_cpu + r.self_cpu) / r.window_s,
        r.etcd_watchers,
        r.puts,
        r.put_secs
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let mesh = MeshConfig::from_dir("127.0.0.1:0".parse()?, &args.certs);
    let mut registry = prometheus_client::registry::Registry::default();
    let dialer = Arc::new(RelayDialer::new(
        &mesh,
        Name::new(&args.node)?,
        &mut registry,
    )?);
    let writer = Arc::new(EtcdStore::connect(std::slice::from_ref(&args.etcd)).await?);
    let baseline_watchers = scrape(&args.etcd, "etcd_debugging_mvcc_watcher_total").await?;
    let worker = worker_of(args.keeper).ok_or("the keeper has no worker")?;
    println!(
        "# relay_bench: etcd {} (pid {}), relay {} (keeper {}, worker {worker}), sizes {:?}, \
         {} rounds of each kind, {} puts/s for {} s ({} B values); etcd watchers before: {baseline_watchers:.0}",
        args.etcd,
        args.etcd_pid,
        args.relay,
        args.keeper,
        args.sizes,
        args.rounds,
        args.rate,
        args.secs,
        args.value_bytes
    );
    let ctx = Ctx {
        args: args.clone(),
        dialer,
        writer,
        baseline_watchers,
    };
    let failures = AtomicUsize::new(0);
    let mut all: Vec<RoundResult> = Vec::new();
    for &n in &args.sizes {
        for i in 1..=args.rounds {
            for kind in [Kind::Relay, Kind::Direct] {
                match round(&ctx, kind, n).await {
                    Ok(r) => {
                        print_round(&r, i);
                        all.push(r);
                    }
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        println!("round {i} n={n} {}: FAILED: {e}", kind.name());
                    }
                }
            }
        }
    }
    // Medians over rounds, per size and kind, and relay / direct.
    println!();
    println!(
        "| N | kind | rounds | latency p50 | p99 | max | lost | relay worker CPU | etcd CPU | load generator CPU | CPU 0 busy | etcd watchers |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let mut med = HashMap::new();
        for kind in [Kind::Relay, Kind::Direct] {
            let rs: Vec<&RoundResult> = all.iter().filter(|r| r.n == n && r.kind == kind).collect();
            let m = |f: fn(&RoundResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
            let row = [
                m(|r| r.p50_ms),
                m(|r| r.p99_ms),
                m(|r| r.max_ms),
                m(|r| r.worker_cpu),
                m(|r| r.etcd_cpu),
                m(|r| r.self_cpu),
                m(|r| r.etcd_watchers),
                m(|r| 100.0 * (r.etcd_cpu + r.self_cpu) / r.window_s),
            ];
            let lost: usize = rs.iter().map(|r| r.lost).sum();
            println!(
                "| {n} | {} | {} | {:.2} ms | {:.2} ms | {:.1} ms | {lost} | {:.2} s | {:.2} s | {:.2} s | {:.0} % | {:.0} |",
                kind.name(),
                rs.len(),
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[7],
                row[6]
            );
            med.insert(kind, row);
        }
        let (r, d) = (med[&Kind::Relay], med[&Kind::Direct]);
        println!(
            "| {n} | relay / direct | | {:.2} | {:.2} | {:.2} | | {:.2} | {:.2} | {:.2} | | {:.3} |",
            r[0] / d[0],
            r[1] / d[1],
            r[2] / d[2],
            r[3] / d[3],
            r[4] / d[4],
            r[5] / d[5],
            r[6] / d[6]
        );
    }
    let failed = failures.load(Ordering::Relaxed);
    let lost: usize = all.iter().map(|r| r.lost).sum();
    if failed > 0 || lost > 0 {
        return Err(format!("{failed} rounds failed, {lost} events lost").into());
    }
    Ok(())
}
