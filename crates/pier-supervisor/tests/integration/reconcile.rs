//! Reconcile scenarios against the embedded store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pier_model::{PodPhase, Resources};

use crate::harness::*;

const WITHIN: Duration = Duration::from_secs(10);

async fn three_nodes() -> Result<Cluster> {
    init_tracing();
    let c = Cluster::embedded().await?;
    for name in ["a", "b", "c"] {
        c.add_node(name, &[], Resources::default()).await?;
    }
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_creates_pods_spread_across_nodes() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    let mut rs = replicaset("web", 1);
    c.put_rs(&rs).await?;
    c.wait_for("1 ready pod", WITHIN, |s| all_ready(s, "web", 1))
        .await?;

    rs.replicas = pier_model::Replicas::new(6)?;
    c.put_rs(&rs).await?;
    let snap = c
        .wait_for("6 ready pods", WITHIN, |s| all_ready(s, "web", 6))
        .await?;
    ensure!(
        per_node(&snap, "web")
            == BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]),
        "not spread: {:?}",
        per_node(&snap, "web")
    );
    for p in pods_of(&snap, "web") {
        let s = p.name.as_str();
        let suffix = s.strip_prefix("web-").unwrap_or("");
        ensure!(
            suffix.len() == 5
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "pod name {s} is not web-<5 [a-z0-9]>"
        );
        ensure!(p.template_hash == rs.template.hash() && p.template == rs.template);
    }
    // Level-triggered and settled: no more writes after the goal.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(pods_of(&c.snapshot(), "web").len() == 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_deletes_unready_and_newest_first() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    let mut rs = replicaset("web", 2);
    c.put_rs(&rs).await?;
    let snap = c
        .wait_for("2 ready", WITHIN, |s| all_ready(s, "web", 2))
        .await?;
    let old: Vec<_> = pods_of(&snap, "web");
    // created_at is in ms: make the next pods strictly newer.
    tokio::time::sleep(Duration::from_millis(20)).await;
    rs.replicas = pier_model::Replicas::new(3)?;
    c.put_rs(&rs).await?;
    let snap = c
        .wait_for("3 ready", WITHIN, |s| all_ready(s, "web", 3))
        .await?;
    let newest = pods_of(&snap, "web")
        .into_iter()
        .find(|p| !old.iter().any(|o| o.name == p.name))
        .expect("a new pod");
    // One of the old pods turns unready.
    let unready = old[0].clone();
    c.set_status(&unready, PodPhase::Running, false, "health check failing")
        .await?;
    c.wait_for("unready status", WITHIN, |s| {
        phase_of(s, &unready) == Some((PodPhase::Running, false))
    })
    .await?;

    rs.replicas = pier_model::Replicas::new(1)?;
    c.put_rs(&rs).await?;
    let snap = c
        .wait_for("1 pod", WITHIN, |s| pods_of(s, "web").len() == 1)
        .await?;
    let kept = &pods_of(&snap, "web")[0];
    ensure!(
        kept.name == old[1].name,
        "kept {} but expected the older ready pod {} (unready {}, newest {})",
        kept.name,
        old[1].name,
        unready.name,
        newest.name
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pod_is_replaced() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    c.put_rs(&replicaset("web", 2)).await?;
    let snap = c
        .wait_for("2 ready", WITHIN, |s| all_ready(s, "web", 2))
        .await?;
    let victim = pods_of(&snap, "web")[0].clone();
    c.set_status(&victim, PodPhase::Failed, false, "exited with code 1")
        .await?;
    let snap = c
        .wait_for("failed pod replaced", WITHIN, |s| {
            all_ready(s, "web", 2) && pods_of(s, "web").iter().all(|p| p.name != victim.name)
        })
        .await?;
    ensure!(pods_of(&snap, "web").len() == 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pod_is_replaced_with_a_new_name() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    c.put_rs(&replicaset("web", 3)).await?;
    let snap = c
        .wait_for("3 ready", WITHIN, |s| all_ready(s, "web", 3))
        .await?;
    let before: BTreeSet<_> = pods_of(&snap, "web")
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let victim = before.iter().next().cloned().expect("a pod");
    c.delete_pod(&victim).await?;
    let snap = c
        .wait_for("replacement", WITHIN, |s| {
            all_ready(s, "web", 3) && pods_of(s, "web").iter().all(|p| p.name != victim)
        })
        .await?;
    let after: BTreeSet<_> = pods_of(&snap, "web")
        .iter()
        .map(|p| p.name.clone())
        .collect();
    ensure!(
        after.difference(&before).count() == 1,
        "{before:?} -> {after:?}"
    );
    // The replacement goes where the deleted pod was: the spread is kept.
    ensure!(
        per_node(&snap, "web").values().all(|n| *n == 1),
        "{:?}",
        per_node(&snap, "web")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_node_whose_lease_expires_move_to_the_others() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    c.put_rs(&replicaset("web", 3)).await?;
    c.wait_for("3 ready", WITHIN, |s| all_ready(s, "web", 3))
        .await?;
    c.kill_node("c");
    // 2 s TTL, then the move.
    let snap = c
        .wait_for("pods off node c", WITHIN, |s| {
            !s.nodes.contains_key("c")
                && all_ready(s, "web", 3)
                && pods_of(s, "web").iter().all(|p| p.node.as_str() != "c")
        })
        .await?;
    let spread = per_node(&snap, "web");
    ensure!(
        spread.values().all(|n| *n <= 2) && spread.len() == 2,
        "{spread:?}"
    );
    Ok(())
}

/// The supervisor runs inside node a's agent: a's record missing means
/// that agent is (re)registering, not that a is lost. A restarted agent
/// replaced every pod of its host at once (mid-rollout, all steps in one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_node_record_missing_after_restart_does_not_move_its_pods() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    c.put_rs(&replicaset("web", 6)).await?;
    let before = c
        .wait_for("6 ready", WITHIN, |s| all_ready(s, "web", 6))
        .await?;
    let on_a: Vec<String> = pods_of(&before, "web")
        .iter()
        .filter(|p| p.node.as_str() == "a")
        .map(|p| p.name.to_string())
        .collect();
    ensure!(!on_a.is_empty(), "{:?}", per_node(&before, "web"));
    c.kill_node("a");
    c.wait_for("a's record gone", WITHIN, |s| !s.nodes.contains_key("a"))
        .await?;
    // Two requeues (1 s each) with a's record gone: its pods stay.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let snap = c.snapshot();
    let now: Vec<String> = pods_of(&snap, "web")
        .iter()
        .filter(|p| p.node.as_str() == "a")
        .map(|p| p.name.to_string())
        .collect();
    ensure!(
        now == on_a && pods_of(&snap, "web").len() == 6,
        "a's pods moved while its own supervisor runs: {on_a:?} -> {now:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_selector_and_capacity_are_respected() -> Result<()> {
    init_tracing();
    let c = Cluster::embedded().await?;
    c.add_node(
        "ssd1",
        &[("disk", "ssd")],
        Resources {
            pods: 2,
            ..Default::default()
        },
    )
    .await?;
    c.add_node(
        "ssd2",
        &[("disk", "ssd")],
        Resources {
            cpu_millis: 1000,
            memory_mb: 0,
            pods: 0,
        },
    )
    .await?;
    c.add_node("hdd", &[("disk", "hdd")], Resources::default())
        .await?;
    let sup = c.supervisor("ssd1", test_config())?;
    let mut rs = replicaset("db", 6);
    rs.placement
        .node_selector
        .insert("disk".into(), "ssd".into());
    rs.template.resources.cpu_millis = 400;
    c.put_rs(&rs).await?;
    // ssd1: 2 by pod count; ssd2: 2 by cpu (2 x 400 <= 1000 < 3 x 400); hdd: never.
    let snap = c
        .wait_for("4 ready", WITHIN, |s| {
            pods_of(s, "db").len() == 4 && pods_of(s, "db").iter().all(|p| phase_of(s, p).is_some())
        })
        .await?;
    ensure!(
        per_node(&snap, "db") == BTreeMap::from([("ssd1".into(), 2), ("ssd2".into(), 2)]),
        "{:?}",
        per_node(&snap, "db")
    );
    let mut problems = sup.problems.clone();
    let p = tokio::time::timeout(WITHIN, problems.wait_for(|p| p.contains_key(&key("db"))))
        .await??
        .get(&key("db"))
        .cloned()
        .unwrap_or_default();
    ensure!(p.contains("cannot place 2 of 6"), "{p}");
    // Stays at 4 across requeues.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(pods_of(&c.snapshot(), "db").len() == 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_feasible_node_reports_a_problem_then_recovers() -> Result<()> {
    let c = three_nodes().await?;
    let sup = c.supervisor("a", test_config())?;
    let mut rs = replicaset("gpu", 2);
    rs.placement
        .node_selector
        .insert("gpu".into(), "yes".into());
    c.put_rs(&rs).await?;
    let mut problems = sup.problems.clone();
    let p = tokio::time::timeout(WITHIN, problems.wait_for(|p| p.contains_key(&key("gpu"))))
        .await??
        .get(&key("gpu"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        p.contains("node_selector gpu=yes") && p.contains("cannot place 2 of 2"),
        "{p}"
    );
    ensure!(pods_of(&c.snapshot(), "gpu").is_empty());
    // Every agent sees the report: it is in the store, under the leader's
    // lease, so it is in everyone's snapshot.
    let snap = c
        .wait_for("the problem in the snapshot", WITHIN, |s| {
            s.problems.contains_key(&key("gpu"))
        })
        .await?;
    let stored = &snap.problems[&key("gpu")];
    ensure!(
        stored.message == p && stored.reported_by.as_str() == "a",
        "{stored:?}"
    );
    let kv = c
        .store
        .get(&pier_model::keys::problem(&key("gpu").0, &key("gpu").1))
        .await?
        .context("the problem key")?;
    ensure!(
        kv.lease.is_some(),
        "the report lives under the leader's lease"
    );
    // Still alive and leading; a matching node fixes it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ensure!(sup.task.as_ref().is_some_and(|t| !t.is_finished()) && sup.is_leader());
    c.add_node("g1", &[("gpu", "yes")], Resources::default())
        .await?;
    c.wait_for("2 ready on g1", WITHIN, |s| all_ready(s, "gpu", 2))
        .await?;
    tokio::time::timeout(WITHIN, problems.wait_for(|p| !p.contains_key(&key("gpu")))).await??;
    c.wait_for("the problem gone from the snapshot", WITHIN, |s| {
        !s.problems.contains_key(&key("gpu"))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_backs_off_instead_of_crash_looping() -> Result<()> {
    let c = three_nodes().await?;
    let sup = c.supervisor("a", test_config())?;
    let mut rs = replicaset("broken", 1);
    rs.template.image = format!("pier-test/{MISSING}:latest");
    c.put_rs(&rs).await?;
    let mut seen: BTreeSet<pier_model::Name> = BTreeSet::new();
    let start = tokio::time::Instant::now();
    let mut rx = c.reflector.subscribe();
    // Backoff: immediate, +1 s, +2 s, +4 s: about 4 pods in 4 s. A crash
    // loop would make hundreds.
    while start.elapsed() < Duration::from_secs(4) {
        for p in pods_of(&rx.borrow_and_update(), "broken") {
            seen.insert(p.name.clone());
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    ensure!(
        (2..=6).contains(&seen.len()),
        "{} pods in 4 s: {seen:?}",
        seen.len()
    );
    let p = sup
        .problems
        .borrow()
        .get(&key("broken"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        p.contains("not found") && p.contains("backoff"),
        "problem: {p:?}"
    );

    // Fixing the image: the next replacement runs and the problem clears.
    rs.template.image = "pier-test/httpd:latest".into();
    c.put_rs(&rs).await?;
    c.wait_for("a running pod", Duration::from_secs(15), |s| {
        pods_of(s, "broken")
            .iter()
            .any(|p| phase_of(s, p) == Some((PodPhase::Running, true)))
    })
    .await?;
    let mut problems = sup.problems.clone();
    tokio::time::timeout(
        WITHIN,
        problems.wait_for(|p| !p.contains_key(&key("broken"))),
    )
    .await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_deleted_replica_set_are_deleted() -> Result<()> {
    let c = three_nodes().await?;
    let _sup = c.supervisor("a", test_config())?;
    c.put_rs(&replicaset("web", 3)).await?;
    c.put_rs(&replicaset("keep", 1)).await?;
    c.wait_for("ready", WITHIN, |s| {
        all_ready(s, "web", 3) && all_ready(s, "keep", 1)
    })
    .await?;
    c.delete_rs("web").await?;
    c.wait_for("web pods gone", WITHIN, |s| pods_of(s, "web").is_empty())
        .await?;
    ensure!(all_ready(&c.snapshot(), "keep", 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_lost_node_wait_out_the_grace_then_move() -> Result<()> {
    let c = three_nodes().await?;
    let mut cfg = test_config();
    cfg.node_grace_ms = 2000;
    let _sup = c.supervisor("a", cfg)?;
    c.put_rs(&replicaset("web", 3)).await?;
    c.wait_for("3 ready", WITHIN, |s| all_ready(s, "web", 3))
        .await?;
    c.kill_node("c");
    c.wait_for("node c gone", WITHIN, |s| !s.nodes.contains_key("c"))
        .await?;
    // Well inside the 2 s grace: the pod is still assigned to c.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snap = c.snapshot();
    ensure!(
        pods_of(&snap, "web").iter().any(|p| p.node.as_str() == "c"),
        "moved before the grace: {:?}",
        per_node(&snap, "web")
    );
    c.wait_for("pods off node c", WITHIN, |s| {
        all_ready(s, "web", 3) && pods_of(s, "web").iter().all(|p| p.node.as_str() != "c")
    })
    .await?;
    Ok(())
}
