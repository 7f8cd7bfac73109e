//! `healthcheck:` and `deploy:` (replicas, resources, placement constraints,
//! update_config) onto the replica set.

use crate::service::{command, string_map};
use crate::util;
use crate::{Ctx, key_str, scalar};
use pier_model::{
    Constraint, ContainerHealth, FailureAction, HealthCheck, HealthKind, Labels, Ratio, Replicas,
    Resources, UpdateConfig, UpdateOrder,
};
use serde_yaml_ng::Value;

pub(crate) fn healthcheck(
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
pub(crate) struct Deploy {
    pub(crate) replicas: Option<u32>,
    pub(crate) resources: Resources,
    pub(crate) labels: Labels,
    pub(crate) constraints: Vec<Constraint>,
    pub(crate) max_per_node: Option<u32>,
    pub(crate) spread_by: Option<String>,
    pub(crate) update: UpdateConfig,
    pub(crate) rollback: UpdateConfig,
}

pub(crate) fn deploy(v: &Value, path: &str, d: &mut Deploy, cx: &mut Ctx) {
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

pub(crate) fn resources(v: &Value, path: &str, r: &mut Resources, cx: &mut Ctx) {
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

pub(crate) fn placement_keys(v: &Value, path: &str, d: &mut Deploy, cx: &mut Ctx) {
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
pub(crate) fn update_config(v: &Value, path: &str, cx: &mut Ctx) -> UpdateConfig {
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
