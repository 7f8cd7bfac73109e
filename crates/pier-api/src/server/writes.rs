//! The handlers that write: create, replace, set image, roll back, scale,
//! autoscale, label nodes, expose and delete. Each answers
//! once its change has reached this agent's snapshot (bounded), so a read
//! right after it sees it.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use pier_model::api::{
    AutoscaleRequest, ExposeRequest, NodeLabelsRequest, Resource, RollbackRequest, ScaleRequest,
    SetImageRequest,
};
use pier_model::{
    Labels, Name, Namespace, PortNum, Protocol, ReplicaSet, Service, ServicePort, Snapshot, decode,
    keys, labels,
};
use pier_store::writes::{self, Scale};
use tracing::{debug, info};

use super::plumbing::{Body, Fail, json, not_found};
use super::validate::{
    check_ns, validate_node_labels, validate_replicaset, validate_service, validate_sla,
};
use super::{Inner, now_ms};
use crate::views;

/// How long a write waits for its own change to reach the snapshot, so that
/// a `get` right after a `run` shows it. A lagging reflector only delays the
/// answer; the write has happened.
pub(super) const READ_YOUR_WRITE_WAIT: Duration = Duration::from_secs(2);

pub(super) async fn create_replicaset(
    inner: &Inner,
    ns: Namespace,
    mut rs: ReplicaSet,
) -> Result<Response<Body>, Fail> {
    check_ns(&mut rs.namespace, &ns)?;
    validate_replicaset(&rs)?;
    rs.created_at = now_ms();
    rs.revision = 1;
    rs.history.clear();
    let rev = writes::create_replicaset(&*inner.st.store, &rs).await?;
    info!(namespace = %ns, replicaset = %rs.name, replicas = rs.replicas.get(), "replica set created");
    settle(inner, |s| s.revision >= rev).await;
    let s = inner.st.snapshot.borrow().clone();
    Ok(json(StatusCode::CREATED, &views::replicaset_view(&s, &rs)))
}

/// Scale to a count or by a delta ([`writes::scale_replicaset`]).
pub(super) async fn scale(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    req: ScaleRequest,
) -> Result<Response<Body>, Fail> {
    let to = match (req.replicas, req.delta) {
        (Some(_), Some(_)) => {
            return Err(Fail::bad("delta: give either replicas or delta, not both"));
        }
        (None, None) => return Err(Fail::bad("replicas: missing (or give delta)")),
        (Some(r), None) => Scale::To(r),
        (None, Some(d)) => Scale::By(d),
    };
    let (rs, rev) = writes::scale_replicaset(&*inner.st.store, &ns, &name, to).await?;
    settle(inner, |s| s.revision >= rev).await;
    let s = inner.st.snapshot.borrow().clone();
    Ok(json(StatusCode::OK, &views::replicaset_view(&s, &rs)))
}

/// Sets (`Some`) or clears (`None`) a set's autoscaling
/// ([`writes::set_autoscale`]). The count itself is left to the autoscaler,
/// which moves a set outside the bounds in at its next round.
pub(super) async fn autoscale(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    req: Option<AutoscaleRequest>,
) -> Result<Response<Body>, Fail> {
    if let Some(r) = &req {
        if r.min > r.max {
            return Err(Fail::bad(format!("min: {} is above max {}", r.min, r.max)));
        }
        if r.max.get() == 0 {
            return Err(Fail::bad("max: must be at least 1"));
        }
        validate_sla("sla", &r.sla)?;
    }
    let bounds = req.map(|r| (r.min, r.max, r.sla));
    let on = bounds.is_some();
    let (rs, rev) = writes::set_autoscale(&*inner.st.store, &ns, &name, bounds).await?;
    info!(namespace = %ns, replicaset = %name, on, "replica set autoscaling set");
    settle(inner, |s| s.revision >= rev).await;
    let s = inner.st.snapshot.borrow().clone();
    Ok(json(StatusCode::OK, &views::replicaset_view(&s, &rs)))
}

/// A new spec through [`writes::update_spec`]: `change` edits it, and it
/// is checked before it is written. `what` names the change in the log
/// and the history.
async fn update_replicaset(
    inner: &Inner,
    ns: &Namespace,
    name: &Name,
    what: &str,
    mut change: impl FnMut(&mut ReplicaSet) -> Result<(), Fail>,
) -> Result<Response<Body>, Fail> {
    let (rs, rev) = writes::update_spec(&*inner.st.store, ns, name, what, now_ms(), |rs| {
        change(rs)?;
        validate_replicaset(rs)
    })
    .await?;
    settle(inner, |s| s.revision >= rev).await;
    let s = inner.st.snapshot.borrow().clone();
    Ok(json(StatusCode::OK, &views::replicaset_view(&s, &rs)))
}

/// `PUT …/replicasets/<rs>`: a new spec. A changed template is a new
/// revision, rolled out under the set's `update_config`.
pub(super) async fn replace_replicaset(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    mut body: ReplicaSet,
) -> Result<Response<Body>, Fail> {
    check_ns(&mut body.namespace, &ns)?;
    if body.name != name {
        return Err(Fail::bad(format!(
            "name: the body says {:?} but the path says {:?}",
            body.name.as_str(),
            name.as_str()
        )));
    }
    update_replicaset(inner, &ns, &name, "replace", |rs| {
        *rs = body.clone();
        Ok(())
    })
    .await
}

/// `PUT …/replicasets/<rs>/image`.
pub(super) async fn set_image(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    req: SetImageRequest,
) -> Result<Response<Body>, Fail> {
    let what = format!("set image {}", req.image);
    update_replicaset(inner, &ns, &name, &what, |rs| {
        rs.template.image = req.image.clone();
        Ok(())
    })
    .await
}

/// `POST …/replicasets/<rs>/rollback`: an earlier revision's template
/// becomes the next revision.
pub(super) async fn rollback(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    req: RollbackRequest,
) -> Result<Response<Body>, Fail> {
    let what = match req.to_revision {
        Some(r) => format!("rollout undo --to-revision {r}"),
        None => "rollout undo".to_owned(),
    };
    update_replicaset(inner, &ns, &name, &what, |rs| {
        let entry = match req.to_revision {
            Some(r) if r == rs.revision => {
                return Err(Fail::bad(format!(
                    "to_revision: {r} is the current revision; `pier rollout history rs {name}` lists the others"
                )));
            }
            Some(r) => rs.history.iter().find(|h| h.revision == r).ok_or_else(|| {
                let kept: Vec<String> = rs.history.iter().map(|h| h.revision.to_string()).collect();
                Fail::bad(format!(
                    "to_revision: revision {r} is not in the history (kept: {})",
                    if kept.is_empty() { "none".into() } else { kept.join(", ") }
                ))
            })?,
            None => rs.history.iter().max_by_key(|h| h.revision).ok_or_else(|| {
                Fail::bad(format!(
                    "replicaset {name:?} has no earlier revision to roll back to"
                ))
            })?,
        };
        rs.template = entry.template.clone();
        Ok(())
    })
    .await
}

/// `PATCH /nodes/<node>/labels`: merges into `nodelabels/<node>`
/// ([`writes::label_node`]).
pub(super) async fn label_node(
    inner: &Inner,
    node: Name,
    req: NodeLabelsRequest,
) -> Result<Response<Body>, Fail> {
    validate_node_labels(&req.labels)?;
    {
        let s = inner.st.snapshot.borrow().clone();
        if !s.nodes.contains_key(&node) {
            let known: Vec<String> = s.nodes.keys().map(|n| n.to_string()).collect();
            return Err(Fail::not_found(format!(
                "node {:?} is not registered (nodes: {}); `pier get nodes` lists them",
                node.as_str(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    let rev = writes::label_node(&*inner.st.store, &node, &req.labels).await?;
    info!(node = %node, labels = ?req.labels, "node labelled");
    settle(inner, |s| s.revision >= rev).await;
    let s = inner.st.snapshot.borrow().clone();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"node": node, "labels": s.node_labels(&node)}),
    ))
}

pub(super) async fn delete_replicaset(
    inner: &Inner,
    ns: Namespace,
    name: Name,
) -> Result<Response<Body>, Fail> {
    let (existed, rev) = writes::delete_replicaset(&*inner.st.store, &ns, &name).await?;
    deleted(inner, Resource::ReplicaSets, &ns, &name, existed, rev).await
}

pub(super) async fn delete_pod(
    inner: &Inner,
    ns: Namespace,
    name: Name,
) -> Result<Response<Body>, Fail> {
    let (existed, rev) = writes::delete_pod(&*inner.st.store, &ns, &name).await?;
    deleted(inner, Resource::Pods, &ns, &name, existed, rev).await
}

/// The answer to a delete of a replica set or a pod.
async fn deleted(
    inner: &Inner,
    kind: Resource,
    ns: &Namespace,
    name: &Name,
    existed: bool,
    rev: pier_store::Revision,
) -> Result<Response<Body>, Fail> {
    if !existed {
        return Err(not_found(kind, Some(ns), Some(name)));
    }
    info!(namespace = %ns, name = %name, kind = kind.singular(), "deleted");
    settle(inner, |s| s.revision >= rev).await;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"deleted": kind.singular(), "namespace": ns, "name": name}),
    ))
}

pub(super) async fn create_service(
    inner: &Inner,
    ns: Namespace,
    mut svc: Service,
) -> Result<Response<Body>, Fail> {
    check_ns(&mut svc.namespace, &ns)?;
    if svc.ports.is_empty() && svc.external_name.is_none() {
        return Err(Fail::bad("ports: a service needs at least one port"));
    }
    if !svc.selector.is_empty() && !svc.static_endpoints.is_empty() {
        return Err(Fail::bad(
            "static_endpoints: a service has either a selector or static endpoints, not both",
        ));
    }
    validate_service(&inner.st, &svc)?;
    svc.created_at = now_ms();
    let created = writes::create_service(&*inner.st.store, &inner.st.alloc, svc, true).await?;
    info!(namespace = %ns, service = %created.name, vip = ?created.vip, "service created");
    let key = (ns, created.name.clone());
    settle(inner, |s| s.services.contains_key(&key)).await;
    Ok(json(StatusCode::CREATED, &created))
}

pub(super) async fn expose(
    inner: &Inner,
    ns: Namespace,
    rs_name: Name,
    req: ExposeRequest,
) -> Result<Response<Body>, Fail> {
    let key = keys::replicaset(&ns, &rs_name);
    let kv = inner.st.store.get(&key).await?.ok_or_else(|| {
        Fail::not_found(format!(
            "replicaset {:?} not found in namespace {ns:?}; create it with `pier run {} --image IMAGE`",
            rs_name.as_str(),
            rs_name
        ))
    })?;
    let rs: ReplicaSet = decode(&key, &kv.value).map_err(|e| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}; fix or delete it"),
        )
    })?;
    let target = req.target_port.unwrap_or(req.port);
    // A port's name: the one given, else the template's port of that
    // number and protocol, else `p<port>` (`p<port>-udp`).
    let name_for = |given: Option<Name>, port: PortNum, target: PortNum, proto: Protocol| {
        given.unwrap_or_else(|| {
            match rs
                .template
                .ports
                .iter()
                .find(|p| p.port == target && p.protocol == proto)
            {
                Some(p) => p.name.clone(),
                None => proto.default_port_name(port),
            }
        })
    };
    let mut ports = vec![ServicePort {
        name: name_for(req.port_name, req.port, target, req.protocol),
        port: req.port,
        target_port: target,
        node_port: req.node_port,
        protocol: req.protocol,
    }];
    for p in req.more_ports {
        ports.push(ServicePort {
            name: name_for(p.name, p.port, p.port, p.protocol),
            port: p.port,
            target_port: p.port,
            node_port: None,
            protocol: p.protocol,
        });
    }
    let mut selector = Labels::new();
    selector.insert(labels::REPLICASET.into(), rs_name.to_string());
    let mut svc = Service::new(
        ns.clone(),
        req.name.unwrap_or_else(|| rs_name.clone()),
        ports,
    );
    svc.service_type = req.service_type;
    svc.selector = selector;
    svc.prefer_local = req.prefer_local;
    svc.headless = req.headless;
    svc.proxy_protocol = req.proxy_protocol;
    svc.session_affinity = req.session_affinity;
    create_service(inner, ns, svc).await
}

pub(super) async fn delete_service(
    inner: &Inner,
    ns: Namespace,
    name: Name,
) -> Result<Response<Body>, Fail> {
    if !writes::delete_service(&*inner.st.store, &ns, &name).await? {
        return Err(not_found(Resource::Services, Some(&ns), Some(&name)));
    }
    info!(namespace = %ns, service = %name, "service deleted");
    let key = (ns.clone(), name.clone());
    settle(inner, |s| !s.services.contains_key(&key)).await;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"deleted": "service", "namespace": ns, "name": name}),
    ))
}

/// Waits (bounded) until the snapshot satisfies `done`, so that a read right
/// after this write sees it.
pub(super) async fn settle(inner: &Inner, done: impl FnMut(&Arc<Snapshot>) -> bool) {
    let mut rx = inner.st.snapshot.clone();
    if tokio::time::timeout(READ_YOUR_WRITE_WAIT, rx.wait_for(done))
        .await
        .is_err()
    {
        debug!("the snapshot did not catch up with a write within 2 s");
    }
}
