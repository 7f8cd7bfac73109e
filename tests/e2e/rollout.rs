//! Rolling updates and placement across sets (issue 14), with a real agent,
//! dockerd and the real CLI: a rollout under a bounded request loop through
//! the VIP fails no request; a rollout to an image that never becomes
//! healthy rolls back with the service intact; two sets with anti-affinity
//! on one host; constraints by node label; a rollout resumes after its
//! supervisor's worker is killed and its agent restarted mid-step.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::{
    AgentOpts, AgentProc, Scenario, TEST_IMAGE, docker, ensure_test_image, eventually, http_get,
    run_id, take_turn,
};
use serde_json::Value;

/// Images this test makes from the test image, removed when dropped (also
/// when the test fails).
struct Images(Vec<String>);

impl Images {
    /// `v2`: the test image under another name (the same server, a new
    /// template). `sleeper`: the test image whose command never listens, so
    /// its pods never pass their TCP check.
    fn make() -> Result<Images> {
        ensure_test_image()?;
        let tag = run_id()
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let v2 = format!("pier-test/httpd:{tag}-v2");
        let sleeper = format!("pier-test/sleeper:{tag}");
        let imgs = Images(vec![v2.clone(), sleeper.clone()]);
        docker(&["tag", TEST_IMAGE, &v2])?;
        let cid = docker(&["create", TEST_IMAGE])?;
        let cid = cid.trim();
        let made = docker(&[
            "commit",
            "--change",
            r#"CMD ["/bin/sleep","3600"]"#,
            cid,
            &sleeper,
        ]);
        let _ = docker(&["rm", "-f", cid]);
        made?;
        Ok(imgs)
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        for i in &self.0 {
            let _ = Command::new("docker")
                .args(["image", "rm", "-f", i])
                .output();
        }
    }
}

/// `(name, image)` of the set's Running pods.
fn pods(a: &AgentProc, rs: &str) -> Result<Vec<(String, String, bool)>> {
    let (code, body) = a.api_get("/api/v1/namespaces/default/pods")?;
    ensure!(code == 200, "GET pods: HTTP {code}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v.as_array()
        .context("pods is not an array")?
        .iter()
        .filter(|p| p["replicaset"] == rs)
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["image"].as_str().unwrap_or_default().to_owned(),
                p["ready"] == true,
            )
        })
        .collect())
}

/// A bounded request loop through the VIP (at most 4000 requests or 120 s).
struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u32, u32, Vec<String>)>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            for _ in 0..4000 {
                if s.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                match http_get(&addr, "/") {
                    Ok((200, _)) => ok += 1,
                    Ok((code, body)) => {
                        failed += 1;
                        errors.push(format!("HTTP {code}: {body}"));
                    }
                    Err(e) => {
                        failed += 1;
                        errors.push(e.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed, errors)
        });
        Load { stop, handle }
    }

    fn finish(self, what: &str) -> Result<u32> {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failed, errors) = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the request loop panicked"))?;
        ensure!(
            failed == 0,
            "{failed} of {} requests failed during {what}: {:?}",
            ok + failed,
            &errors[..errors.len().min(5)]
        );
        ensure!(
            ok > 50,
            "the request loop made only {ok} requests during {what}"
        );
        Ok(ok)
    }
}

#[test]
fn rolling_update_fails_no_request_and_a_never_healthy_image_rolls_back() -> Result<()> {
    let _turn = take_turn();
    let imgs = Images::make()?;
    let (v2, sleeper) = (imgs.0[0].clone(), imgs.0[1].clone());
    let a = AgentProc::start(AgentOpts {
        store: "embedded".into(),
        node: "roll-1".into(),
        extra_toml: String::new(),
    })?;
    // Swarm's defaults (stop-first, one pod per step) but a 1 s monitor,
    // and a 6 s deadline for the never-healthy image.
    let vip_addr = a
        .run_and_expose(
            "web",
            &[
                "--replicas",
                "3",
                "--update-monitor",
                "1s",
                "--update-ready-timeout",
                "6s",
                "--update-failure-action",
                "rollback",
                "--wait",
            ],
            &[],
        )?
        .vip_addr();
    eventually(Duration::from_secs(10), "the VIP answers", || {
        Ok(http_get(&vip_addr, "/").ok().filter(|r| r.0 == 200))
    })?;
    let before: BTreeSet<String> = pods(&a, "web")?.into_iter().map(|p| p.0).collect();

    // 1. A rollout to v2 under load: no failed request.
    let load = Load::start(vip_addr);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    a.cli_ok(&["set", "image", "rs", "web", &v2])?;
    let status = a.cli_ok(&["rollout", "status", "rs", "web", "--timeout", "90s"])?;
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let ok = load.finish("the rollout to v2")?;
    ensure!(status.contains("rolled out (revision 2)"), "{status}");
    let now = pods(&a, "web")?;
    ensure!(
        now.len() == 3
            && now
                .iter()
                .all(|p| p.1 == v2 && p.2 && !before.contains(&p.0)),
        "after the rollout: {now:?}"
    );
    eprintln!("rollout of 3 pods: {took:?}, {ok} requests, 0 failed");

    // 2. A rollout to an image that never passes its check: after the
    //    deadline it rolls back; `rollout status` says so and exits 1; the
    //    service answered throughout.
    let load = Load::start(vip_addr);
    a.cli_ok(&["set", "image", "rs", "web", &sleeper])?;
    let out = a.cli(&["rollout", "status", "rs", "web", "--timeout", "90s"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "rollout status succeeded: {err}");
    ensure!(
        err.contains("rolled back")
            && err.contains("not ready 6s after it was created")
            && err.contains("revision 2"),
        "rollout status: {err}"
    );
    load.finish("the failed rollout and its rollback")?;
    let now = eventually(Duration::from_secs(30), "3 ready v2 pods", || {
        let p = pods(&a, "web")?;
        Ok((p.len() == 3 && p.iter().all(|p| p.1 == v2 && p.2)).then_some(p))
    })?;
    ensure!(now.len() == 3);
    let describe = a.cli_ok(&["describe", "rs", "web"])?;
    ensure!(
        describe.contains("rolled back") && describe.contains("revision 3"),
        "describe: {describe}"
    );

    // 3. History and undo: back to the first image as revision 4.
    let hist = a.cli_ok(&["rollout", "history", "rs", "web"])?;
    ensure!(
        hist.contains(TEST_IMAGE)
            && hist.contains(&v2)
            && hist.contains(&sleeper)
            && hist.ends_with('\n'),
        "history: {hist:?}"
    );
    a.cli_ok(&["rollout", "undo", "rs", "web", "--to-revision", "1"])?;
    let status = a.cli_ok(&["rollout", "status", "rs", "web", "--timeout", "90s"])?;
    ensure!(status.contains("rolled out (revision 4)"), "{status}");
    let now = pods(&a, "web")?;
    ensure!(
        now.len() == 3 && now.iter().all(|p| p.1 == TEST_IMAGE),
        "after undo: {now:?}"
    );
    a.cli_ok(&["delete", "rs", "web"])?;
    a.cli_ok(&["delete", "svc", "web"])?;
    Ok(())
}

fn problem_of(a: &AgentProc, rs: &str) -> Result<String> {
    let (code, body) = a.api_get("/api/v1/problems")?;
    ensure!(code == 200, "GET problems: HTTP {code}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == rs)
        .filter_map(|p| p["message"].as_str().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("; "))
}

fn running(a: &AgentProc, rs: &str, n: usize) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        &format!("{n} ready pods of {rs}"),
        || {
            let p = pods(a, rs)?;
            Ok((p.len() == n && p.iter().all(|p| p.2)).then_some(()))
        },
    )
}

#[test]
fn anti_affinity_on_one_host_and_constraints_by_node_label() -> Result<()> {
    let a = Scenario::embedded("place-1", "[node.labels]\nzone = \"a\"\n")?;
    let run = |name: &str, extra: &[&str]| -> Result<String> {
        let mut args = vec!["run", name, "--image", TEST_IMAGE, "--port", "8080"];
        args.extend(extra);
        a.cli_ok(&args)
    };

    // The keyserver first; the frontend must not share its host: Pending,
    // and the problem names the rule.
    run("keyserver", &[])?;
    running(&a, "keyserver", 1)?;
    run(
        "frontend",
        &["--replicas", "2", "--anti-affinity", "keyserver"],
    )?;
    let why = eventually(Duration::from_secs(10), "the frontend's problem", || {
        let p = problem_of(&a, "frontend")?;
        Ok((!p.is_empty()).then_some(p))
    })?;
    ensure!(
        why.contains("cannot place 2 of 2")
            && why.contains("run a pod of keyserver, which this set's anti_affinity keeps away"),
        "{why}"
    );
    ensure!(pods(&a, "frontend")?.is_empty());
    let d = a.cli_ok(&["describe", "rs", "frontend"])?;
    ensure!(
        d.contains("2 not placed") && d.contains("anti_affinity=keyserver"),
        "{d}"
    );

    // Deleting the keyserver lets the frontend run.
    a.cli_ok(&["delete", "rs", "keyserver"])?;
    running(&a, "frontend", 2)?;
    // Two-way: a keyserver applied now, with no rule of its own, is kept
    // off the frontend's host by the frontend's rule.
    run("keyserver", &[])?;
    let why = eventually(Duration::from_secs(10), "the keyserver's problem", || {
        let p = problem_of(&a, "keyserver")?;
        Ok((!p.is_empty()).then_some(p))
    })?;
    ensure!(
        why.contains("run a pod of frontend, whose anti_affinity keeps this set away"),
        "{why}"
    );
    ensure!(pods(&a, "keyserver")?.is_empty());
    a.cli_ok(&["delete", "rs", "keyserver"])?;
    a.cli_ok(&["delete", "rs", "frontend"])?;

    // Constraints: the config's label, and one set with `pier label node`.
    run("zoned", &["--constraint", "node.labels.zone==a"])?;
    running(&a, "zoned", 1)?;
    run("ssd", &["--constraint", "node.labels.disk==ssd"])?;
    let why = eventually(Duration::from_secs(10), "the ssd set's problem", || {
        let p = problem_of(&a, "ssd")?;
        Ok((!p.is_empty()).then_some(p))
    })?;
    ensure!(
        why.contains("fail constraint node.labels.disk==ssd"),
        "{why}"
    );
    let out = a.cli_ok(&["label", "node", "place-1", "disk=ssd"])?;
    ensure!(out.contains("disk=ssd") && out.contains("zone=a"), "{out}");
    running(&a, "ssd", 1)?;
    // `k-` removes, also a label from the config; the node shows it.
    a.cli_ok(&["label", "node", "place-1", "zone-"])?;
    let n = a.cli_json(&["get", "nodes"])?;
    ensure!(
        n[0]["labels"].get("zone").is_none() && n[0]["labels"]["disk"] == "ssd",
        "{n}"
    );
    let bad = a.cli(&[
        "run",
        "x",
        "--image",
        TEST_IMAGE,
        "--constraint",
        "node.role==manager",
    ])?;
    let err = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        bad.status.code() == Some(2)
            && err.contains("node.role==manager")
            && err.contains("node.labels.KEY"),
        "{err}"
    );
    a.cli_ok(&["delete", "rs", "zoned"])?;
    a.cli_ok(&["delete", "rs", "ssd"])?;
    Ok(())
}

/// The rollout record of `web` (`rollout` of its view), if any.
fn rollout_of(a: &AgentProc) -> Result<Value> {
    let (code, body) = a.api_get("/api/v1/namespaces/default/replicasets/web")?;
    ensure!(code == 200, "GET rs web: HTTP {code}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["rollout"].clone())
}

/// Waits until `web`'s rollout has made `steps` steps.
fn wait_steps(a: &AgentProc, steps: u64) -> Result<()> {
    eventually(
        Duration::from_secs(60),
        &format!("rollout step {steps}"),
        || Ok((rollout_of(a)?["steps"].as_u64() >= Some(steps)).then_some(())),
    )
    .with_context(|| a.log_tail())
}

/// A rollout survives its supervisor: the worker is killed (SIGKILL) while
/// step 1 is in flight, and the whole agent (store, supervisor, worker) is
/// stopped and started again while step 2 is; the rollout resumes from its
/// stored record and completes, one pod per step: no stall, and no step
/// taken twice or early (each new pod appears at least a monitor period
/// after the one before it).
#[test]
fn rollout_resumes_after_worker_kill_and_agent_restart_mid_step() -> Result<()> {
    use pier_tests::load::children;
    let _turn = take_turn();
    let imgs = Images::make()?;
    let v2 = imgs.0[0].clone();
    let mut a = AgentProc::start(AgentOpts {
        store: "embedded".into(),
        node: "resume-1".into(),
        extra_toml: String::new(),
    })?;
    // Stop-first, one pod per step, 3 s monitor: a step takes ~4 s, long
    // enough to restart inside one.
    const MONITOR: Duration = Duration::from_secs(3);
    a.cli_ok(&[
        "run",
        "web",
        "--image",
        TEST_IMAGE,
        "--port",
        "8080",
        "--replicas",
        "3",
        "--update-monitor",
        "3s",
        "--wait",
    ])?;
    ensure!(pods(&a, "web")?.len() == 3, "{:?}", pods(&a, "web")?);

    // Every new pod that exists for 100 ms (the polling period), with when
    // the supervisor created it.
    let (addr, token) = (a.api_addr(), a.token()?);
    let stop = AtomicBool::new(false);
    let watch = || {
        let mut seen: Vec<(String, u64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(150);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let r =
                pier_tests::http_get_auth(&addr, "/api/v1/namespaces/default/pods", Some(&token));
            if let Ok((200, body)) = r
                && let Ok(Value::Array(ps)) = serde_json::from_str::<Value>(&body)
            {
                for p in ps.iter().filter(|p| p["image"] == v2.as_str()) {
                    let name = p["name"].as_str().unwrap_or_default();
                    if !seen.iter().any(|(n, _)| n == name) {
                        let at = p["created_at"].as_u64().unwrap_or_default();
                        seen.push((name.to_owned(), at));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    };
    let (outcome, seen) = std::thread::scope(|s| {
        let watcher = s.spawn(watch);
        let mut run = || -> Result<String> {
            a.cli_ok(&["set", "image", "rs", "web", &v2])?;
            // Step 1 in flight: SIGKILL the worker; the keeper starts another.
            wait_steps(&a, 1)?;
            let keeper = a.child.as_ref().context("agent not running")?.id();
            let workers = children(keeper);
            ensure!(workers.len() == 1, "workers {workers:?}");
            let kill = Command::new("kill")
                .args(["-KILL", &workers[0].to_string()])
                .status()?;
            ensure!(kill.success(), "kill -KILL {}", workers[0]);
            // Step 2 in flight: the whole agent stops and starts again.
            wait_steps(&a, 2)?;
            ensure!(
                rollout_of(&a)?["state"] == "progressing",
                "step 2 must still be in flight: {}",
                rollout_of(&a)?
            );
            a.stop()?;
            a.spawn()?;
            a.cli_ok(&["rollout", "status", "rs", "web", "--timeout", "90s"])
        };
        let r = run();
        stop.store(true, Ordering::SeqCst);
        (r, watcher.join().expect("watcher thread"))
    });
    let status = outcome.with_context(|| a.log_tail())?;
    ensure!(status.contains("rolled out (revision 2)"), "{status}");
    let rec = rollout_of(&a)?;
    ensure!(
        rec["state"] == "complete" && rec["steps"] == 3 && rec["failures"] == 0,
        "the record after the restarts: {rec}; new pods {seen:?}\n{}",
        a.log_tail()
    );
    let now = pods(&a, "web")?;
    let new: BTreeSet<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        now.len() == 3
            && now
                .iter()
                .all(|p| p.1 == v2 && p.2 && new.contains(p.0.as_str()))
            && seen.len() == 3,
        "3 new pods, each made once: now {now:?}, new pods seen {seen:?}"
    );
    let mut seen = seen;
    seen.sort_by_key(|p| p.1);
    let gaps: Vec<Duration> = seen
        .windows(2)
        .map(|w| Duration::from_millis(w[1].1.saturating_sub(w[0].1)))
        .collect();
    for (w, gap) in seen.windows(2).zip(&gaps) {
        ensure!(
            *gap >= MONITOR,
            "{} appeared {gap:?} after {}: a step was taken before the last one's monitor ended",
            w[1].0,
            w[0].0
        );
    }
    eprintln!("resumed; new pods created {gaps:?} apart: {seen:?}");
    Ok(())
}
