//! `pier apply -f` and `pier diff -f`: an application from Compose files,
//! written by the API in one revision-checked transaction.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use pier_model::Name;
use pier_model::Namespace;

use super::args::{client, parse_duration};
use super::compose::{FileArgs, load};
use super::output::print_app_plan;

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub(super) files: FileArgs,
    /// Apply only if the application is still at this revision (from
    /// `pier diff`); 0: only if it does not exist yet.
    #[arg(long, value_name = "REV")]
    revision: Option<i64>,
    /// Block until every pod of the application is ready.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits: 60s, 2m, 500ms or plain seconds.
    #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub(super) files: FileArgs,
}

pub(super) async fn apply(server: &str, a: ApplyArgs) -> Result<()> {
    let mut spec = load(&a.files)?;
    spec.expect_revision = a.revision;
    let c = client(server)?;
    let p = c.apply_app(&spec, true).await?;
    print_app_plan(&p, false);
    match p.to_revision {
        Some(r) => outln!(
            "app/{} applied in namespace {} (revision {r})",
            p.name,
            p.namespace
        ),
        None => outln!(
            "app/{} unchanged in namespace {} (revision {})",
            p.name,
            p.namespace,
            p.from_revision
        ),
    }
    if a.wait {
        wait_ready(&c, &spec.namespace, &spec.name, a.timeout).await?;
    }
    Ok(())
}

pub(super) async fn diff(server: &str, a: DiffArgs) -> Result<()> {
    let spec = load(&a.files)?;
    let c = client(server)?;
    let p = c.apply_app(&spec, false).await?;
    print_app_plan(&p, true);
    if p.changes_anything() {
        outln!(
            "app/{} in namespace {} would change (at revision {}; `pier apply --revision {}` applies only if it still is)",
            p.name,
            p.namespace,
            p.from_revision,
            p.from_revision
        );
    } else {
        outln!("app/{} in namespace {}: no changes", p.name, p.namespace);
    }
    Ok(())
}

async fn wait_ready(
    c: &pier_api::Client,
    ns: &Namespace,
    name: &Name,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    // Each line once: a line changes only when a count or a problem does.
    let mut told = std::collections::BTreeSet::new();
    loop {
        let apps = c.list_apps(Some(ns)).await?;
        let Some(app) = apps.iter().find(|a| &a.name == name) else {
            bail!("app/{name} is gone from namespace {ns}");
        };
        if app.ready {
            outln!(
                "app/{name}: all pods ready ({} ms)",
                start.elapsed().as_millis()
            );
            return Ok(());
        }
        let waiting: Vec<String> = app
            .services
            .iter()
            .filter(|s| s.ready < s.desired)
            .map(|s| {
                format!(
                    "{} {}/{} ready{}",
                    s.name,
                    s.ready,
                    s.desired,
                    s.problem
                        .as_deref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        // A problem (a pod no host can take, an image missing) is shown
        // when it appears, not only at the timeout.
        for w in waiting.iter().filter(|w| w.contains(" (")) {
            if told.insert(w.clone()) {
                eprintln!("app/{name} waiting: {w}");
            }
        }
        if start.elapsed() >= timeout {
            // `get pods` lists only the pods that exist; a replica no host
            // can take, and why, is in the set's description.
            let why = match app.services.iter().find(|s| s.ready < s.desired) {
                Some(s) => format!("pier describe rs {} -n {ns}", s.name),
                None => format!("pier get pods -n {ns}"),
            };
            bail!(
                "app/{name} not ready after {:?}: {}; `{why}` says why",
                timeout,
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
