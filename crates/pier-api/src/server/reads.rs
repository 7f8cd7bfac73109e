//! The handlers that read: health and readiness, metrics, problems, lists
//! and single objects (from the snapshot, never the store).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use pier_model::Snapshot;
use pier_model::api::{Problem, Readiness, Resource, StoreFreshness};
use serde_json::Value;

use super::plumbing::{Body, Fail, full, json, not_found};
use super::watch::watch_response;
use super::{Inner, now_ms};
use crate::views::{self, Filter};

/// How long a read waits for the first snapshot before answering 503.
pub(super) const SYNC_WAIT: Duration = Duration::from_secs(5);

pub(super) fn readyz(inner: &Inner) -> Response<Body> {
    let mut checks = BTreeMap::new();
    let snap = inner.st.snapshot.borrow().clone();
    checks.insert("snapshot".to_owned(), is_synced(&snap));
    for (name, rx) in &inner.st.readiness {
        checks.insert((*name).to_owned(), *rx.borrow());
    }
    let ready = checks.values().all(|v| *v);
    let store = StoreFreshness {
        revision: snap.revision,
        stale_since_ms: snap.stale_since_ms,
        stale_for_ms: snap.stale_for_ms(now_ms()),
    };
    json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &Readiness {
            ready,
            checks,
            store,
            insecure_no_auth: inner.insecure,
        },
    )
}

pub(super) fn metrics(inner: &Inner) -> Result<Response<Body>, Fail> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &inner.st.registry).map_err(|e| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
    })?;
    Ok(full(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        out,
    ))
}

/// This agent's own subsystems' problems (the proxy's node-port
/// conflicts), then the cluster-wide ones every agent sees in its snapshot
/// (the supervisor leader's replica-set reports); an identical report from
/// both is listed once.
pub(super) fn problems(inner: &Inner) -> Vec<Problem> {
    let mut out = Vec::new();
    for rx in &inner.st.problems {
        for ((ns, name), msg) in rx.borrow().iter() {
            out.push(Problem {
                namespace: ns.clone(),
                name: name.clone(),
                message: msg.clone(),
            });
        }
    }
    let snap = inner.st.snapshot.borrow().clone();
    for ((ns, name), p) in snap.problems.iter() {
        let dup = out
            .iter()
            .any(|o| &o.namespace == ns && &o.name == name && o.message == p.message);
        if !dup {
            out.push(Problem {
                namespace: ns.clone(),
                name: name.clone(),
                message: p.message.clone(),
            });
        }
    }
    out
}

/// The reflector sets `synced_at_ms` once its first list is applied.
pub(super) fn is_synced(s: &Snapshot) -> bool {
    s.synced_at_ms > 0
}

pub(super) async fn synced(inner: &Inner) -> Result<Arc<Snapshot>, Fail> {
    let mut rx = inner.st.snapshot.clone();
    match tokio::time::timeout(SYNC_WAIT, rx.wait_for(|s| is_synced(s))).await {
        Ok(Ok(s)) => Ok(s.clone()),
        Ok(Err(_)) => Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )),
        Err(_) => Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent has not read the store yet (is the store reachable?); try again",
        )),
    }
}

pub(super) async fn list(
    inner: &Arc<Inner>,
    kind: Resource,
    f: Filter,
    watch: bool,
    peer: std::net::IpAddr,
) -> Result<Response<Body>, Fail> {
    if watch {
        let slot = inner
            .watches
            .take(peer)
            .map_err(|m| Fail::new(StatusCode::TOO_MANY_REQUESTS, m))?;
        synced(inner).await?;
        return Ok(watch_response(inner.clone(), kind, f, slot));
    }
    let s = synced(inner).await?;
    let items: Vec<Value> = views::collect(kind, &s, &f).into_values().collect();
    Ok(json(StatusCode::OK, &items))
}

pub(super) async fn get_one(
    inner: &Inner,
    kind: Resource,
    f: Filter,
) -> Result<Response<Body>, Fail> {
    let s = synced(inner).await?;
    match views::collect(kind, &s, &f).into_values().next() {
        Some(v) => Ok(json(StatusCode::OK, &v)),
        None => Err(not_found(kind, f.namespace.as_ref(), f.name.as_ref())),
    }
}

/// A set's autoscaling: its targets, what the autoscaler measures now and
/// its last decisions. Unlike the other reads, this one reads the store:
/// the `stats/` records of the services that select the set (as the
/// autoscaler does, summed by the same `measure`) and `autoscale/<ns>/<rs>`,
/// which the snapshot does not hold.
pub(super) async fn autoscale_view(
    inner: &Inner,
    ns: pier_model::Namespace,
    name: pier_model::Name,
) -> Result<Response<Body>, Fail> {
    use pier_model::autoscale::{AutoscaleStatus, measure, selects};
    use pier_model::keys::{self, Key};
    let s = synced(inner).await?;
    let rs = s
        .replicasets
        .get(&(ns.clone(), name.clone()))
        .ok_or_else(|| not_found(Resource::ReplicaSets, Some(&ns), Some(&name)))?
        .clone();
    let mut recs = Vec::new();
    let mut services = Vec::new();
    for svc in s.services.values().filter(|svc| selects(svc, &rs)) {
        services.push(svc.name.clone());
        let list = inner
            .st
            .store
            .list(&keys::prefix::stats_of(&svc.namespace, &svc.name))
            .await?;
        for kv in list.kvs {
            let Ok(Key::Stats { node, .. }) = Key::parse(&kv.key) else {
                tracing::warn!(key = kv.key, "not a stats key; skipped");
                continue;
            };
            match pier_model::decode::<pier_model::Stats>(&kv.key, &kv.value) {
                Ok(st) => recs.push((node, st)),
                Err(e) => tracing::warn!(error = %e, "stats record skipped"),
            }
        }
    }
    let st_key = keys::autoscale(&ns, &name);
    let status = match inner.st.store.get(&st_key).await? {
        Some(kv) => pier_model::decode::<AutoscaleStatus>(&st_key, &kv.value).map_err(|e| {
            Fail::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e}; delete it and the autoscaler writes a new one"),
            )
        })?,
        None => AutoscaleStatus::default(),
    };
    let ready = s
        .pods
        .iter()
        .filter(|((pns, _), p)| *pns == ns && p.replicaset == name)
        .filter(|(k, _)| s.pod_statuses.get(*k).is_some_and(|st| st.ready))
        .count() as u32;
    Ok(json(
        StatusCode::OK,
        &pier_model::api::AutoscaleView {
            min: rs.min_replicas,
            max: rs.max_replicas,
            sla: rs.sla.clone(),
            replicas: rs.replicas,
            ready,
            services,
            measured: measure(recs.iter().map(|(n, st)| (n, st)), now_ms()),
            status,
        },
    ))
}
