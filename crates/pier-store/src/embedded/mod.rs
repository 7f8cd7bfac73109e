//! `EmbeddedStore`: the single-host store, in-process and persisted with redb.
//!
//! It follows etcd 3.4's semantics: one global revision counter (a fresh store
//! is at revision 1, so the first write is revision 2), `create_revision`,
//! `mod_revision` and `version` per key, leases that take their keys with
//! them, and watches from a revision.
//!
//! How it works:
//! - The committed state lives in memory (`State`, behind a std `RwLock`
//!   whose critical sections never `.await`); reads never touch the disk.
//! - Every write goes to one writer thread. It takes every request that is
//!   queued (group commit), applies them in order to an overlay over the
//!   committed state, writes the overlay in ONE redb transaction with
//!   `Durability::Immediate`, and only then publishes it to the in-memory
//!   state and to watchers and answers the callers. A write that was
//!   acknowledged is on disk; nobody ever reads a write that is not.
//! - The same thread expires leases: it sleeps until the earliest lease
//!   deadline, so an expiry is late by one commit at most.
//! - Persisted: keys, leases (id and TTL) and the revision counter. On reopen
//!   every lease's deadline restarts at now + TTL, as etcd does on a leader
//!   change. Watch history is kept in memory only (since open, capped at
//!   [`MAX_HISTORY_EVENTS`]); watching from before it gives `Compacted`.
//! - redb locks the file, so a second open of the same dir (from any process)
//!   fails with an error naming the path.
//!
//! It is not a cluster: one process, one host.
//!
//! This module holds the store, its committed state and the `Store` trait;
//! `changes` applies a transaction to an overlay, `writer` is the
//! writer thread, and `disk` the redb file.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, DatabaseError};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Ttl, Txn, TxnOp, TxnResult,
    WatchEvent, WatchItem, WatchStream,
};

mod changes;
mod disk;
mod writer;

use changes::TxnOutcome;
use disk::{DB_FILE, load, secure_files, unavailable};
use writer::{Request, Writer};

/// Watch history kept in memory, in events. Older revisions are compacted,
/// as etcd's auto-compaction does; a watcher that far behind lists again.
pub const MAX_HISTORY_EVENTS: usize = 200_000;

/// The embedded store. Cheap to clone; the last clone dropped closes the
/// database (waiting for the writer to finish its batch) and ends watches
/// with `Err(StoreError::Closed)`.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    shared: Arc<RwLock<State>>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping the sender ends the writer loop; joining makes sure the
        // file lock is released when the store is gone, so it can be reopened.
        self.tx.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(store.path = %self.path.display(), "embedded store writer panicked");
        }
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

struct LeaseState {
    ttl: Ttl,
    deadline: Instant,
    keys: BTreeSet<String>,
}

type WatchTx = tmpsc::UnboundedSender<Result<WatchItem, StoreError>>;

struct Watcher {
    prefix: String,
    /// The first revision it wants (a watch may start in the future).
    from: Revision,
    tx: WatchTx,
}

struct State {
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, LeaseState>,
    revision: Revision,
    /// Events per revision, ascending, every revision >= `first_kept`.
    history: VecDeque<(Revision, Vec<WatchEvent>)>,
    history_events: usize,
    /// [`MAX_HISTORY_EVENTS`]; smaller in unit tests.
    history_cap: usize,
    /// The lowest revision a watch may start from (etcd's compact revision).
    first_kept: Revision,
    /// The last explicit `compact()`; 0 if none since open.
    compact_rev: Revision,
    watchers: Vec<Watcher>,
    closed: bool,
}

fn read(lock: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    // A poisoned lock means a panic mid-update in this module; the state is
    // only mutated after a successful commit, so keep serving it.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write(lock: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl EmbeddedStore {
    /// Opens or creates the store under `dir` (creates the dir). Fails with a
    /// clear error if another process holds it.
    ///
    /// The store holds pod environments, often secrets: `dir` is made (or
    /// tightened to) mode 0700 and the database file 0600, whatever the
    /// umask; a database file that is a symlink or not a regular file is
    /// refused.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let path = dir.join(DB_FILE);
        secure_files(dir, &path)?;
        let db = Database::create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "embedded store {} is already open (locked by another process, \
                 or by another EmbeddedStore in this one); stop it or use another data dir",
                path.display()
            )),
            e => unavailable(&path, "open", e),
        })?;
        let loaded = load(&db, &path)?;
        let now = Instant::now();
        let fresh = loaded.revision.is_none();
        // 1: a fresh etcd cluster is at revision 1; its first write is 2.
        let revision = loaded.revision.unwrap_or(1);
        let mut leases: HashMap<LeaseId, LeaseState> = loaded
            .leases
            .iter()
            .map(|&(id, ttl)| {
                (
                    id,
                    LeaseState {
                        ttl,
                        // Restart every deadline, as etcd does on a leader change.
                        deadline: now + ttl.as_duration(),
                        keys: BTreeSet::new(),
                    },
                )
            })
            .collect();
        for kv in loaded.kvs.values() {
            if let Some(id) = kv.lease {
                match leases.get_mut(&id) {
                    Some(l) => {
                        l.keys.insert(kv.key.clone());
                    }
                    None => tracing::warn!(
                        store.path = %path.display(), key = %kv.key, lease = %id,
                        "key refers to a lease that is not stored; it stays until deleted"
                    ),
                }
            }
        }
        let max_lease = loaded.leases.iter().map(|(id, _)| id.0).max().unwrap_or(0);
        let now_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX / 2));
        // Time-seeded so ids are not reused across reopens.
        let next_lease = now_nanos.max(max_lease + 1);

        let state = State {
            kvs: loaded.kvs,
            leases,
            revision,
            history: VecDeque::new(),
            history_events: 0,
            history_cap: MAX_HISTORY_EVENTS,
            // History is in memory only: after a reopen nothing before the
            // next revision can be replayed.
            first_kept: if fresh { 1 } else { revision + 1 },
            compact_rev: 0,
            watchers: Vec::new(),
            closed: false,
        };
        let shared = Arc::new(RwLock::new(state));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db,
            path: path.clone(),
            rx,
            shared: shared.clone(),
            next_lease,
        };
        let writer = std::thread::Builder::new()
            .name("pier-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| unavailable(&path, "spawn writer thread", e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                path,
                shared,
                tx: Some(tx),
                writer: Some(writer),
            }),
        })
    }

    #[cfg(test)]
    fn set_history_cap(&self, cap: usize) {
        write(&self.inner.shared).history_cap = cap;
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn send(&self, req: Request) -> Result<(), StoreError> {
        self.inner
            .tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(req)
            .map_err(|_| StoreError::Closed)
    }

    async fn txn_inner(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Txn { txn, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Lease 0 is etcd's "no lease".
fn no_lease_zero(lease: Option<LeaseId>) -> Option<LeaseId> {
    lease.filter(|l| l.0 != 0)
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(read(&self.inner.shared).kvs.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let state = read(&self.inner.shared);
        let kvs = state
            .kvs
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(ListResult {
            kvs,
            revision: state.revision,
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let txn = Txn {
            compares: Vec::new(),
            success: vec![TxnOp::Put {
                key: key.to_owned(),
                value,
                lease,
            }],
            failure: Vec::new(),
        };
        Ok(self.txn_inner(txn).await?.revision)
    }

    async fn delete(&self, key: &str) -> Result<(bool, Revision), StoreError> {
        let txn = Txn {
            compares: Vec::new(),
            success: vec![TxnOp::Delete {
                key: key.to_owned(),
            }],
            failure: Vec::new(),
        };
        let out = self.txn_inner(txn).await?;
        Ok((out.deleted > 0, out.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let out = self.txn_inner(txn).await?;
        Ok(TxnResult {
            succeeded: out.succeeded,
            revision: out.revision,
        })
    }

    async fn lease_grant(&self, ttl: Ttl) -> Result<LeaseId, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Grant { ttl, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<Ttl, StoreError> {
        let mut state = write(&self.inner.shared);
        let now = Instant::now();
        match state.leases.get_mut(&lease) {
            // Past its deadline, the lease is as good as gone: the writer is
            // about to revoke it (etcd answers not-found in that window too).
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl.as_duration();
                Ok(l.ttl)
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Revoke { lease, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut state = write(&self.inner.shared);
        if state.closed {
            return Err(StoreError::Closed);
        }
        // 0: from now on, as in etcd.
        let from = if from <= 0 { state.revision + 1 } else { from };
        if from < state.first_kept {
            return Err(StoreError::Compacted {
                requested: from,
                compact_revision: state.first_kept,
            });
        }
        let (tx, rx) = tmpsc::unbounded_channel();
        for (rev, events) in state.history.iter().filter(|(rev, _)| *rev >= from) {
            let mine: Vec<WatchEvent> = events
                .iter()
                .filter(|e| event_key(e).starts_with(prefix))
                .cloned()
                .collect();
            if !mine.is_empty() {
                // The receiver is right here: this cannot fail.
                drop(tx.send(Ok(WatchItem::Events {
                    revision: *rev,
                    events: mine,
                })));
            }
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            from,
            tx,
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut state = write(&self.inner.shared);
        if revision > state.revision {
            return Err(StoreError::Invalid(format!(
                "compact to {revision}: required revision is a future revision (current {})",
                state.revision
            )));
        }
        if revision <= state.compact_rev {
            return Err(StoreError::Compacted {
                requested: revision,
                compact_revision: state.compact_rev,
            });
        }
        state.compact_rev = revision;
        while state
            .history
            .front()
            .is_some_and(|(rev, _)| *rev < revision)
        {
            if let Some((_, events)) = state.history.pop_front() {
                state.history_events -= events.len();
            }
        }
        state.first_kept = state.first_kept.max(revision);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
