//! `ports:` in its short (`"8080:80/udp"`) and long forms, onto the
//! service's ports and the containers' ports.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Ctx, key_str, scalar};
use pier_model::{PortNum, Protocol, ServicePort};
use serde_yaml_ng::Value;

pub(crate) fn port_num(s: &str, path: &str, cx: &mut Ctx) -> Option<u16> {
    match s.trim().parse::<u16>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            cx.err(path, format!("{s:?} is not a port (1-65535)"));
            None
        }
    }
}

/// `"80"`, `"8000-8002"` → the list of ports.
pub(crate) fn port_range(s: &str, path: &str, cx: &mut Ctx) -> Option<Vec<u16>> {
    match s.split_once('-') {
        None => port_num(s, path, cx).map(|p| vec![p]),
        Some((a, b)) => {
            let (a, b) = (port_num(a, path, cx)?, port_num(b, path, cx)?);
            if a > b || b - a > 100 {
                cx.err(path, format!("{s:?} is not a range of at most 100 ports"));
                return None;
            }
            Some((a..=b).collect())
        }
    }
}

pub(crate) struct PortSpec {
    pub(crate) target: u16,
    pub(crate) published: Option<u16>,
    pub(crate) protocol: Protocol,
}

/// A port's protocol as Compose spells it: `tcp` (the default) or `udp`.
pub(crate) fn protocol(proto: &str, path: &str, cx: &mut Ctx) -> Option<Protocol> {
    match proto {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => {
            cx.err(
                path,
                format!("protocol {proto}: pier proxies tcp and udp only"),
            );
            None
        }
    }
}

pub(crate) fn ports(
    ports: Option<&Value>,
    expose: Option<&Value>,
    path: &str,
    cx: &mut Ctx,
) -> Vec<ServicePort> {
    let mut specs: Vec<(String, PortSpec)> = Vec::new();
    if let Some(v) = ports {
        let p = format!("{path}.ports");
        match v {
            Value::Sequence(items) => {
                for (i, it) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    for s in port_entry(it, &ip, cx) {
                        specs.push((ip.clone(), s));
                    }
                }
            }
            _ => cx.err(p, "must be a list"),
        }
    }
    if let Some(v) = expose {
        let p = format!("{path}.expose");
        match v {
            Value::Sequence(items) => {
                for (i, it) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    let Some(s) = scalar(it) else {
                        cx.err(ip, "must be a port");
                        continue;
                    };
                    let (s, proto) = match s.split_once('/') {
                        Some((n, proto)) => match protocol(proto, &ip, cx) {
                            Some(proto) => (n.to_owned(), proto),
                            None => continue,
                        },
                        None => (s, Protocol::Tcp),
                    };
                    for target in port_range(&s, &ip, cx).unwrap_or_default() {
                        specs.push((
                            ip.clone(),
                            PortSpec {
                                target,
                                published: None,
                                protocol: proto,
                            },
                        ));
                    }
                }
            }
            _ => cx.err(p, "must be a list"),
        }
    }
    // One service port per container port and protocol; a published one
    // wins. TCP and UDP may share a number.
    let mut by_target: BTreeMap<(u16, Protocol), (String, Option<u16>)> = BTreeMap::new();
    let mut order = Vec::new();
    for (p, s) in specs {
        match by_target.get_mut(&(s.target, s.protocol)) {
            None => {
                order.push((s.target, s.protocol));
                by_target.insert((s.target, s.protocol), (p, s.published));
            }
            Some((_, pub_)) => match (*pub_, s.published) {
                (Some(a), Some(b)) if a != b => cx.err(
                    p,
                    format!(
                        "container port {} is published twice ({a} and {b}); pier gives a port one node port",
                        s.target
                    ),
                ),
                (None, Some(b)) => *pub_ = Some(b),
                _ => {}
            },
        }
    }
    let mut seen_published = BTreeSet::new();
    let mut out = Vec::new();
    for (t, proto) in order {
        let (p, published) = &by_target[&(t, proto)];
        if let Some(n) = published
            && !seen_published.insert((*n, proto))
        {
            cx.err(
                p.clone(),
                format!("host port {n}/{} is published twice", proto.as_str()),
            );
        }
        let Ok(port) = PortNum::new(t) else {
            continue;
        };
        out.push(ServicePort {
            name: proto.default_port_name(port),
            port,
            target_port: port,
            node_port: published.and_then(|n| PortNum::new(n).ok()),
            protocol: proto,
        });
    }
    out
}

pub(crate) fn port_entry(v: &Value, path: &str, cx: &mut Ctx) -> Vec<PortSpec> {
    if let Value::Mapping(m) = v {
        // Long syntax.
        for (k, _) in m {
            let k = key_str(k);
            if !matches!(
                k.as_str(),
                "target" | "published" | "protocol" | "mode" | "host_ip" | "name" | "app_protocol"
            ) {
                cx.err(format!("{path}.{k}"), "not a key of a port");
            }
        }
        let proto = match m.get("protocol").and_then(scalar) {
            None => Protocol::Tcp,
            Some(proto) => match protocol(&proto, &format!("{path}.protocol"), cx) {
                Some(proto) => proto,
                None => return vec![],
            },
        };
        if let Some(ip) = m.get("host_ip").and_then(scalar) {
            host_ip(&ip, path, cx);
            return vec![];
        }
        if let Some(mode) = m.get("mode").and_then(scalar)
            && mode == "host"
        {
            cx.warn(
                format!("{path}.mode"),
                "host mode: pier publishes through a node port on every node, as ingress mode does",
            );
        }
        let Some(target) = m.get("target").and_then(scalar) else {
            cx.err(path, "needs target: (the container port)");
            return vec![];
        };
        let Some(target) = port_num(&target, &format!("{path}.target"), cx) else {
            return vec![];
        };
        let published = match m.get("published").and_then(scalar) {
            None => None,
            Some(s) => match port_num(&s, &format!("{path}.published"), cx) {
                Some(n) => Some(n),
                None => return vec![],
            },
        };
        return vec![PortSpec {
            target,
            published,
            protocol: proto,
        }];
    }
    let Some(s) = scalar(v) else {
        cx.err(path, "must be \"HOST:CONTAINER\" or a mapping with target:");
        return vec![];
    };
    let (s, proto) = match s.rsplit_once('/') {
        Some((a, p)) => match protocol(p, path, cx) {
            Some(proto) => (a.to_owned(), proto),
            None => return vec![],
        },
        None => (s.clone(), Protocol::Tcp),
    };
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    let (target, published) = match parts.as_slice() {
        [t] => (*t, None),
        [t, p] => (*t, Some(*p)),
        [_, _, ip] => {
            host_ip(ip, path, cx);
            return vec![];
        }
        _ => unreachable!("rsplitn(3) yields 1 to 3 parts"),
    };
    let Some(targets) = port_range(target, path, cx) else {
        return vec![];
    };
    match published.filter(|p| !p.is_empty()) {
        None => targets
            .into_iter()
            .map(|target| PortSpec {
                target,
                published: None,
                protocol: proto,
            })
            .collect(),
        Some(p) => {
            let Some(pubs) = port_range(p, path, cx) else {
                return vec![];
            };
            if pubs.len() != targets.len() {
                cx.err(
                    path,
                    format!("{s:?}: the host and container ranges differ in length"),
                );
                return vec![];
            }
            targets
                .into_iter()
                .zip(pubs)
                .map(|(target, p)| PortSpec {
                    target,
                    published: Some(p),
                    protocol: proto,
                })
                .collect()
        }
    }
}

pub(crate) fn host_ip(ip: &str, path: &str, cx: &mut Ctx) {
    cx.err(
        path,
        format!(
            "host address {ip}: pier publishes a port as a node port on every node's address, which would expose more than {ip}; leave the address out, or use expose: to keep it inside the application"
        ),
    );
}
