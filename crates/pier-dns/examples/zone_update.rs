//! The cost of applying one snapshot change to the zone, and of a lookup
//! (see BENCHMARKS.md).
//!
//!   zone_update --mode full|incremental [--services 10000] [--endpoints 10] [--updates 200]
//!
//! Builds a snapshot of N services (VIP, one `http` port, K ready endpoints
//! each, so N*K endpoints), then applies `--updates` snapshots that each
//! flip the readiness of one endpoint of one service, copy-on-write as the
//! reflector publishes them. `full` rebuilds the zone from each snapshot, as
//! pier did before the incremental update; `incremental` uses
//! `ZoneUpdater::update`, as the server does now. Prints the time per update
//! (min / median / p90 / max), the resident size, and the peak during the
//! updates (VmHWM, reset after the first build).
//!
//! Then times the name lookup (`Names::get` and the type's answer) against
//! the zone's sharded map and against one map of the same entries (the
//! layout before), interleaved, on a shuffled mix of service, pod, SRV, PTR
//! and missing names.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pier_dns::wire;
use pier_dns::zone::{self, FastHash, NameEntry, ZoneParams, ZoneUpdater};
use pier_model::*;

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Reset VmHWM to the current RSS, so that the peak printed at the end is
/// the peak of the updates, not of the first build.
fn reset_peak() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset the peak RSS: {e}");
    }
}

fn vip(i: usize) -> IpAddr {
    IpAddr::from([10, 96, (i / 250) as u8, (i % 250 + 1) as u8])
}

fn pod_ip(i: usize, j: usize) -> IpAddr {
    IpAddr::from([172, 16 + j as u8, (i / 250) as u8, (i % 250 + 1) as u8])
}

fn snapshot(n: usize, k: usize) -> Result<Snapshot> {
    let mut services = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let node = Name::new("node1")?;
    for i in 0..n {
        let name = Name::new(&format!("svc{i:05}"))?;
        let ns = Namespace::default();
        let svc: Service = serde_json::from_value(serde_json::json!({
            "name": name, "namespace": ns, "vip": vip(i),
            "ports": [{"name": "http", "port": 80, "target_port": 8080}],
        }))?;
        let mut eps = EndpointMap::new();
        for j in 0..k {
            let id = Name::new(&format!("c{i:06}x{j}"))?;
            eps.insert(
                (node.clone(), id.clone()),
                Arc::new(Endpoint {
                    service: name.clone(),
                    namespace: ns.clone(),
                    node: node.clone(),
                    id,
                    pod: Some(Name::new(&format!("svc{i:05}-{j}"))?),
                    hostname: None,
                    ip: pod_ip(i, j),
                    ports: vec![EndpointPort {
                        name: Name::new("http")?,
                        port: PortNum::new(8080)?,
                        protocol: Default::default(),
                    }],
                    ready: true,
                    is_static: false,
                    addr: None,
                }),
            );
        }
        services.insert((ns.clone(), name.clone()), Arc::new(svc));
        endpoints.insert((ns, name), Arc::new(eps));
    }
    Ok(Snapshot {
        revision: 1,
        services: pier_model::Map::from(services),
        endpoints: pier_model::Map::from(endpoints),
        ..Snapshot::default()
    })
}

/// The next snapshot: endpoint 0 of service `i` flips readiness.
fn flip(prev: &Snapshot, i: usize) -> Result<Snapshot> {
    let mut s = prev.clone();
    s.revision += 1;
    let key = (Namespace::default(), Name::new(&format!("svc{i:05}"))?);
    let eps = &mut s.endpoints;
    let m = Arc::make_mut(eps.get_mut(&key).context("service endpoints")?);
    let e = m.values_mut().next().context("an endpoint")?;
    Arc::make_mut(e).ready ^= true;
    Ok(s)
}

fn summary(mut t: Vec<Duration>) -> String {
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "min {:.3} ms, median {:.3} ms, p90 {:.3} ms, max {:.3} ms",
        ms(t[0]),
        ms(t[t.len() / 2]),
        ms(t[t.len() * 9 / 10]),
        ms(t[t.len() - 1])
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = arg(&args, "--mode").unwrap_or_else(|| "incremental".into());
    let n: usize = arg(&args, "--services").map_or(Ok(10_000), |s| s.parse())?;
    let k: usize = arg(&args, "--endpoints").map_or(Ok(10), |s| s.parse())?;
    let updates: usize = arg(&args, "--updates").map_or(Ok(200), |s| s.parse())?;
    if n == 0 || k == 0 || updates == 0 || n > 60_000 || k > 200 {
        bail!("--services 1..=60000, --endpoints 1..=200, --updates >= 1");
    }
    let params = ZoneParams {
        domain: wire::wire_name("pier.internal").context("domain")?,
        vip_ttl: 30,
        headless_ttl: 1,
        pod_ttl: 1,
        negative_ttl: 1,
    };
    let rss0 = status_kb("VmRSS:");
    let mut snap = Arc::new(snapshot(n, k)?);
    let rss_snap = status_kb("VmRSS:");
    let t0 = Instant::now();
    let mut times = Vec::with_capacity(updates);
    let zone = match mode.as_str() {
        "full" => {
            let mut cur = Arc::new(zone::build(&snap, params.clone()));
            let first = t0.elapsed();
            let rss_built = status_kb("VmRSS:");
            eprintln!(
                "first build {:.1} ms; rss {rss_built} kB, peak {} kB",
                first.as_secs_f64() * 1e3,
                status_kb("VmHWM:")
            );
            reset_peak();
            for u in 0..updates {
                let next = Arc::new(flip(&snap, (u * 7919) % n)?);
                let t = Instant::now();
                let z = Arc::new(zone::build(&next, params.clone()));
                // As the server does: swap in the new zone, drop the old one.
                cur = z;
                times.push(t.elapsed());
                snap = next;
            }
            cur
        }
        "incremental" => {
            let mut up = ZoneUpdater::new(snap.clone(), params.clone());
            let first = t0.elapsed();
            let rss_built = status_kb("VmRSS:");
            eprintln!(
                "first build {:.1} ms; rss {rss_built} kB, peak {} kB",
                first.as_secs_f64() * 1e3,
                status_kb("VmHWM:")
            );
            reset_peak();
            let mut cur = up.zone();
            for u in 0..updates {
                let next = Arc::new(flip(&snap, (u * 7919) % n)?);
                let t = Instant::now();
                let kind = up.update(next.clone());
                cur = up.zone();
                times.push(t.elapsed());
                if u == 0 {
                    eprintln!("update kind: {kind:?}");
                }
                snap = next;
            }
            drop(up);
            cur
        }
        other => bail!("--mode full|incremental, not {other:?}"),
    };
    println!(
        "mode {mode}: {n} services, {} endpoints, {} names in {} shards",
        n * k,
        zone.names.len(),
        zone.names.shard_count()
    );
    println!("one endpoint flip, {updates} updates: {}", summary(times));
    println!(
        "rss: start {rss0} kB, with snapshot {rss_snap} kB, after updates {} kB; peak during the updates (VmHWM) {} kB",
        status_kb("VmRSS:"),
        status_kb("VmHWM:")
    );

    // Lookups: the sharded map against a flat map of the same entries.
    // The same keys and values (shared), only the table differs.
    let flat: HashMap<Arc<[u8]>, NameEntry, FastHash> = zone
        .names
        .entries()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut qs: Vec<(Vec<u8>, u16)> = Vec::new();
    for i in (0..n).step_by(3) {
        let svc = format!("svc{i:05}.default.svc.pier.internal");
        let w = |s: &str| wire::wire_name(s).unwrap_or_default();
        qs.push((w(&svc), wire::rtype::A));
        qs.push((w(&format!("_http._tcp.{svc}")), wire::rtype::SRV));
        qs.push((w(&format!("svc{i:05}-1.{svc}")), wire::rtype::A));
        qs.push((zone::reverse_name(pod_ip(i, k - 1)), wire::rtype::PTR));
        qs.push((
            w(&format!("nope{i}.default.svc.pier.internal")),
            wire::rtype::A,
        ));
    }
    // Deterministic shuffle (xorshift), so the walk does not follow the
    // maps' memory order.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..qs.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        qs.swap(i, (x % (i as u64 + 1)) as usize);
    }
    // Cold: all the names, shuffled, much more than the caches hold. Hot:
    // the first 1000 (a dnsperf-sized query set), repeated.
    for (label, set, rounds) in [
        ("cold", &qs[..], 20),
        ("hot", &qs[..1000.min(qs.len())], 400),
    ] {
        let (mut sharded, mut single) = (Duration::ZERO, Duration::ZERO);
        let mut hits = 0usize;
        for _ in 0..rounds {
            let t = Instant::now();
            for (q, ty) in set {
                if let Some(e) = zone.names.get(black_box(&q[..])) {
                    if let Some((_, a)) = e.types.iter().find(|(t, _)| t == ty) {
                        hits += black_box(a.an) as usize;
                    }
                }
            }
            sharded += t.elapsed();
            let t = Instant::now();
            for (q, ty) in set {
                if let Some(e) = flat.get(black_box(&q[..])) {
                    if let Some((_, a)) = e.types.iter().find(|(t, _)| t == ty) {
                        hits += black_box(a.an) as usize;
                    }
                }
            }
            single += t.elapsed();
        }
        let per = |d: Duration| d.as_secs_f64() * 1e9 / (rounds * set.len()) as f64;
        println!(
            "lookup {label} ({} names x {rounds}, {hits} records): sharded {:.1} ns, one map {:.1} ns, ratio {:.2}",
            set.len(),
            per(sharded),
            per(single),
            per(sharded) / per(single)
        );
    }
    Ok(())
}
