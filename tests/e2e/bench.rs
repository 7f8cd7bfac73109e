//! End-to-end timings with the real dockerd and a release `pier agent`
//! (embedded store, one host): how long a deleted pod takes to be replaced
//! by a Running, ready pod, and how long `pier scale` takes from 1 to 20
//! ready pods and back.
//!
//! ```sh
//! cargo build --release -p pier
//! cargo bench -p pier-tests --bench e2e      # env E2E_BENCH_DELETES (default 20)
//! ```
//!
//! Times are taken from just before the CLI command to the first `GET
//! /api/v1/pods` (polled every 10 ms) that shows the wanted state, so they
//! include the CLI's own start-up (a few ms).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pier_tests::{AgentOpts, AgentProc, TEST_IMAGE, ensure_test_image};
use serde_json::Value;

/// (name, Running and ready) of the set's pods, from the API.
fn pods(a: &AgentProc, rs: &str) -> Result<Vec<(String, bool)>> {
    let (code, body) = a.api_get("/api/v1/pods")?;
    if code != 200 {
        bail!("GET /api/v1/pods: HTTP {code}: {body}");
    }
    let v: Value = serde_json::from_str(&body)?;
    Ok(v.as_array()
        .context("pods is not an array")?
        .iter()
        .filter(|p| p["replicaset"] == rs)
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["phase"] == "Running" && p["ready"] == true,
            )
        })
        .collect())
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() -> Result<()> {
    let deletes: usize = std::env::var("E2E_BENCH_DELETES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    ensure_test_image()?;
    let a = AgentProc::start(AgentOpts {
        store: "embedded".into(),
        node: "bench-1".into(),
        extra_toml: String::new(),
    })?;
    a.cli_ok(&[
        "run",
        "b",
        "--image",
        TEST_IMAGE,
        "--port",
        "8080",
        "--replicas",
        "3",
        "--wait",
    ])?;

    // Delete a pod, time until the set has 3 ready pods again, one of them
    // new.
    let mut replace_ms = Vec::new();
    for _ in 0..deletes {
        let before = pods(&a, "b")?;
        let names: BTreeSet<String> = before.iter().map(|p| p.0.clone()).collect();
        let victim = before.first().context("a pod")?.0.clone();
        let t = Instant::now();
        a.cli_ok(&["delete", "pod", &victim])?;
        wait(Duration::from_secs(60), "a replacement", || {
            let p = pods(&a, "b")?;
            Ok(p.len() == 3 && p.iter().all(|x| x.1) && p.iter().any(|x| !names.contains(&x.0)))
        })?;
        replace_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // Scale 3 → 1 first, then 1 → 20 and 20 → 1.
    a.cli_ok(&["scale", "rs", "b", "--replicas", "1", "--wait"])?;
    let t = Instant::now();
    a.cli_ok(&["scale", "rs", "b", "--replicas", "20"])?;
    wait(Duration::from_secs(120), "20 ready pods", || {
        let p = pods(&a, "b")?;
        Ok(p.len() == 20 && p.iter().all(|x| x.1))
    })?;
    let up_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    a.cli_ok(&["scale", "rs", "b", "--replicas", "1"])?;
    wait(Duration::from_secs(120), "19 containers removed", || {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                "label=pier.replicaset=b",
                "--filter",
            ])
            .arg(format!("label=pier.test-run={}", a.run_label))
            .output()?;
        Ok(pods(&a, "b")?.len() == 1 && String::from_utf8_lossy(&out.stdout).lines().count() == 1)
    })?;
    let down_ms = t.elapsed().as_secs_f64() * 1e3;
    a.cli_ok(&["delete", "rs", "b"])?;

    let n = replace_ms.len();
    let mean = replace_ms.iter().sum::<f64>() / n as f64;
    println!("\ne2e bench: real dockerd, release pier agent, embedded store, one host\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| delete pod → 3 ready again (n={n}) p50 / p90 / max / mean | {:.0} / {:.0} / {:.0} / {:.0} ms |",
        pct(&mut replace_ms, 0.5),
        pct(&mut replace_ms, 0.9),
        pct(&mut replace_ms, 1.0),
        mean
    );
    println!("| scale 1 → 20 ready | {up_ms:.0} ms |");
    println!("| scale 20 → 1 (19 containers removed) | {down_ms:.0} ms |");
    Ok(())
}
