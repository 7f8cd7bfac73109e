//! The routing table: a request's method and path to its handler. A new
//! route is one arm here and one handler in `reads` or `writes`.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use pier_model::api::{
    AutoscaleRequest, ExposeRequest, NodeLabelsRequest, Resource, RollbackRequest, ScaleRequest,
    SetImageRequest, VersionInfo,
};
use pier_model::app::AppSpec;
use pier_model::{ReplicaSet, Service};

use super::apps::{apply_app, delete_app, list_apps};
use super::plumbing::{
    Body, Fail, fail_response, full, json, method_not_allowed, parse_kind, parse_name, parse_ns,
    read_json, wants_watch,
};
use super::reads::{autoscale_view, get_one, list, metrics, problems, readyz, synced};
use super::writes::{
    autoscale, create_replicaset, create_service, delete_pod, delete_replicaset, delete_service,
    expose, label_node, replace_replicaset, rollback, scale, set_image,
};
use super::{Inner, Peer};
use crate::views::Filter;

pub(super) async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    max_body: usize,
) -> Response<Body> {
    match route(inner, req, max_body).await {
        Ok(r) => r,
        Err(f) => fail_response(f),
    }
}

pub(super) async fn route(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    max_body: usize,
) -> Result<Response<Body>, Fail> {
    let path = req.uri().path().to_owned();
    let m = req.method().clone();
    match path.as_str() {
        "/healthz" => return Ok(full(StatusCode::OK, "text/plain", "ok\n")),
        "/readyz" => return Ok(readyz(&inner)),
        "/metrics" => return metrics(&inner),
        p if super::layers::is_ui(p) => {
            return if m == Method::GET || m == Method::HEAD {
                Ok(super::ui::route(
                    &inner,
                    p,
                    req.uri().query(),
                    req.headers(),
                ))
            } else {
                Err(method_not_allowed(&m, p))
            };
        }
        _ => {}
    }
    let Some(rest) = path.strip_prefix(pier_model::api::PREFIX) else {
        return Err(Fail::not_found(format!(
            "no such path {path:?}; the API is under {}",
            pier_model::api::PREFIX
        )));
    };
    let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let watch = wants_watch(&req)?;
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let get = m == Method::GET;
    match segs.as_slice() {
        ["version"] if get => {
            let s = inner.st.snapshot.borrow().clone();
            Ok(json(
                StatusCode::OK,
                &VersionInfo {
                    version: env!("CARGO_PKG_VERSION").into(),
                    node: inner.st.node.clone(),
                    revision: s.revision,
                    domain: inner.st.dns_domain.clone(),
                },
            ))
        }
        ["problems"] if get => Ok(json(StatusCode::OK, &problems(&inner))),
        ["dashboard", "logins"] if m == Method::POST => super::ui::new_login(&inner),
        ["signals"] if get => super::signals::signals(&inner, watch, peer).await,
        ["apps"] if get => list_apps(&inner, None, None).await,
        ["namespaces", ns, "apps"] if get => list_apps(&inner, Some(parse_ns(ns)?), None).await,
        ["namespaces", ns, "apps", name] if get => {
            list_apps(&inner, Some(parse_ns(ns)?), Some(parse_name(name)?)).await
        }
        ["namespaces", ns, "apps", name] if m == Method::DELETE => {
            delete_app(&inner, parse_ns(ns)?, parse_name(name)?).await
        }
        ["namespaces", ns, "apps", name, verb @ ("apply" | "diff")] if m == Method::POST => {
            let (ns, name) = (parse_ns(ns)?, parse_name(name)?);
            let spec: AppSpec = read_json(req, max_body).await?;
            apply_app(&inner, ns, name, spec, *verb == "apply").await
        }
        [kind] if get => {
            let kind = parse_kind(kind)?;
            list(&inner, kind, Filter::default(), watch, peer).await
        }
        ["nodes", name] if get => {
            let f = Filter {
                namespace: None,
                name: Some(parse_name(name)?),
            };
            get_one(&inner, Resource::Nodes, f).await
        }
        ["namespaces", ns, kind] => {
            let ns = parse_ns(ns)?;
            let kind = parse_kind(kind)?;
            let f = Filter {
                namespace: Some(ns.clone()),
                name: None,
            };
            match (m.clone(), kind) {
                (Method::GET, Resource::Nodes) => Err(Fail::not_found(
                    "nodes are not namespaced; use /api/v1/nodes",
                )),
                (Method::GET, _) => list(&inner, kind, f, watch, peer).await,
                (Method::POST, Resource::ReplicaSets) => {
                    let rs: ReplicaSet = read_json(req, max_body).await?;
                    create_replicaset(&inner, ns, rs).await
                }
                (Method::POST, Resource::Services) => {
                    let svc: Service = read_json(req, max_body).await?;
                    create_service(&inner, ns, svc).await
                }
                _ => Err(method_not_allowed(&m, &path)),
            }
        }
        ["namespaces", ns, kind, name] => {
            let ns = parse_ns(ns)?;
            let kind = parse_kind(kind)?;
            let name = parse_name(name)?;
            match (m.clone(), kind) {
                (Method::GET, Resource::Endpoints) => {
                    let f = Filter {
                        namespace: Some(ns.clone()),
                        name: Some(name.clone()),
                    };
                    if watch {
                        return list(&inner, kind, f, true, peer).await;
                    }
                    let s = synced(&inner).await?;
                    if s.service(&ns, &name).is_none() {
                        return Err(Fail::not_found(format!(
                            "service {name:?} not found in namespace {ns:?}"
                        )));
                    }
                    list(&inner, kind, f, false, peer).await
                }
                (Method::GET, _) => {
                    let f = Filter {
                        namespace: Some(ns),
                        name: Some(name),
                    };
                    if watch {
                        list(&inner, kind, f, true, peer).await
                    } else {
                        get_one(&inner, kind, f).await
                    }
                }
                (Method::DELETE, Resource::ReplicaSets) => {
                    delete_replicaset(&inner, ns, name).await
                }
                (Method::DELETE, Resource::Pods) => delete_pod(&inner, ns, name).await,
                (Method::DELETE, Resource::Services) => delete_service(&inner, ns, name).await,
                (Method::PUT, Resource::ReplicaSets) => {
                    let rs: ReplicaSet = read_json(req, max_body).await?;
                    replace_replicaset(&inner, ns, name, rs).await
                }
                _ => Err(method_not_allowed(&m, &path)),
            }
        }
        ["namespaces", ns, "replicasets", name, "scale"]
            if m == Method::PUT || m == Method::POST =>
        {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            let r: ScaleRequest = read_json(req, max_body).await?;
            scale(&inner, ns, name, r).await
        }
        ["namespaces", ns, "replicasets", name, "autoscale"] => {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            match m {
                Method::GET => autoscale_view(&inner, ns, name).await,
                Method::PUT | Method::POST => {
                    let r: AutoscaleRequest = read_json(req, max_body).await?;
                    autoscale(&inner, ns, name, Some(r)).await
                }
                Method::DELETE => autoscale(&inner, ns, name, None).await,
                _ => Err(method_not_allowed(&m, &path)),
            }
        }
        ["namespaces", ns, "replicasets", name, "image"] if m == Method::PUT => {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            let r: SetImageRequest = read_json(req, max_body).await?;
            set_image(&inner, ns, name, r).await
        }
        ["namespaces", ns, "replicasets", name, "rollback"] if m == Method::POST => {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            let r: RollbackRequest = read_json(req, max_body).await?;
            rollback(&inner, ns, name, r).await
        }
        ["nodes", name, "labels"] if m == Method::PATCH || m == Method::PUT => {
            let name = parse_name(name)?;
            let r: NodeLabelsRequest = read_json(req, max_body).await?;
            label_node(&inner, name, r).await
        }
        ["namespaces", ns, "replicasets", name, "expose"] if m == Method::POST => {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            let r: ExposeRequest = read_json(req, max_body).await?;
            expose(&inner, ns, name, r).await
        }
        _ => Err(Fail::not_found(format!("no such path {path:?} for {m}"))),
    }
}
