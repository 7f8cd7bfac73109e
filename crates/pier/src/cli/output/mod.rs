//! How the CLI shows objects: tables for people (`table`: every kind's
//! columns), JSON and YAML for scripts, the cells and one-line summaries
//! (here), and what an apply did (`apps`). Pure formatting and printing: it
//! calls no command and no API.

mod apps;
mod table;

use anyhow::{Context, Result};
use pier_model::{Service, ServiceType, now_ms};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::args::usage;

pub(super) use apps::{apps_table, print_app_plan};
pub(super) use table::{fixed_row, print_section, render_table, table_rows};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
}

impl Format {
    pub(super) fn parse(s: &str) -> Result<Format> {
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

/// ` -n NS` for a command a user is told to type next, empty for the
/// default namespace.
pub(super) fn ns_flag(ns: &pier_model::Namespace) -> String {
    if *ns == pier_model::Namespace::default() {
        String::new()
    } else {
        format!(" -n {ns}")
    }
}

/// kubectl's AGE: `45s`, `12m`, `3h`, `4d`.
pub(super) fn age(ms: u64) -> String {
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

pub(super) fn dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "<none>".into())
}

pub(super) fn svc_ports(svc: &Service) -> String {
    svc.ports
        .iter()
        .map(|p| match p.node_port {
            Some(np) => format!("{}:{np}/{}", p.port, upper(p.protocol)),
            None => format!("{}/{}", p.port, upper(p.protocol)),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `TCP` or `UDP`, as kubectl prints them.
pub(in crate::cli) fn upper(p: pier_model::Protocol) -> &'static str {
    match p {
        pier_model::Protocol::Tcp => "TCP",
        pier_model::Protocol::Udp => "UDP",
    }
}

/// `/udp` after a UDP port number; nothing after a TCP one.
fn udp_suffix(p: pier_model::Protocol) -> &'static str {
    if p.is_tcp() { "" } else { "/udp" }
}

pub(super) fn labels_str(l: &pier_model::Labels) -> String {
    or_none(
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// `<none>` for an empty cell.
pub(super) fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

pub(super) fn ready_str(ready: bool) -> String {
    if ready { "Ready" } else { "NotReady" }.into()
}

pub(super) fn mesh_port_str(port: u16) -> String {
    if port == 0 {
        "<off>".into()
    } else {
        port.to_string()
    }
}

pub(super) fn svc_type_str(t: ServiceType) -> String {
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
    }
    .into()
}

pub(super) fn to_values<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<Value> {
    items
        .into_iter()
        .map(|v| serde_json::to_value(v).expect("API objects serialize to JSON"))
        .collect()
}

pub(super) fn typed<T: DeserializeOwned>(v: &Value) -> Result<T> {
    serde_json::from_value(v.clone())
        .context("the agent's answer does not have the expected fields")
}

/// `VIP 10.213.0.5, port 80 -> 8080`, as `expose` and `create` print it.
pub(super) fn describe_vip_and_ports(svc: &Service) -> String {
    match svc.vip {
        Some(vip) => match svc.vip6 {
            Some(v6) => format!("VIP {vip} and {v6}, {}", describe_service_ports(svc)),
            None => format!("VIP {vip}, {}", describe_service_ports(svc)),
        },
        // A headless service's name answers with its pods' endpoint VIPs.
        None if svc.headless => format!(
            "headless (no VIP; its name resolves to each ready pod), {}",
            describe_service_ports(svc)
        ),
        None => format!("VIP none, {}", describe_service_ports(svc)),
    }
}

pub(super) fn describe_service_ports(svc: &Service) -> String {
    svc.ports
        .iter()
        .map(|p| match p.node_port {
            Some(np) => format!(
                "port {}{} -> {} (node port {np})",
                p.port,
                udp_suffix(p.protocol),
                p.target_port
            ),
            None => format!(
                "port {}{} -> {}",
                p.port,
                udp_suffix(p.protocol),
                p.target_port
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
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
