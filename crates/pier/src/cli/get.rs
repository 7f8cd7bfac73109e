//! `pier get`: list objects, or follow them with `-w`.

use anyhow::Result;
use pier_model::api::{Resource, WatchEvent};
use serde_json::Value;

use super::args::{NamespaceArg, Usage, client, name_arg, resource_arg};
use super::output::{Format, apps_table, fixed_row, render_table, table_rows, to_values};

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// nodes, rs, pods, svc or endpoints.
    pub(super) resource: String,
    /// One object (for endpoints: one service's).
    pub(super) name: Option<String>,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub(super) all_namespaces: bool,
    /// table, wide, json or yaml.
    #[arg(short = 'o', long, default_value = "table", value_name = "FORMAT")]
    pub(super) output: String,
    /// After listing, print every change until interrupted.
    #[arg(short = 'w', long)]
    pub(super) watch: bool,
}

pub(super) async fn run(server: &str, a: GetArgs) -> Result<()> {
    if matches!(a.resource.as_str(), "apps" | "app") {
        if a.watch || a.name.is_some() {
            return Err(Usage("get apps takes neither a name nor -w".into()).into());
        }
        // An application's namespace is its project name, so apps are
        // listed across namespaces unless -n names one.
        let ns = a.namespace.get()?;
        let nsf =
            (!a.all_namespaces && ns.as_str() != pier_model::DEFAULT_NAMESPACE).then_some(&ns);
        return apps(server, nsf, &a.output).await;
    }
    let kind = resource_arg(&a.resource)?;
    let format = Format::parse(&a.output)?;
    let name = a
        .name
        .as_deref()
        .map(|n| name_arg(&format!("{} name", kind.singular()), n))
        .transpose()?;
    let ns = a.namespace.get()?;
    let all_ns = a.all_namespaces || !kind.namespaced();
    let nsf = if all_ns { None } else { Some(&ns) };
    let c = client(server)?;
    if a.watch {
        return watch(&c, kind, nsf, name.as_ref(), format, a.all_namespaces).await;
    }
    let items: Vec<Value> = match &name {
        None => c.list_raw(kind, nsf).await?,
        Some(n) => match kind {
            Resource::Endpoints => to_values(c.endpoints_of(&ns, n).await?),
            Resource::Nodes => to_values([c.get_node(n).await?]),
            Resource::ReplicaSets => to_values([c.get_replicaset(&ns, n).await?]),
            Resource::Pods => to_values([c.get_pod(&ns, n).await?]),
            Resource::Services => to_values([c.get_service(&ns, n).await?]),
        },
    };
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&items)?),
        Format::Yaml => out!("{}", serde_yaml_ng::to_string(&items)?),
        Format::Table | Format::Wide => {
            if items.is_empty() {
                match nsf {
                    Some(ns) => eprintln!("No {kind} found in namespace {ns}."),
                    None => eprintln!("No {kind} found."),
                }
                return Ok(());
            }
            let (header, rows) =
                table_rows(kind, &items, format == Format::Wide, a.all_namespaces)?;
            outln!("{}", render_table(&header, rows));
        }
    }
    Ok(())
}

async fn watch(
    c: &pier_api::Client,
    kind: Resource,
    ns: Option<&pier_model::Namespace>,
    name: Option<&pier_model::Name>,
    format: Format,
    all_ns: bool,
) -> Result<()> {
    use std::io::Write;
    let mut w = c.watch::<Value>(kind, ns, name).await?;
    let mut widths: Option<Vec<usize>> = None;
    let mut out = std::io::stdout();
    while let Some(ev) = w.next().await {
        let ev: WatchEvent<Value> = ev?;
        match format {
            Format::Json => writeln!(out, "{}", serde_json::to_string(&ev)?)?,
            Format::Yaml => write!(out, "---\n{}", serde_yaml_ng::to_string(&ev)?)?,
            Format::Table | Format::Wide => {
                let (header, rows) = table_rows(
                    kind,
                    std::slice::from_ref(&ev.object),
                    format == Format::Wide,
                    all_ns,
                )?;
                // EVENT is a column too, so the one before it (IP, say)
                // keeps its width whatever its value.
                let ws = widths.get_or_insert_with(|| {
                    let mut hs: Vec<String> = header.iter().map(|h| h.to_string()).collect();
                    hs.push("EVENT".into());
                    let ws: Vec<usize> = hs
                        .iter()
                        .map(|h| match h.as_str() {
                            "NAME" | "SERVICE" | "POD" | "ADDRESS" => h.len().max(24),
                            "NAMESPACE" | "NODE" | "IP" | "VIP" | "PORT(S)" => h.len().max(14),
                            _ => h.len().max(8),
                        })
                        .collect();
                    let _ = writeln!(out, "{}", fixed_row(&hs, &ws));
                    ws
                });
                for mut r in rows {
                    r.push(ev.kind.to_string());
                    writeln!(out, "{}", fixed_row(&r, ws))?;
                }
            }
        }
        out.flush()?;
    }
    anyhow::bail!("the agent closed the watch (is it shutting down?)")
}

/// `pier get apps`.
async fn apps(server: &str, ns: Option<&pier_model::Namespace>, format: &str) -> Result<()> {
    let c = client(server)?;
    let apps = c.list_apps(ns).await?;
    match format {
        "json" => outln!("{}", serde_json::to_string_pretty(&apps)?),
        "yaml" => out!("{}", serde_yaml_ng::to_string(&apps)?),
        "table" | "wide" => {
            if apps.is_empty() {
                match ns {
                    Some(ns) => eprintln!("No apps found in namespace {ns}."),
                    None => eprintln!("No apps found."),
                }
                return Ok(());
            }
            out!("{}", apps_table(&apps, format == "wide"));
        }
        other => {
            return Err(Usage(format!("-o {other:?}: use table, wide, json or yaml")).into());
        }
    }
    Ok(())
}
