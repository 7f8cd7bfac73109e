//! What a write's body must satisfy beyond its types: the checks that
//! answer 400 before anything reaches the store.

use pier_model::{Namespace, ReplicaSet, Service};
use pier_store::alloc;

use super::plumbing::Fail;
use crate::ApiState;
use crate::guard;

/// The path's namespace wins; a body that names another one is an error.
pub(super) fn check_ns(body: &mut Namespace, path: &Namespace) -> Result<(), Fail> {
    if body != path && body.as_str() != pier_model::DEFAULT_NAMESPACE {
        return Err(Fail::bad(format!(
            "namespace: the body says {body:?} but the path says {path:?}"
        )));
    }
    *body = path.clone();
    Ok(())
}

pub(super) fn validate_replicaset(rs: &ReplicaSet) -> Result<(), Fail> {
    let t = &rs.template;
    if t.image.trim().is_empty() {
        return Err(Fail::bad("template.image: must not be empty"));
    }
    if t.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Fail::bad(format!(
            "template.image: {:?} contains spaces",
            t.image
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for (i, p) in t.ports.iter().enumerate() {
        if !names.insert(&p.name) {
            return Err(Fail::bad(format!(
                "template.ports[{i}].name: {:?} is used twice",
                p.name.as_str()
            )));
        }
        if !ports.insert(p.port) {
            return Err(Fail::bad(format!(
                "template.ports[{i}].port: {} is used twice",
                p.port
            )));
        }
    }
    for k in t.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Fail::bad(format!(
                "template.env: {k:?} is not a valid variable name"
            )));
        }
    }
    if let (Some(min), Some(max)) = (rs.min_replicas, rs.max_replicas)
        && min > max
    {
        return Err(Fail::bad(format!(
            "min_replicas: {min} is above max_replicas {max}"
        )));
    }
    rs.placement.validate(&rs.name).map_err(Fail::bad)?;
    rs.update_config
        .validate("update_config")
        .map_err(Fail::bad)?;
    rs.rollback_config
        .validate("rollback_config")
        .map_err(Fail::bad)?;
    if let Some(sla) = &rs.sla {
        validate_sla("sla", sla)?;
    }
    Ok(())
}

/// The longest window or delay: an hour (the HPA's longest default is 5
/// minutes; more is a typo).
const MAX_WINDOW_MS: u64 = 3_600_000;

/// An SLA the autoscaler can act on; errors name the field as `at.field`.
pub(super) fn validate_sla(at: &str, sla: &pier_model::Sla) -> Result<(), Fail> {
    if !sla.has_target() {
        return Err(Fail::bad(format!(
            "{at}: no target; give at least one of max_active_per_pod, max_conn_rate_per_pod, p99_first_byte_ms (--max-active-per-pod, --max-conn-rate-per-pod, --p99-first-byte)"
        )));
    }
    for (f, v) in [
        ("max_active_per_pod", sla.max_active_per_pod),
        ("max_conn_rate_per_pod", sla.max_conn_rate_per_pod),
        ("p99_first_byte_ms", sla.p99_first_byte_ms),
    ] {
        if v == Some(0) {
            return Err(Fail::bad(format!("{at}.{f}: must be at least 1")));
        }
    }
    for (f, v) in [
        ("scale_up_window_ms", sla.scale_up_window_ms),
        ("scale_down_window_ms", sla.scale_down_window_ms),
    ] {
        if v > MAX_WINDOW_MS {
            return Err(Fail::bad(format!(
                "{at}.{f}: {v} ms is more than an hour; use 0 to {MAX_WINDOW_MS}"
            )));
        }
    }
    if sla.tolerance_pct > 100 {
        return Err(Fail::bad(format!(
            "{at}.tolerance_pct: {} is not a percentage of 0 to 100",
            sla.tolerance_pct
        )));
    }
    Ok(())
}

/// What a writer asked for explicitly: node ports in the range, a VIP in
/// the service CIDR (the same check `alloc` makes), and static endpoints
/// that do not reach a host's own services.
pub(super) fn validate_service(st: &ApiState, svc: &Service) -> Result<(), Fail> {
    alloc::check_explicit(&st.alloc, svc)?;
    if svc.static_endpoints.is_empty() {
        return Ok(());
    }
    let host = guard::host_addrs();
    let cidrs: Vec<_> = std::iter::once(st.alloc.service_cidr)
        .chain(st.alloc.service_cidr6)
        .collect();
    for (i, ep) in svc.static_endpoints.iter().enumerate() {
        if let Some(name) = &ep.name
            && let Err(why) = pier_model::check_external_name(name)
        {
            return Err(Fail::bad(format!(
                "static_endpoints[{i}].name: {name:?} {why}"
            )));
        }
        if let Err(r) =
            pier_model::addr::check_static_ip(ep.ip, &cidrs, &host, &st.static_endpoint_allow)
        {
            return Err(Fail::bad(format!(
                "static_endpoints[{i}].ip: {} {r}; every host's proxy would connect to its own such address, so it is refused. To allow it anyway, add a CIDR holding it to [network] static_endpoint_allow in every agent's config",
                ep.ip
            )));
        }
    }
    Ok(())
}

/// A label set on a node: a key as [`pier_model::valid_label_key`], a value
/// of at most 63 characters without spaces (`None` removes).
pub(super) fn validate_node_labels(
    labels: &std::collections::BTreeMap<String, Option<String>>,
) -> Result<(), Fail> {
    if labels.is_empty() {
        return Err(Fail::bad(
            "labels: give at least one label to set or remove",
        ));
    }
    for (k, v) in labels {
        if !pier_model::valid_label_key(k) {
            return Err(Fail::bad(format!(
                "labels: {k:?} is not a label key (letters, digits, '.', '-', '_', '/')"
            )));
        }
        if let Some(v) = v
            && (v.len() > 63
                || v.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '='))
        {
            return Err(Fail::bad(format!(
                "labels.{k}: {v:?} is not a label value (at most 63 characters, no spaces or '=')"
            )));
        }
    }
    Ok(())
}
