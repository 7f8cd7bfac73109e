//! Every write of a cluster object made on a user's behalf goes through
//! here: services with their VIP and node-port allocations (`service`),
//! replica sets (create, scale, autoscale, a new spec, delete) and pod
//! deletes (`replicaset`), applications (`app`: the pure apply plan and its
//! commit), node labels (`node`), endpoint VIPs (`endpoint`: claimed by
//! the endpoint's agent under its lease), and the autoscaler's fenced
//! count changes. The API's handlers, the agent (services for labelled
//! containers) and the autoscaler call it; nothing else writes these keys
//! (ARCHITECTURE.md, "Who writes each key", lists the other writers: the
//! agent's own endpoints and pod statuses, the supervisor's pods and
//! rollouts, each node's record).
//!
//! Each write is one transaction whose compares make racing writers safe:
//! an object or an allocation is *claimed* ([`Batch::claim`]: put if
//! absent), an update is made against the revision it read. An allocation
//! is a key (`alloc/vip/<ip>`, `alloc/nodeport/<n>`) claimed in the same txn
//! as its service, so two writers (two agents auto-creating the same
//! service, or the API racing an agent) can never hand out one address
//! twice, nor create a service twice.

pub mod app;
mod endpoint;
mod node;
mod replicaset;
mod service;

use pier_model::api::Resource;
use pier_model::{Allocation, Name, Namespace, Replicas, Service};

use crate::{Compare, Revision, Store, StoreError, Txn, TxnOp, TxnResult};

pub use endpoint::{claim_endpoint_addr, endpoint_addrs_of};
pub use node::label_node;
pub use replicaset::{
    Scale, autoscale_step, create_replicaset, delete_pod, delete_replicaset, next_spec,
    scale_replicaset, set_autoscale, update_spec,
};
pub use service::{create_service, delete_service, update_service};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service {}/{} already exists", .0.namespace, .0.name)]
    AlreadyExists(Box<Service>),
    #[error(
        "replicaset {:?} already exists in namespace {:?}; scale it with `pier scale rs {} --replicas N` or delete it first",
        .name.as_str(), .namespace, .name
    )]
    ReplicaSetExists { namespace: Namespace, name: Name },
    #[error("no free {0} left; widen the range in the agent config")]
    Exhausted(&'static str),
    #[error("node port {port} is already used by service {}/{}", by.namespace, by.service)]
    NodePortTaken { port: u16, by: Allocation },
    #[error("{0}")]
    Invalid(String),
    /// The stored object does not parse: a write cannot start from it.
    #[error("{error}; fix or delete it")]
    Corrupt { error: pier_model::DecodeError },
    #[error("{0}")]
    Conflict(Conflict),
    /// A manual scale of a set whose count the autoscaler owns.
    #[error(
        "replicaset {:?} is autoscaled between {min} and {max} replicas, so its count is the autoscaler's; change the bounds with `pier autoscale rs {name} --min N --max M`, or turn autoscaling off with `pier autoscale rs {name} --off` and scale again",
        .name.as_str()
    )]
    Autoscaled {
        name: Name,
        min: Replicas,
        max: Replicas,
    },
    #[error("{} {:?} not found in namespace {:?}", .kind.singular(), .name.as_str(), .namespace)]
    NotFound {
        kind: Resource,
        namespace: Namespace,
        name: Name,
    },
}

/// What another writer changed under a write, which then gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// Every attempt to create or delete `key` lost a race.
    #[error(
        "the service changed while it was being written ({action} {key} raced with other writers {attempts} times); try again"
    )]
    Raced {
        action: &'static str,
        key: String,
        attempts: usize,
    },
    /// An update was made against revision `expected`, and `key` is at
    /// `found`.
    #[error(
        "the service changed while it was being written ({key} is at revision {found}, not {expected}); try again"
    )]
    Revision {
        key: String,
        found: Revision,
        expected: Revision,
    },
    /// The service or a node port it claims changed between the read and
    /// the write.
    #[error(
        "the service changed while it was being written ({key} or one of its node ports changed meanwhile); try again"
    )]
    NodePorts { key: String },
    /// Every attempt to update a replica set lost a race.
    #[error(
        "replicaset {:?} kept changing while {doing} ({attempts} attempts); try again",
        .name.as_str()
    )]
    Update {
        name: Name,
        doing: &'static str,
        attempts: u32,
    },
    /// Every attempt to merge a node's labels lost a race.
    #[error("the labels of node {:?} kept changing ({attempts} attempts); try again", .node.as_str())]
    NodeLabels { node: Name, attempts: u32 },
    /// An application or one of its objects changed between the read its
    /// plan was made from and the write.
    #[error(
        "application {namespace}/{name} changed while this request was computed (another apply or delete, or a write to one of its replica sets or services); nothing was written. Run `pier diff -f FILE` and try again"
    )]
    App { namespace: Namespace, name: Name },
}

/// Attempts before a racing service writer is reported as a conflict.
const ATTEMPTS: usize = 8;
/// How often a read-modify-write of a replica set or of a node's labels
/// retries a revision conflict before giving up.
const UPDATE_ATTEMPTS: u32 = 16;

/// One transaction under construction: its compares and its operations.
#[derive(Debug, Default)]
struct Batch {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
}

impl Batch {
    /// Claims `key` for `value`: put it, and fail the txn if it exists.
    fn claim(&mut self, key: String, value: Vec<u8>) {
        self.compares.push(Compare::Absent(key.clone()));
        self.put(key, value);
    }

    /// Puts `key` (no lease: objects outlive their writer).
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.ops.push(TxnOp::Put {
            key,
            value,
            lease: None,
        });
    }

    fn delete(&mut self, key: String) {
        self.ops.push(TxnOp::Delete { key });
    }

    /// Fails the txn unless `key` is still at `rev`.
    fn at_revision(&mut self, key: String, rev: Revision) {
        self.compares.push(Compare::ModRevision(key, rev));
    }

    fn into_txn(self) -> Txn {
        Txn {
            compares: self.compares,
            success: self.ops,
            failure: vec![],
        }
    }

    async fn commit(self, store: &dyn Store) -> Result<TxnResult, StoreError> {
        store.txn(self.into_txn()).await
    }
}

/// A short back-off after a lost compare-and-swap, growing with the
/// attempt and varying with the clock so that two racers separate.
async fn back_off(attempt: u32) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 3_000)
        .unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_micros(
        500 * u64::from(attempt + 1) + u64::from(jitter),
    ))
    .await;
}
