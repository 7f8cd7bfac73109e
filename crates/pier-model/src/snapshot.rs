//! The immutable view of the whole store that every reader works from.
//!
//! The reflector (in pier-store) builds a new `Snapshot` for each batch of
//! changes and publishes it as an `Arc<Snapshot>`. The maps are persistent
//! B-trees ([`Map`], `imbl::OrdMap`): a snapshot is a copy of the one before
//! with only the changed paths new, so a change to one pod copies a few tree
//! nodes (O(log n)), never the whole world, and two snapshots share every
//! part that did not change. Readers compare snapshots cheaply with
//! `Map::ptr_eq` and `Map::diff` (which skips the shared parts): the cost of
//! finding what changed is proportional to the change, not to the cluster.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::names::{Name, Namespace};
use crate::objects::{
    Endpoint, Labels, Node, NodeLabels, Pod, PodStatus, ReplicaSet, ReplicaSetProblem, Service,
};
use crate::rollout::Rollout;

/// `(namespace, name)`.
pub type ObjectKey = (Namespace, Name);
/// `(node, id)` of an endpoint within its service.
pub type EndpointKey = (Name, Name);

/// A persistent ordered map: cloning it is O(1), an insert copies only the
/// path to the key, and unchanged parts are shared between clones.
pub type Map<K, V> = imbl::OrdMap<K, V>;
/// One difference found by `Map::diff`.
pub use imbl::ordmap::DiffItem;

/// The endpoints of one service, keyed by `(node, id)`.
pub type EndpointMap = BTreeMap<EndpointKey, Arc<Endpoint>>;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store revision this snapshot reflects.
    pub revision: i64,
    /// Unix milliseconds when the reflector last knew it was in sync.
    pub synced_at_ms: u64,
    /// Unix milliseconds since when the store has been unreachable; `None`
    /// while the watch is live.
    pub stale_since_ms: Option<u64>,
    pub nodes: Map<Name, Arc<Node>>,
    pub services: Map<ObjectKey, Arc<Service>>,
    pub replicasets: Map<ObjectKey, Arc<ReplicaSet>>,
    /// The supervisor leader's problem reports, by replica set.
    pub problems: Map<ObjectKey, Arc<ReplicaSetProblem>>,
    pub pods: Map<ObjectKey, Arc<Pod>>,
    pub pod_statuses: Map<ObjectKey, Arc<PodStatus>>,
    /// Service `(namespace, name)` → its endpoints on every node.
    pub endpoints: Map<ObjectKey, Arc<EndpointMap>>,
    /// The supervisor leader's rollout records, by replica set.
    pub rollouts: Map<ObjectKey, Arc<Rollout>>,
    /// Labels set with `pier label node`, by node (see
    /// [`Snapshot::node_labels`]).
    pub node_labels: Map<Name, Arc<NodeLabels>>,
    /// Nodes whose lease expired while the store was unreachable from this
    /// reader, kept in `nodes` (with their endpoints and pod statuses) until
    /// they register again or until the Unix milliseconds given here; see
    /// the reflector's hold. Empty in normal operation.
    pub held_nodes: Arc<BTreeMap<Name, u64>>,
}

impl Snapshot {
    pub fn service(&self, ns: &Namespace, name: &Name) -> Option<&Arc<Service>> {
        self.services.get(&(ns.clone(), name.clone()))
    }

    /// Every endpoint of a service, ready or not.
    pub fn endpoints_of(&self, ns: &Namespace, svc: &Name) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints
            .get(&(ns.clone(), svc.clone()))
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// The ready endpoints of a service.
    pub fn ready_endpoints_of(
        &self,
        ns: &Namespace,
        svc: &Name,
    ) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints_of(ns, svc).filter(|e| e.ready)
    }

    /// A node's effective labels: those its agent registered, overlaid by
    /// `pier label node`. Empty for a node not in the snapshot.
    pub fn node_labels(&self, node: &Name) -> Labels {
        let base = self
            .nodes
            .get(node)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        match self.node_labels.get(node) {
            Some(o) => o.apply(&base),
            None => base,
        }
    }

    /// The service whose VIP (IPv4 or IPv6) is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services
            .values()
            .find(|s| s.vip == Some(ip) || s.vip6 == Some(ip))
    }

    /// How long the snapshot has been stale at `now_ms`, or 0 when live.
    pub fn stale_for_ms(&self, now_ms: u64) -> u64 {
        self.stale_since_ms
            .map(|s| now_ms.saturating_sub(s))
            .unwrap_or(0)
    }
}
