//! `get` and `describe`: tables for people, JSON and YAML for scripts.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use comfy_table::{ContentArrangement, Table};
use pier_model::api::{NodeView, PodView, ReplicaSetView, Resource, WatchEvent};
use pier_model::{Endpoint, Service, ServiceType};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{DescribeArgs, GetArgs, client, name_arg, ns_arg, resource_arg, usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
}

impl Format {
    fn parse(s: &str) -> Result<Format> {
        Ok(match s {
            "table" => Format::Table,
            "wide" => Format::Wide,
            "json" => Format::Json,
            "yaml" => Format::Yaml,
            _ => {
                return usage(format!(
                    "-o: unknown output format {s:?}; use table, wide, json or yaml"
                ));
            }
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// kubectl's AGE: `45s`, `12m`, `3h`, `4d`.
pub fn age(ms: u64) -> String {
    if ms == 0 {
        return "<unknown>".into();
    }
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "<none>".into())
}

fn svc_ports(svc: &Service) -> String {
    svc.ports
        .iter()
        .map(|p| match p.node_port {
            Some(np) => format!("{}:{np}/TCP", p.port),
            None => format!("{}/TCP", p.port),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn labels_str(l: &pier_model::Labels) -> String {
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn typed<T: DeserializeOwned>(v: &Value) -> Result<T> {
    serde_json::from_value(v.clone())
        .context("the agent's answer does not have the expected fields")
}

/// The header and one row per object.
fn table_rows(
    kind: Resource,
    items: &[Value],
    wide: bool,
    all_ns: bool,
) -> Result<(Vec<&'static str>, Vec<Vec<String>>)> {
    let mut header: Vec<&'static str> = Vec::new();
    if all_ns && kind.namespaced() {
        header.push("NAMESPACE");
    }
    let mut rows = Vec::new();
    match kind {
        Resource::Nodes => {
            header.extend(["NAME", "STATUS", "ADDRESS", "PODS", "AGE", "VERSION"]);
            if wide {
                header.extend(["MESH-PORT", "LABELS"]);
            }
            for v in items {
                let n: NodeView = typed(v)?;
                let mut r = vec![
                    n.name.to_string(),
                    if n.ready { "Ready" } else { "NotReady" }.into(),
                    n.addr.to_string(),
                    n.pods.to_string(),
                    age(n.started_at),
                    if n.version.is_empty() {
                        "<unknown>".into()
                    } else {
                        n.version.clone()
                    },
                ];
                if wide {
                    r.push(if n.mesh_port == 0 {
                        "<off>".into()
                    } else {
                        n.mesh_port.to_string()
                    });
                    r.push(labels_str(&n.labels));
                }
                rows.push(r);
            }
        }
        Resource::ReplicaSets => {
            header.extend(["NAME", "DESIRED", "CURRENT", "READY", "AGE"]);
            if wide {
                header.extend(["IMAGE", "PORTS"]);
            }
            for v in items {
                let rs: ReplicaSetView = typed(v)?;
                let mut r = Vec::new();
                if all_ns {
                    r.push(rs.namespace.to_string());
                }
                r.extend([
                    rs.name.to_string(),
                    rs.replicas.to_string(),
                    rs.current.to_string(),
                    rs.ready.to_string(),
                    age(rs.created_at),
                ]);
                if wide {
                    r.push(rs.template.image.clone());
                    let ports: Vec<String> = rs
                        .template
                        .ports
                        .iter()
                        .map(|p| format!("{}:{}", p.name, p.port))
                        .collect();
                    r.push(if ports.is_empty() {
                        "<none>".into()
                    } else {
                        ports.join(",")
                    });
                }
                rows.push(r);
            }
        }
        Resource::Pods => {
            header.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE", "NODE", "IP"]);
            if wide {
                header.extend(["REPLICASET", "CONTAINER", "MESSAGE"]);
            }
            for v in items {
                let p: PodView = typed(v)?;
                let mut r = Vec::new();
                if all_ns {
                    r.push(p.namespace.to_string());
                }
                r.extend([
                    p.name.to_string(),
                    if p.ready { "1/1" } else { "0/1" }.into(),
                    p.phase.to_string(),
                    p.restarts.to_string(),
                    age(p.started_at.unwrap_or(p.created_at)),
                    p.node.to_string(),
                    dash(p.ip),
                ]);
                if wide {
                    r.push(p.replicaset.to_string());
                    r.push(dash(
                        p.container_id
                            .as_deref()
                            .map(|c| c.chars().take(12).collect::<String>()),
                    ));
                    r.push(if p.message.is_empty() {
                        "<none>".into()
                    } else {
                        p.message.clone()
                    });
                }
                rows.push(r);
            }
        }
        Resource::Services => {
            header.extend(["NAME", "TYPE", "VIP", "PORT(S)", "AGE"]);
            if wide {
                header.extend(["SELECTOR", "STATIC-ENDPOINTS"]);
            }
            for v in items {
                let s: Service = typed(v)?;
                let mut r = Vec::new();
                if all_ns {
                    r.push(s.namespace.to_string());
                }
                r.extend([
                    s.name.to_string(),
                    match s.service_type {
                        ServiceType::ClusterIP => "ClusterIP",
                        ServiceType::NodePort => "NodePort",
                    }
                    .into(),
                    s.vip
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "None".into()),
                    svc_ports(&s),
                    age(s.created_at),
                ]);
                if wide {
                    r.push(labels_str(&s.selector));
                    let st: Vec<String> =
                        s.static_endpoints.iter().map(|e| e.to_string()).collect();
                    r.push(if st.is_empty() {
                        "<none>".into()
                    } else {
                        st.join(",")
                    });
                }
                rows.push(r);
            }
        }
        Resource::Endpoints => {
            header.extend(["SERVICE", "POD", "NODE", "ADDRESS", "READY"]);
            if wide {
                header.extend(["ID", "HOSTNAME"]);
            }
            for v in items {
                let e: Endpoint = typed(v)?;
                let mut r = Vec::new();
                if all_ns {
                    r.push(e.namespace.to_string());
                }
                let addr = if e.ports.is_empty() {
                    e.ip.to_string()
                } else {
                    e.ports
                        .iter()
                        .map(|p| format!("{}:{}", e.ip, p.port))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                r.extend([
                    e.service.to_string(),
                    dash(e.pod.as_ref()),
                    e.node.to_string(),
                    addr,
                    e.ready.to_string(),
                ]);
                if wide {
                    r.push(e.id.to_string());
                    r.push(dash(e.hostname.as_ref()));
                }
                rows.push(r);
            }
        }
    }
    Ok((header, rows))
}

fn render_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec())
        .add_rows(rows);
    for c in t.column_iter_mut() {
        c.set_padding((0, 3));
    }
    t.lines()
        .map(|l| l.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A row for a watch, in columns at least as wide as the header's, so that
/// rows printed one at a time still line up roughly.
fn fixed_row(cells: &[String], widths: &[usize]) -> String {
    let mut out = String::new();
    for (i, c) in cells.iter().enumerate() {
        let w = widths.get(i).copied().unwrap_or(0);
        out.push_str(&format!("{c:<w$}   "));
    }
    out.trim_end().to_owned()
}

pub async fn get(server: &str, a: GetArgs) -> Result<()> {
    let kind = resource_arg(&a.resource)?;
    let format = Format::parse(&a.output)?;
    let name = a
        .name
        .as_deref()
        .map(|n| name_arg(&format!("{} name", kind.singular()), n))
        .transpose()?;
    let ns = ns_arg(&a.namespace)?;
    let all_ns = a.all_namespaces || !kind.namespaced();
    let nsf = if all_ns { None } else { Some(&ns) };
    let c = client(server)?;
    if a.watch {
        return watch(&c, kind, nsf, name.as_ref(), format, a.all_namespaces).await;
    }
    let items: Vec<Value> = match &name {
        None => c.list_raw(kind, nsf).await?,
        Some(n) => match kind {
            Resource::Endpoints => c
                .endpoints_of(&ns, n)
                .await?
                .iter()
                .map(|e| serde_json::to_value(e).expect("endpoints serialize"))
                .collect(),
            Resource::Nodes => vec![serde_json::to_value(c.get_node(n).await?).expect("serialize")],
            Resource::ReplicaSets => {
                vec![serde_json::to_value(c.get_replicaset(&ns, n).await?).expect("serialize")]
            }
            Resource::Pods => {
                vec![serde_json::to_value(c.get_pod(&ns, n).await?).expect("serialize")]
            }
            Resource::Services => {
                vec![serde_json::to_value(c.get_service(&ns, n).await?).expect("serialize")]
            }
        },
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(&items)?),
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
            println!("{}", render_table(&header, rows));
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
                let ws = widths.get_or_insert_with(|| {
                    let ws: Vec<usize> = header
                        .iter()
                        .map(|h| match *h {
                            "NAME" | "SERVICE" | "POD" | "ADDRESS" => h.len().max(24),
                            "NAMESPACE" | "NODE" | "IP" | "VIP" | "PORT(S)" => h.len().max(14),
                            _ => h.len().max(8),
                        })
                        .collect();
                    let hs: Vec<String> = header.iter().map(|h| h.to_string()).collect();
                    let _ = writeln!(out, "{}   EVENT", fixed_row(&hs, &ws));
                    ws
                });
                for r in rows {
                    writeln!(out, "{}   {}", fixed_row(&r, ws), ev.kind)?;
                }
            }
        }
        out.flush()?;
    }
    anyhow::bail!("the agent closed the watch (is it shutting down?)")
}

pub async fn describe(server: &str, a: DescribeArgs) -> Result<()> {
    let kind = resource_arg(&a.kind)?;
    let name = name_arg(&format!("{} name", kind.singular()), &a.name)?;
    let ns = ns_arg(&a.namespace)?;
    let c = client(server)?;
    let problems: Vec<String> = match kind {
        Resource::ReplicaSets | Resource::Services => c
            .problems()
            .await?
            .into_iter()
            .filter(|p| p.namespace == ns && p.name == name)
            .map(|p| p.message)
            .collect(),
        _ => Vec::new(),
    };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    match kind {
        Resource::Nodes => {
            let n = c.get_node(&name).await?;
            line("Name", n.name.to_string());
            line("Status", if n.ready { "Ready" } else { "NotReady" }.into());
            line("Address", n.addr.to_string());
            line(
                "Mesh port",
                if n.mesh_port == 0 {
                    "<off>".into()
                } else {
                    n.mesh_port.to_string()
                },
            );
            line("Labels", labels_str(&n.labels));
            line(
                "Capacity",
                format!(
                    "cpu {}m, memory {} MB, pods {}",
                    n.capacity.cpu_millis, n.capacity.memory_mb, n.capacity.pods
                ),
            );
            line("Version", n.version.clone());
            line("Age", age(n.started_at));
            let pods: Vec<Value> = c
                .list_pods(None)
                .await?
                .into_iter()
                .filter(|p| p.node == name)
                .map(|p| serde_json::to_value(p).expect("serialize"))
                .collect();
            print!("{out}");
            print_section("Pods", Resource::Pods, &pods, true)?;
        }
        Resource::ReplicaSets => {
            let rs = c.get_replicaset(&ns, &name).await?;
            line("Name", rs.name.to_string());
            line("Namespace", rs.namespace.to_string());
            line("Image", rs.template.image.clone());
            line(
                "Command",
                if rs.template.cmd.is_empty() {
                    "<image default>".into()
                } else {
                    rs.template.cmd.join(" ")
                },
            );
            line(
                "Ports",
                rs.template
                    .ports
                    .iter()
                    .map(|p| format!("{}:{}", p.name, p.port))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            line("Env", labels_str(&rs.template.env));
            line("Labels", labels_str(&rs.template.labels));
            line(
                "Replicas",
                format!(
                    "{} desired, {} current, {} ready",
                    rs.replicas, rs.current, rs.ready
                ),
            );
            line("Node selector", labels_str(&rs.placement.node_selector));
            line("Age", age(rs.created_at));
            let pods: Vec<Value> = c
                .list_pods(Some(&ns))
                .await?
                .into_iter()
                .filter(|p| p.replicaset == name)
                .map(|p| serde_json::to_value(p).expect("serialize"))
                .collect();
            print!("{out}");
            print_section("Pods", Resource::Pods, &pods, false)?;
            print_problems(&problems);
        }
        Resource::Pods => {
            let p = c.get_pod(&ns, &name).await?;
            line("Name", p.name.to_string());
            line("Namespace", p.namespace.to_string());
            line("Replica set", p.replicaset.to_string());
            line("Node", p.node.to_string());
            line("Image", p.image.clone());
            line("Phase", p.phase.to_string());
            line("Ready", p.ready.to_string());
            line("IP", dash(p.ip));
            line("Container", dash(p.container_id.clone()));
            line("Restarts", p.restarts.to_string());
            line("Started", age(p.started_at.unwrap_or(0)));
            line(
                "Message",
                if p.message.is_empty() {
                    "<none>".into()
                } else {
                    p.message.clone()
                },
            );
            print!("{out}");
        }
        Resource::Services => {
            let s = c.get_service(&ns, &name).await?;
            line("Name", s.name.to_string());
            line("Namespace", s.namespace.to_string());
            line(
                "Type",
                match s.service_type {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                }
                .into(),
            );
            line(
                "VIP",
                s.vip
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "None (headless)".into()),
            );
            for p in &s.ports {
                line(
                    "Port",
                    format!(
                        "{} {}/TCP -> {}{}",
                        p.name,
                        p.port,
                        p.target_port,
                        p.node_port
                            .map(|n| format!(", node port {n}"))
                            .unwrap_or_default()
                    ),
                );
            }
            line("Selector", labels_str(&s.selector));
            if !s.static_endpoints.is_empty() {
                line(
                    "Static",
                    s.static_endpoints
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
            line("Age", age(s.created_at));
            let eps: Vec<Value> = c
                .endpoints_of(&ns, &name)
                .await?
                .iter()
                .map(|e| serde_json::to_value(e).expect("serialize"))
                .collect();
            print!("{out}");
            print_section("Endpoints", Resource::Endpoints, &eps, false)?;
            print_problems(&problems);
        }
        Resource::Endpoints => {
            return usage(
                "describe takes node, rs, pod or svc; for endpoints use `pier get endpoints NAME`",
            );
        }
    }
    Ok(())
}

fn print_section(title: &str, kind: Resource, items: &[Value], all_ns: bool) -> Result<()> {
    if items.is_empty() {
        println!("{title}:\n  <none>");
        return Ok(());
    }
    let (header, rows) = table_rows(kind, items, false, all_ns)?;
    println!("{title}:");
    for l in render_table(&header, rows).lines() {
        println!("  {l}");
    }
    Ok(())
}

fn print_problems(problems: &[String]) {
    if problems.is_empty() {
        return;
    }
    println!("Problems:");
    for p in problems {
        println!("  {p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(age(0), "<unknown>");
        assert_eq!(age(now_ms() - 5_000), "5s");
        assert_eq!(age(now_ms() - 600_000), "10m");
        assert_eq!(age(now_ms() - 3 * 86_400_000), "3d");
    }
}
