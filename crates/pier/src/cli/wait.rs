//! `--wait`: block until a replica set's pods are all there and ready.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pier_api::Client;
use pier_model::api::PodView;
use pier_model::{Name, Namespace, PodPhase, RolloutState};

/// 250 ms: a pod becomes ready about half a second after it listens, so a
/// quarter second adds little to `--wait` and costs two small reads.
const POLL: Duration = Duration::from_millis(250);

/// How `--wait` treats a rollout that stopped (paused or rolled back).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnStoppedRollout {
    /// Keep waiting (`scale`: pods of the revision that runs may still
    /// come).
    Wait,
    /// Give up at once with the rollout's reason (`run`: the set is new,
    /// so its first revision's pods failed and there is nothing before it
    /// to run instead).
    Fail,
}

pub async fn until_ready(
    c: &Client,
    ns: &Namespace,
    name: &Name,
    timeout: Duration,
    on_stopped: OnStoppedRollout,
) -> Result<()> {
    let start = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            b.set_style(style);
        }
        b.enable_steady_tick(Duration::from_millis(100));
        b
    });
    loop {
        let rs = c.get_replicaset(ns, name).await?;
        let pods: Vec<PodView> = c
            .list_pods(Some(ns))
            .await?
            .into_iter()
            .filter(|p| &p.replicaset == name)
            .collect();
        let want = rs.spec.replicas.get() as usize;
        let ready = pods.iter().filter(|p| p.ready).count();
        if ready == want && pods.len() == want {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            outln!("replicaset/{name}: {ready}/{want} pods ready");
            return Ok(());
        }
        if on_stopped == OnStoppedRollout::Fail
            && let Some(r) = rs
                .rollout
                .as_ref()
                .filter(|r| r.revision == rs.spec.revision && r.state.is_final())
                .filter(|r| r.state != RolloutState::Complete)
                // Not the record of a set of the same name deleted just
                // before, which the supervisor has not removed yet (a
                // record from before `set_created_at`: by its start).
                .filter(|r| {
                    r.is_of_set(rs.spec.created_at)
                        && (r.set_created_at != 0 || r.started_at >= rs.spec.created_at)
                })
        {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            bail!(
                "replicaset/{name}: {ready} of {want} pods ready, and its rollout stopped ({}): {}",
                r.state,
                r.message
            );
        }
        if let Some(b) = &bar {
            b.set_message(format!(
                "waiting for replicaset/{name}: {ready}/{want} pods ready, {} exist",
                pods.len()
            ));
        }
        if start.elapsed() >= timeout {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let mut missing = Vec::new();
            if pods.len() < want {
                missing.push(format!(
                    "{} pod(s) not created yet (is a ready node with capacity there, and the supervisor running?)",
                    want - pods.len()
                ));
            }
            if pods.len() > want {
                missing.push(format!(
                    "{} surplus pod(s) not removed yet",
                    pods.len() - want
                ));
            }
            // Pods that are not ready for the same reason, in one line.
            let mut why_pods: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for p in pods.iter().filter(|p| !p.ready) {
                let why = if !p.message.is_empty() {
                    format!(": {}", p.message)
                } else if p.phase == PodPhase::Running {
                    ": running but not passing its health check".to_owned()
                } else {
                    String::new()
                };
                why_pods
                    .entry(format!("{}{why}", p.phase))
                    .or_default()
                    .push(format!("{} on {}", p.name, p.node));
            }
            for (why, names) in why_pods {
                missing.push(match names.as_slice() {
                    [one] => format!("pod {one} is {why}"),
                    _ => format!("pods {} are {why}", names.join(", ")),
                });
            }
            let problems = c.problems().await.unwrap_or_default();
            for p in problems
                .iter()
                .filter(|p| &p.namespace == ns && &p.name == name)
            {
                missing.push(p.message.clone());
            }
            bail!(
                "timed out after {}s waiting for replicaset/{name}: {ready} of {want} pods ready; {}",
                timeout.as_secs(),
                missing.join("; ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
