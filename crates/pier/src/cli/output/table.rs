//! Every kind's table: its columns, plain and wide, and its rows.

use anyhow::Result;
use comfy_table::{ContentArrangement, Table};
use pier_model::api::{NodeView, PodView, ReplicaSetView, Resource};
use pier_model::{Endpoint, Service};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::*;

/// A row's first cells: the namespace (with `-A`), then `cells`.
pub(in crate::cli) fn row<const N: usize>(
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

/// One kind's table: its `columns`, plus `wide_columns` with `-o wide`; an
/// object's `cells`, plus its `wide_cells` with `-o wide`.
pub(in crate::cli) fn kind_table<T: DeserializeOwned>(
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
pub(in crate::cli) fn table_rows(
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
            &["NAME", "DESIRED", "CURRENT", "READY", "MIN", "MAX", "AGE"],
            &["IMAGE", "PORTS"],
            |rs: &ReplicaSetView| {
                // Min and max only when the autoscaler acts on them.
                let auto = rs.spec.sla.as_ref().is_some_and(|s| s.has_target());
                let bound = |b: Option<pier_model::Replicas>| match b {
                    Some(b) if auto => b.to_string(),
                    _ => "-".into(),
                };
                row(
                    all_ns,
                    &rs.spec.namespace,
                    [
                        rs.spec.name.to_string(),
                        rs.spec.replicas.to_string(),
                        rs.current.to_string(),
                        rs.ready.to_string(),
                        bound(rs.spec.min_replicas),
                        bound(rs.spec.max_replicas),
                        age(rs.spec.created_at),
                    ],
                )
            },
            |rs| {
                let ports: Vec<String> = rs
                    .spec
                    .template
                    .ports
                    .iter()
                    .map(|p| format!("{}:{}", p.name, p.port))
                    .collect();
                vec![rs.spec.template.image.clone(), or_none(ports.join(","))]
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
                        match (&s.external_name, s.headless) {
                            (Some(_), _) => "ExternalName".into(),
                            (None, true) => "Headless".into(),
                            (None, false) => svc_type_str(s.service_type),
                        },
                        match (s.vip, s.vip6) {
                            (Some(v), Some(v6)) => format!("{v},{v6}"),
                            (Some(v), None) => v.to_string(),
                            (None, _) => "None".into(),
                        },
                        match &s.external_name {
                            Some(host) => format!("CNAME {host}"),
                            None => svc_ports(s),
                        },
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

pub(in crate::cli) fn render_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
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
pub(in crate::cli) fn fixed_row(cells: &[String], widths: &[usize]) -> String {
    let mut out = String::new();
    for (i, c) in cells.iter().enumerate() {
        let w = widths.get(i).copied().unwrap_or(0);
        out.push_str(&format!("{c:<w$}   "));
    }
    out.trim_end().to_owned()
}

pub(in crate::cli) fn print_section(
    title: &str,
    kind: Resource,
    items: &[Value],
    all_ns: bool,
) -> Result<()> {
    if items.is_empty() {
        outln!("{title}:\n  <none>");
        return Ok(());
    }
    let (header, rows) = table_rows(kind, items, false, all_ns)?;
    outln!("{title}:");
    for l in render_table(&header, rows).lines() {
        outln!("  {l}");
    }
    Ok(())
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
                           "ready": 1, "min_replicas": 1, "max_replicas": 4,
                           "sla": {"max_active_per_pod": 5}, "template": {"image": "httpd",
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
NAME   DESIRED   CURRENT   READY   MIN   MAX   AGE
web    3         2         1       1     4     <unknown>
db     0         0         0       -     -     <unknown>
replicasets wide=true all=false
NAME   DESIRED   CURRENT   READY   MIN   MAX   AGE         IMAGE   PORTS
web    3         2         1       1     4     <unknown>   httpd   http:8080
db     0         0         0       -     -     <unknown>   pg      <none>
replicasets wide=false all=true
NAMESPACE   NAME   DESIRED   CURRENT   READY   MIN   MAX   AGE
prod        web    3         2         1       1     4     <unknown>
default     db     0         0         0       -     -     <unknown>
replicasets wide=true all=true
NAMESPACE   NAME   DESIRED   CURRENT   READY   MIN   MAX   AGE         IMAGE   PORTS
prod        web    3         2         1       1     4     <unknown>   httpd   http:8080
default     db     0         0         0       -     -     <unknown>   pg      <none>
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
}
