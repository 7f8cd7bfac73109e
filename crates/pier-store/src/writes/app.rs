//! `pier apply`, `pier diff` and `pier delete -f`: an application's
//! desired objects against the store's, as one revision-checked
//! transaction.
//!
//! [`plan`] and [`plan_delete`] are pure: the spec, what the namespace
//! holds now and the allocation state in, the changes and the transaction
//! out (built with the same [`Batch`] claims as every other write here).
//! The API's handlers read, call them, and [`commit`] the transaction. The
//! transaction compares the application's key and every object it touches
//! at the revisions read, so two applies racing (or an apply racing `pier scale`) never leave a mix:
//! one wins, the other gets a conflict and wrote nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use pier_model::app::{App, AppComponent, AppPlan, AppSpec, Change, ChangeAction};
use pier_model::{
    Allocation, Name, Namespace, PortNum, ReplicaSet, Service, ServiceType, encode, keys,
};
use serde::Serialize;

use super::{Batch, Conflict, WriteError, next_spec};
use crate::alloc::{self, AllocConfig, alloc_value, node_ports_of};
use crate::{Revision, Store, Txn};

/// etcd's default `--max-txn-ops`: the most operations one transaction may
/// carry (compares and writes are counted separately).
pub const MAX_TXN_OPS: usize = 128;

/// Why an apply was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The request is wrong: 400.
    Bad(String),
    /// The namespace holds something that stands in the way, or the
    /// application moved on since the revision the client expected: 409.
    Conflict(String),
}

/// What the namespace holds now, with each key's `mod_revision`.
#[derive(Debug, Clone, Default)]
pub struct Current {
    pub app: Option<(App, Revision)>,
    pub replicasets: BTreeMap<Name, (ReplicaSet, Revision)>,
    pub services: BTreeMap<Name, (Service, Revision)>,
    /// Allocated VIPs, and node ports with their holders, cluster-wide.
    pub vips: BTreeSet<IpAddr>,
    pub node_ports: BTreeMap<u16, Allocation>,
}

/// The changes and the transaction that makes them.
#[derive(Debug, Clone)]
pub struct Planned {
    pub changes: Vec<Change>,
    /// `None` when nothing changes: nothing is written.
    pub txn: Option<Txn>,
    pub from_revision: Revision,
}

fn app_rev(cur: &Current) -> Revision {
    cur.app.as_ref().map(|(_, r)| *r).unwrap_or(0)
}

fn owned(cur: &Current) -> (BTreeSet<Name>, BTreeSet<Name>) {
    let mut rs = BTreeSet::new();
    let mut svc = BTreeSet::new();
    if let Some((app, _)) = &cur.app {
        for c in &app.components {
            rs.insert(c.name.clone());
            if c.service {
                svc.insert(c.name.clone());
            }
        }
    }
    (rs, svc)
}

/// The top-level and second-level fields where two objects differ, as
/// `template.image`.
pub fn changed_fields<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    fn walk(
        a: &serde_json::Value,
        b: &serde_json::Value,
        path: &str,
        depth: u32,
        out: &mut Vec<String>,
    ) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) if depth < 2 => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => walk(u, v, &p, depth + 1, out),
                        (None, None) => {}
                        _ => out.push(p),
                    }
                }
            }
            _ if a != b => out.push(path.to_owned()),
            _ => {}
        }
    }
    let a = serde_json::to_value(old).expect("model objects serialize");
    let b = serde_json::to_value(new).expect("model objects serialize");
    let mut out = Vec::new();
    walk(&a, &b, "", 0, &mut out);
    out
}

fn check_spec(spec: &AppSpec, ns: &Namespace, name: &Name) -> Result<(), PlanError> {
    let bad = |m: String| Err(PlanError::Bad(m));
    if &spec.namespace != ns || &spec.name != name {
        return bad(format!(
            "the body is application {}/{} but the path says {ns}/{name}",
            spec.namespace, spec.name
        ));
    }
    if spec.components.is_empty() {
        return bad("components: an application needs at least one service".into());
    }
    let mut seen = BTreeSet::new();
    for c in &spec.components {
        let p = format!("services.{}", c.name);
        if !seen.insert(&c.name) {
            return bad(format!("{p}: given twice"));
        }
        if c.replicaset.name != c.name || &c.replicaset.namespace != ns {
            return bad(format!("{p}: its replica set must be {ns}/{}", c.name));
        }
        if let Some(s) = &c.service
            && (s.name != c.name || &s.namespace != ns)
        {
            return bad(format!("{p}: its service must be {ns}/{}", c.name));
        }
    }
    Ok(())
}

/// Decide what an apply of `spec` changes. `now` stamps new objects.
pub fn plan(
    spec: &AppSpec,
    cur: &Current,
    cfg: &AllocConfig,
    now: u64,
) -> Result<Planned, PlanError> {
    let ns = &spec.namespace;
    check_spec(spec, ns, &spec.name)?;
    let from = app_rev(cur);
    if let Some(want) = spec.expect_revision
        && want != from
    {
        return Err(PlanError::Conflict(format!(
            "application {ns}/{} is at revision {from}, not {want}: it was applied or deleted since; run pier diff -f again and re-apply",
            spec.name
        )));
    }
    let (own_rs, own_svc) = owned(cur);
    let app_key = keys::app(ns, &spec.name);
    let mut b = Batch::default();
    b.at_revision(app_key.clone(), from);
    let mut changes = Vec::new();
    let mut vips = cur.vips.clone();
    let mut taken: BTreeMap<u16, String> = BTreeMap::new();
    let change = |action, kind: &str, name: &Name, fields: Vec<String>| Change {
        action,
        kind: kind.into(),
        name: name.clone(),
        fields,
    };
    let not_ours = |kind: &str, n: &Name, how: &str| {
        PlanError::Conflict(format!(
            "services.{n}: {kind} {ns}/{n} exists and is not part of application {}; delete it ({how}) or rename the Compose service",
            spec.name
        ))
    };
    for c in &spec.components {
        let rs_key = keys::replicaset(ns, &c.name);
        match cur.replicasets.get(&c.name) {
            Some(_) if !own_rs.contains(&c.name) => {
                return Err(not_ours(
                    "replicaset",
                    &c.name,
                    &format!("pier delete rs {}", c.name),
                ));
            }
            Some((old, rev)) => {
                let new = next_revision(old, c.replicaset.clone(), now);
                if &new == old {
                    changes.push(change(
                        ChangeAction::Unchanged,
                        "replicaset",
                        &c.name,
                        vec![],
                    ));
                } else {
                    changes.push(change(
                        ChangeAction::Update,
                        "replicaset",
                        &c.name,
                        changed_fields(old, &new),
                    ));
                    b.at_revision(rs_key.clone(), *rev);
                    b.put(rs_key, encode(&new));
                }
            }
            None => {
                let mut new = c.replicaset.clone();
                new.created_at = now;
                new.revision = 1;
                changes.push(change(ChangeAction::Create, "replicaset", &c.name, vec![]));
                b.claim(rs_key, encode(&new));
            }
        }
        let svc_key = keys::service(ns, &c.name);
        let old = cur.services.get(&c.name);
        if old.is_some() && !own_svc.contains(&c.name) {
            return Err(not_ours(
                "service",
                &c.name,
                &format!("pier delete svc {}", c.name),
            ));
        }
        match (&c.service, old) {
            (None, None) => {}
            (None, Some((old, rev))) => {
                changes.push(change(ChangeAction::Delete, "service", &c.name, vec![]));
                delete_service(old, *rev, &mut b);
            }
            (Some(want), old) => {
                let mut new = want.clone();
                let old_ports: BTreeSet<u16> =
                    old.map(|(o, _)| node_ports_of(o)).unwrap_or_default();
                for (i, p) in new.ports.iter().enumerate() {
                    let Some(np) = p.node_port else { continue };
                    let n = np.get();
                    if n < cfg.node_port_min || n > cfg.node_port_max {
                        return Err(PlanError::Bad(format!(
                            "services.{}.ports: published port {n} (container port {}) is outside pier's node-port range {}-{}; publish a port inside it, or widen [network] node_port_min/node_port_max in every agent's config",
                            c.name, p.target_port, cfg.node_port_min, cfg.node_port_max
                        )));
                    }
                    if let Some(by) = cur.node_ports.get(&n)
                        && !old_ports.contains(&n)
                    {
                        return Err(PlanError::Conflict(format!(
                            "services.{}.ports[{i}]: published port {n} is already taken by service {}/{}",
                            c.name, by.namespace, by.service
                        )));
                    }
                    if let Some(other) = taken.insert(n, c.name.to_string()) {
                        return Err(PlanError::Bad(format!(
                            "services.{}.ports: published port {n} is also published by services.{other}",
                            c.name
                        )));
                    }
                }
                match old {
                    Some((old, rev)) => {
                        if new.headless != old.headless {
                            return Err(PlanError::Bad(format!(
                                "services.{}.x-pier.headless: a service cannot change between headless and not; remove the service from the file, apply, and add it back",
                                c.name
                            )));
                        }
                        new.vip = old.vip;
                        new.vip6 = old.vip6;
                        new.created_at = old.created_at;
                        if &new == old {
                            changes.push(change(
                                ChangeAction::Unchanged,
                                "service",
                                &c.name,
                                vec![],
                            ));
                            continue;
                        }
                        changes.push(change(
                            ChangeAction::Update,
                            "service",
                            &c.name,
                            changed_fields(old, &new),
                        ));
                        b.at_revision(svc_key.clone(), *rev);
                        let new_ports = node_ports_of(&new);
                        for n in new_ports.difference(&old_ports) {
                            b.claim(keys::node_port_alloc(port(*n)), alloc_value(&new));
                        }
                        for n in old_ports.difference(&new_ports) {
                            b.delete(keys::node_port_alloc(port(*n)));
                        }
                        b.put(svc_key, encode(&new));
                    }
                    None => {
                        if !new.headless {
                            let vip = alloc::pick_vip(cfg, &vips).map_err(|e| {
                                PlanError::Conflict(format!("services.{}: {e}", c.name))
                            })?;
                            vips.insert(vip);
                            new.vip = Some(vip);
                            b.claim(keys::vip_alloc(vip), alloc_value(&new));
                            let vip6 = alloc::pick_vip6(cfg, &vips).map_err(|e| {
                                PlanError::Conflict(format!("services.{}: {e}", c.name))
                            })?;
                            if let Some(v6) = vip6 {
                                vips.insert(v6);
                                new.vip6 = Some(v6);
                                b.claim(keys::vip_alloc(v6), alloc_value(&new));
                            }
                        }
                        new.created_at = now;
                        if new.ports.iter().any(|p| p.node_port.is_some()) {
                            new.service_type = ServiceType::NodePort;
                        }
                        changes.push(change(ChangeAction::Create, "service", &c.name, vec![]));
                        for n in node_ports_of(&new) {
                            b.claim(keys::node_port_alloc(port(n)), alloc_value(&new));
                        }
                        b.claim(svc_key, encode(&new));
                    }
                }
            }
        }
    }
    // What the application owned and the file no longer lists.
    let wanted: BTreeSet<&Name> = spec.components.iter().map(|c| &c.name).collect();
    for n in own_rs.iter().filter(|n| !wanted.contains(n)) {
        if let Some((_, rev)) = cur.replicasets.get(n) {
            changes.push(change(ChangeAction::Delete, "replicaset", n, vec![]));
            let k = keys::replicaset(ns, n);
            b.at_revision(k.clone(), *rev);
            b.delete(k);
        }
        if own_svc.contains(n)
            && let Some((old, rev)) = cur.services.get(n)
        {
            changes.push(change(ChangeAction::Delete, "service", n, vec![]));
            delete_service(old, *rev, &mut b);
        }
    }
    let components: Vec<AppComponent> = spec
        .components
        .iter()
        .map(|c| AppComponent {
            name: c.name.clone(),
            service: c.service.is_some(),
            labels: c.labels.clone(),
        })
        .collect();
    let record_same = cur
        .app
        .as_ref()
        .is_some_and(|(a, _)| a.components == components && a.files == spec.files);
    if b.ops.is_empty() && record_same {
        return Ok(Planned {
            changes,
            txn: None,
            from_revision: from,
        });
    }
    let app = App {
        name: spec.name.clone(),
        namespace: ns.clone(),
        components,
        generation: cur.app.as_ref().map(|(a, _)| a.generation).unwrap_or(0) + 1,
        files: spec.files.clone(),
        created_at: cur.app.as_ref().map(|(a, _)| a.created_at).unwrap_or(now),
        updated_at: now,
    };
    changes.push(change(
        if cur.app.is_some() {
            ChangeAction::Update
        } else {
            ChangeAction::Create
        },
        "app",
        &spec.name,
        vec![],
    ));
    b.put(app_key, encode(&app));
    Ok(Planned {
        changes,
        txn: Some(checked_txn(b)?),
        from_revision: from,
    })
}

/// The replica set `want` as it replaces `old`: an autoscaled set keeps
/// its count (within the file's bounds); the revision and the history are
/// [`next_spec`]'s, as for a `PUT` (the same revision when the template is
/// the same, else the next one, the old template kept for `rollout undo`).
fn next_revision(old: &ReplicaSet, mut want: ReplicaSet, now: u64) -> ReplicaSet {
    // The autoscaler owns the count of a set it scales (as an HPA owns a
    // Deployment's): an apply keeps it, within the file's bounds.
    if want.sla.is_some()
        && let (Some(min), Some(max)) = (want.min_replicas, want.max_replicas)
    {
        want.replicas = old.replicas.clamp(min, max);
    }
    // A set stored before revisions were counted is revision 1.
    let mut old = old.clone();
    old.revision = old.revision.max(1);
    next_spec(&old, want, "apply", now)
}

/// What `pier delete -f` removes: everything the application owns.
pub fn plan_delete(ns: &Namespace, name: &Name, cur: &Current) -> Result<Planned, PlanError> {
    let Some((app, rev)) = &cur.app else {
        return Err(PlanError::Bad(format!(
            "application {ns}/{name} does not exist; `pier get apps` lists them"
        )));
    };
    let mut b = Batch::default();
    b.at_revision(keys::app(ns, name), *rev);
    b.delete(keys::app(ns, name));
    let mut changes = Vec::new();
    for c in &app.components {
        if let Some((_, r)) = cur.replicasets.get(&c.name) {
            let k = keys::replicaset(ns, &c.name);
            b.at_revision(k.clone(), *r);
            b.delete(k);
            changes.push(Change {
                action: ChangeAction::Delete,
                kind: "replicaset".into(),
                name: c.name.clone(),
                fields: vec![],
            });
        }
        if c.service
            && let Some((s, r)) = cur.services.get(&c.name)
        {
            delete_service(s, *r, &mut b);
            changes.push(Change {
                action: ChangeAction::Delete,
                kind: "service".into(),
                name: c.name.clone(),
                fields: vec![],
            });
        }
    }
    changes.push(Change {
        action: ChangeAction::Delete,
        kind: "app".into(),
        name: name.clone(),
        fields: vec![],
    });
    Ok(Planned {
        changes,
        txn: Some(checked_txn(b)?),
        from_revision: *rev,
    })
}

/// The batch as one transaction, if etcd takes one that large.
fn checked_txn(b: Batch) -> Result<Txn, PlanError> {
    let n = b.compares.len().max(b.ops.len());
    if n > MAX_TXN_OPS {
        return Err(PlanError::Bad(format!(
            "this apply needs {n} operations in one transaction and etcd allows {MAX_TXN_OPS} by default (--max-txn-ops); split the application into two projects, or raise --max-txn-ops on every etcd member"
        )));
    }
    Ok(b.into_txn())
}

fn port(n: u16) -> PortNum {
    PortNum::new(n).expect("node ports in the store are valid ports")
}

/// Deletes service `s` (at `rev`) and frees its allocations.
fn delete_service(s: &Service, rev: Revision, b: &mut Batch) {
    let k = keys::service(&s.namespace, &s.name);
    b.at_revision(k.clone(), rev);
    b.delete(k);
    for vip in s.vip.into_iter().chain(s.vip6) {
        b.delete(keys::vip_alloc(vip));
    }
    for n in node_ports_of(s) {
        b.delete(keys::node_port_alloc(port(n)));
    }
}

/// Writes a planned transaction. Returns the store's revision after it;
/// a conflict when the application or one of its objects changed since the
/// read the plan was made from (nothing was written then).
pub async fn commit(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    txn: Txn,
) -> Result<Revision, WriteError> {
    let r = store.txn(txn).await?;
    if !r.succeeded {
        return Err(WriteError::Conflict(Conflict::App {
            namespace: ns.clone(),
            name: name.clone(),
        }));
    }
    Ok(r.revision)
}

/// The answer for the client.
pub fn answer(spec_ns: &Namespace, name: &Name, p: &Planned, to: Option<Revision>) -> AppPlan {
    AppPlan {
        name: name.clone(),
        namespace: spec_ns.clone(),
        from_revision: p.from_revision,
        to_revision: to,
        changes: p.changes.clone(),
        applied: to.is_some(),
    }
}

#[cfg(test)]
mod tests;
