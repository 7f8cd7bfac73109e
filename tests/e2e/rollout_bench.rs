//! A rolling update of 10 pods with the real dockerd and a release `pier
//! agent` (embedded store, one host), under a request loop through the VIP:
//! how long from `pier set image` to the rollout's record saying complete,
//! and how many requests failed.
//!
//! ```sh
//! cargo build --release -p pier
//! cargo bench -p pier-tests --bench rollout
//! ```
//!
//! Two update configs: Swarm's defaults (stop-first, one pod per step, 5 s
//! monitor) and a fast one (start-first, two per step, 1 s monitor).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use pier_tests::{AgentOpts, AgentProc, TEST_IMAGE, ensure_test_image, http_get, run_id};
use serde_json::Value;

fn rollout_state(a: &AgentProc, rs: &str) -> Result<(u64, String)> {
    let (code, body) = a.api_get(&format!("/api/v1/namespaces/default/replicasets/{rs}"))?;
    if code != 200 {
        bail!("GET rs: HTTP {code}: {body}");
    }
    let v: Value = serde_json::from_str(&body)?;
    let rev = v["revision"].as_u64().unwrap_or(0);
    let r = &v["rollout"];
    if r["revision"].as_u64() != Some(rev) {
        return Ok((rev, "not started".into()));
    }
    Ok((rev, r["state"].as_str().unwrap_or_default().to_owned()))
}

fn one(a: &AgentProc, name: &str, flags: &[&str], v2: &str) -> Result<(Duration, u32, u32)> {
    let mut args = vec!["--replicas", "10", "--wait", "--timeout", "120s"];
    args.extend(flags);
    let addr = a.run_and_expose(name, &args, &[])?.vip_addr();
    // The first rollout (creation) must be complete before the update.
    let end = Instant::now() + Duration::from_secs(60);
    while rollout_state(a, name)?.1 != "complete" {
        if Instant::now() > end {
            bail!("the creation of {name} did not complete");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // Bounded: at most 60000 requests or 10 minutes.
    let load = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, 0u32);
        let deadline = Instant::now() + Duration::from_secs(600);
        for _ in 0..60_000 {
            if s.load(Ordering::SeqCst) || Instant::now() > deadline {
                break;
            }
            match http_get(&addr, "/") {
                Ok((200, _)) => ok += 1,
                _ => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    a.cli_ok(&["set", "image", "rs", name, v2])?;
    loop {
        let (rev, state) = rollout_state(a, name)?;
        if rev == 2 && state == "complete" {
            break;
        }
        if rev == 2 && (state == "paused" || state == "rolled_back") {
            bail!("the rollout of {name} ended {state}");
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the rollout of {name} took more than 300 s ({state})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().map_err(|_| anyhow::anyhow!("load panicked"))?;
    a.cli_ok(&["delete", "rs", name])?;
    a.cli_ok(&["delete", "svc", name])?;
    Ok((took, ok, failed))
}

fn main() -> Result<()> {
    ensure_test_image()?;
    let tag = run_id()
        .to_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let v2 = format!("pier-test/httpd:{tag}-bench-v2");
    let out = Command::new("docker")
        .args(["tag", TEST_IMAGE, &v2])
        .output()?;
    if !out.status.success() {
        bail!("docker tag: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r = (|| -> Result<()> {
        let a = AgentProc::start(AgentOpts {
            store: "embedded".into(),
            node: "bench-roll".into(),
            extra_toml: String::new(),
        })?;
        for (name, flags) in [
            ("swarm-defaults", &[][..]),
            (
                "fast",
                &[
                    "--update-order",
                    "start-first",
                    "--update-parallelism",
                    "2",
                    "--update-monitor",
                    "1s",
                ][..],
            ),
        ] {
            let (took, ok, failed) = one(&a, name, flags, &v2)?;
            println!(
                "rolling update of 10 pods, {name}: {:.1} s, {ok} requests, {failed} failed",
                took.as_secs_f64()
            );
        }
        Ok(())
    })();
    let _ = Command::new("docker").args(["image", "rm", &v2]).output();
    r
}
