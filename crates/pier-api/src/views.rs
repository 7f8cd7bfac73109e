//! What the API shows of a snapshot: the views of each kind, keyed, for
//! lists, gets and watches alike.

use std::collections::BTreeMap;

use pier_model::api::{NodeView, PodView, ReplicaSetView, Resource};
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

/// `(current, ready)` pods per replica set.
fn rs_counts(s: &Snapshot) -> BTreeMap<ObjectKey, (u32, u32)> {
    let mut out: BTreeMap<ObjectKey, (u32, u32)> = BTreeMap::new();
    for pod in s.pods.values() {
        let e = out
            .entry((pod.namespace.clone(), pod.replicaset.clone()))
            .or_default();
        e.0 += 1;
        if pod_view(s, pod).ready {
            e.1 += 1;
        }
    }
    out
}

fn rs_view(rs: &ReplicaSet, counts: &BTreeMap<ObjectKey, (u32, u32)>) -> ReplicaSetView {
    let (current, ready) = counts
        .get(&(rs.namespace.clone(), rs.name.clone()))
        .copied()
        .unwrap_or((0, 0));
    ReplicaSetView {
        name: rs.name.clone(),
        namespace: rs.namespace.clone(),
        replicas: rs.replicas,
        current,
        ready,
        template: rs.template.clone(),
        placement: rs.placement.clone(),
        min_replicas: rs.min_replicas,
        max_replicas: rs.max_replicas,
        created_at: rs.created_at,
    }
}

pub(crate) fn replicaset_view(s: &Snapshot, rs: &ReplicaSet) -> ReplicaSetView {
    rs_view(rs, &rs_counts(s))
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
                    ready: s.stale_since_ms.is_none(),
                    labels: n.labels.clone(),
                    mesh_port: n.mesh_port,
                    capacity: n.capacity,
                    version: n.version.clone(),
                    started_at: n.started_at,
                    pods: pods.get(name).copied().unwrap_or(0),
                };
                out.insert(name.to_string(), to_value(&v));
            }
        }
        Resource::ReplicaSets => {
            let counts = rs_counts(s);
            for ((ns, name), rs) in s.replicasets.iter() {
                if f.ns_ok(ns) && f.name_ok(name) {
                    out.insert(format!("{ns}/{name}"), to_value(&rs_view(rs, &counts)));
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
