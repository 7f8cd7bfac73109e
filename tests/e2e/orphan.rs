//! A `kill -9` of the keeper (the process a user starts, systemd's
//! MainPID) does not take the data plane with it: the worker serves on as
//! an orphan, and the next `pier agent` on the same data dir adopts it
//! (its sockets, then an upgrade's hand-off). Real clients throughout:
//! bounded loops of new connections through a node port and a VIP, and
//! `dig` at the DNS VIP.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::{AgentProc, Scenario, eventually};

use crate::restart::{one_worker, show, signal, under_load, web_target};

/// Some thread of `pid` still runs: a killed process's leader is a
/// zombie before its last thread has exited and closed its descriptors.
fn alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !matches!(r.trim_start().chars().next(), Some('Z' | 'X')))
        })
    })
}

fn adopt_sock(a: &AgentProc) -> PathBuf {
    a.dir.path().join("data").join("adopt.sock")
}

fn gone_within(pid: u32, d: Duration, what: &str) -> Result<()> {
    eventually(d, what, || Ok((!alive(pid)).then_some(())))
}

#[test]
fn a_killed_keeper_leaves_the_data_plane_serving_and_is_adopted() -> Result<()> {
    // No name leaves the host.
    let mut a = Scenario::embedded(
        "orphan-1",
        "\n[dns]\nupstreams = [\"127.0.0.1:9\"]\nupstream_timeout_ms = 200\n",
    )?;
    let t = web_target(&a)?;
    let worker = one_worker(&a)?;

    // 1. kill -9 of the keeper: not one request or query fails, and the
    //    worker lives on, listening for adoption.
    let mut killed = None;
    let reps = under_load(&t, || {
        killed = Some(a.kill_keeper()?);
        Ok(())
    })?;
    let msg = show("keeper killed", &reps);
    eprint!("{msg}");
    for r in &reps {
        ensure!(r.failed() == 0, "{msg}{}", a.log_tail());
    }
    let (keeper, workers) = killed.context("the keeper was not killed")?;
    ensure!(
        workers == vec![worker],
        "workers {workers:?}, not [{worker}]"
    );
    ensure!(!alive(keeper), "the keeper {keeper} lives");
    ensure!(
        alive(worker),
        "the worker died with its keeper:\n{}",
        a.log_tail()
    );
    ensure!(adopt_sock(&a).exists(), "no adoption socket");
    // The orphan still answers the API (registration and all).
    a.cli_ok(&["get", "svc", "web"])?;

    // 2. `pier agent` again, same config: it adopts the orphan; again
    //    nothing fails; the orphan exits once the new worker serves.
    let t0 = Instant::now();
    let reps = under_load(&t, || a.spawn())?;
    let msg = show("adoption", &reps);
    eprint!("{msg}");
    for r in &reps {
        ensure!(r.failed() == 0, "{msg}{}", a.log_tail());
    }
    gone_within(worker, Duration::from_secs(15), "the orphan to exit")
        .with_context(|| a.log_tail())?;
    let new = one_worker(&a)?;
    ensure!(new != worker, "no new worker");
    let log = std::fs::read_to_string(&a.log)?;
    ensure!(
        log.contains("adopting the orphaned worker") && log.contains("adopted:"),
        "no adoption in the log:\n{}",
        a.log_tail()
    );
    let ready = log
        .find(&format!("worker ready (worker={new})"))
        .context("no ready line for the new worker")?;
    let left = log
        .find(&format!(
            "worker exited (adopted; its socket closed) worker={worker}"
        ))
        .context("the orphan's exit is not logged")?;
    ensure!(
        ready < left,
        "the orphan exited before the new worker was ready"
    );
    ensure!(
        !adopt_sock(&a).exists(),
        "the adoption socket outlived the adoption"
    );
    eprintln!(
        "step 2 (adoption under load, orphan gone) took {} ms",
        t0.elapsed().as_millis()
    );
    let reps = under_load(&t, || Ok(()))?;
    for r in &reps {
        ensure!(r.failed() == 0, "{}", show("after adoption", &reps));
    }

    // 3. An orphan stops on SIGTERM: deregisters, drains, exits, and
    //    removes its adoption socket.
    let (_, workers) = a.kill_keeper()?;
    let orphan = *workers.first().context("no worker")?;
    eventually(Duration::from_secs(10), "the adoption socket", || {
        Ok(adopt_sock(&a).exists().then_some(()))
    })?;
    signal(orphan, "TERM")?;
    gone_within(
        orphan,
        Duration::from_secs(20),
        "the orphan to stop on SIGTERM",
    )
    .with_context(|| a.log_tail())?;
    let log = std::fs::read_to_string(&a.log)?;
    ensure!(
        log.rsplit_once("the keeper is gone")
            .is_some_and(
                |(_, after)| after.contains("pier agent stopped") && !after.contains("handed off")
            ),
        "the orphan did not stop cleanly:\n{}",
        a.log_tail()
    );
    ensure!(!adopt_sock(&a).exists(), "SIGTERM left the adoption socket");

    // 4. A stale adoption socket (its orphan killed too) does not stop a
    //    start.
    a.spawn()?;
    let (_, workers) = a.kill_keeper()?;
    let orphan = *workers.first().context("no worker")?;
    eventually(Duration::from_secs(10), "the adoption socket", || {
        Ok(adopt_sock(&a).exists().then_some(()))
    })?;
    signal(orphan, "KILL")?;
    gone_within(orphan, Duration::from_secs(5), "the orphan to die")?;
    ensure!(
        adopt_sock(&a).exists(),
        "the stale socket went with its orphan"
    );
    a.spawn()?;
    let log = std::fs::read_to_string(&a.log)?;
    ensure!(
        log.contains("removed a stale adoption socket"),
        "{}",
        a.log_tail()
    );
    eventually(
        Duration::from_secs(20),
        "the node port to answer again",
        || Ok((pier_tests::load::http_loop(t.node_port, 1, Duration::ZERO).ok == 1).then_some(())),
    )
    .with_context(|| a.log_tail())?;
    Ok(())
}
