//! Compose files → pier applications.
//!
//! [`load`] reads one or more Compose files (merged in order, as
//! `docker compose -f a -f b` does), interpolates `${VARS}`, picks the
//! project name, and maps every Compose service onto a pier replica set and
//! (when it has ports) a service of the same name, in the project's
//! namespace: an [`AppSpec`] for the API's apply. Every problem names the
//! key's path (`services.web.ports[1]`). Keys pier cannot honour are errors
//! where running without them would change what the application does, and
//! warnings where it would not; the table is [`service_key`] and README's
//! "Applications" section.
//!
//! It is pure: no network, no store, no files but those read through the
//! `read_file` callback the caller hands in (for `env_file`).

mod interp;
pub mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use pier_model::app::{AppSpec, ComponentSpec};
use pier_model::{
    AffinityKind, Constraint, ContainerHealth, ContainerPort, FailureAction, HealthCheck,
    HealthKind, Labels, LbPolicy, Name, Namespace, Placement, PodTemplate, PortNum, Protocol,
    Ratio, ReplicaSet, Replicas, Resources, Service, ServicePort, ServiceType, SessionAffinity,
    Sla, UpdateConfig, UpdateOrder, labels,
};
use serde_yaml_ng::{Mapping, Value};

/// One Compose file's text.
#[derive(Debug, Clone)]
pub struct Source {
    /// Shown in messages: the path as given, or `-` for stdin.
    pub name: String,
    pub text: String,
}

/// What the caller knows besides the files.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-p NAME`.
    pub project: Option<String>,
    /// The base name of the project directory (the first file's
    /// directory), the last resort for the project name.
    pub dir_name: Option<String>,
    /// Variables for interpolation: the environment, over the project
    /// directory's `.env`.
    pub env: BTreeMap<String, String>,
}

/// A message about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diag {
    /// `services.web.ports[0]`, or the file name for a file-level problem.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The result of a load that worked.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub spec: AppSpec,
    pub warnings: Vec<Diag>,
}

/// A load that did not: every error found, and the warnings.
#[derive(Debug, Clone)]
pub struct Failed {
    pub errors: Vec<Diag>,
    pub warnings: Vec<Diag>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failed {}

#[derive(Default)]
struct Ctx {
    errors: Vec<Diag>,
    warnings: Vec<Diag>,
}

impl Ctx {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Diag {
            path: path.into(),
            message: message.into(),
        });
    }
    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Diag {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Read, merge and map Compose files onto an application.
pub fn load(
    sources: &[Source],
    opts: &Options,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Loaded, Failed> {
    let mut cx = Ctx::default();
    let merged = merge_sources(sources, opts, &mut cx);
    let spec = merged.and_then(|m| build(&m, sources, opts, read_file, &mut cx));
    match spec {
        Some(spec) if cx.errors.is_empty() => Ok(Loaded {
            spec,
            warnings: cx.warnings,
        }),
        _ => Err(Failed {
            errors: cx.errors,
            warnings: cx.warnings,
        }),
    }
}

fn merge_sources(sources: &[Source], opts: &Options, cx: &mut Ctx) -> Option<Mapping> {
    if sources.is_empty() {
        cx.err("-f", "no Compose file given");
        return None;
    }
    let mut merged: Option<Mapping> = None;
    for src in sources {
        let v: Value = match serde_yaml_ng::from_str(&src.text) {
            Ok(v) => v,
            Err(e) => {
                cx.err(&src.name, format!("not valid YAML: {e}"));
                continue;
            }
        };
        let Value::Mapping(mut m) = v else {
            cx.err(
                &src.name,
                "a Compose file is a mapping with a services: key at the top",
            );
            continue;
        };
        let mut notes = interp::Notes::default();
        for (k, v) in m.iter_mut() {
            let key = key_str(k);
            // x- keys hold YAML anchors' sources and tools' settings;
            // Compose interpolates them too, but they are not ours.
            if !key.starts_with("x-") {
                interp_value(v, &key, &opts.env, &mut notes, cx);
            }
        }
        for name in dedup(notes.unset) {
            cx.warn(
                &src.name,
                format!("variable {name} is not set; it is replaced by an empty string"),
            );
        }
        normalize(&mut m, cx);
        merged = Some(match merged {
            None => m,
            Some(base) => merge_map(base, m, ""),
        });
    }
    merged
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    v.into_iter().filter(|s| seen.insert(s.clone())).collect()
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn interp_value(
    v: &mut Value,
    path: &str,
    env: &BTreeMap<String, String>,
    notes: &mut interp::Notes,
    cx: &mut Ctx,
) {
    match v {
        Value::String(s) => match interp::interpolate(s, env, notes) {
            Ok(n) => *s = n,
            Err(e) => cx.err(path, e),
        },
        Value::Sequence(items) => {
            for (i, it) in items.iter_mut().enumerate() {
                interp_value(it, &format!("{path}[{i}]"), env, notes, cx);
            }
        }
        Value::Mapping(m) => {
            for (k, it) in m.iter_mut() {
                let p = format!("{path}.{}", key_str(k));
                interp_value(it, &p, env, notes, cx);
            }
        }
        Value::Tagged(t) => interp_value(&mut t.value, path, env, notes, cx),
        _ => {}
    }
}

/// List forms of `environment`, `labels` and `deploy.labels` become maps,
/// so that files merge key by key.
fn normalize(top: &mut Mapping, cx: &mut Ctx) {
    let Some(Value::Mapping(services)) = top.get_mut("services") else {
        return;
    };
    for (name, svc) in services.iter_mut() {
        let Value::Mapping(svc) = svc else { continue };
        let base = format!("services.{}", key_str(name));
        for key in ["environment", "labels"] {
            if let Some(v) = svc.get_mut(key) {
                list_to_map(v, &format!("{base}.{key}"), cx);
            }
        }
        if let Some(Value::Mapping(d)) = svc.get_mut("deploy")
            && let Some(v) = d.get_mut("labels")
        {
            list_to_map(v, &format!("{base}.deploy.labels"), cx);
        }
    }
}

fn list_to_map(v: &mut Value, path: &str, cx: &mut Ctx) {
    let Value::Sequence(items) = v else { return };
    let mut m = Mapping::new();
    for (i, it) in items.iter().enumerate() {
        let Some(s) = scalar(it) else {
            cx.err(format!("{path}[{i}]"), "write KEY=VALUE as a string");
            continue;
        };
        match s.split_once('=') {
            Some((k, val)) => m.insert(Value::String(k.into()), Value::String(val.into())),
            None => m.insert(Value::String(s), Value::Null),
        };
    }
    *v = Value::Mapping(m);
}

/// Compose's merge: mappings key by key, `ports`, `expose` and `env_file`
/// appended, everything else replaced by the later file.
fn merge_map(mut base: Mapping, over: Mapping, path: &str) -> Mapping {
    for (k, v) in over {
        let key = key_str(&k);
        let p = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let in_service = p.starts_with("services.") && p.matches('.').count() == 2;
        let merged = match (base.remove(&k), v) {
            (Some(Value::Mapping(a)), Value::Mapping(b)) => Value::Mapping(merge_map(a, b, &p)),
            (Some(Value::Sequence(mut a)), Value::Sequence(b))
                if in_service && matches!(key.as_str(), "ports" | "expose" | "env_file") =>
            {
                for it in b {
                    if !a.contains(&it) {
                        a.push(it);
                    }
                }
                Value::Sequence(a)
            }
            (_, v) => v,
        };
        base.insert(k, merged);
    }
    base
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// How pier treats a service key it does not read.
enum Support {
    /// Read and mapped.
    Read,
    /// Ignored without a word: pier does this anyway.
    Quiet,
    /// Ignored, with this warning: the application still means the same.
    Warn(&'static str),
    /// Refused: running without it would change what the application does.
    Error(&'static str),
}

/// The table of Compose service keys.
fn service_key(k: &str) -> Option<Support> {
    use Support::*;
    Some(match k {
        "image" | "command" | "entrypoint" | "environment" | "env_file" | "labels" | "ports"
        | "expose" | "healthcheck" | "deploy" | "x-pier" | "build" | "restart" | "networks"
        | "scale" => Read,
        "init" => Quiet,
        "container_name" => Warn(
            "pier names pod containers itself (pier-<project>-<pod>); reach the service by its Compose name",
        ),
        "hostname" | "domainname" => {
            Warn("each pod's hostname is its pod name; reach the service by its Compose name")
        }
        "depends_on" => Warn(
            "pier starts every service at once and restarts pods that exit, so a dependant retries until its dependency is up",
        ),
        "links" => Warn("every service is reachable by its Compose name already"),
        "stop_grace_period" | "stop_signal" => {
            Warn("pier stops pods with Docker's default signal and timeout")
        }
        "logging" => Warn("pods log with the Docker daemon's default log driver"),
        "platform" => Warn("pods run the image for the node's own platform"),
        "stdin_open" | "tty" => Warn("pods run without a terminal"),
        "pull_policy" => Warn("pier uses a local image, or pulls from the agent's registry"),
        "mem_limit" | "memswap_limit" | "cpus" | "cpu_shares" | "cpu_quota" | "cpuset" => Warn(
            "pier does not set container limits here; use deploy.resources, which pier uses for placement",
        ),
        "annotations" => Warn("pier keeps no annotations"),
        "volumes" => Error(
            "pier does not mount volumes: a pod's data would be lost and its files missing; keep state outside pier, or bake the files into the image",
        ),
        "volumes_from" | "tmpfs" => Error("pier does not mount volumes"),
        "user" | "working_dir" => Error(
            "pier runs the image's own user and working directory; set them in the image (USER, WORKDIR)",
        ),
        "network_mode" | "pid" | "ipc" | "uts" | "userns_mode" | "cgroup" | "cgroup_parent" => {
            Error("pier runs every pod on its own network and namespaces")
        }
        "privileged"
        | "cap_add"
        | "cap_drop"
        | "devices"
        | "device_cgroup_rules"
        | "security_opt"
        | "sysctls"
        | "ulimits"
        | "read_only"
        | "shm_size"
        | "group_add"
        | "oom_kill_disable"
        | "oom_score_adj"
        | "runtime"
        | "isolation"
        | "storage_opt"
        | "gpus" => Error(
            "pier does not set this container option; without it the container runs differently",
        ),
        "secrets" | "configs" => Error(
            "pier does not mount secrets or configs; pass them in environment or env_file, or bake them into the image",
        ),
        "dns" | "dns_search" | "dns_opt" | "extra_hosts" => {
            Error("pier gives pods its own DNS, which answers the project's service names")
        }
        "external_links" => Error("pier does not link to containers outside the application"),
        "profiles" => Error(
            "pier applies every service of the file; remove the profiles, or keep the profiled services in another file",
        ),
        "extends" => Error("extends is not supported; merge the files with -f a.yaml -f b.yaml"),
        "mac_address" | "use_api_socket" | "post_start" | "pre_stop" | "develop" | "attach"
        | "credential_spec" | "provider" | "models" | "label_file" | "blkio_config"
        | "cpu_count" | "cpu_percent" | "cpu_period" | "cpu_rt_period" | "cpu_rt_runtime"
        | "mem_reservation" | "mem_swappiness" | "pids_limit" => {
            Error("pier does not support this key yet")
        }
        _ => return None,
    })
}

fn build(
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
fn project_name(top: &Mapping, opts: &Options, cx: &mut Ctx) -> Option<Namespace> {
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
fn service(
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

fn networks(v: &Value, path: &str, cx: &mut Ctx) {
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

fn command(v: Option<&Value>, path: &str, cx: &mut Ctx) -> Vec<String> {
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
fn string_map(v: &Value, path: &str, cx: &mut Ctx, mut f: impl FnMut(String, Option<String>)) {
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

fn env_files(
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

fn port_num(s: &str, path: &str, cx: &mut Ctx) -> Option<u16> {
    match s.trim().parse::<u16>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            cx.err(path, format!("{s:?} is not a port (1-65535)"));
            None
        }
    }
}

/// `"80"`, `"8000-8002"` → the list of ports.
fn port_range(s: &str, path: &str, cx: &mut Ctx) -> Option<Vec<u16>> {
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

struct PortSpec {
    target: u16,
    published: Option<u16>,
    protocol: Protocol,
}

/// A port's protocol as Compose spells it: `tcp` (the default) or `udp`.
fn protocol(proto: &str, path: &str, cx: &mut Ctx) -> Option<Protocol> {
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

fn ports(
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

fn port_entry(v: &Value, path: &str, cx: &mut Ctx) -> Vec<PortSpec> {
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

fn host_ip(ip: &str, path: &str, cx: &mut Ctx) {
    cx.err(
        path,
        format!(
            "host address {ip}: pier publishes a port as a node port on every node's address, which would expose more than {ip}; leave the address out, or use expose: to keep it inside the application"
        ),
    );
}

fn healthcheck(
    v: Option<&Value>,
    path: &str,
    cx: &mut Ctx,
) -> (Option<ContainerHealth>, Option<HealthCheck>) {
    let Some(v) = v else { return (None, None) };
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping");
        return (None, None);
    };
    let mut h = ContainerHealth {
        test: vec![],
        interval_ms: 0,
        timeout_ms: 0,
        retries: 0,
        start_period_ms: 0,
    };
    let mut disabled = false;
    for (k, val) in m {
        let k = key_str(k);
        let p = format!("{path}.{k}");
        let dur = |cx: &mut Ctx| match scalar(val).map(|s| util::duration_ms(&s)) {
            Some(Ok(ms)) => ms,
            Some(Err(e)) => {
                cx.err(&p, e);
                0
            }
            None => {
                cx.err(&p, "must be a duration such as 30s");
                0
            }
        };
        match k.as_str() {
            "test" => {
                h.test = match val {
                    Value::String(s) => vec!["CMD-SHELL".into(), s.clone()],
                    Value::Sequence(_) => command(Some(val), &p, cx),
                    _ => {
                        cx.err(&p, "must be a string or a list");
                        vec![]
                    }
                };
                match h.test.first().map(String::as_str) {
                    Some("CMD" | "CMD-SHELL") if h.test.len() >= 2 => {}
                    Some("NONE") => disabled = true,
                    _ => cx.err(
                        &p,
                        "a list starts with CMD, CMD-SHELL or NONE, as in [\"CMD\", \"curl\", \"-f\", \"http://localhost\"]",
                    ),
                }
            }
            "interval" => h.interval_ms = dur(cx),
            "timeout" => h.timeout_ms = dur(cx),
            "start_period" => h.start_period_ms = dur(cx),
            "start_interval" => cx.warn(&p, "ignored: the check runs at interval from the start"),
            "retries" => match val.as_u64() {
                Some(n) => h.retries = n.min(u32::MAX as u64) as u32,
                None => cx.err(&p, "must be a number"),
            },
            "disable" => disabled = val.as_bool().unwrap_or(false),
            _ => cx.err(&p, "not a healthcheck key"),
        }
    }
    if disabled {
        h.test = vec!["NONE".into()];
        return (Some(h), None);
    }
    if h.test.is_empty() {
        // Only timings: they adjust the image's own HEALTHCHECK.
        h.test = vec![];
    }
    // pier polls Docker's verdict every 500 ms; Docker's own retries
    // already counted the failures, so one poll decides.
    let pier = HealthCheck {
        kind: HealthKind::Docker,
        interval_ms: 500,
        timeout_ms: HealthCheck::default_timeout_ms(),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    };
    (Some(h), Some(pier))
}

#[derive(Default)]
struct Deploy {
    replicas: Option<u32>,
    resources: Resources,
    labels: Labels,
    constraints: Vec<Constraint>,
    max_per_node: Option<u32>,
    spread_by: Option<String>,
    update: UpdateConfig,
    rollback: UpdateConfig,
}

fn deploy(v: &Value, path: &str, d: &mut Deploy, cx: &mut Ctx) {
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping");
        return;
    };
    for (k, val) in m {
        let k = key_str(k);
        let p = format!("{path}.{k}");
        match k.as_str() {
            "replicas" => match val.as_u64() {
                Some(n) if n <= u64::from(Replicas::MAX) => d.replicas = Some(n as u32),
                _ => cx.err(&p, format!("must be a number from 0 to {}", Replicas::MAX)),
            },
            "mode" => match scalar(val).as_deref() {
                Some("replicated") => {}
                Some("global") => cx.err(
                    &p,
                    "not supported: global mode; use replicas: N with placement.max_replicas_per_node: 1",
                ),
                _ => cx.err(&p, "must be replicated or global"),
            },
            "labels" => string_map(val, &p, cx, |k, v| {
                d.labels.insert(k, v.unwrap_or_default());
            }),
            "resources" => resources(val, &p, &mut d.resources, cx),
            "placement" => placement_keys(val, &p, d, cx),
            "update_config" => d.update = update_config(val, &p, cx),
            "rollback_config" => d.rollback = update_config(val, &p, cx),
            "restart_policy" => cx.warn(
                &p,
                "ignored: pier restarts a pod that exits, at once, without a limit",
            ),
            "endpoint_mode" => match scalar(val).as_deref() {
                Some("vip") => {}
                _ => cx.warn(&p, "ignored: every pier service has a VIP"),
            },
            _ => cx.err(&p, "not a deploy key"),
        }
    }
}

fn resources(v: &Value, path: &str, r: &mut Resources, cx: &mut Ctx) {
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping");
        return;
    };
    let read = |which: &str, r: &mut Resources, cx: &mut Ctx| {
        let Some(Value::Mapping(x)) = m.get(which) else {
            return;
        };
        for (k, val) in x {
            let k = key_str(k);
            let p = format!("{path}.{which}.{k}");
            match k.as_str() {
                "cpus" => match scalar(val).and_then(|s| s.parse::<f64>().ok()) {
                    Some(c) if (0.0..=4096.0).contains(&c) => {
                        r.cpu_millis = (c * 1000.0).round() as u32
                    }
                    _ => cx.err(&p, "must be a number of CPUs such as 0.5"),
                },
                "memory" => match scalar(val).map(|s| util::size_mb(&s)) {
                    Some(Ok(mb)) => r.memory_mb = mb,
                    Some(Err(e)) => cx.err(&p, e),
                    None => cx.err(&p, "must be a size such as 512M"),
                },
                "pids" => cx.warn(&p, "ignored: pier sets no pids limit"),
                "devices" | "generic_resources" => {
                    cx.err(&p, "not supported: pier does not schedule devices")
                }
                _ => cx.err(&p, "not a resources key"),
            }
        }
    };
    // Reservations are what a pod asks of a node; limits stand in for them
    // when there are none. Docker does not enforce them as limits here.
    let mut lim = Resources::default();
    read("limits", &mut lim, cx);
    let mut res = Resources::default();
    read("reservations", &mut res, cx);
    r.cpu_millis = if res.cpu_millis > 0 {
        res.cpu_millis
    } else {
        lim.cpu_millis
    };
    r.memory_mb = if res.memory_mb > 0 {
        res.memory_mb
    } else {
        lim.memory_mb
    };
    if m.get("limits").is_some() {
        cx.warn(
            format!("{path}.limits"),
            "used for placement (what a pod needs of a node); pier does not set Docker's cgroup limits",
        );
    }
    for (k, _) in m {
        let k = key_str(k);
        if k != "limits" && k != "reservations" {
            cx.err(
                format!("{path}.{k}"),
                "not a resources key (limits, reservations)",
            );
        }
    }
}

fn placement_keys(v: &Value, path: &str, d: &mut Deploy, cx: &mut Ctx) {
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping");
        return;
    };
    for (k, val) in m {
        let k = key_str(k);
        let p = format!("{path}.{k}");
        match k.as_str() {
            "constraints" => {
                let Value::Sequence(items) = val else {
                    cx.err(&p, "must be a list such as [\"node.labels.zone==a\"]");
                    continue;
                };
                for (i, it) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    match scalar(it).map(|s| s.parse::<Constraint>()) {
                        Some(Ok(c)) => d.constraints.push(c),
                        Some(Err(e)) => cx.err(ip, e.to_string()),
                        None => cx.err(ip, "must be a string"),
                    }
                }
            }
            "max_replicas_per_node" => match val.as_u64() {
                Some(n) if n > 0 && n <= u64::from(u32::MAX) => d.max_per_node = Some(n as u32),
                _ => cx.err(&p, "must be a number above 0"),
            },
            "preferences" => {
                let Value::Sequence(items) = val else {
                    cx.err(&p, "must be a list of - spread: node.labels.K");
                    continue;
                };
                for (i, it) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}].spread");
                    match it.get("spread").and_then(scalar) {
                        Some(s) if s == "node.hostname" || s == "node.id" => {}
                        Some(s) => match s.strip_prefix("node.labels.") {
                            Some(k) if pier_model::valid_label_key(k) && d.spread_by.is_none() => {
                                d.spread_by = Some(k.to_owned())
                            }
                            Some(_) if d.spread_by.is_some() => cx.err(
                                ip,
                                "pier spreads over one node label; keep one spread: preference",
                            ),
                            _ => cx.err(
                                ip,
                                format!("{s:?}: spread over node.labels.KEY (or node.hostname)"),
                            ),
                        },
                        None => cx.err(format!("{p}[{i}]"), "only spread: preferences exist"),
                    }
                }
            }
            _ => cx.err(&p, "not a placement key"),
        }
    }
}

/// `update_config` / `rollback_config`, from Swarm's defaults
/// ([`UpdateConfig::default`]).
fn update_config(v: &Value, path: &str, cx: &mut Ctx) -> UpdateConfig {
    let mut u = UpdateConfig::default();
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping");
        return u;
    };
    for (k, val) in m {
        let k = key_str(k);
        let p = format!("{path}.{k}");
        match k.as_str() {
            "parallelism" => match val.as_u64() {
                Some(n) => u.parallelism = n.min(u64::from(u32::MAX)) as u32,
                None => cx.err(&p, "must be a number (0: all at once)"),
            },
            "delay" | "monitor" => match scalar(val).map(|s| util::duration_ms(&s)) {
                Some(Ok(ms)) if k == "delay" => u.delay_ms = ms,
                Some(Ok(ms)) => u.monitor_ms = ms,
                Some(Err(e)) => cx.err(&p, e),
                None => cx.err(&p, "must be a duration such as 10s"),
            },
            "failure_action" => match scalar(val).map(|s| s.parse::<FailureAction>()) {
                Some(Ok(a)) => u.failure_action = a,
                _ => cx.err(&p, "must be pause, continue or rollback"),
            },
            "max_failure_ratio" => match val.as_f64().map(Ratio::new) {
                Some(Ok(r)) => u.max_failure_ratio = r,
                _ => cx.err(&p, "must be a number from 0 to 1"),
            },
            "order" => match scalar(val).as_deref() {
                Some("stop-first") => u.order = UpdateOrder::StopFirst,
                Some("start-first") => u.order = UpdateOrder::StartFirst,
                _ => cx.err(&p, "must be stop-first or start-first"),
            },
            _ => cx.err(&p, "not an update_config key"),
        }
    }
    if let Err(e) = u.validate(path) {
        cx.err(path, e);
    }
    u
}

#[derive(Default)]
struct XPier {
    anti_affinity: Vec<Name>,
    affinity: Vec<Name>,
    prefer_local: bool,
    proxy_protocol: bool,
    headless: bool,
    lb: Option<LbPolicy>,
    sla: Option<Sla>,
    session_affinity: Option<SessionAffinity>,
    affinity_timeout_s: Option<u32>,
    min_replicas: Option<Replicas>,
    max_replicas: Option<Replicas>,
}

fn x_pier(v: &Value, path: &str, all: &BTreeSet<String>, cx: &mut Ctx) -> XPier {
    let mut x = XPier::default();
    let Value::Mapping(m) = v else {
        cx.err(path, "must be a mapping");
        return x;
    };
    for (k, val) in m {
        let k = key_str(k);
        let p = format!("{path}.{k}");
        match k.as_str() {
            "anti_affinity" | "affinity" => {
                let Value::Sequence(items) = val else {
                    cx.err(&p, "must be a list of service names");
                    continue;
                };
                for (i, it) in items.iter().enumerate() {
                    let ip = format!("{p}[{i}]");
                    match scalar(it).map(|s| Name::new(&s)) {
                        Some(Ok(n)) => {
                            if !all.contains(n.as_str()) {
                                cx.warn(&ip, format!("{n} is not a service of this file"));
                            }
                            if k == "affinity" {
                                x.affinity.push(n)
                            } else {
                                x.anti_affinity.push(n)
                            }
                        }
                        Some(Err(e)) => cx.err(ip, e.to_string()),
                        None => cx.err(ip, "must be a service name"),
                    }
                }
            }
            "prefer_local" | "proxy_protocol" | "headless" => match val.as_bool() {
                Some(b) if k == "prefer_local" => x.prefer_local = b,
                Some(b) if k == "headless" => x.headless = b,
                Some(b) => x.proxy_protocol = b,
                None => cx.err(&p, "must be true or false"),
            },
            "session_affinity" => match scalar(val).as_deref() {
                Some("None") => x.session_affinity = None,
                Some(k) => match k.parse::<AffinityKind>() {
                    Ok(kind) => {
                        let timeout_s = x
                            .session_affinity
                            .map_or_else(SessionAffinity::default_timeout_s, |a| a.timeout_s);
                        x.session_affinity = Some(SessionAffinity { kind, timeout_s });
                    }
                    Err(e) => cx.err(&p, e.to_string()),
                },
                None => cx.err(&p, "must be ClientIP or None"),
            },
            "affinity_timeout" => {
                let secs = match scalar(val) {
                    Some(s) => util::duration_ms(&s).map(|ms| ms / 1000),
                    None => Err("must be a duration, e.g. 3h".to_owned()),
                };
                match secs {
                    Ok(s) if s >= 1 && s <= u64::from(SessionAffinity::MAX_TIMEOUT_S) => {
                        // Applied once session_affinity is read (any order).
                        x.affinity_timeout_s = Some(s as u32);
                    }
                    Ok(_) => cx.err(&p, "must be from 1s to 24h"),
                    Err(e) => cx.err(&p, e),
                }
            }
            "lb" => match scalar(val).map(|s| s.parse::<LbPolicy>()) {
                Some(Ok(l)) => x.lb = Some(l),
                Some(Err(e)) => cx.err(&p, e.to_string()),
                None => cx.err(&p, "must be p2c or round_robin"),
            },
            "sla" => {
                // The autoscaler's targets (pier autoscale's), with the
                // replica bounds beside them.
                let Value::Mapping(m) = val else {
                    cx.err(&p, "must be a mapping");
                    continue;
                };
                let mut rest = m.clone();
                for (bound, slot) in [
                    ("min_replicas", &mut x.min_replicas),
                    ("max_replicas", &mut x.max_replicas),
                ] {
                    if let Some(v) = rest.remove(bound) {
                        match v.as_u64().and_then(|n| Replicas::new(n.min(u64::from(u32::MAX)) as u32).ok()) {
                            Some(r) => *slot = Some(r),
                            None => cx.err(
                                format!("{p}.{bound}"),
                                format!("must be a number from 0 to {}", Replicas::MAX),
                            ),
                        }
                    }
                }
                match serde_yaml_ng::from_value::<Sla>(Value::Mapping(rest)) {
                    Ok(sla) => x.sla = Some(sla),
                    Err(e) => cx.err(&p, format!("{e} (keys: min_replicas, max_replicas, max_active_per_pod, max_conn_rate_per_pod, p99_first_byte_ms, scale_up_window_ms, scale_down_window_ms, max_step, tolerance_pct)")),
                }
                if x.sla.is_some() && (x.min_replicas.is_none() || x.max_replicas.is_none()) {
                    cx.err(&p, "the autoscaler needs min_replicas and max_replicas beside the targets");
                }
            }
            _ => cx.err(
                &p,
                "not an x-pier key (anti_affinity, affinity, prefer_local, proxy_protocol, headless, lb, sla, session_affinity, affinity_timeout)",
            ),
        }
    }
    match (&mut x.session_affinity, x.affinity_timeout_s) {
        (Some(a), Some(t)) => a.timeout_s = t,
        (None, Some(_)) => cx.err(
            format!("{path}.affinity_timeout"),
            "needs session_affinity: ClientIP",
        ),
        _ => {}
    }
    x
}

/// The placement keys and `x-pier`'s affinities as the model's
/// [`Placement`], checked as the API checks it.
fn placement(name: &Name, d: &Deploy, x: &XPier, path: &str, cx: &mut Ctx) -> Placement {
    let p = Placement {
        constraints: d.constraints.clone(),
        max_per_node: d.max_per_node,
        spread_by: d.spread_by.clone(),
        anti_affinity: x.anti_affinity.clone(),
        affinity: x.affinity.clone(),
        ..Placement::default()
    };
    if let Err(e) = p.validate(name) {
        let at = if e.contains("affinity") {
            format!("{path}.x-pier")
        } else {
            format!("{path}.deploy.placement")
        };
        cx.err(at, e);
    }
    p
}

#[cfg(test)]
mod tests;
