//! Supervisor figures against the embedded store, with simulated node agents
//! that mark each pod Running at once (no Docker: the lead measures that end
//! to end).
//!
//! ```text
//! cargo run -p pier-supervisor --example supervisor_bench
//! ```
//!
//! - delete a pod → replacement written (seen in the snapshot) and Running,
//!   p50/p99 over 20 tries;
//! - scale 1 → 20 → all assigned and all Running, 5 tries;
//! - failover: the leader crashes (no resign) → the other leads, lease TTL
//!   2 s and 5 s; and a graceful handover (cancel → resign).
//!
//! Each against the embedded store, then against a real etcd.

#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pier_model::{Replicas, Resources};

use harness::*;

const WITHIN: Duration = Duration::from_secs(30);

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<44} n={:<3} p50={:>8.1?} p99={:>8.1?} min={:>8.1?} max={:>8.1?}",
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.99),
        v[0],
        v[v.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    init_tracing();
    println!("== embedded store (redb, temp dir)");
    bench(Cluster::embedded().await?).await?;
    println!("== etcd 3.4 (one member on loopback, PIER_ETCD_BIN or /usr/bin/etcd)");
    let etcd = pier_store::testing::EtcdServer::start().context("start etcd")?;
    let store = pier_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?;
    bench(Cluster::with_store(std::sync::Arc::new(store), None).await).await?;
    Ok(())
}

async fn bench(c: Cluster) -> Result<()> {
    for name in ["n1", "n2", "n3"] {
        c.add_node(name, &[], Resources::default()).await?;
    }
    let cfg = pier_supervisor::SupervisorConfig {
        lease_ttl_secs: 2,
        ..Default::default()
    };
    let sup = c.supervisor("n1", cfg.clone())?;
    tokio::time::timeout(WITHIN, sup.leader.clone().wait_for(|l| *l)).await??;

    // 1. delete pod -> replacement.
    let mut rs = replicaset("web", 3);
    c.put_rs(&rs).await?;
    c.wait_for("3 ready", WITHIN, |s| all_ready(s, "web", 3))
        .await?;
    let (mut written, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let snap = c.snapshot();
        let before: BTreeSet<_> = pods_of(&snap, "web")
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let victim = before.iter().next().cloned().context("a pod")?;
        let t0 = Instant::now();
        c.delete_pod(&victim).await?;
        c.wait_for("replacement written", WITHIN, |s| {
            pods_of(s, "web").iter().any(|p| !before.contains(&p.name))
        })
        .await?;
        written.push(t0.elapsed());
        c.wait_for("replacement ready", WITHIN, |s| {
            all_ready(s, "web", 3) && pods_of(s, "web").iter().all(|p| p.name != victim)
        })
        .await?;
        ready.push(t0.elapsed());
    }
    summary("delete pod -> replacement pod written", written);
    summary("delete pod -> replacement Running (sim.)", ready);

    // 2. scale 1 -> 20.
    let (mut assigned, mut running) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        rs.replicas = Replicas::new(1)?;
        c.put_rs(&rs).await?;
        c.wait_for("1 ready", WITHIN, |s| all_ready(s, "web", 1))
            .await?;
        let t0 = Instant::now();
        rs.replicas = Replicas::new(20)?;
        c.put_rs(&rs).await?;
        c.wait_for("20 assigned", WITHIN, |s| pods_of(s, "web").len() == 20)
            .await?;
        assigned.push(t0.elapsed());
        c.wait_for("20 ready", WITHIN, |s| all_ready(s, "web", 20))
            .await?;
        running.push(t0.elapsed());
    }
    summary("scale 1 -> 20: all assigned", assigned);
    summary("scale 1 -> 20: all Running (sim.)", running);
    drop(sup);

    // 3. failover.
    for (ttl, tries) in [(2u32, 3usize), (5, 2)] {
        let mut took = Vec::new();
        for _ in 0..tries {
            let cfg = pier_supervisor::SupervisorConfig {
                lease_ttl_secs: ttl,
                ..Default::default()
            };
            let mut a = c.supervisor("n1", cfg.clone())?;
            tokio::time::timeout(WITHIN, a.leader.clone().wait_for(|l| *l)).await??;
            let b = c.supervisor("n2", cfg)?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t0 = Instant::now();
            a.crash().await;
            tokio::time::timeout(WITHIN, b.leader.clone().wait_for(|l| *l)).await??;
            took.push(t0.elapsed());
            b.cancel.cancel();
            // Let b resign before the next round.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        summary(&format!("failover, leader crashed, TTL {ttl} s"), took);
    }
    let mut took = Vec::new();
    for _ in 0..5 {
        let a = c.supervisor("n1", cfg.clone())?;
        tokio::time::timeout(WITHIN, a.leader.clone().wait_for(|l| *l)).await??;
        let b = c.supervisor("n2", cfg.clone())?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        a.cancel.cancel();
        tokio::time::timeout(WITHIN, b.leader.clone().wait_for(|l| *l)).await??;
        took.push(t0.elapsed());
        b.cancel.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    summary("handover, leader cancelled (resigns)", took);
    Ok(())
}
