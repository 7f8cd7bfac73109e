//! The pod runtime against the real dockerd and a real embedded store.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pier_model::{Name, Namespace, Pod, PodPhase, PodStatus, Snapshot, encode, keys};

use crate::harness::*;

fn pod(name: &str, node: &str, image: &str, cmd: &[&str]) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": name,
        "replicaset": "rs1",
        "node": node,
        "template_hash": "abc123",
        "template": {
            "image": image,
            "cmd": cmd,
            "env": {"GREETING": "hi"},
            "ports": [{"name": "http", "port": 8080}],
            "labels": {"tier": "front"},
        },
    }))?)
}

fn status(s: &Snapshot, name: &str) -> Option<PodStatus> {
    s.pod_statuses
        .get(&(Namespace::default(), Name::new(name).ok()?))
        .map(|p| (**p).clone())
}

async fn put_pod(env: &StoreEnv, p: &Pod) -> Result<()> {
    env.store
        .put(&keys::pod(&p.namespace, &p.name), encode(p), None)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_becomes_a_running_container_and_deleting_it_removes_the_container() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let name = format!("web-{}", d.run);
    let p = pod(&name, "n1", IMAGE, &[])?;
    put_pod(&env, &p).await?;
    // A pod of another node is not ours to run.
    let other = pod(&format!("other-{}", d.run), "n2", IMAGE, &[])?;
    put_pod(&env, &other).await?;

    let st = wait_snap(
        &mut snap,
        Duration::from_secs(20),
        "pod running and ready",
        |s| status(s, &name).filter(|st| st.phase == PodPhase::Running && st.ready),
    )
    .await?;
    let cid = st.container_id.clone().context("no container id")?;
    ensure!(st.node.as_ref().map(Name::as_str) == Some("n1"));
    ensure!(st.started_at.is_some());
    let ip = st.ip.context("no pod ip")?;
    ensure!(ip == d.ip(&cid)?, "pod status ip differs from docker's");

    let cname = format!("pier-default-{name}");
    let inspect = d.ok(&["inspect", &cname])?;
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    let c = &v[0];
    ensure!(c["Id"] == cid.as_str());
    ensure!(
        c["Config"]["Hostname"] == name.as_str(),
        "hostname {}",
        c["Config"]["Hostname"]
    );
    ensure!(c["HostConfig"]["Init"] == true, "init not set");
    let l = &c["Config"]["Labels"];
    ensure!(l["pier.pod"] == name.as_str());
    ensure!(l["pier.replicaset"] == "rs1");
    ensure!(l["pier.namespace"] == "default");
    ensure!(l["pier.node"] == "n1");
    ensure!(l["pier.template-hash"] == "abc123");
    ensure!(l["pier.ports"] == "http:8080");
    ensure!(l["tier"] == "front");
    ensure!(l["pier.test-run"] == d.run.as_str());
    ensure!(
        l.get("pier.service").is_none(),
        "pods must not carry pier.service"
    );
    let env_list = c["Config"]["Env"].to_string();
    ensure!(env_list.contains("GREETING=hi"), "env {env_list}");
    ensure!(
        c["Config"]["ExposedPorts"].get("8080/tcp").is_some(),
        "port not exposed"
    );
    let search = c["HostConfig"]["DnsSearch"].to_string();
    ensure!(
        search.contains("default.svc.pier.internal"),
        "dns search {search}"
    );
    // Hostname is the pod name inside the container too.
    let h = d.ok(&["exec", &cid, "hostname"])?;
    ensure!(h == name, "hostname inside is {h}");
    // The other node's pod got no container and no status from us.
    ensure!(status(&snap.borrow(), &format!("other-{}", d.run)).is_none());
    ensure!(
        d.ok(&[
            "ps",
            "-aq",
            "--filter",
            &format!("name=pier-default-other-{}", d.run)
        ])?
        .is_empty()
    );

    env.store.delete(&keys::pod(&p.namespace, &p.name)).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = d.ok(&["ps", "-aq", "--filter", &format!("id={cid}")])?;
        if out.is_empty() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "pod container not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_snap(
        &mut snap,
        Duration::from_secs(5),
        "pod status removed",
        |s| status(s, &name).is_none().then_some(()),
    )
    .await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_with_missing_image_fails_with_a_message_that_says_so() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let name = format!("ghost-{}", d.run);
    put_pod(&env, &pod(&name, "n1", "pier-test/does-not-exist:1", &[])?).await?;
    let st = wait_snap(&mut snap, Duration::from_secs(10), "pod failed", |s| {
        status(s, &name).filter(|st| st.phase == PodPhase::Failed)
    })
    .await?;
    ensure!(
        st.message.contains("pier-test/does-not-exist:1")
            && st.message.contains("not found locally"),
        "message: {}",
        st.message
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_whose_container_exits_is_failed_and_not_restarted() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let name = format!("quit-{}", d.run);
    put_pod(
        &env,
        &pod(&name, "n1", IMAGE, &["sh", "-c", "sleep 0.3; exit 3"])?,
    )
    .await?;
    let st = wait_snap(&mut snap, Duration::from_secs(15), "pod failed", |s| {
        status(s, &name).filter(|st| st.phase == PodPhase::Failed)
    })
    .await?;
    ensure!(st.message.contains("code 3"), "message: {}", st.message);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids = d.labelled();
    ensure!(
        ids.len() == 1,
        "expected exactly one container, got {ids:?}"
    );
    let state = d.ok(&["inspect", "-f", "{{.State.Status}}", &ids[0]])?;
    ensure!(state == "exited", "container was restarted: {state}");
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_of_a_pod_that_is_not_here_is_stopped_and_removed() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    // A pod container of this node (pier's name and labels) whose pod was
    // reassigned to n2.
    let name = format!("moved-{}", d.run);
    put_pod(&env, &pod(&name, "n2", IMAGE, &[])?).await?;
    let stray = d.run_container(
        &[
            ("pier.pod", &name),
            ("pier.node", "n1"),
            ("pier.namespace", "default"),
            ("pier.replicaset", "rs1"),
        ],
        &["--init", "--name", &format!("pier-default-{name}")],
    )?;
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if d.ok(&["ps", "-aq", "--filter", &format!("id={stray}")])?
            .is_empty()
        {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "stray pod container not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await?;
    Ok(())
}
