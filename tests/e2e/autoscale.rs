//! The autoscaler on real containers: long-lived connections through the
//! VIP scale a set up, closing them scales it down after the delay, with
//! no flapping and no connection failed (issue 15, section 4).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use pier_tests::{AgentOpts, AgentProc, Scenario, eventually, http_get};
use serde_json::Value;

const RS: &str = "as-conns";
/// Connections the scale-up test holds open (see its comment).
const HELD: u64 = 18;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Desired and ready replicas, from the API (a request costs about a
/// millisecond; the CLI process could cost hundreds on a loaded machine,
/// which would be counted against pier).
fn counts(a: &AgentProc) -> Result<(u64, u64)> {
    let (code, body) = a.api_get(&format!("/api/v1/namespaces/default/replicasets/{RS}"))?;
    ensure!(code == 200, "GET rs: HTTP {code}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    let v = if v.is_array() { v[0].clone() } else { v };
    Ok((
        v["replicas"].as_u64().context("replicas")?,
        v["ready"].as_u64().context("ready")?,
    ))
}

fn autoscale_view(a: &AgentProc) -> Result<Value> {
    let (code, body) = a.api_get(&format!(
        "/api/v1/namespaces/default/replicasets/{RS}/autoscale"
    ))?;
    ensure!(code == 200, "GET autoscale: HTTP {code}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// `--max-active-per-pod 5`, min 1, max 4, a 5 s scale-down delay: 18
/// connections held open through the VIP take the set to 4 pods within a
/// few seconds; closed, it goes back to 1 after the delay and not before;
/// no flapping (the count only rises while they are held, and one
/// decision takes it down); every one of the 18 connections completes
/// its request.
///
/// Why 18: a stats window can end while the connections are still being
/// accepted, and a round on that partial count scales to 2 or 3 first.
/// From 3 pods, 18 is 1.2 per target, outside the 10 % tolerance, so the
/// next round still takes the set to 4 (16 would be 1.07 and hold at 3,
/// as a HorizontalPodAutoscaler would).
#[test]
fn held_connections_scale_up_and_back_down_after_the_delay() -> Result<()> {
    let a = Scenario::embedded("as-1", "")?;
    let vip_addr = a.run_and_expose(RS, &[], &[])?.vip_addr();
    let out = a.cli_ok(&[
        "autoscale",
        "rs",
        RS,
        "--min",
        "1",
        "--max",
        "4",
        "--max-active-per-pod",
        "5",
        "--scale-down-delay",
        "5s",
    ])?;
    ensure!(out.contains("between 1 and 4"), "{out}");
    // A manual scale is refused with what to do.
    let o = a.cli(&["scale", "rs", RS, "--replicas", "2"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("--off"),
        "scale of an autoscaled set: {err}"
    );
    eventually(
        Duration::from_secs(20),
        "1 ready pod answering on the VIP",
        || {
            Ok(
                (counts(&a)? == (1, 1) && http_get(&vip_addr, "/").is_ok_and(|(c, _)| c == 200))
                    .then_some(()),
            )
        },
    )
    .with_context(|| a.log_tail())?;
    // The probe's connection is over: let it leave the window.
    std::thread::sleep(Duration::from_millis(2500));

    // 18 connections, each with a request begun and not ended (busybox
    // httpd waits up to 60 s for the rest of the headers).
    let mut conns = Vec::new();
    for i in 0..HELD {
        let mut s = TcpStream::connect_timeout(&vip_addr, Duration::from_secs(2))
            .with_context(|| format!("connection {i}"))?;
        s.write_all(b"GET / HTTP/1.0\r\n")?;
        conns.push(s);
    }
    let open = Instant::now();
    let up_after = eventually(Duration::from_secs(10), "4 replicas desired", || {
        Ok((counts(&a)?.0 == 4).then(|| open.elapsed()))
    })
    .with_context(|| a.log_tail())?;
    let ready_after = eventually(Duration::from_secs(30), "4 pods ready", || {
        Ok((counts(&a)? == (4, 4)).then(|| open.elapsed()))
    })
    .with_context(|| a.log_tail())?;
    eprintln!(
        "autoscale e2e: {HELD} connections open → 4 desired in {} ms, 4 ready in {} ms",
        up_after.as_millis(),
        ready_after.as_millis()
    );
    // The goal is a decision within 3 s of a breach: a 1 s stats window, a
    // 1 s round, the store in between; 4 s on a loaded 2-core machine
    // (a first round on a partial count adds one round).
    ensure!(
        up_after <= Duration::from_secs(4),
        "scaled up after {up_after:?}"
    );
    let view = autoscale_view(&a)?;
    ensure!(
        view["measured"]["active"] == HELD,
        "measured: {}",
        view["measured"]
    );
    let table = a.cli_ok(&["get", "rs", RS])?;
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(
        row.len() >= 6 && row[1] == "4" && row[4] == "1" && row[5] == "4",
        "get rs should show DESIRED 4, MIN 1, MAX 4: {table}"
    );
    let d = a.cli_ok(&["describe", "rs", RS])?;
    ensure!(
        d.contains("Open conns:") && d.contains("target 5 per pod") && d.contains(" → 4"),
        "{d}"
    );

    // Every connection finishes its request: none failed.
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"\r\n")?;
        let mut got = String::new();
        s.read_to_string(&mut got)
            .with_context(|| format!("connection {i}"))?;
        ensure!(
            got.starts_with("HTTP/1.") && got.lines().next().is_some_and(|l| l.contains(" 200")),
            "connection {i}: {got:?}"
        );
    }
    drop(conns);
    let closed = now_ms();
    let down_after = eventually(Duration::from_secs(20), "back to 1 replica", || {
        Ok((counts(&a)?.0 == 1).then(|| now_ms() - closed))
    })
    .with_context(|| a.log_tail())?;
    eprintln!("autoscale e2e: connections closed → 1 desired in {down_after} ms (delay 5 s)");
    let view = autoscale_view(&a)?;
    let decisions = view["status"]["decisions"]
        .as_array()
        .context("decisions")?;
    let steps: Vec<(u64, u64, u64)> = decisions
        .iter()
        .map(|d| {
            (
                d["at"].as_u64().unwrap_or(0),
                d["from"].as_u64().unwrap_or(0),
                d["to"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    // No flapping: up from 1 (in one step, or two if a round saw only
    // part of the connections) to 4, never down while they were held, then
    // one step down to 1.
    let (down, ups) = steps.split_last().context("no decisions")?;
    ensure!(
        (1..=2).contains(&ups.len())
            && ups[0].1 == 1
            && ups.last().is_some_and(|u| u.2 == 4)
            && ups.windows(2).all(|w| w[0].2 == w[1].1 && w[0].2 < w[1].2)
            && (down.1, down.2) == (4, 1),
        "decisions (no flapping: up to 4, one step down to 1): {decisions:?}"
    );
    // Not before the delay: the last recommendation of 4 came at most one
    // stats window (1 s) before the close.
    ensure!(
        down.0 + 1000 >= closed + 5000,
        "scaled down {} ms after the close, inside the 5 s delay",
        down.0 as i64 - closed as i64
    );
    ensure!(
        down_after <= 5000 + 4000,
        "scaled down only after {down_after} ms"
    );
    Ok(())
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(-1)
}

/// The figures of BENCHMARKS.md ("Autoscaler reaction"): five cycles of a
/// breach (16 connections held, 5 per pod allowed, 1 → 4 pods) on one
/// release agent: breach → decision (the decision's own time stamp),
/// decision → Docker started each new container (its `State.StartedAt`),
/// and Docker started → the pod answering through the VIP. Not in CI:
/// `cargo test --release -p pier-tests --test e2e autoscale_reaction_figures
/// -- --ignored --nocapture` (after `cargo build --release -p pier`, with
/// `PIER_BIN=target/release/pier`).
#[test]
#[ignore]
fn autoscale_reaction_figures() -> Result<()> {
    // etcd, so that the test can read how often the stats key was written.
    let etcd = pier_store::testing::EtcdServer::start()?;
    let a = Scenario::start(AgentOpts {
        store: format!("etcd://{}", etcd.endpoint),
        node: "as-fig".into(),
        extra_toml: String::new(),
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = rt.block_on(pier_store::EtcdStore::connect(std::slice::from_ref(
        &etcd.endpoint,
    )))?;
    let stats_key = pier_model::keys::stats(
        &pier_model::Namespace::new("default")?,
        &pier_model::Name::new(RS)?,
        &pier_model::Name::new("as-fig")?,
    );
    let writes = || -> Result<i64> {
        use pier_store::Store;
        Ok(rt
            .block_on(store.get(&stats_key))?
            .map(|kv| kv.version)
            .unwrap_or(0))
    };
    let vip_addr = a.run_and_expose(RS, &[], &[])?.vip_addr();
    a.cli_ok(&[
        "autoscale",
        "rs",
        RS,
        "--min",
        "1",
        "--max",
        "4",
        "--max-active-per-pod",
        "5",
        "--scale-down-delay",
        "2s",
    ])?;
    let (mut decide, mut started, mut serving) = (vec![], vec![], vec![]);
    for cycle in 0..5 {
        eventually(Duration::from_secs(30), "1 ready pod, alone", || {
            let pods = a.cli_json(&["get", "pods"])?;
            Ok((counts(&a)? == (1, 1)
                && pods.as_array().is_some_and(|p| p.len() == 1)
                && http_get(&vip_addr, "/").is_ok_and(|(c, _)| c == 200))
            .then_some(()))
        })
        .with_context(|| a.log_tail())?;
        std::thread::sleep(Duration::from_millis(2500));
        let before: std::collections::BTreeSet<String> = a
            .cli_json(&["get", "pods"])?
            .as_array()
            .context("pods")?
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        let mut conns = Vec::new();
        for _ in 0..16 {
            let mut s = TcpStream::connect_timeout(&vip_addr, Duration::from_secs(2))?;
            s.write_all(b"GET / HTTP/1.0\r\n")?;
            conns.push(s);
        }
        let breach = now_ms();
        // The new pods' first answers through the VIP (P2C sends new
        // connections to the pods without the 16).
        let mut seen: std::collections::BTreeMap<String, u64> = Default::default();
        // One request every 2 ms (eventually's 50 ms would add to the
        // figure), bounded at 30 s.
        let until = Instant::now() + Duration::from_secs(30);
        while seen.len() < 3 {
            ensure!(
                Instant::now() < until,
                "3 new pods not answering after 30 s: {seen:?}\n{}",
                a.log_tail()
            );
            if let Ok((200, body)) = http_get(&vip_addr, "/") {
                let name = body.trim().to_owned();
                if !before.contains(&name) {
                    seen.entry(name).or_insert_with(now_ms);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let view = autoscale_view(&a)?;
        let dec = view["status"]["decisions"]
            .as_array()
            .and_then(|d| d.last())
            .context("no decision")?
            .clone();
        let dec_at = dec["at"].as_u64().context("at")?;
        decide.push(dec_at as i64 - breach as i64);
        let pods = a.cli_json(&["get", "pods"])?;
        for p in pods.as_array().context("pods")? {
            let name = p["name"].as_str().unwrap_or_default();
            if let (Some(first), Some(st)) = (seen.get(name), p["started_at"].as_u64()) {
                started.push(st as i64 - dec_at as i64);
                serving.push(*first as i64 - st as i64);
            }
        }
        eprintln!(
            "cycle {cycle}: breach → decision {} ms; {dec}",
            dec_at as i64 - breach as i64
        );
        for s in conns.iter_mut() {
            s.write_all(b"\r\n")?;
        }
        drop(conns);
    }
    // The stats key's writes (its etcd version) under three loads, for the
    // write-load estimate: idle, 16 connections held, and a steady 50
    // short connections per second.
    let rate = |what: &str, secs: u64, mut load: Box<dyn FnMut() -> Result<()>>| -> Result<()> {
        let v0 = writes()?;
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            load()?;
        }
        let n = writes()? - v0;
        eprintln!(
            "RESULT stats_writes load={what} writes={n} secs={secs} per_s={:.2}",
            n as f64 / secs as f64
        );
        Ok(())
    };
    std::thread::sleep(Duration::from_secs(4));
    rate(
        "idle",
        20,
        Box::new(|| {
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        }),
    )?;
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect_timeout(&vip_addr, Duration::from_secs(2))?;
        s.write_all(b"GET / HTTP/1.0\r\n")?;
        held.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    rate(
        "16_held",
        30,
        Box::new(|| {
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        }),
    )?;
    drop(held);
    std::thread::sleep(Duration::from_secs(3));
    rate(
        "50_conn_per_s",
        30,
        Box::new(move || {
            let t = Instant::now();
            let _ = http_get(&vip_addr, "/");
            std::thread::sleep(Duration::from_millis(20).saturating_sub(t.elapsed()));
            Ok(())
        }),
    )?;
    eprintln!(
        "RESULT autoscale breach_to_decision_ms median={} all={decide:?}",
        median(decide.clone())
    );
    eprintln!(
        "RESULT autoscale decision_to_docker_started_ms median={} all={started:?}",
        median(started.clone())
    );
    eprintln!(
        "RESULT autoscale docker_started_to_serving_ms median={} all={serving:?}",
        median(serving.clone())
    );
    Ok(())
}

/// A CGI script for busybox httpd whose answer takes 50 ms per request in
/// flight on its pod: latency that grows with concurrency.
const SLOW_CGI: &str = r#"mkdir -p /www/cgi-bin && cat > /www/cgi-bin/slow <<'X'
#!/bin/sh
f=/tmp/r.$$; : > $f
n=$(ls /tmp/r.* | wc -l)
sleep $(awk "BEGIN{print $n*0.05}")
rm -f $f
printf 'Content-Type: text/plain\r\n\r\nok\n'
X
chmod +x /www/cgi-bin/slow && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"#;

/// `--p99-first-byte 200ms` on a backend that answers in 50 ms × the
/// requests in flight on its pod: 6 clients in a loop make one pod answer
/// in ~300 ms; the autoscaler adds pods until the p99 over all of them is
/// back under 200 ms. Bounded: 6 clients for at most 45 s.
#[test]
fn p99_first_byte_target_adds_pods_until_latency_is_back_under() -> Result<()> {
    const LAT: &str = "as-lat";
    let a = Scenario::embedded("as-2", "")?;
    let vip_addr = a
        .run_and_expose(LAT, &["--", "/bin/sh", "-c", SLOW_CGI], &[])?
        .vip_addr();
    a.cli_ok(&[
        "autoscale",
        "rs",
        LAT,
        "--min",
        "1",
        "--max",
        "4",
        "--p99-first-byte",
        "200ms",
        "--scale-down-delay",
        "60s",
    ])?;
    eventually(Duration::from_secs(20), "the slow CGI answering", || {
        Ok(http_get(&vip_addr, "/cgi-bin/slow")
            .is_ok_and(|(c, b)| c == 200 && b.trim() == "ok")
            .then_some(()))
    })
    .with_context(|| a.log_tail())?;
    let view = |a: &AgentProc| -> Result<Value> {
        let (code, body) = a.api_get(&format!(
            "/api/v1/namespaces/default/replicasets/{LAT}/autoscale"
        ))?;
        ensure!(code == 200, "GET autoscale: HTTP {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(45);
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    match http_get(&vip_addr, "/cgi-bin/slow") {
                        Ok((200, _)) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let started = Instant::now();
    let r = (|| -> Result<(u64, u64)> {
        let up = eventually(Duration::from_secs(20), "more than 1 replica", || {
            let v = view(&a)?;
            Ok((v["replicas"].as_u64() > Some(1)).then_some(v))
        })
        .with_context(|| a.log_tail())?;
        eprintln!(
            "autoscale latency e2e: scaled up after {} ms: {}",
            started.elapsed().as_millis(),
            up["status"]["decisions"]
        );
        // Then the p99 over every pod's traffic comes back under 200 ms
        // with the pods ready.
        let v = eventually(
            Duration::from_secs(20),
            "p99 first byte under 200 ms",
            || {
                let v = view(&a)?;
                let p99 = v["measured"]["p99_first_byte_us"].as_u64();
                let ready = v["ready"].as_u64().unwrap_or(0);
                Ok((ready >= 2
                    && ready == v["replicas"].as_u64().unwrap_or(0)
                    && p99.is_some_and(|p| p < 200_000))
                .then_some(v))
            },
        )
        .with_context(|| a.log_tail())?;
        Ok((
            v["replicas"].as_u64().unwrap_or(0),
            v["measured"]["p99_first_byte_us"].as_u64().unwrap_or(0),
        ))
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = 0;
    for c in clients {
        failed += c.join().map(|(_, f)| f).unwrap_or(1);
    }
    let (replicas, p99) = r?;
    eprintln!("autoscale latency e2e: {replicas} replicas, p99 first byte {p99} µs");
    ensure!((2..=4).contains(&replicas), "{replicas} replicas");
    ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}
