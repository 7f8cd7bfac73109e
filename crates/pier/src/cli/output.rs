//! `get` and `describe`: tables for people, JSON and YAML for scripts.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use comfy_table::{ContentArrangement, Table};
use pier_model::api::{NodeView, PodView, ReplicaSetView, Resource, WatchEvent};
use pier_model::{Endpoint, Service, ServiceType};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{DescribeArgs, GetArgs, client, name_arg, resource_arg, usage};

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
    or_none(
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// `<none>` for an empty cell.
fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn ready_str(ready: bool) -> String {
    if ready { "Ready" } else { "NotReady" }.into()
}

fn mesh_port_str(port: u16) -> String {
    if port == 0 {
        "<off>".into()
    } else {
        port.to_string()
    }
}

fn svc_type_str(t: ServiceType) -> String {
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
    }
    .into()
}

/// A row's first cells: the namespace (with `-A`), then `cells`.
fn row<const N: usize>(
    all_ns: bool,
    ns: &pier_model::Namespace,
    cells: [String; N],
) -> Vec<String> {
    let mut r = Vec::with_capacity(N + 1);
    if all_ns {
        r.push(ns.to_string());
    }
    r.extend(cells);
    r
}

fn to_values<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<Value> {
    items
        .into_iter()
        .map(|v| serde_json::to_value(v).expect("API objects serialize to JSON"))
        .collect()
}

fn typed<T: DeserializeOwned>(v: &Value) -> Result<T> {
    serde_json::from_value(v.clone())
        .context("the agent's answer does not have the expected fields")
}

/// One kind's table: its `columns`, plus `wide_columns` with `-o wide`; an
/// object's `cells`, plus its `wide_cells` with `-o wide`.
fn kind_table<T: DeserializeOwned>(
    items: &[Value],
    wide: bool,
    header: &mut Vec<&'static str>,
    columns: &[&'static str],
    wide_columns: &[&'static str],
    cells: impl Fn(&T) -> Vec<String>,
    wide_cells: impl Fn(&T) -> Vec<String>,
) -> Result<Vec<Vec<String>>> {
    header.extend(columns);
    if wide {
        header.extend(wide_columns);
    }
    items
        .iter()
        .map(|v| {
            let t: T = typed(v)?;
            let mut r = cells(&t);
            if wide {
                r.extend(wide_cells(&t));
            }
            Ok(r)
        })
        .collect()
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
    let h = &mut header;
    let rows = match kind {
        Resource::Nodes => kind_table(
            items,
            wide,
            h,
            &["NAME", "STATUS", "ADDRESS", "PODS", "AGE", "VERSION"],
            &["MESH-PORT", "LABELS"],
            |n: &NodeView| {
                vec![
                    n.name.to_string(),
                    ready_str(n.ready),
                    n.addr.to_string(),
                    n.pods.to_string(),
                    age(n.started_at),
                    if n.version.is_empty() {
                        "<unknown>".into()
                    } else {
                        n.version.clone()
                    },
                ]
            },
            |n| vec![mesh_port_str(n.mesh_port), labels_str(&n.labels)],
        )?,
        Resource::ReplicaSets => kind_table(
            items,
            wide,
            h,
            &["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
            &["IMAGE", "PORTS"],
            |rs: &ReplicaSetView| {
                row(
                    all_ns,
                    &rs.namespace,
                    [
                        rs.name.to_string(),
                        rs.replicas.to_string(),
                        rs.current.to_string(),
                        rs.ready.to_string(),
                        age(rs.created_at),
                    ],
                )
            },
            |rs| {
                let ports: Vec<String> = rs
                    .template
                    .ports
                    .iter()
                    .map(|p| format!("{}:{}", p.name, p.port))
                    .collect();
                vec![rs.template.image.clone(), or_none(ports.join(","))]
            },
        )?,
        Resource::Pods => kind_table(
            items,
            wide,
            h,
            &["NAME", "READY", "STATUS", "RESTARTS", "AGE", "NODE", "IP"],
            &["REPLICASET", "CONTAINER", "MESSAGE"],
            |p: &PodView| {
                row(
                    all_ns,
                    &p.namespace,
                    [
                        p.name.to_string(),
                        if p.ready { "1/1" } else { "0/1" }.into(),
                        p.phase.to_string(),
                        p.restarts.to_string(),
                        age(p.started_at.unwrap_or(p.created_at)),
                        p.node.to_string(),
                        dash(p.ip),
                    ],
                )
            },
            |p| {
                vec![
                    p.replicaset.to_string(),
                    dash(
                        p.container_id
                            .as_deref()
                            .map(|c| c.chars().take(12).collect::<String>()),
                    ),
                    or_none(p.message.clone()),
                ]
            },
        )?,
        Resource::Services => kind_table(
            items,
            wide,
            h,
            &["NAME", "TYPE", "VIP", "PORT(S)", "AGE"],
            &["SELECTOR", "STATIC-ENDPOINTS"],
            |s: &Service| {
                row(
                    all_ns,
                    &s.namespace,
                    [
                        s.name.to_string(),
                        svc_type_str(s.service_type),
                        s.vip
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "None".into()),
                        svc_ports(s),
                        age(s.created_at),
                    ],
                )
            },
            |s| {
                let st: Vec<String> = s.static_endpoints.iter().map(|e| e.to_string()).collect();
                vec![labels_str(&s.selector), or_none(st.join(","))]
            },
        )?,
        Resource::Endpoints => kind_table(
            items,
            wide,
            h,
            &["SERVICE", "POD", "NODE", "ADDRESS", "READY"],
            &["ID", "HOSTNAME"],
            |e: &Endpoint| {
                let addr = if e.ports.is_empty() {
                    e.ip.to_string()
                } else {
                    e.ports
                        .iter()
                        .map(|p| format!("{}:{}", e.ip, p.port))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                row(
                    all_ns,
                    &e.namespace,
                    [
                        e.service.to_string(),
                        dash(e.pod.as_ref()),
                        e.node.to_string(),
                        addr,
                        e.ready.to_string(),
                    ],
                )
            },
            |e| vec![e.id.to_string(), dash(e.hostname.as_ref())],
        )?,
    };
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
    let ns = a.namespace.get()?;
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
            line("Status", ready_str(n.ready));
            line("Address", n.addr.to_string());
            line("Mesh port", mesh_port_str(n.mesh_port));
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
            let pods = to_values(
                c.list_pods(None)
                    .await?
                    .into_iter()
                    .filter(|p| p.node == name),
            );
            print!("{out}");
            print_section("Pods", Resource::Pods, &pods, true)?;
            print_refused(n.refused.iter().map(|r| (n.name.as_str(), r)));
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
            let pods = to_values(
                c.list_pods(Some(&ns))
                    .await?
                    .into_iter()
                    .filter(|p| p.replicaset == name),
            );
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
            line("Message", or_none(p.message.clone()));
            print!("{out}");
        }
        Resource::Services => {
            let s = c.get_service(&ns, &name).await?;
            line("Name", s.name.to_string());
            line("Namespace", s.namespace.to_string());
            line("Type", svc_type_str(s.service_type));
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
            let eps = to_values(c.endpoints_of(&ns, &name).await?);
            let nodes = c.list_nodes().await?;
            print!("{out}");
            print_section("Endpoints", Resource::Endpoints, &eps, false)?;
            print_refused(nodes.iter().flat_map(|n| {
                n.refused
                    .iter()
                    .filter(|r| r.namespace == ns && r.service.as_ref() == Some(&name))
                    .map(move |r| (n.name.as_str(), r))
            }));
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

/// The containers agents refused, as `node/container (id): reason`; nothing
/// when there are none.
fn print_refused<'a>(refused: impl Iterator<Item = (&'a str, &'a pier_model::Refusal)>) {
    let lines: Vec<String> = refused
        .map(|(node, r)| format!("  {node}/{} ({}): {}", r.container, r.id, r.reason))
        .collect();
    if !lines.is_empty() {
        println!("Refused containers:\n{}", lines.join("\n"));
    }
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
    use serde_json::json;

    /// Every kind's table, plain, wide and with `-A`, on fixed objects
    /// (created_at 0, so AGE is `<unknown>`): the columns the CLI contract
    /// promises, byte for byte.
    #[test]
    fn tables() {
        let labels = json!({"app": "web", "tier": "front"});
        let cases = [
            (
                Resource::Nodes,
                vec![
                    json!({"name": "n1", "addr": "10.0.0.1", "ready": true, "labels": labels,
                           "mesh_port": 7443, "version": "0.1.0", "pods": 2}),
                    json!({"name": "n2", "addr": "10.0.0.2", "ready": false}),
                ],
            ),
            (
                Resource::ReplicaSets,
                vec![
                    json!({"name": "web", "namespace": "prod", "replicas": 3, "current": 2,
                           "ready": 1, "template": {"image": "httpd",
                           "ports": [{"name": "http", "port": 8080}]}}),
                    json!({"name": "db", "namespace": "default", "replicas": 0, "current": 0,
                           "ready": 0, "template": {"image": "pg"}}),
                ],
            ),
            (
                Resource::Pods,
                vec![
                    json!({"name": "web-abcde", "namespace": "prod", "replicaset": "web",
                           "node": "n1", "phase": "Running", "ready": true, "ip": "172.17.0.2",
                           "container_id": "0123456789abcdef", "restarts": 1}),
                    json!({"name": "web-fghij", "namespace": "prod", "replicaset": "web",
                           "node": "n2", "phase": "Pending", "ready": false, "ip": null,
                           "container_id": null, "message": "creating the container"}),
                ],
            ),
            (
                Resource::Services,
                vec![
                    json!({"name": "web", "namespace": "prod", "vip": "10.213.0.5",
                           "type": "NodePort", "selector": labels,
                           "ports": [{"name": "p80", "port": 80, "target_port": 8080,
                                      "node_port": 30001}]}),
                    json!({"name": "ext", "namespace": "default", "vip": null,
                           "ports": [{"name": "p5432", "port": 5432, "target_port": 5432}],
                           "static_endpoints": [{"ip": "192.0.2.7", "port": 5432}]}),
                ],
            ),
            (
                Resource::Endpoints,
                vec![
                    json!({"service": "web", "namespace": "prod", "node": "n1", "id": "0123456789ab",
                           "pod": "web-abcde", "ip": "172.17.0.2",
                           "ports": [{"name": "http", "port": 8080}], "ready": true}),
                    json!({"service": "ext", "namespace": "default", "node": "n1",
                           "id": "static-0", "hostname": "db.example", "ip": "192.0.2.7",
                           "ports": [], "ready": false}),
                ],
            ),
        ];
        let mut out = String::new();
        for (kind, items) in &cases {
            for (wide, all_ns) in [(false, false), (true, false), (false, true), (true, true)] {
                let (header, rows) = table_rows(*kind, items, wide, all_ns).unwrap();
                out.push_str(&format!("{kind} wide={wide} all={all_ns}\n"));
                out.push_str(&render_table(&header, rows));
                out.push('\n');
            }
        }
        assert_eq!(out, EXPECTED_TABLES.trim_start(), "got:\n{out}");
    }

    const EXPECTED_TABLES: &str = r#"
nodes wide=false all=false
NAME   STATUS     ADDRESS    PODS   AGE         VERSION
n1     Ready      10.0.0.1   2      <unknown>   0.1.0
n2     NotReady   10.0.0.2   0      <unknown>   <unknown>
nodes wide=true all=false
NAME   STATUS     ADDRESS    PODS   AGE         VERSION     MESH-PORT   LABELS
n1     Ready      10.0.0.1   2      <unknown>   0.1.0       7443        app=web,tier=front
n2     NotReady   10.0.0.2   0      <unknown>   <unknown>   <off>       <none>
nodes wide=false all=true
NAME   STATUS     ADDRESS    PODS   AGE         VERSION
n1     Ready      10.0.0.1   2      <unknown>   0.1.0
n2     NotReady   10.0.0.2   0      <unknown>   <unknown>
nodes wide=true all=true
NAME   STATUS     ADDRESS    PODS   AGE         VERSION     MESH-PORT   LABELS
n1     Ready      10.0.0.1   2      <unknown>   0.1.0       7443        app=web,tier=front
n2     NotReady   10.0.0.2   0      <unknown>   <unknown>   <off>       <none>
replicasets wide=false all=false
NAME   DESIRED   CURRENT   READY   AGE
web    3         2         1       <unknown>
db     0         0         0       <unknown>
replicasets wide=true all=false
NAME   DESIRED   CURRENT   READY   AGE         IMAGE   PORTS
web    3         2         1       <unknown>   httpd   http:8080
db     0         0         0       <unknown>   pg      <none>
replicasets wide=false all=true
NAMESPACE   NAME   DESIRED   CURRENT   READY   AGE
prod        web    3         2         1       <unknown>
default     db     0         0         0       <unknown>
replicasets wide=true all=true
NAMESPACE   NAME   DESIRED   CURRENT   READY   AGE         IMAGE   PORTS
prod        web    3         2         1       <unknown>   httpd   http:8080
default     db     0         0         0       <unknown>   pg      <none>
pods wide=false all=false
NAME        READY   STATUS    RESTARTS   AGE         NODE   IP
web-abcde   1/1     Running   1          <unknown>   n1     172.17.0.2
web-fghij   0/1     Pending   0          <unknown>   n2     <none>
pods wide=true all=false
NAME        READY   STATUS    RESTARTS   AGE         NODE   IP           REPLICASET   CONTAINER      MESSAGE
web-abcde   1/1     Running   1          <unknown>   n1     172.17.0.2   web          0123456789ab   <none>
web-fghij   0/1     Pending   0          <unknown>   n2     <none>       web          <none>         creating the container
pods wide=false all=true
NAMESPACE   NAME        READY   STATUS    RESTARTS   AGE         NODE   IP
prod        web-abcde   1/1     Running   1          <unknown>   n1     172.17.0.2
prod        web-fghij   0/1     Pending   0          <unknown>   n2     <none>
pods wide=true all=true
NAMESPACE   NAME        READY   STATUS    RESTARTS   AGE         NODE   IP           REPLICASET   CONTAINER      MESSAGE
prod        web-abcde   1/1     Running   1          <unknown>   n1     172.17.0.2   web          0123456789ab   <none>
prod        web-fghij   0/1     Pending   0          <unknown>   n2     <none>       web          <none>         creating the container
services wide=false all=false
NAME   TYPE        VIP          PORT(S)        AGE
web    NodePort    10.213.0.5   80:30001/TCP   <unknown>
ext    ClusterIP   None         5432/TCP       <unknown>
services wide=true all=false
NAME   TYPE        VIP          PORT(S)        AGE         SELECTOR             STATIC-ENDPOINTS
web    NodePort    10.213.0.5   80:30001/TCP   <unknown>   app=web,tier=front   <none>
ext    ClusterIP   None         5432/TCP       <unknown>   <none>               192.0.2.7:5432
services wide=false all=true
NAMESPACE   NAME   TYPE        VIP          PORT(S)        AGE
prod        web    NodePort    10.213.0.5   80:30001/TCP   <unknown>
default     ext    ClusterIP   None         5432/TCP       <unknown>
services wide=true all=true
NAMESPACE   NAME   TYPE        VIP          PORT(S)        AGE         SELECTOR             STATIC-ENDPOINTS
prod        web    NodePort    10.213.0.5   80:30001/TCP   <unknown>   app=web,tier=front   <none>
default     ext    ClusterIP   None         5432/TCP       <unknown>   <none>               192.0.2.7:5432
endpoints wide=false all=false
SERVICE   POD         NODE   ADDRESS           READY
web       web-abcde   n1     172.17.0.2:8080   true
ext       <none>      n1     192.0.2.7         false
endpoints wide=true all=false
SERVICE   POD         NODE   ADDRESS           READY   ID             HOSTNAME
web       web-abcde   n1     172.17.0.2:8080   true    0123456789ab   <none>
ext       <none>      n1     192.0.2.7         false   static-0       db.example
endpoints wide=false all=true
NAMESPACE   SERVICE   POD         NODE   ADDRESS           READY
prod        web       web-abcde   n1     172.17.0.2:8080   true
default     ext       <none>      n1     192.0.2.7         false
endpoints wide=true all=true
NAMESPACE   SERVICE   POD         NODE   ADDRESS           READY   ID             HOSTNAME
prod        web       web-abcde   n1     172.17.0.2:8080   true    0123456789ab   <none>
default     ext       <none>      n1     192.0.2.7         false   static-0       db.example
"#;

    #[test]
    fn ages() {
        assert_eq!(age(0), "<unknown>");
        assert_eq!(age(now_ms() - 5_000), "5s");
        assert_eq!(age(now_ms() - 600_000), "10m");
        assert_eq!(age(now_ms() - 3 * 86_400_000), "3d");
    }
}
