//! The store: one `Store` trait with two implementations, and the reflector.
//!
//! - [`Store`]: get, list a prefix, put (optionally under a lease), delete,
//!   compare-and-swap transactions on revisions, leases, watches from a
//!   revision and leader election. Its semantics are etcd's: one global
//!   revision counter, `create_revision`/`mod_revision`/`version` per key,
//!   leases that take their keys with them.
//! - `EtcdStore` talks to an etcd cluster; `EmbeddedStore` is the
//!   single-host default, in-process and persisted under the data dir. One
//!   conformance suite runs against both.
//! - The reflector turns list + watch into a `watch::Receiver<Arc<Snapshot>>`.
//!
//! This crate does not know Docker, DNS or the proxy.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

pub mod alloc;
mod embedded;
pub mod writes;
pub use embedded::EmbeddedStore;
mod etcd;
pub use etcd::EtcdStore;
mod etcd_security;
pub use etcd_security::{EtcdSecurity, EtcdTls, EtcdUser, FileProblem};
pub mod election;
pub mod lease;
pub mod reflector;
pub mod relay;
#[cfg(feature = "testing")]
pub mod testing;

/// A store revision. etcd's revisions start at 1; 0 means "absent" in
/// comparisons.
pub type Revision = i64;

/// A lease id. Never a TTL: see [`Ttl`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease:{:x}", self.0)
    }
}
impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A lease time-to-live, whole seconds, at least [`Ttl::MIN`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Ttl(u32);

impl Ttl {
    /// 2 s: etcd's minimum lease TTL.
    pub const MIN: u32 = 2;
    pub fn from_secs(secs: u32) -> Result<Ttl, StoreError> {
        if secs < Self::MIN {
            return Err(StoreError::Invalid(format!(
                "lease TTL {secs}s is below etcd's minimum of {}s",
                Self::MIN
            )));
        }
        Ok(Ttl(secs))
    }
    pub fn secs(self) -> u32 {
        self.0
    }
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0 as u64)
    }
}

/// One stored key with its metadata, as etcd reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Number of writes since creation, starting at 1.
    pub version: i64,
    pub lease: Option<LeaseId>,
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("mod_revision", &self.mod_revision)
            .field("lease", &self.lease)
            .finish()
    }
}

/// The result of a prefix list: the keys, and the revision they were read at.
#[derive(Debug, Clone)]
pub struct ListResult {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this; 0 means the key is absent.
    ModRevision(String, Revision),
    /// The key does not exist (create-if-absent).
    Absent(String),
    /// The key exists.
    Exists(String),
}

/// An operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// If every compare holds, apply `success`, else `failure`. Atomic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// A deletion, including one caused by an expired or revoked lease.
    Delete {
        key: String,
        mod_revision: Revision,
    },
}

/// What a watch stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Changes, in revision order; `revision` is the store revision they
    /// bring the watcher up to.
    Events {
        revision: Revision,
        events: Vec<WatchEvent>,
    },
    /// The connection was lost; the stream is trying to resume from the last
    /// revision it delivered. Nothing was missed yet.
    Disconnected { reason: String },
    /// Resumed after a `Disconnected`, from the next revision: no change was
    /// lost.
    Resumed,
}

/// A watch. It ends with `Err(StoreError::Compacted)` when the revision to
/// resume from is gone, or another error when it gives up; the watcher then
/// lists again.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchItem, StoreError>> + Send>>;

/// Store errors. Each names what it was doing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("revision {requested} was compacted (oldest kept is {compact_revision}); list again")]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("store closed")]
    Closed,
    /// etcd's "lease not found", before the caller names the lease (it
    /// answers `LeaseNotFound(id)`).
    #[error("store error: {what}: lease not found")]
    NoSuchLease { what: String },
    /// The store refused a request with a status pier has no better name
    /// for: etcd's gRPC code and message.
    #[error("store error: {what}: {code}: {message}")]
    Refused {
        what: String,
        code: String,
        message: String,
    },
    /// The store client failed in a way pier has no better name for.
    #[error("store error: {what}: {message}")]
    Client { what: String, message: String },
    /// A record in the embedded store's file does not parse.
    #[error("store error: embedded store {path}: record of key {key:?} is malformed")]
    Corrupt { path: String, key: String },
    /// A background task of the store client ended abnormally (a bug).
    #[error("store error: {task}: {message}")]
    Task { task: &'static str, message: String },
}

/// The store. Semantics follow etcd 3.4; the conformance suite checks that
/// `EtcdStore` and `EmbeddedStore` agree.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key under `prefix`, sorted by key, with the read revision.
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError>;
    /// Returns the new revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;
    /// Returns whether the key existed, and the new revision.
    async fn delete(&self, key: &str) -> Result<(bool, Revision), StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;

    async fn lease_grant(&self, ttl: Ttl) -> Result<LeaseId, StoreError>;
    /// Renew once; returns the remaining TTL, or `LeaseNotFound`.
    async fn lease_keepalive(&self, lease: LeaseId) -> Result<Ttl, StoreError>;
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Watch every key under `prefix`, starting at revision `from`
    /// (inclusive). `from` at or below the compaction point yields
    /// `Err(Compacted)`.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// Compact history up to `revision`, as etcd does. Used by tests and by
    /// the embedded store's own housekeeping.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}
