//! `pier describe`: one object in detail, with its pods, endpoints and
//! problems.

use anyhow::Result;
use pier_model::api::Resource;

use super::args::{NamespaceArg, client, name_arg, resource_arg, usage};
use super::output::{
    age, dash, labels_str, mesh_port_str, or_none, print_section, ready_str, svc_type_str,
    to_values,
};

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// node, rs, pod or svc.
    pub(super) kind: String,
    pub(super) name: String,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

pub(super) async fn run(server: &str, a: DescribeArgs) -> Result<()> {
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
    let mut line = |k: &str, v: String| {
        // An empty key continues the previous line's list.
        let k = if k.is_empty() {
            String::new()
        } else {
            format!("{k}:")
        };
        out.push_str(&format!("{k:<16}{v}\n"))
    };
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
            if let Some(since) = n.runtime_down_since {
                line(
                    "Runtime",
                    format!(
                        "dockerd unreachable for {}; no new pod is placed here, and pods still pending here move after {}s",
                        age(since),
                        pier_model::Node::RUNTIME_DOWN_GRACE_MS / 1000
                    ),
                );
            }
            let pods = to_values(
                c.list_pods(None)
                    .await?
                    .into_iter()
                    .filter(|p| p.node == name),
            );
            out!("{out}");
            print_section("Pods", Resource::Pods, &pods, true)?;
            print_refused(n.refused.iter().map(|r| (n.name.as_str(), r)));
        }
        Resource::ReplicaSets => {
            let rs = c.get_replicaset(&ns, &name).await?;
            line("Name", rs.spec.name.to_string());
            line("Namespace", rs.spec.namespace.to_string());
            line("Image", rs.spec.template.image.clone());
            line(
                "Command",
                if rs.spec.template.cmd.is_empty() {
                    "<image default>".into()
                } else {
                    rs.spec.template.cmd.join(" ")
                },
            );
            line(
                "Ports",
                if rs.spec.template.ports.is_empty() {
                    "<none>".into()
                } else {
                    rs.spec
                        .template
                        .ports
                        .iter()
                        .map(|p| pier_model::PortSpec::from(p).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            );
            line("Env", labels_str(&rs.spec.template.env));
            line("Labels", labels_str(&rs.spec.template.labels));
            line(
                "Replicas",
                format!(
                    "{} desired, {} current, {} ready",
                    rs.spec.replicas, rs.current, rs.ready
                ),
            );
            let pending = (rs.spec.replicas.get()).saturating_sub(rs.current);
            if pending > 0 {
                line(
                    "Pending",
                    format!("{pending} not placed (the problems below say why)"),
                );
            }
            line(
                "Node selector",
                labels_str(&rs.spec.placement.node_selector),
            );
            let pl = &rs.spec.placement;
            let mut rules: Vec<String> = pl.constraints.iter().map(|c| c.to_string()).collect();
            if let Some(m) = pl.max_per_node {
                rules.push(format!("max_per_node={m}"));
            }
            if !pl.anti_affinity.is_empty() {
                rules.push(format!("anti_affinity={}", join(&pl.anti_affinity)));
            }
            if !pl.affinity.is_empty() {
                rules.push(format!("affinity={}", join(&pl.affinity)));
            }
            if let Some(k) = &pl.spread_by {
                rules.push(format!("spread_by={k}"));
            }
            line("Placement", or_none(rules.join(", ")));
            let u = &rs.spec.update_config;
            line(
                "Update",
                format!(
                    "parallelism {}, {}, on failure {}, monitor {}ms, delay {}ms, ready timeout {}ms",
                    u.parallelism,
                    u.order,
                    u.failure_action,
                    u.monitor_ms,
                    u.delay_ms,
                    u.ready_timeout_ms
                ),
            );
            line(
                "Revision",
                format!(
                    "{} ({} pods on it, {} ready)",
                    rs.spec.revision, rs.updated, rs.updated_ready
                ),
            );
            if let Some(r) = &rs.rollout {
                let mut v = format!("{} (revision {}", r.state, r.revision);
                if r.target != r.revision {
                    v.push_str(&format!(", pods on revision {}", r.target));
                }
                v.push(')');
                if !r.message.is_empty() {
                    v.push_str(&format!(": {}", r.message));
                }
                line("Rollout", v);
            }
            line("Age", age(rs.spec.created_at));
            if rs.spec.sla.as_ref().is_some_and(|s| s.has_target()) {
                let v = c.get_autoscale(&ns, &name).await?;
                for (k, val) in autoscale_lines(&v) {
                    line(k, val);
                }
            }
            let pods = to_values(
                c.list_pods(Some(&ns))
                    .await?
                    .into_iter()
                    .filter(|p| p.replicaset == name),
            );
            out!("{out}");
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
            out!("{out}");
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
            if let Some(v6) = s.vip6 {
                line("VIP6", v6.to_string());
            }
            for p in &s.ports {
                line(
                    "Port",
                    format!(
                        "{} {}/{} -> {}{}",
                        p.name,
                        p.port,
                        super::output::upper(p.protocol),
                        p.target_port,
                        p.node_port
                            .map(|n| format!(", node port {n}"))
                            .unwrap_or_default()
                    ),
                );
            }
            line("Selector", labels_str(&s.selector));
            if let Some(a) = &s.session_affinity {
                line(
                    "Affinity",
                    format!("ClientIP, {} s idle timeout", a.timeout_s),
                );
            }
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
            out!("{out}");
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
        outln!("Refused containers:\n{}", lines.join("\n"));
    }
}

fn print_problems(problems: &[String]) {
    if problems.is_empty() {
        return;
    }
    outln!("Problems:");
    for p in problems {
        outln!("  {p}");
    }
}

/// The autoscaling part of `describe rs`: bounds, each target against
/// what is measured now, and the last decisions with their reasons.
fn autoscale_lines(v: &pier_model::api::AutoscaleView) -> Vec<(&'static str, String)> {
    let Some(sla) = &v.sla else { return vec![] };
    let m = &v.measured;
    let per = |x: f64| {
        if v.ready == 0 {
            "no ready pod".to_string()
        } else {
            format!("{:.1} per ready pod", x / v.ready as f64)
        }
    };
    let mut out = vec![(
        "Autoscale",
        format!(
            "min {}, max {}; scale-down delay {} s, scale-up delay {} s, max step {}, tolerance {}%",
            dash(v.min),
            dash(v.max),
            sla.scale_down_window_ms / 1000,
            sla.scale_up_window_ms / 1000,
            if sla.max_step == 0 {
                "none".to_string()
            } else {
                sla.max_step.to_string()
            },
            sla.tolerance_pct
        ),
    )];
    if let Some(t) = sla.max_active_per_pod {
        out.push((
            "  Open conns",
            format!(
                "{} ({}), target {t} per pod",
                m.active,
                per(m.active as f64)
            ),
        ));
    }
    if let Some(t) = sla.max_conn_rate_per_pod {
        out.push((
            "  New conns/s",
            format!(
                "{:.1} ({}), target {t} per pod",
                m.conn_rate,
                per(m.conn_rate)
            ),
        ));
    }
    if let Some(t) = sla.p99_first_byte_ms {
        out.push((
            "  p99 1st byte",
            match m.p99_first_byte_us {
                Some(us) => format!(
                    "{:.1} ms over {} samples, target {t} ms",
                    us as f64 / 1000.0,
                    m.first_byte_samples
                ),
                None => format!("no samples in the last window, target {t} ms"),
            },
        ));
    }
    let svcs: Vec<&str> = v.services.iter().map(|s| s.as_str()).collect();
    out.push((
        "  Measured on",
        if svcs.is_empty() {
            "no service selects the pods: expose the set (`pier expose rs`) to measure it".into()
        } else {
            let mut s = format!(
                "service {} on {} node{}",
                svcs.join(", "),
                m.nodes,
                if m.nodes == 1 { "" } else { "s" }
            );
            if !m.stale_nodes.is_empty() {
                let names: Vec<&str> = m.stale_nodes.iter().map(|n| n.as_str()).collect();
                s.push_str(&format!(" (stale: {})", names.join(", ")));
            }
            s
        },
    ));
    if v.status.decisions.is_empty() {
        out.push(("Decisions", "<none>".into()));
    } else {
        out.push((
            "Decisions",
            format!(
                "{} in all; the last {}:",
                v.status.total,
                v.status.decisions.len()
            ),
        ));
        for d in v.status.decisions.iter().rev() {
            out.push(("", format!("{} ago  {}", age(d.at), d.reason)));
        }
    }
    out
}

fn join(v: &[pier_model::Name]) -> String {
    v.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(",")
}
