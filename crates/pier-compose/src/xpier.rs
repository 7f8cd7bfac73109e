//! The `x-pier:` extension (spread, affinity, SLA, headless, proxy protocol, …)
//! and the placement it makes together with `deploy:`.

use std::collections::BTreeSet;

use crate::deploy::Deploy;
use crate::util;
use crate::{Ctx, key_str, scalar};
use pier_model::{AffinityKind, LbPolicy, Name, Placement, Replicas, SessionAffinity, Sla};
use serde_yaml_ng::Value;

#[derive(Default)]
pub(crate) struct XPier {
    pub(crate) anti_affinity: Vec<Name>,
    pub(crate) affinity: Vec<Name>,
    pub(crate) prefer_local: bool,
    pub(crate) proxy_protocol: bool,
    pub(crate) headless: bool,
    pub(crate) lb: Option<LbPolicy>,
    pub(crate) sla: Option<Sla>,
    pub(crate) session_affinity: Option<SessionAffinity>,
    pub(crate) affinity_timeout_s: Option<u32>,
    pub(crate) min_replicas: Option<Replicas>,
    pub(crate) max_replicas: Option<Replicas>,
}

pub(crate) fn x_pier(v: &Value, path: &str, all: &BTreeSet<String>, cx: &mut Ctx) -> XPier {
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
                match pier_model::deserialize_strict::<_, Sla>(Value::Mapping(rest)) {
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
pub(crate) fn placement(name: &Name, d: &Deploy, x: &XPier, path: &str, cx: &mut Ctx) -> Placement {
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
