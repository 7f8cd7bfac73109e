//! `pier rollout status|history|undo rs NAME`: follow, list and undo a
//! replica set's template revisions.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use pier_model::api::{ReplicaSetView, Resource};
use pier_model::{Name, RolloutState};

use super::args::{NamespaceArg, client, name_arg, parse_duration, resource_arg, usage};
use super::output::{age, render_table};

/// 250 ms, as `--wait` polls.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCmd {
    /// Wait for the latest rollout and show its progress; exit 1 when it
    /// paused, rolled back or timed out.
    Status(StatusArgs),
    /// List the template revisions kept.
    History(RsArgs),
    /// Roll back: an earlier revision's template becomes the next revision.
    Undo(UndoArgs),
}

#[derive(Debug, clap::Args)]
pub struct RsArgs {
    /// The kind: rs.
    pub(super) kind: String,
    /// The replica set.
    pub(super) name: String,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub(super) rs: RsArgs,
    /// How long to wait: 2m, 90s, 500ms or plain seconds.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub(super) timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct UndoArgs {
    #[command(flatten)]
    pub(super) rs: RsArgs,
    /// The revision to go back to (`pier rollout history`); the one before
    /// the current by default.
    #[arg(long, value_name = "N")]
    pub(super) to_revision: Option<u64>,
}

fn rs_target(a: &RsArgs) -> Result<(pier_model::Namespace, Name)> {
    match resource_arg(&a.kind)? {
        Resource::ReplicaSets => {}
        other => return usage(format!("{other} have no rollouts; only rs")),
    }
    Ok((a.namespace.get()?, name_arg("replica set name", &a.name)?))
}

pub(super) async fn run(server: &str, cmd: RolloutCmd) -> Result<()> {
    match cmd {
        RolloutCmd::Status(a) => status(server, a).await,
        RolloutCmd::History(a) => history(server, a).await,
        RolloutCmd::Undo(a) => undo(server, a).await,
    }
}

/// One line of progress, as kubectl prints it.
fn progress(rs: &ReplicaSetView) -> String {
    let want = rs.spec.replicas.get();
    match &rs.rollout {
        Some(r) if r.revision == rs.spec.revision => {
            let mut s = format!(
                "revision {}: {} of {want} pods updated, {} ready; {}",
                rs.spec.revision, rs.updated, rs.updated_ready, r.state
            );
            if r.state == RolloutState::RollingBack {
                s.push_str(&format!(" to revision {}", r.target));
            }
            if r.failures > 0 {
                s.push_str(&format!(", {} new pod(s) failed", r.failures));
            }
            // Why a step went as it did (a failure, an in-place step); a
            // final state's message is printed with its verdict.
            if !r.state.is_final() && !r.message.is_empty() {
                s.push_str(&format!(" ({})", r.message));
            }
            s
        }
        _ => format!(
            "revision {}: waiting for the supervisor to start the rollout ({} of {want} pods updated)",
            rs.spec.revision, rs.updated
        ),
    }
}

async fn status(server: &str, a: StatusArgs) -> Result<()> {
    let (ns, name) = rs_target(&a.rs)?;
    let c = client(server)?;
    let start = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let rs = c.get_replicaset(&ns, &name).await?;
        let line = progress(&rs);
        if line != last {
            if tty || last.is_empty() || !line.starts_with(&last) {
                outln!("{line}");
            }
            last = line;
        }
        if let Some(r) = rs
            .rollout
            .as_ref()
            .filter(|r| r.revision == rs.spec.revision)
        {
            match r.state {
                RolloutState::Complete => {
                    outln!(
                        "replicaset/{name} rolled out (revision {})",
                        rs.spec.revision
                    );
                    return Ok(());
                }
                RolloutState::Paused => bail!("replicaset/{name}: {}", r.message),
                RolloutState::RolledBack => bail!(
                    "replicaset/{name}: rolled back; its pods run revision {}: {}",
                    r.target,
                    r.message
                ),
                RolloutState::Progressing | RolloutState::RollingBack => {}
            }
        }
        if start.elapsed() >= a.timeout {
            let problems: Vec<String> = c
                .problems()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.namespace == ns && p.name == name)
                .map(|p| p.message)
                .collect();
            bail!(
                "timed out after {}s waiting for the rollout of replicaset/{name}: {last}{}",
                a.timeout.as_secs(),
                if problems.is_empty() {
                    String::new()
                } else {
                    format!("; {}", problems.join("; "))
                }
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn history(server: &str, a: RsArgs) -> Result<()> {
    let (ns, name) = rs_target(&a)?;
    let c = client(server)?;
    let rs = c.get_replicaset(&ns, &name).await?;
    let mut rows: Vec<Vec<String>> = rs
        .spec
        .history
        .iter()
        .map(|h| {
            vec![
                h.revision.to_string(),
                h.template.image.clone(),
                // 0: written before the time was kept.
                if h.replaced_at == 0 {
                    format!("replaced by {}", h.replaced_by)
                } else {
                    format!("replaced {} ago by {}", age(h.replaced_at), h.replaced_by)
                },
            ]
        })
        .collect();
    let state = match &rs.rollout {
        Some(r) if r.revision == rs.spec.revision => match r.state {
            RolloutState::RolledBack => {
                format!("current (rolled back: pods run revision {})", r.target)
            }
            s => format!("current ({s})"),
        },
        _ => "current".into(),
    };
    rows.push(vec![
        rs.spec.revision.to_string(),
        rs.spec.template.image.clone(),
        state,
    ]);
    outln!("{}", render_table(&["REVISION", "IMAGE", "CHANGE"], rows));
    Ok(())
}

async fn undo(server: &str, a: UndoArgs) -> Result<()> {
    let (ns, name) = rs_target(&a.rs)?;
    let c = client(server)?;
    let rs = c.rollback_replicaset(&ns, &name, a.to_revision).await?;
    outln!(
        "replicaset/{name} rolled back to {} (now revision {}); follow it with `pier rollout status rs {name}{}`",
        rs.spec.template.image,
        rs.spec.revision,
        super::output::ns_flag(&ns)
    );
    Ok(())
}
