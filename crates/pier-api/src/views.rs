//! What the API shows of a snapshot: the views of each kind, keyed, for
//! lists, gets and watches alike.

use std::collections::BTreeMap;

use pier_model::api::{NodeView, PodView, ReplicaSetView, Resource};
use pier_model::app::{AppServiceView, AppView};
use pier_model::{Name, Namespace, ObjectKey, Pod, PodPhase, ReplicaSet, Snapshot};
use serde_json::Value;

/// Which objects a list or watch wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// `None`: every namespace.
    pub namespace: Option<Namespace>,
    /// `None`: every object. For endpoints, the service's name.
    pub name: Option<Name>,
}

impl Filter {
    fn ns_ok(&self, ns: &Namespace) -> bool {
        self.namespace.as_ref().is_none_or(|n| n == ns)
    }
    fn name_ok(&self, name: &Name) -> bool {
        self.name.as_ref().is_none_or(|n| n == name)
    }
}

pub(crate) fn pod_view(s: &Snapshot, pod: &Pod) -> PodView {
    let st = s
        .pod_statuses
        .get(&(pod.namespace.clone(), pod.name.clone()));
    PodView {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        replicaset: pod.replicaset.clone(),
        node: pod.node.clone(),
        phase: st.map(|st| st.phase).unwrap_or_default(),
        ready: st.is_some_and(|st| st.ready && st.phase == PodPhase::Running),
        ip: st.and_then(|st| st.ip),
        container_id: st.and_then(|st| st.container_id.clone()),
        restarts: st.map(|st| st.restarts).unwrap_or(0),
        message: st.map(|st| st.message.clone()).unwrap_or_default(),
        image: pod.template.image.clone(),
        created_at: pod.created_at,
        started_at: st.and_then(|st| st.started_at),
    }
}

/// Pod counts of one replica set.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    current: u32,
    ready: u32,
    /// On the replica set's current template.
    updated: u32,
    updated_ready: u32,
}

/// Pod counts per replica set.
fn rs_counts(s: &Snapshot) -> BTreeMap<ObjectKey, Counts> {
    let hashes: BTreeMap<&ObjectKey, String> = s
        .replicasets
        .iter()
        .map(|(k, rs)| (k, rs.template.hash()))
        .collect();
    let mut out: BTreeMap<ObjectKey, Counts> = BTreeMap::new();
    for pod in s.pods.values() {
        let k = (pod.namespace.clone(), pod.replicaset.clone());
        let updated = hashes.get(&k).is_some_and(|h| *h == pod.template_hash);
        let e = out.entry(k).or_default();
        let ready = pod_view(s, pod).ready;
        e.current += 1;
        e.ready += u32::from(ready);
        e.updated += u32::from(updated);
        e.updated_ready += u32::from(updated && ready);
    }
    out
}

fn rs_view(s: &Snapshot, rs: &ReplicaSet, counts: &BTreeMap<ObjectKey, Counts>) -> ReplicaSetView {
    let key = (rs.namespace.clone(), rs.name.clone());
    let c = counts.get(&key).copied().unwrap_or_default();
    ReplicaSetView {
        spec: rs.clone(),
        current: c.current,
        ready: c.ready,
        updated: c.updated,
        updated_ready: c.updated_ready,
        // Not an earlier set of the same name's, which the supervisor has
        // not removed yet.
        rollout: s
            .rollouts
            .get(&key)
            .filter(|r| r.is_of_set(rs.created_at))
            .map(|r| (**r).clone()),
        problem: s.problems.get(&key).map(|p| p.message.clone()),
    }
}

/// A row of `pier get apps`: each component's desired and ready pods, its
/// VIP ports and node ports, and the supervisor's problem if any.
pub(crate) fn app_view(s: &Snapshot, app: &pier_model::app::App, revision: i64) -> AppView {
    let counts = rs_counts(s);
    let mut ready_all = true;
    let services = app
        .components
        .iter()
        .map(|c| {
            let key = (app.namespace.clone(), c.name.clone());
            let desired = s
                .replicasets
                .get(&key)
                .map(|r| r.replicas.get())
                .unwrap_or(0);
            // Ready on the current template: an app in the middle of a
            // rollout is not ready yet.
            let n = counts.get(&key).copied().unwrap_or_default();
            let ready = n.updated_ready;
            ready_all &=
                ready >= desired && n.current == desired && s.replicasets.contains_key(&key);
            let ports = if c.service {
                s.services
                    .get(&key)
                    .map(|svc| {
                        svc.ports
                            .iter()
                            .map(|p| {
                                let vip = svc.vip.map(|v| v.to_string()).unwrap_or_default();
                                match p.node_port {
                                    Some(np) => format!("{vip}:{} (node port {np})", p.port),
                                    None => format!("{vip}:{}", p.port),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                vec![]
            };
            AppServiceView {
                name: c.name.clone(),
                desired,
                ready,
                ports,
                problem: s.problems.get(&key).map(|p| p.message.clone()),
            }
        })
        .collect();
    AppView {
        name: app.name.clone(),
        namespace: app.namespace.clone(),
        generation: app.generation,
        revision,
        files: app.files.clone(),
        services,
        ready: ready_all,
        updated_at: app.updated_at,
    }
}

pub(crate) fn replicaset_view(s: &Snapshot, rs: &ReplicaSet) -> ReplicaSetView {
    rs_view(s, rs, &rs_counts(s))
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API views serialize to JSON")
}

/// The objects of `kind` that pass `f`, keyed by `ns/name` (endpoints by
/// `ns/service/node/id`), in key order.
pub(crate) fn collect(kind: Resource, s: &Snapshot, f: &Filter) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    match kind {
        Resource::Nodes => {
            let mut pods: BTreeMap<&Name, u32> = BTreeMap::new();
            for p in s.pods.values() {
                *pods.entry(&p.node).or_default() += 1;
            }
            for (name, n) in s.nodes.iter() {
                if !f.name_ok(name) {
                    continue;
                }
                let v = NodeView {
                    name: n.name.clone(),
                    addr: n.addr,
                    ready: s.stale_since_ms.is_none() && !s.held_nodes.contains_key(name),
                    labels: s.node_labels(name),
                    mesh_port: n.mesh_port,
                    capacity: n.capacity,
                    version: n.version.clone(),
                    started_at: n.started_at,
                    pods: pods.get(name).copied().unwrap_or(0),
                    refused: n.refused.clone(),
                    runtime_down_since: n.runtime_down_since,
                };
                out.insert(name.to_string(), to_value(&v));
            }
        }
        Resource::ReplicaSets => {
            let counts = rs_counts(s);
            for ((ns, name), rs) in s.replicasets.iter() {
                if f.ns_ok(ns) && f.name_ok(name) {
                    out.insert(format!("{ns}/{name}"), to_value(&rs_view(s, rs, &counts)));
                }
            }
        }
        Resource::Pods => {
            for ((ns, name), pod) in s.pods.iter() {
                if f.ns_ok(ns) && f.name_ok(name) {
                    out.insert(format!("{ns}/{name}"), to_value(&pod_view(s, pod)));
                }
            }
        }
        Resource::Services => {
            for ((ns, name), svc) in s.services.iter() {
                if f.ns_ok(ns) && f.name_ok(name) {
                    out.insert(format!("{ns}/{name}"), to_value(&**svc));
                }
            }
        }
        Resource::Endpoints => {
            for ((ns, svc), eps) in s.endpoints.iter() {
                if !(f.ns_ok(ns) && f.name_ok(svc)) {
                    continue;
                }
                for ((node, id), ep) in eps.iter() {
                    out.insert(format!("{ns}/{svc}/{node}/{id}"), to_value(&**ep));
                }
            }
        }
    }
    out
}

/// Whether `new` shows the same objects of `kind` under `f` as `old` did,
/// judged by the pointers of the maps the view reads (the reflector
/// replaces only the maps a change touched). `false` may be a false alarm
/// (the caller then rebuilds and diffs); `true` is never wrong, because the
/// caller holds `old`, so its maps cannot be freed and their addresses
/// reused.
pub(crate) fn unchanged(kind: Resource, f: &Filter, old: &Snapshot, new: &Snapshot) -> bool {
    use std::sync::Arc;
    match kind {
        Resource::Nodes => {
            old.nodes.ptr_eq(&new.nodes)
                && old.pods.ptr_eq(&new.pods)
                && Arc::ptr_eq(&old.held_nodes, &new.held_nodes)
                && old.stale_since_ms.is_none() == new.stale_since_ms.is_none()
        }
        Resource::ReplicaSets => {
            old.replicasets.ptr_eq(&new.replicasets)
                && old.pods.ptr_eq(&new.pods)
                && old.pod_statuses.ptr_eq(&new.pod_statuses)
                && old.rollouts.ptr_eq(&new.rollouts)
                && old.problems.ptr_eq(&new.problems)
        }
        Resource::Pods => old.pods.ptr_eq(&new.pods) && old.pod_statuses.ptr_eq(&new.pod_statuses),
        Resource::Services => old.services.ptr_eq(&new.services),
        Resource::Endpoints => {
            if old.endpoints.ptr_eq(&new.endpoints) {
                return true;
            }
            // One service's endpoints: only that service's map matters.
            match (&f.namespace, &f.name) {
                (Some(ns), Some(name)) => {
                    let k = (ns.clone(), name.clone());
                    match (old.endpoints.get(&k), new.endpoints.get(&k)) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    }
                }
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ep_map() -> Arc<pier_model::EndpointMap> {
        Arc::new(pier_model::EndpointMap::new())
    }

    #[test]
    fn unchanged_follows_the_maps_a_view_reads() {
        let a = Snapshot::default();
        let mut b = a.clone();
        let all = Filter::default();
        for k in [
            Resource::Nodes,
            Resource::ReplicaSets,
            Resource::Pods,
            Resource::Services,
            Resource::Endpoints,
        ] {
            assert!(unchanged(k, &all, &a, &b), "{k:?}");
        }
        // A changed pod map: pods, replica sets and nodes rebuild; services
        // do not.
        let key = (Namespace::default(), Name::new("x").unwrap());
        let pod: pier_model::Pod = serde_json::from_value(serde_json::json!({
            "name": "x", "replicaset": "web", "node": "n1", "template_hash": "h",
            "template": {"image": "i"}, "created_at": 1,
        }))
        .unwrap();
        b.pods.insert(key.clone(), Arc::new(pod));
        assert!(!unchanged(Resource::Pods, &all, &a, &b));
        assert!(!unchanged(Resource::ReplicaSets, &all, &a, &b));
        assert!(!unchanged(Resource::Nodes, &all, &a, &b));
        assert!(unchanged(Resource::Services, &all, &a, &b));
        assert!(unchanged(Resource::Endpoints, &all, &a, &b));
        // Rollout records and problems are part of a replica set's view.
        let mut r = a.clone();
        r.rollouts.insert(key.clone(), Arc::default());
        assert!(!unchanged(Resource::ReplicaSets, &all, &a, &r));
        let mut p = a.clone();
        p.problems.insert(
            key.clone(),
            Arc::new(pier_model::ReplicaSetProblem {
                message: "m".into(),
                reported_by: Name::new("n1").unwrap(),
            }),
        );
        assert!(!unchanged(Resource::ReplicaSets, &all, &a, &p));
        assert!(unchanged(Resource::Pods, &all, &a, &p));

        // Endpoints of one service: another service's change is skipped.
        let ns = Namespace::default();
        let (x, y) = (Name::new("x").unwrap(), Name::new("y").unwrap());
        let mut m = BTreeMap::new();
        m.insert((ns.clone(), x.clone()), ep_map());
        m.insert((ns.clone(), y.clone()), ep_map());
        let mut c = Snapshot {
            endpoints: pier_model::Map::from(m),
            ..Snapshot::default()
        };
        let mut d = c.clone();
        d.endpoints.insert((ns.clone(), y.clone()), ep_map());
        let fx = Filter {
            namespace: Some(ns.clone()),
            name: Some(x.clone()),
        };
        let fy = Filter {
            namespace: Some(ns.clone()),
            name: Some(y.clone()),
        };
        assert!(unchanged(Resource::Endpoints, &fx, &c, &d));
        assert!(!unchanged(Resource::Endpoints, &fy, &c, &d));
        assert!(!unchanged(Resource::Endpoints, &all, &c, &d));
        // A service's map appearing is a change.
        c.endpoints.remove(&(ns.clone(), x.clone()));
        assert!(!unchanged(Resource::Endpoints, &fx, &c, &d));
    }
}
