//! Two supervisors: exactly one leads; a crashed leader is replaced within
//! the lease TTL + 1 s (real etcd), a cancelled one hands over at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_model::{Name, Resources};
use pier_store::election::leader;
use pier_store::testing::EtcdServer;
use pier_store::{EtcdStore, Store};

use crate::harness::*;

const WITHIN: Duration = Duration::from_secs(10);

async fn wait_leader(s: &RunningSupervisor, within: Duration) -> Result<()> {
    let mut rx = s.leader.clone();
    tokio::time::timeout(within, rx.wait_for(|l| *l)).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_leader_is_replaced_within_ttl_plus_one_second_on_etcd() -> Result<()> {
    init_tracing();
    let etcd = EtcdServer::start().context("start etcd")?;
    let store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?);
    let c = Cluster::with_store(store, None).await;
    for name in ["a", "b"] {
        c.add_node(name, &[], Resources::default()).await?;
    }
    // The second supervisor talks to etcd through its own client, as on
    // another host.
    let store_b: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?);
    let mut sa = c.supervisor("a", test_config())?;
    wait_leader(&sa, WITHIN).await?;
    let sb = {
        let sup = pier_supervisor::Supervisor::new(
            test_config(),
            n("b"),
            store_b.clone(),
            c.reflector.subscribe(),
        )?;
        let leader = sup.is_leader();
        let problems = sup.problems();
        let cancel = c.cancel.child_token();
        let task = tokio::spawn(sup.run(cancel.clone()));
        RunningSupervisor {
            leader,
            problems,
            cancel,
            task: Some(task),
        }
    };
    c.put_rs(&replicaset("web", 2)).await?;
    c.wait_for("2 ready", WITHIN, |s| all_ready(s, "web", 2))
        .await?;
    // Longer than the TTL: b never leads while a renews.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(sa.is_leader() && !sb.is_leader(), "exactly one must lead");
    let election = Name::new("supervisor")?;
    ensure!(leader(&*store_b, &election).await? == Some("a".into()));

    // a crashes: no resign, its lease runs out.
    let crashed = Instant::now();
    sa.crash().await;
    wait_leader(&sb, WITHIN).await?;
    let took = crashed.elapsed();
    eprintln!("failover took {took:?}");
    ensure!(
        took <= Duration::from_secs(test_config().lease_ttl_secs as u64 + 1),
        "failover took {took:?}"
    );
    ensure!(leader(&*store_b, &election).await? == Some("b".into()));

    // The new leader reconciles: a deleted pod comes back.
    let victim = pods_of(&c.snapshot(), "web")[0].name.clone();
    c.delete_pod(&victim).await?;
    c.wait_for("replacement by b", WITHIN, |s| {
        all_ready(s, "web", 2) && pods_of(s, "web").iter().all(|p| p.name != victim)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_leader_resigns_and_hands_over_at_once() -> Result<()> {
    init_tracing();
    let c = Cluster::embedded().await?;
    c.add_node("a", &[], Resources::default()).await?;
    let mut cfg = test_config();
    cfg.lease_ttl_secs = 10;
    let sa = c.supervisor("a", cfg.clone())?;
    wait_leader(&sa, WITHIN).await?;
    let sb = c.supervisor("b", cfg)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(sa.is_leader() && !sb.is_leader());
    let t = Instant::now();
    sa.cancel.cancel();
    // Far below the 10 s TTL: the lease was revoked.
    wait_leader(&sb, Duration::from_secs(3)).await?;
    ensure!(!sa.is_leader());
    ensure!(t.elapsed() < Duration::from_secs(3));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_leads_again_without_waiting_out_its_old_lease() -> Result<()> {
    init_tracing();
    let c = Cluster::embedded().await?;
    c.add_node("a", &[], Resources::default()).await?;
    let mut cfg = test_config();
    cfg.lease_ttl_secs = 30;
    let mut first = c.supervisor("a", cfg.clone())?;
    wait_leader(&first, WITHIN).await?;
    // A crash: the key stays under its lease for 30 s.
    first.crash().await;
    // Another node's supervisor waits for that lease...
    let other = c.supervisor("b", cfg.clone())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(!other.is_leader());
    // ...but node a's next run recognises its own key and leads at once.
    let t = Instant::now();
    let second = c.supervisor("a", cfg)?;
    // b may win the race for the freed key; either way someone leads now,
    // not after 30 s.
    tokio::time::timeout(Duration::from_secs(3), async {
        let (mut la, mut lb) = (second.leader.clone(), other.leader.clone());
        tokio::select! {
            r = la.wait_for(|l| *l) => r.map(|_| ()),
            r = lb.wait_for(|l| *l) => r.map(|_| ()),
        }
    })
    .await??;
    ensure!(t.elapsed() < Duration::from_secs(3));
    ensure!(second.is_leader() != other.is_leader(), "exactly one leads");
    Ok(())
}
