//! The application handlers: apply, diff, delete and list. They read
//! what [`apply::plan`] needs from the store (not the snapshot: the
//! transaction compares the revisions read here), call it, and write its
//! transaction with [`apply::commit`] (`pier_store::writes::app`).

use http::{Response, StatusCode};
use pier_model::app::{App, AppSpec};
use pier_model::{Name, Namespace, ReplicaSet, Service, decode, keys};
use pier_store::Txn;
use pier_store::alloc;
use pier_store::writes::app as apply;
use serde::de::DeserializeOwned;
use tracing::info;

use super::plumbing::{Body, Fail, json};
use super::reads::synced;
use super::validate::validate_replicaset;
use super::writes::settle;
use super::{Inner, now_ms};
use crate::views;

impl From<apply::PlanError> for Fail {
    fn from(e: apply::PlanError) -> Fail {
        match e {
            apply::PlanError::Bad(m) => Fail::bad(m),
            apply::PlanError::Conflict(m) => Fail::conflict(m),
        }
    }
}

fn decode_or_500<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, Fail> {
    decode(key, value).map_err(|e| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}; fix or delete it"),
        )
    })
}

/// Everything [`apply::plan`] looks at, read from the store (not the
/// snapshot: the transaction compares the revisions read here).
async fn read_current(inner: &Inner, ns: &Namespace, name: &Name) -> Result<apply::Current, Fail> {
    let store = &inner.st.store;
    let mut cur = apply::Current::default();
    let app_key = keys::app(ns, name);
    if let Some(kv) = store.get(&app_key).await? {
        cur.app = Some((decode_or_500(&app_key, &kv.value)?, kv.mod_revision));
    }
    for kv in store.list(&keys::prefix::replicasets_in(ns)).await?.kvs {
        let rs: ReplicaSet = decode_or_500(&kv.key, &kv.value)?;
        cur.replicasets
            .insert(rs.name.clone(), (rs, kv.mod_revision));
    }
    for kv in store.list(&keys::prefix::services_in(ns)).await?.kvs {
        let s: Service = decode_or_500(&kv.key, &kv.value)?;
        cur.services.insert(s.name.clone(), (s, kv.mod_revision));
    }
    cur.vips = alloc::used_vips(&**store).await?;
    cur.node_ports = alloc::used_node_ports(&**store).await?;
    Ok(cur)
}

pub(super) async fn apply_app(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    spec: AppSpec,
    write: bool,
) -> Result<Response<Body>, Fail> {
    let cur = read_current(inner, &ns, &name).await?;
    if spec.namespace != ns || spec.name != name {
        return Err(Fail::bad(format!(
            "the body is application {}/{} but the path says {ns}/{name}",
            spec.namespace, spec.name
        )));
    }
    for c in &spec.components {
        validate_replicaset(&c.replicaset)
            .map_err(|f| Fail::bad(format!("services.{}: {}", c.name, f.message)))?;
    }
    let planned = apply::plan(&spec, &cur, &inner.st.alloc, now_ms())?;
    let txn = match (&planned.txn, write) {
        (Some(t), true) => t.clone(),
        _ => {
            return Ok(json(
                StatusCode::OK,
                &apply::answer(&ns, &name, &planned, None),
            ));
        }
    };
    commit_app(inner, &ns, &name, planned, txn).await
}

async fn commit_app(
    inner: &Inner,
    ns: &Namespace,
    name: &Name,
    planned: apply::Planned,
    txn: Txn,
) -> Result<Response<Body>, Fail> {
    let rev = apply::commit(&*inner.st.store, ns, name, txn).await?;
    info!(namespace = %ns, app = %name, revision = rev, changes = planned.changes.len(), "application written");
    settle(inner, |s| s.revision >= rev).await;
    Ok(json(
        StatusCode::OK,
        &apply::answer(ns, name, &planned, Some(rev)),
    ))
}

pub(super) async fn delete_app(
    inner: &Inner,
    ns: Namespace,
    name: Name,
) -> Result<Response<Body>, Fail> {
    let cur = read_current(inner, &ns, &name).await?;
    if cur.app.is_none() {
        return Err(Fail::not_found(format!(
            "application {name:?} not found in namespace {ns:?}; `pier get apps` lists them"
        )));
    }
    let planned = apply::plan_delete(&ns, &name, &cur)?;
    let txn = planned.txn.clone().expect("a delete always writes");
    commit_app(inner, &ns, &name, planned, txn).await
}

pub(super) async fn list_apps(
    inner: &Inner,
    ns: Option<Namespace>,
    name: Option<Name>,
) -> Result<Response<Body>, Fail> {
    let prefix = match &ns {
        Some(ns) => keys::prefix::apps_in(ns),
        None => keys::prefix::APPS.to_owned(),
    };
    let kvs = inner.st.store.list(&prefix).await?.kvs;
    let s = synced(inner).await?;
    let mut out = Vec::new();
    for kv in kvs {
        let app: App = match decode(&kv.key, &kv.value) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping an application that does not parse");
                continue;
            }
        };
        if name.as_ref().is_some_and(|n| n != &app.name) {
            continue;
        }
        out.push(views::app_view(&s, &app, kv.mod_revision));
    }
    if let (Some(ns), Some(n)) = (&ns, &name)
        && out.is_empty()
    {
        return Err(Fail::not_found(format!(
            "application {n:?} not found in namespace {ns:?}; `pier get apps` lists them"
        )));
    }
    Ok(json(StatusCode::OK, &out))
}
