//! The Kubernetes 1.0 demo on plain Docker: run, expose, curl, scale, kill a
//! pod with no failed request, delete. Once with the embedded store and
//! once with a real etcd.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pier_tests::{AgentOpts, AgentProc, Scenario, TEST_IMAGE, eventually, http_get};
use serde_json::Value;

fn running_pods(a: &AgentProc) -> Result<Vec<(String, String)>> {
    let pods = a.cli_json(&["get", "pods"])?;
    let arr = pods
        .as_array()
        .context("get pods -o json is not an array")?;
    Ok(arr
        .iter()
        .filter(|p| p["phase"] == "Running" && p["replicaset"] == "kube-demo")
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["ip"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The names of kube-demo's Running pods, straight from the agent's API
/// (`GET /api/v1/namespaces/default/pods`, what `pier get pods -o json`
/// prints). For timing a bound: one loopback request costs about a
/// millisecond, where starting the CLI process costs up to a few hundred
/// on a loaded machine, which would be counted against pier.
fn running_pod_names_api(a: &AgentProc) -> Result<BTreeSet<String>> {
    let (code, body) = a.api_get("/api/v1/namespaces/default/pods")?;
    ensure!(code == 200, "GET pods: HTTP {code}: {body}");
    let pods: Value = serde_json::from_str(&body).context("pods JSON")?;
    let arr = pods.as_array().context("pods JSON is not an array")?;
    Ok(arr
        .iter()
        .filter(|p| p["phase"] == "Running" && p["replicaset"] == "kube-demo")
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

fn get_body(addr: &SocketAddr) -> Result<String> {
    let (code, body) = http_get(addr, "/")?;
    ensure!(code == 200, "HTTP {code} from {addr}");
    Ok(body.trim().to_owned())
}

fn demo(store: &str) -> Result<()> {
    let a = Scenario::start(AgentOpts {
        store: store.to_owned(),
        node: "demo-1".into(),
        extra_toml: String::new(),
    })?;

    // 1-2. run, and one pod Running.
    a.cli_ok(&["run", "kube-demo", "--image", TEST_IMAGE, "--port", "8080"])?;
    let rs = a.cli_json(&["get", "rs"])?;
    ensure!(
        rs.as_array()
            .is_some_and(|v| v.iter().any(|r| r["name"] == "kube-demo")),
        "get rs does not list kube-demo: {rs}"
    );
    let first = eventually(Duration::from_secs(20), "1 Running pod", || {
        let p = running_pods(&a)?;
        Ok((p.len() == 1).then(|| p[0].0.clone()))
    })
    .with_context(|| a.log_tail())?;
    let table = a.cli_ok(&["get", "pods"])?;
    ensure!(
        table.contains(&first) && table.contains("Running"),
        "table: {table}"
    );

    // 3-4. expose as a NodePort service; the VIP and node port are shown.
    a.cli_ok(&[
        "expose",
        "rs",
        "kube-demo",
        "--port",
        "8080",
        "--type",
        "NodePort",
    ])?;
    let svc = a.cli_json(&["get", "svc", "kube-demo"])?;
    let svc = svc
        .as_array()
        .and_then(|v| v.first())
        .cloned()
        .context("no service")?;
    let vip: std::net::IpAddr = svc["vip"].as_str().context("no vip")?.parse()?;
    let np = svc["ports"][0]["node_port"]
        .as_u64()
        .context("no node_port")? as u16;
    let vip_addr = SocketAddr::new(vip, 8080);
    let np_addr: SocketAddr = format!("127.0.0.1:{np}").parse()?;

    // 5. curl the node port and the VIP: the pod's name comes back.
    let body = eventually(Duration::from_secs(10), "node port answers", || {
        Ok(get_body(&np_addr).ok())
    })?;
    ensure!(
        body == first,
        "node port answered {body:?}, expected pod {first:?}"
    );
    let body = eventually(Duration::from_secs(10), "VIP answers", || {
        Ok(get_body(&vip_addr).ok())
    })?;
    ensure!(
        body == first,
        "VIP answered {body:?}, expected pod {first:?}"
    );

    // 6-7. scale to 3; 30 requests see all three names.
    a.cli_ok(&["scale", "rs", "kube-demo", "--replicas", "3", "--wait"])?;
    let names: BTreeSet<String> = running_pods(&a)?.into_iter().map(|p| p.0).collect();
    ensure!(names.len() == 3, "after scale --wait: {names:?}");
    let seen = eventually(Duration::from_secs(10), "all 3 pods answer", || {
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            seen.insert(get_body(&vip_addr)?);
        }
        Ok((seen == names).then_some(seen))
    })?;
    ensure!(seen.len() == 3);

    // 8. delete a pod under a bounded request loop: 0 failures, and a new
    //    pod with a new name Running within 2 s.
    let victim = names.iter().next().cloned().context("a pod")?;
    let stop = Arc::new(AtomicBool::new(false));
    let loop_handle = {
        let stop = stop.clone();
        std::thread::spawn(move || -> (u32, u32, Vec<String>) {
            let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(30);
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                match get_body(&vip_addr) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        errors.push(e.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, failed, errors)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    a.cli_ok(&["delete", "pod", &victim])?;
    let delete_cmd = t0.elapsed();
    // Watched through the API, not the CLI: see `running_pod_names_api`.
    let replacement = eventually(Duration::from_secs(10), "a replacement pod Running", || {
        let now = running_pod_names_api(&a)?;
        let new: Vec<String> = now.difference(&names).cloned().collect();
        Ok((now.len() == 3 && !now.contains(&victim) && new.len() == 1).then(|| new[0].clone()))
    })?;
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed, errors) = loop_handle
        .join()
        .map_err(|_| anyhow::anyhow!("loop panicked"))?;
    ensure!(
        failed == 0,
        "{failed} of {} requests failed while pod {victim} was deleted: {:?}",
        ok + failed,
        &errors[..errors.len().min(5)]
    );
    ensure!(ok > 50, "the request loop made only {ok} requests");
    ensure!(replacement != victim);
    ensure!(
        took <= Duration::from_secs(2),
        "replacement {replacement} took {took:?} to be Running (limit 2 s; \
         `pier delete pod` itself took {delete_cmd:?} of it)"
    );

    // 9. delete rs: the containers go; the service stays until deleted.
    a.cli_ok(&["delete", "rs", "kube-demo"])?;
    eventually(
        Duration::from_secs(15),
        "the pod containers to be removed",
        || {
            let out = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter"])
                .arg(format!("label=pier.test-run={}", a.run_label))
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .trim()
                .is_empty()
                .then_some(()))
        },
    )?;
    let svc = a.cli_json(&["get", "svc", "kube-demo"])?;
    ensure!(
        svc.as_array().is_some_and(|v| v.len() == 1),
        "service gone too early: {svc}"
    );
    a.cli_ok(&["delete", "svc", "kube-demo"])?;
    let out = a.cli(&["get", "svc", "kube-demo"])?;
    let gone = !out.status.success()
        || serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.is_empty()))
            .unwrap_or(false)
        || String::from_utf8_lossy(&out.stdout).trim().is_empty();
    if !gone {
        bail!(
            "service still listed after delete: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

#[test]
fn demo_with_embedded_store() -> Result<()> {
    demo("embedded")
}

#[test]
fn demo_with_etcd() -> Result<()> {
    let etcd = pier_store::testing::EtcdServer::start()?;
    demo(&format!("etcd://{}", etcd.endpoint))
}
