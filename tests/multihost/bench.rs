//! Cross-host benchmark with real hosts (network namespaces joined by a
//! veth switch, one dockerd, etcd member and release `pier agent` each):
//! the same kind of service reached from host 1 locally and through the
//! mTLS mesh hop to host 2, in one run.
//!
//! ```sh
//! cargo build --release -p pier
//! cargo bench -p pier-tests --bench multihost
//! ```
//!
//! Env: `MH_BENCH_CONNECTS` (sequential connections per target, default
//! 2000), `MH_BENCH_MIB` (bulk MiB per target, default 1024).
//!
//! Each pod is a `sleep` container whose network namespace runs this
//! process's own servers (a thread `setns`-ed into it): a one-byte echo on
//! :7000 and a sink on :9000 that answers with the byte count at EOF, so the
//! servers cost the same on both paths and never limit the proxy. The
//! client is a thread in host 1's namespace. Three targets:
//!
//! - `direct`: host 1 → its local pod's IP, no proxy (reference);
//! - `local`: host 1 → service VIP → pier proxy → local pod (splice);
//! - `mesh`: host 1 → service VIP → pier proxy → TLS mesh → host 2's
//!   agent → pod;
//! - the same two through each pod's endpoint VIP (the address its pod
//!   name resolves to) instead of the service VIP.
//!
//! CPU is the agents' user+system time from `/proc/<pid>/stat` over the
//! bulk run (both agents).

mod cluster;
mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cluster::Cluster;
use pier_tests::eventually;

const PING: u16 = 7000;
const SINK: u16 = 9000;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Clock ticks of user+system time of `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn ticks_per_sec() -> f64 {
    // CLK_TCK is 100 on every Linux this runs on.
    100.0
}

/// The pod's servers, in the container's network namespace, for the life
/// of the process.
fn start_servers(pid: u32) {
    let _detached = netns::in_netns_at(format!("/proc/{pid}/ns/net"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            use tokio::net::TcpListener;
            let ping = TcpListener::bind(("0.0.0.0", PING)).await?;
            let sink = TcpListener::bind(("0.0.0.0", SINK)).await?;
            tokio::spawn(async move {
                while let Ok((mut s, _)) = ping.accept().await {
                    tokio::spawn(async move {
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).await.is_ok() {
                            let _ = s.write_all(&b).await;
                        }
                    });
                }
            });
            while let Ok((mut s, _)) = sink.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut n: u64 = 0;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(k) => n += k as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&n.to_be_bytes()).await;
                });
            }
            Ok::<(), anyhow::Error>(())
        })
    });
}

struct Result1 {
    name: &'static str,
    conn_per_s: f64,
    us_per_conn: f64,
    mib_s: f64,
    cpu_s_per_gib: f64,
}

/// Sequential connect + 1-byte round trip + close, `n` times.
fn conn_rate(addr: SocketAddr, n: u64) -> Result<(f64, f64)> {
    let one = || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    };
    for _ in 0..50 {
        one().with_context(|| format!("warm-up connect to {addr}"))?;
    }
    let t = Instant::now();
    for _ in 0..n {
        one().with_context(|| format!("connect to {addr}"))?;
    }
    let el = t.elapsed().as_secs_f64();
    Ok((n as f64 / el, el * 1e6 / n as f64))
}

/// One connection, `mib` MiB one way, then the sink's byte count.
fn bulk(addr: SocketAddr, mib: u64) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let chunk = vec![0x5au8; 256 * 1024];
    let total = mib * 1024 * 1024;
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let el = t.elapsed().as_secs_f64();
    ensure!(
        u64::from_be_bytes(n) == sent,
        "sink got {} of {sent} bytes",
        u64::from_be_bytes(n)
    );
    Ok(sent as f64 / (1024.0 * 1024.0) / el)
}

fn main() -> Result<()> {
    let conns = env_num("MH_BENCH_CONNECTS", 2000);
    let mib = env_num("MH_BENCH_MIB", 1024);
    let c = Cluster::start(3, 2)?;
    let ports = format!("ping:{PING},bulk:{SINK}");
    for (i, name, svc) in [(1, "loc", "local"), (2, "rem", "remote")] {
        c.run_labelled(
            i,
            name,
            &[("pier.service", svc), ("pier.ports", &ports)],
            &["sleep", "3600"],
        )?;
        start_servers(c.container_pid(i, name)?);
    }
    eventually(
        Duration::from_secs(30),
        "h1 sees local and remote ready",
        || {
            Ok((c.ready_endpoints(1, "local")?.len() == 1
                && c.ready_endpoints(1, "remote")?.len() == 1)
                .then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    let vip = |svc: &str| -> Result<std::net::IpAddr> {
        let v = c.cli_json(1, &["get", "svc", svc])?;
        let s = v
            .first()
            .and_then(|s| s["vip"].as_str())
            .with_context(|| format!("no VIP for {svc}"))?;
        Ok(s.parse()?)
    };
    // The pod's endpoint VIP (what its pod name resolves to).
    let ep_addr = |svc: &str| -> Result<std::net::IpAddr> {
        let v = c.cli_json(1, &["get", "endpoints", svc])?;
        let s = v
            .first()
            .and_then(|e| e["addr"].as_str())
            .with_context(|| format!("no endpoint VIP for {svc}: {v:?}"))?;
        Ok(s.parse()?)
    };
    let targets = [
        ("direct (pod IP, no proxy)", c.pod_ip(1, "loc")?),
        ("local (VIP, proxy, splice)", vip("local")?),
        ("local (endpoint VIP, proxy, splice)", ep_addr("local")?),
        ("mesh (VIP, proxy, mTLS hop)", vip("remote")?),
        ("mesh (endpoint VIP, proxy, mTLS hop)", ep_addr("remote")?),
    ];
    let agents = c.agents.clone();
    let netns = c.topo.host(1).netns.clone();
    let results = netns::in_netns(&netns, move || {
        let mut out = Vec::new();
        for (name, ip) in targets {
            let (conn_per_s, us_per_conn) = conn_rate(SocketAddr::new(ip, PING), conns)?;
            let before: u64 = agents.iter().map(|p| cpu_ticks(*p)).sum();
            let mib_s = bulk(SocketAddr::new(ip, SINK), mib)?;
            let after: u64 = agents.iter().map(|p| cpu_ticks(*p)).sum();
            let cpu_s = (after - before) as f64 / ticks_per_sec();
            out.push(Result1 {
                name,
                conn_per_s,
                us_per_conn,
                mib_s,
                cpu_s_per_gib: cpu_s / (mib as f64 / 1024.0),
            });
        }
        Ok(out)
    })?;
    let local = &results[1];
    println!(
        "\ncross-host bench: {conns} sequential connections and {mib} MiB per target, 2 hosts (netns + veth), release pier\n"
    );
    println!("| target | conn/s | µs/conn | × local | bulk MiB/s | × local | agents' CPU-s/GiB |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} |",
            r.name,
            r.conn_per_s,
            r.us_per_conn,
            r.conn_per_s / local.conn_per_s,
            r.mib_s,
            r.mib_s / local.mib_s,
            r.cpu_s_per_gib
        );
    }
    let m = c.metrics(1)?;
    for l in m
        .lines()
        .filter(|l| l.contains("mesh_client_") && !l.starts_with('#'))
    {
        println!("h1 {l}");
    }
    Ok(())
}
