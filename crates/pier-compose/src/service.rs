//! Mapping the merged file onto an application: the project name, and each
//! Compose service onto a replica set (and a service when it has ports):
//! image, command, environment, env files, networks.

use std::collections::{BTreeMap, BTreeSet};

use crate::deploy::{Deploy, deploy, healthcheck};
use crate::keys::{Support, service_key};
use crate::ports::ports;
use crate::util;
use crate::xpier::{placement, x_pier};
use crate::{Ctx, Options, Source, key_str, scalar};
use pier_model::app::{AppSpec, ComponentSpec};
use pier_model::{
    ContainerPort, Labels, Name, Namespace, PodTemplate, ReplicaSet, Replicas, Service,
    ServiceType, labels,
};
use serde_yaml_ng::{Mapping, Value};

pub(crate) fn build(
    top: &Mapping,
    sources: &[Source],
    opts: &Options,
    read_file: &dyn Fn(&str) -> Result<String, String>,
    cx: &mut Ctx,
) -> Option<AppSpec> {
    for (k, v) in top {
        let key = key_str(k);
        match key.as_str() {
            "services" | "name" => {}
            "version" => {}
            "networks" => {
                if let Value::Mapping(m) = v {
                    for (n, _) in m {
                        let n = key_str(n);
                        if n != "default" {
                            cx.warn(
                                format!("networks.{n}"),
                                "pier makes no per-application networks: every service reaches the others by name through pier's VIPs, and services of other projects can reach them by VIP too",
                            );
                        }
                    }
                }
            }
            "volumes" | "secrets" | "configs" => cx.warn(
                &key,
                "pier mounts no volumes, secrets or configs; a service that uses one is refused",
            ),
            k if k.starts_with("x-") => {}
            _ => cx.err(
                &key,
                "not a top-level Compose key (services, name, networks, volumes, secrets, configs, x-…)",
            ),
        }
    }
    let ns = project_name(top, opts, cx)?;
    let Some(services) = top.get("services") else {
        cx.err(
            sources.first().map(|s| s.name.as_str()).unwrap_or("-"),
            "no services: key; a Compose file lists its services under services:",
        );
        return None;
    };
    let Value::Mapping(services) = services else {
        cx.err("services", "must be a mapping of service names to services");
        return None;
    };
    if services.is_empty() {
        cx.err("services", "is empty; an application needs a service");
        return None;
    }
    let names: BTreeSet<String> = services.keys().map(key_str).collect();
    let mut components = Vec::new();
    for (k, v) in services {
        let raw = key_str(k);
        let path = format!("services.{raw}");
        let name = match Name::new(&raw) {
            Ok(n) => n,
            Err(e) => {
                cx.err(
                    &path,
                    format!("{e}; pier reaches a service by its name in DNS, so rename it"),
                );
                continue;
            }
        };
        let Value::Mapping(svc) = v else {
            cx.err(&path, "must be a mapping");
            continue;
        };
        if let Some(c) = service(&name, &ns, svc, &path, &names, read_file, opts, cx) {
            components.push(c);
        }
    }
    let files = sources.iter().map(|s| s.name.clone()).collect();
    Some(AppSpec {
        name: Name::new(ns.as_str()).expect("a namespace is a valid name"),
        namespace: ns,
        files,
        components,
        expect_revision: None,
    })
}

/// `-p`, then `name:`, then the directory, normalised as Compose does
/// (lower case; only `a-z0-9_-` kept). pier needs an RFC 1123 label.
pub(crate) fn project_name(top: &Mapping, opts: &Options, cx: &mut Ctx) -> Option<Namespace> {
    let (raw, from) = if let Some(p) = &opts.project {
        (p.clone(), "-p")
    } else if let Some(n) = top.get("name") {
        match scalar(n) {
            Some(s) => (s, "name"),
            None => {
                cx.err("name", "must be a string");
                return None;
            }
        }
    } else if let Some(d) = &opts.dir_name {
        let norm: String = d
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-')
            .collect();
        (norm, "the directory name")
    } else {
        cx.err(
            "-p",
            "no project name: pass -p NAME or set name: in the file",
        );
        return None;
    };
    match Namespace::new(&raw) {
        Ok(ns) => Some(ns),
        Err(e) => {
            cx.err(
                from,
                format!(
                    "project name from {from}: {e}; it becomes the namespace, so pass -p NAME with lower-case letters, digits and '-'"
                ),
            );
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn service(
    name: &Name,
    ns: &Namespace,
    svc: &Mapping,
    path: &str,
    all: &BTreeSet<String>,
    read_file: &dyn Fn(&str) -> Result<String, String>,
    opts: &Options,
    cx: &mut Ctx,
) -> Option<ComponentSpec> {
    let errs_before = cx.errors.len();
    for (k, _) in svc {
        let key = key_str(k);
        let p = format!("{path}.{key}");
        match service_key(&key) {
            Some(Support::Read | Support::Quiet) => {}
            Some(Support::Warn(why)) => cx.warn(p, format!("ignored: {why}")),
            Some(Support::Error(why)) => cx.err(p, format!("not supported: {why}")),
            None if key.starts_with("x-") => {}
            None => cx.err(p, "not a Compose service key"),
        }
    }
    let get = |k: &str| svc.get(k);
    let image = match get("image").map(|v| (v, scalar(v))) {
        Some((_, Some(s))) if !s.trim().is_empty() => s,
        Some(_) => {
            cx.err(format!("{path}.image"), "must be an image name");
            String::new()
        }
        None => {
            if get("build").is_some() {
                cx.err(
                    format!("{path}.build"),
                    "pier runs images and does not build them: build the image (docker build -t NAME .), load it on every host, and set image: NAME",
                );
            } else {
                cx.err(path, "has no image:");
            }
            String::new()
        }
    };
    if get("image").is_some() && get("build").is_some() {
        cx.warn(
            format!("{path}.build"),
            format!(
                "ignored: pier runs the image {image:?}; build it and load it on every host first"
            ),
        );
    }
    if let Some(r) = get("restart") {
        match scalar(r).as_deref() {
            Some("always" | "unless-stopped") => {}
            Some("on-failure") => cx.warn(
                format!("{path}.restart"),
                "pier restarts a pod whatever its exit status",
            ),
            _ => cx.err(
                format!("{path}.restart"),
                "pier keeps every pod running and restarts it when it exits; a one-shot container does not fit a replica set",
            ),
        }
    }
    if let Some(n) = get("networks") {
        networks(n, &format!("{path}.networks"), cx);
    }
    let cmd = command(get("command"), &format!("{path}.command"), cx);
    let entrypoint = command(get("entrypoint"), &format!("{path}.entrypoint"), cx);
    let mut env = BTreeMap::new();
    if let Some(v) = get("env_file") {
        env_files(
            v,
            &format!("{path}.env_file"),
            read_file,
            opts,
            &mut env,
            cx,
        );
    }
    if let Some(v) = get("environment") {
        let p = format!("{path}.environment");
        string_map(v, &p, cx, |k, val| match val {
            Some(val) => {
                env.insert(k, val);
            }
            // A bare KEY takes the value of the caller's environment.
            None => {
                if let Some(val) = opts.env.get(&k) {
                    env.insert(k, val.clone());
                }
            }
        });
    }
    for k in env.keys() {
        if k.is_empty() || k.contains('\0') {
            cx.err(
                format!("{path}.environment"),
                format!("{k:?} is not a variable name"),
            );
        }
    }
    let mut tlabels = Labels::new();
    if let Some(v) = get("labels") {
        let p = format!("{path}.labels");
        string_map(v, &p, cx, |k, val| {
            tlabels.insert(k, val.unwrap_or_default());
        });
        for k in tlabels.keys() {
            if k.starts_with("pier.") {
                cx.err(
                    format!("{p}.{k}"),
                    "labels starting with pier. are pier's own; choose another prefix",
                );
            }
        }
    }
    let ports = ports(get("ports"), get("expose"), path, cx);
    let (container_health, health) =
        healthcheck(get("healthcheck"), &format!("{path}.healthcheck"), cx);
    let mut replicas = 1u32;
    if let Some(s) = get("scale") {
        match s.as_u64() {
            Some(n) => replicas = n as u32,
            None => cx.err(format!("{path}.scale"), "must be a number"),
        }
    }
    let mut d = Deploy::default();
    if let Some(v) = get("deploy") {
        deploy(v, &format!("{path}.deploy"), &mut d, cx);
    }
    if let Some(r) = d.replicas {
        replicas = r;
    }
    let replicas = match Replicas::new(replicas) {
        Ok(r) => r,
        Err(e) => {
            cx.err(format!("{path}.deploy.replicas"), e.to_string());
            Replicas::new(1).expect("1 is valid")
        }
    };
    let x = get("x-pier")
        .map(|v| x_pier(v, &format!("{path}.x-pier"), all, cx))
        .unwrap_or_default();
    let placement = placement(name, &d, &x, path, cx);
    if cx.errors.len() > errs_before {
        return None;
    }
    let template = PodTemplate {
        image,
        cmd,
        env,
        ports: ports
            .iter()
            .map(|p| ContainerPort {
                name: p.name.clone(),
                port: p.target_port,
                protocol: p.protocol,
            })
            .collect(),
        labels: tlabels,
        resources: d.resources,
        health,
        entrypoint,
        container_health,
    };
    let replicaset = ReplicaSet {
        name: name.clone(),
        namespace: ns.clone(),
        template,
        replicas,
        placement,
        min_replicas: x.min_replicas,
        max_replicas: x.max_replicas,
        sla: x.sla.clone(),
        created_at: 0,
        update_config: d.update,
        rollback_config: d.rollback,
        revision: 0,
        history: vec![],
    };
    if x.headless && ports.iter().any(|p| p.node_port.is_some()) {
        cx.err(
            format!("{path}.x-pier.headless"),
            "a headless service has no proxy, so no published ports; remove ports: (keep expose:), or leave headless off",
        );
    }
    let service = if ports.is_empty() {
        cx.warn(
            path,
            "has neither ports nor expose: it runs, but pier cannot tell which port to give its name; list its ports under expose: to reach it by name",
        );
        None
    } else {
        let mut selector = Labels::new();
        selector.insert(labels::REPLICASET.into(), name.to_string());
        Some(Service {
            name: name.clone(),
            namespace: ns.clone(),
            vip: None,
            vip6: None,
            headless: x.headless,
            external_name: None,
            service_type: if ports.iter().any(|p| p.node_port.is_some()) {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIP
            },
            ports,
            selector,
            static_endpoints: vec![],
            lb: x.lb.unwrap_or_default(),
            proxy_protocol: x.proxy_protocol,
            prefer_local: x.prefer_local,
            accept_labelled: false,
            drain_timeout_ms: None,
            health: None,
            sla: None,
            session_affinity: x.session_affinity,
            created_at: 0,
        })
    };
    Some(ComponentSpec {
        name: name.clone(),
        replicaset,
        service,
        labels: d.labels,
    })
}

pub(crate) fn networks(v: &Value, path: &str, cx: &mut Ctx) {
    let names: Vec<(String, Option<&Value>)> = match v {
        Value::Sequence(s) => s
            .iter()
            .map(|n| (scalar(n).unwrap_or_default(), None))
            .collect(),
        Value::Mapping(m) => m.iter().map(|(k, v)| (key_str(k), Some(v))).collect(),
        _ => {
            cx.err(path, "must be a list or a mapping of networks");
            return;
        }
    };
    for (n, settings) in names {
        if let Some(Value::Mapping(s)) = settings {
            for (k, _) in s {
                let k = key_str(k);
                match k.as_str() {
                    "aliases" => cx.err(
                        format!("{path}.{n}.aliases"),
                        "not supported: a service has one name in pier, its Compose name; rename the service or add one that forwards",
                    ),
                    "ipv4_address" | "ipv6_address" | "link_local_ips" | "mac_address" => cx.err(
                        format!("{path}.{n}.{k}"),
                        "not supported: pods get their addresses from Docker; reach them by name",
                    ),
                    _ => cx.warn(format!("{path}.{n}.{k}"), "ignored"),
                }
            }
        }
        if n != "default" {
            cx.warn(
                format!("{path}.{n}"),
                "ignored: pier makes no per-application networks; the service reaches the others by name through pier's VIPs",
            );
        }
    }
}

pub(crate) fn command(v: Option<&Value>, path: &str, cx: &mut Ctx) -> Vec<String> {
    match v {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => util::shell_split(s).unwrap_or_else(|e| {
            cx.err(path, e);
            vec![]
        }),
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| {
                let s = scalar(it);
                if s.is_none() {
                    cx.err(format!("{path}[{i}]"), "must be a string");
                }
                s
            })
            .collect(),
        Some(_) => {
            cx.err(path, "must be a string or a list of strings");
            vec![]
        }
    }
}

/// A mapping (lists were made mappings by `normalize`) of scalar values;
/// a null value is passed as `None`.
pub(crate) fn string_map(
    v: &Value,
    path: &str,
    cx: &mut Ctx,
    mut f: impl FnMut(String, Option<String>),
) {
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping or a list of KEY=VALUE");
        return;
    };
    for (k, val) in m {
        let k = key_str(k);
        match val {
            Value::Null => f(k, None),
            v => match scalar(v) {
                Some(s) => f(k, Some(s)),
                None => cx.err(format!("{path}.{k}"), "must be a string, number or boolean"),
            },
        }
    }
}

pub(crate) fn env_files(
    v: &Value,
    path: &str,
    read_file: &dyn Fn(&str) -> Result<String, String>,
    opts: &Options,
    env: &mut BTreeMap<String, String>,
    cx: &mut Ctx,
) {
    let items: Vec<Value> = match v {
        Value::Sequence(s) => s.clone(),
        other => vec![other.clone()],
    };
    for (i, it) in items.iter().enumerate() {
        let p = if matches!(v, Value::Sequence(_)) {
            format!("{path}[{i}]")
        } else {
            path.to_owned()
        };
        let (file, required) = match it {
            Value::Mapping(m) => (
                m.get("path").and_then(scalar),
                m.get("required").and_then(Value::as_bool).unwrap_or(true),
            ),
            other => (scalar(other), true),
        };
        let Some(file) = file else {
            cx.err(p, "must be a file path, or path: and required:");
            continue;
        };
        match read_file(&file) {
            Ok(text) => {
                let look = |k: &str| opts.env.get(k).cloned();
                match util::env_file(&text, &look) {
                    Ok(kv) => env.extend(kv),
                    Err(e) => cx.err(p, format!("{file}: {e}")),
                }
            }
            Err(_) if !required => {}
            Err(e) => cx.err(p, format!("cannot read {file}: {e}")),
        }
    }
}
