//! Serve a fixed data set for the benchmark (see BENCHMARKS.md).
//!
//!   bench_server --addr 127.0.0.1:15360 --zone-file DIR/mesh.internal.zone [--origin mesh.internal]
//!   bench_server --addr 127.0.0.1:15360 --services 10000 [--srv 100]
//!
//! `--zone-file` reads the zone that /work/shared/bench/gen_dns_data.py writes
//! for NSD and Knot (A and SRV records; SOA and NS lines are skipped) and
//! serves it through the same query path as the mesh zone: its names
//! (`svcNNNN.mesh.internal`) are not in pier's `<svc>.<ns>.svc.<domain>`
//! shape, so they cannot come from a snapshot.
//!
//! `--services N` builds a snapshot of N services in pier's own shape
//! (`svcNNNN.default.svc.pier.internal`, a VIP each, one ready pod each,
//! the first `--srv` with a second pod) and serves it exactly as the agent
//! does; it prints the resident size once the zone is built.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use pier_dns::zone::{StaticRecord, from_records};
use pier_dns::{DnsConfig, DnsServer, wire};
use pier_model::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn parse_zone(text: &str, origin: &str) -> Result<Vec<(Vec<u8>, u32, StaticRecord)>> {
    let mut ttl = 3600u32;
    let mut out = Vec::new();
    let abs = |owner: &str| -> String {
        if owner == "@" {
            origin.to_string()
        } else if let Some(o) = owner.strip_suffix('.') {
            o.to_string()
        } else {
            format!("{owner}.{origin}")
        }
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || f[0].starts_with(';') {
            continue;
        }
        if f[0] == "$TTL" {
            ttl = f.get(1).context("$TTL value")?.parse()?;
            continue;
        }
        if f[0].starts_with('$') || f.len() < 4 || f[1] != "IN" {
            continue;
        }
        let owner = wire::wire_name(&abs(f[0])).context("owner name")?;
        match f[2] {
            "A" | "AAAA" => out.push((owner, ttl, StaticRecord::Addr(f[3].parse::<IpAddr>()?))),
            "SRV" if f.len() >= 7 => out.push((
                owner,
                ttl,
                StaticRecord::Srv {
                    priority: f[3].parse()?,
                    weight: f[4].parse()?,
                    port: f[5].parse()?,
                    target: wire::wire_name(&abs(f[6])).context("SRV target")?,
                },
            )),
            _ => {}
        }
    }
    if out.is_empty() {
        bail!("no A or SRV records in the zone file");
    }
    Ok(out)
}

fn big_snapshot(n: usize, srv: usize) -> Result<Snapshot> {
    use pier_model::*;
    use std::collections::BTreeMap;
    let mut services = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for i in 1..=n {
        let name = Name::new(&format!("svc{i:04}"))?;
        let ns = Namespace::default();
        let vip: IpAddr = format!("10.96.{}.{}", i / 250, i % 250 + 1).parse()?;
        let svc: Service = serde_json::from_value(serde_json::json!({
            "name": name, "namespace": ns, "vip": vip,
            "ports": [{"name": "http", "port": 80, "target_port": 8080}],
        }))?;
        let mut eps = EndpointMap::new();
        for j in 0..(if i <= srv { 2 } else { 1 }) {
            let id = Name::new(&format!("c{i:06}x{j}"))?;
            eps.insert(
                (Name::new("node1")?, id.clone()),
                Arc::new(Endpoint {
                    service: name.clone(),
                    namespace: ns.clone(),
                    node: Name::new("node1")?,
                    id,
                    pod: Some(Name::new(&format!("svc{i:04}-{j}"))?),
                    hostname: None,
                    ip: format!("172.{}.{}.{}", 16 + j, i / 250, i % 250 + 1).parse()?,
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

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = arg(&args, "--addr")
        .unwrap_or_else(|| "127.0.0.1:15360".into())
        .parse()?;
    if !addr.ip().is_loopback() {
        bail!("the benchmark server binds loopback only");
    }
    let rss0 = rss_kb();
    let zone_file = arg(&args, "--zone-file");
    let origin = arg(&args, "--origin").unwrap_or_else(|| "mesh.internal".into());
    let snap = match arg(&args, "--services") {
        Some(n) => big_snapshot(
            n.parse()?,
            arg(&args, "--srv")
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(100),
        )?,
        None => Snapshot::default(),
    };
    let rss_snap = rss_kb();
    let cfg = DnsConfig {
        domain: if zone_file.is_some() {
            origin.clone()
        } else {
            "pier.internal".into()
        },
        upstreams: vec!["127.0.0.1:9".parse()?],
        udp_workers: arg(&args, "--workers")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(0),
        ..DnsConfig::default()
    };
    let (_snap_tx, snap_rx) = watch::channel(Arc::new(snap));
    let (_nets_tx, nets_rx) = watch::channel(Vec::new());
    let mut registry = prometheus_client::registry::Registry::default();
    let t0 = std::time::Instant::now();
    let srv = DnsServer::new(cfg, snap_rx, nets_rx, &mut registry)?;
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(path) = zone_file {
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let recs = parse_zone(&text, origin.trim_end_matches('.'))?;
        let n = recs.len();
        srv.replace_zone(from_records(srv.zone_params(), 1, recs));
        eprintln!("bench_server: {n} records from {path}");
    }
    eprintln!(
        "bench_server: listening on {addr}; rss at start {} kB, with the snapshot {} kB, after zone build {} kB; zone names {} built in {:.1} ms",
        rss0,
        rss_snap,
        rss_kb(),
        srv.zone_len(),
        build_ms
    );
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let c = cancel.clone();
    tokio::spawn(async move {
        term.recv().await;
        c.cancel();
    });
    srv.serve(vec![udp], vec![tcp], cancel).await?;
    Ok(())
}
