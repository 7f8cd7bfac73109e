//! EmbeddedStore is killed with SIGKILL during a burst of writes: after
//! reopening, every write it acknowledged is there, with its value and
//! revision.
//!
//! The writer is this test binary re-executed (`crash_child_writer`, ignored
//! unless the env var names a dir): it prints `ack <key> <value> <revision>`
//! after each acknowledged put.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pier_store::{EmbeddedStore, Store};

const CHILD_ENV: &str = "PIER_EMBEDDED_CRASH_DIR";
/// Concurrent writers in the child, so group commit batches are in flight
/// when the kill lands.
const WRITERS: usize = 16;
/// Acknowledgements to see before the kill.
const KILL_AFTER: usize = 400;
/// Bounds of the child's burst (it is killed long before).
const CHILD_MAX_WRITES: usize = 1_000_000;
const CHILD_MAX_TIME: Duration = Duration::from_secs(60);

/// Kills and reaps the child however the test ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Already dead after the planned kill: both calls are then no-ops.
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

#[test]
#[ignore = "helper: runs only as the child process of acknowledged_writes_survive_kill_9"]
fn crash_child_writer() -> Result<()> {
    let dir = std::env::var(CHILD_ENV).context("child needs its dir in the env")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = Arc::new(EmbeddedStore::open(Path::new(&dir))?);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let store = store.clone();
            tasks.spawn(async move {
                let mut i = 0;
                while i < CHILD_MAX_WRITES / WRITERS && start.elapsed() < CHILD_MAX_TIME {
                    let key = format!("/crash/{w:02}/{i:06}");
                    let value = format!("value-{w}-{i}");
                    let rev = store.put(&key, value.clone().into_bytes(), None).await?;
                    // One line per ack; stdout is line-buffered.
                    println!("ack {key} {value} {rev}");
                    i += 1;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })
}

#[test]
fn acknowledged_writes_survive_kill_9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["--ignored", "--exact", "crash_child_writer", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().context("child stdout")?;
    let mut acked = Vec::new();
    let mut killed = false;
    let start = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Some(rest) = line.strip_prefix("ack ") else {
            continue;
        };
        let mut parts = rest.split(' ');
        let (Some(key), Some(value), Some(rev)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("malformed ack line {line:?}");
        };
        acked.push((key.to_owned(), value.to_owned(), rev.parse::<i64>()?));
        if acked.len() == 1 {
            // The child holds the store: a second process cannot open it.
            match EmbeddedStore::open(dir.path()) {
                Ok(_) => bail!("opened a store that another process holds"),
                Err(e) => {
                    let msg = e.to_string();
                    ensure!(
                        msg.contains("already open")
                            && msg.contains(&*dir.path().to_string_lossy()),
                        "unclear lock error: {msg}"
                    );
                }
            }
        }
        if !killed && acked.len() >= KILL_AFTER {
            // SIGKILL, mid-burst. Lines already written are still read below:
            // they were acknowledged before the kill.
            child.0.kill()?;
            killed = true;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "child too slow: {} acks",
            acked.len()
        );
    }
    let status = child.0.wait()?;
    ensure!(
        killed,
        "child ended before the kill: {status:?}, {} acks",
        acked.len()
    );
    ensure!(!status.success(), "child was not killed: {status:?}");

    // Reopen (the dead process's lock is gone) and check every ack.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = EmbeddedStore::open(dir.path())?;
        let list = store.list("/crash/").await?;
        ensure!(
            list.kvs.len() >= acked.len(),
            "{} keys < {} acks",
            list.kvs.len(),
            acked.len()
        );
        let max_acked = acked.iter().map(|a| a.2).max().unwrap_or(0);
        ensure!(
            list.revision >= max_acked,
            "revision {} < acked {max_acked}",
            list.revision
        );
        for (key, value, rev) in &acked {
            let kv = store
                .get(key)
                .await?
                .with_context(|| format!("acknowledged key {key} lost"))?;
            ensure!(kv.value == value.as_bytes(), "{key}: wrong value {kv:?}");
            ensure!(
                kv.mod_revision == *rev,
                "{key}: acked at {rev}, stored {kv:?}"
            );
        }
        // Revisions are unique per put: no two acks share one.
        let mut revs: Vec<_> = acked.iter().map(|a| a.2).collect();
        revs.sort_unstable();
        revs.dedup();
        ensure!(revs.len() == acked.len(), "duplicate revisions among acks");
        // And the store still takes writes after the crash.
        let next = store.put("/crash/after", b"x".to_vec(), None).await?;
        ensure!(
            next == list.revision + 1,
            "next revision {next}, was {}",
            list.revision
        );
        anyhow::Ok(())
    })?;
    eprintln!("{} acknowledged writes survived SIGKILL", acked.len());
    Ok(())
}
