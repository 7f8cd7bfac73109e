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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    Compare, KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Ttl, Txn, TxnOp,
    TxnResult, WatchEvent, WatchItem, WatchStream,
};

/// The file under the store's dir.
const DB_FILE: &str = "store.redb";
const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const LEASES: TableDefinition<'_, i64, u32> = TableDefinition::new("leases");
const META: TableDefinition<'_, &str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
/// A KV record: create_revision, mod_revision, version, lease (0 = none), each
/// i64 little-endian, then the value.
const KV_HEADER: usize = 32;

/// Requests taken into one redb transaction at most; bounds the latency of
/// the first request of a batch.
const MAX_BATCH: usize = 4096;
/// Watch history kept in memory, in events. Older revisions are compacted,
/// as etcd's auto-compaction does; a watcher that far behind lists again.
pub const MAX_HISTORY_EVENTS: usize = 200_000;
/// How long the writer sleeps when no lease is due.
const IDLE_WAKE: Duration = Duration::from_secs(1);

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

struct TxnOutcome {
    succeeded: bool,
    revision: Revision,
    deleted: usize,
}

enum Request {
    Txn {
        txn: Txn,
        reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
    },
    Grant {
        ttl: Ttl,
        reply: oneshot::Sender<Result<LeaseId, StoreError>>,
    },
    Revoke {
        lease: LeaseId,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

enum Reply {
    Txn(
        oneshot::Sender<Result<TxnOutcome, StoreError>>,
        Result<TxnOutcome, StoreError>,
    ),
    Grant(
        oneshot::Sender<Result<LeaseId, StoreError>>,
        Result<LeaseId, StoreError>,
    ),
    Revoke(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Reply {
    /// The commit failed: every success becomes that failure.
    fn fail(self, err: &StoreError) -> Reply {
        match self {
            Reply::Txn(tx, Ok(_)) => Reply::Txn(tx, Err(err.clone())),
            Reply::Grant(tx, Ok(_)) => Reply::Grant(tx, Err(err.clone())),
            Reply::Revoke(tx, Ok(())) => Reply::Revoke(tx, Err(err.clone())),
            other => other,
        }
    }

    fn send(self) {
        // A caller that went away (its future was dropped) no longer wants
        // the answer; the write itself is committed either way.
        match self {
            Reply::Txn(tx, r) => drop(tx.send(r)),
            Reply::Grant(tx, r) => drop(tx.send(r)),
            Reply::Revoke(tx, r) => drop(tx.send(r)),
        }
    }
}

/// The changes of one batch, over the committed state.
#[derive(Default)]
struct Changes {
    kvs: BTreeMap<String, Option<KeyValue>>,
    /// `Some(ttl)`: granted in this batch; `None`: revoked.
    leases: HashMap<LeaseId, Option<Ttl>>,
    revision: Revision,
    events: Vec<(Revision, Vec<WatchEvent>)>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.kvs.is_empty() && self.leases.is_empty()
    }

    fn kv<'a>(&'a self, base: &'a State, key: &str) -> Option<&'a KeyValue> {
        match self.kvs.get(key) {
            Some(v) => v.as_ref(),
            None => base.kvs.get(key),
        }
    }

    fn lease_exists(&self, base: &State, id: LeaseId) -> bool {
        match self.leases.get(&id) {
            Some(v) => v.is_some(),
            None => base.leases.contains_key(&id),
        }
    }

    fn lease_keys(&self, base: &State, id: LeaseId) -> BTreeSet<String> {
        let mut keys = base
            .leases
            .get(&id)
            .map(|l| l.keys.clone())
            .unwrap_or_default();
        for (key, kv) in &self.kvs {
            match kv {
                Some(kv) if kv.lease == Some(id) => keys.insert(key.clone()),
                _ => keys.remove(key),
            };
        }
        keys
    }

    fn apply_txn(&mut self, base: &State, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        let succeeded = txn.compares.iter().all(|c| match c {
            Compare::ModRevision(key, rev) => {
                self.kv(base, key).map_or(0, |kv| kv.mod_revision) == *rev
            }
            Compare::Absent(key) => self.kv(base, key).is_none(),
            Compare::Exists(key) => self.kv(base, key).is_some(),
        });
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // Validate everything first: a txn applies whole or not at all.
        let mut seen = BTreeSet::new();
        for op in ops {
            let (key, lease) = match op {
                TxnOp::Put { key, lease, .. } => (key, no_lease_zero(*lease)),
                TxnOp::Delete { key } => (key, None),
            };
            if key.is_empty() {
                return Err(StoreError::Invalid("key is not provided".into()));
            }
            if !seen.insert(key.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "duplicate key {key:?} given in txn request"
                )));
            }
            if let Some(lease) = lease
                && !self.lease_exists(base, lease)
            {
                return Err(StoreError::LeaseNotFound(lease));
            }
        }
        let rev = self.revision + 1;
        let mut events = Vec::new();
        let mut deleted = 0;
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let prev = self.kv(base, key);
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.map_or(1, |p| p.version + 1),
                        lease: no_lease_zero(*lease),
                    };
                    self.kvs.insert(key.clone(), Some(kv.clone()));
                    events.push(WatchEvent::Put(kv));
                }
                TxnOp::Delete { key } => {
                    if self.kv(base, key).is_some() {
                        self.kvs.insert(key.clone(), None);
                        events.push(WatchEvent::Delete {
                            key: key.clone(),
                            mod_revision: rev,
                        });
                        deleted += 1;
                    }
                }
            }
        }
        // etcd bumps the revision only when something changed.
        if !events.is_empty() {
            self.revision = rev;
            self.events.push((rev, events));
        }
        Ok(TxnOutcome {
            succeeded,
            revision: self.revision,
            deleted,
        })
    }

    fn revoke(&mut self, base: &State, id: LeaseId) -> Result<(), StoreError> {
        if !self.lease_exists(base, id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let keys = self.lease_keys(base, id);
        self.leases.insert(id, None);
        if !keys.is_empty() {
            // All the lease's keys go in one revision, as in etcd.
            let rev = self.revision + 1;
            let mut events = Vec::with_capacity(keys.len());
            for key in keys {
                self.kvs.insert(key.clone(), None);
                events.push(WatchEvent::Delete {
                    key,
                    mod_revision: rev,
                });
            }
            self.revision = rev;
            self.events.push((rev, events));
        }
        Ok(())
    }
}

/// The store dir at 0700 and the database file at 0600 (created so if
/// missing, tightened if open, refused if a symlink or not a file).
fn secure_files(dir: &Path, path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| unavailable(dir, "create dir", e))?;
    let tighten = |p: &Path, want: u32| -> Result<(), StoreError> {
        let md = std::fs::metadata(p).map_err(|e| unavailable(p, "stat", e))?;
        let mode = md.permissions().mode() & 0o7777;
        if mode != want {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(want)).map_err(|e| {
                unavailable(
                    p,
                    &format!(
                        "it is mode {mode:04o}, open to other users, and setting {want:04o} failed"
                    ),
                    format!("{e}; chown it to the agent's user or chmod it {want:04o}"),
                )
            })?;
            tracing::warn!(path = %p.display(), was = %format!("{mode:04o}"), now = %format!("{want:04o}"), "tightened the embedded store's mode");
        }
        Ok(())
    };
    tighten(dir, 0o700)?;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_symlink() => {
            return Err(unavailable(
                path,
                "open",
                "it is a symbolic link, which is refused; move the real file here",
            ));
        }
        Ok(md) if !md.is_file() => {
            return Err(unavailable(path, "open", "it is not a regular file"));
        }
        Ok(_) => tighten(path, 0o600)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Empty: redb initialises a database in an empty file.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| unavailable(path, "create", e))?;
            tighten(path, 0o600)?;
        }
        Err(e) => return Err(unavailable(path, "stat", e)),
    }
    Ok(())
}

fn unavailable(path: &Path, what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store {}: {what}: {e}", path.display()))
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(KV_HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, bytes: &[u8]) -> Option<KeyValue> {
    let field = |i: usize| -> Option<i64> {
        let b: [u8; 8] = bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?;
        Some(i64::from_le_bytes(b))
    };
    let lease = field(3)?;
    Some(KeyValue {
        key: key.to_owned(),
        value: bytes.get(KV_HEADER..)?.to_vec(),
        create_revision: field(0)?,
        mod_revision: field(1)?,
        version: field(2)?,
        lease: (lease != 0).then_some(LeaseId(lease)),
    })
}

/// What `open` loads from disk.
struct Loaded {
    kvs: BTreeMap<String, KeyValue>,
    leases: Vec<(LeaseId, Ttl)>,
    revision: Option<Revision>,
}

fn load(db: &Database, path: &Path) -> Result<Loaded, StoreError> {
    let err = |what: &str, e: &dyn fmt::Display| unavailable(path, what, e);
    // Create the tables on first open.
    let wtx = db.begin_write().map_err(|e| err("begin", &e))?;
    {
        wtx.open_table(KV).map_err(|e| err("open table kv", &e))?;
        wtx.open_table(LEASES)
            .map_err(|e| err("open table leases", &e))?;
        wtx.open_table(META)
            .map_err(|e| err("open table meta", &e))?;
    }
    wtx.commit().map_err(|e| err("commit", &e))?;

    let rtx = db.begin_read().map_err(|e| err("begin read", &e))?;
    let mut kvs = BTreeMap::new();
    let table = rtx.open_table(KV).map_err(|e| err("open table kv", &e))?;
    for entry in table.iter().map_err(|e| err("read kv", &e))? {
        let (k, v) = entry.map_err(|e| err("read kv", &e))?;
        let key = k.value();
        let kv = decode(key, v.value()).ok_or_else(|| StoreError::Corrupt {
            path: path.display().to_string(),
            key: key.to_owned(),
        })?;
        kvs.insert(key.to_owned(), kv);
    }
    let mut leases = Vec::new();
    let table = rtx
        .open_table(LEASES)
        .map_err(|e| err("open table leases", &e))?;
    for entry in table.iter().map_err(|e| err("read leases", &e))? {
        let (id, ttl) = entry.map_err(|e| err("read leases", &e))?;
        let ttl = Ttl::from_secs(ttl.value()).map_err(|e| err("lease ttl", &e))?;
        leases.push((LeaseId(id.value()), ttl));
    }
    let table = rtx
        .open_table(META)
        .map_err(|e| err("open table meta", &e))?;
    let revision = table
        .get(META_REVISION)
        .map_err(|e| err("read revision", &e))?
        .map(|g| g.value());
    Ok(Loaded {
        kvs,
        leases,
        revision,
    })
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

struct Writer {
    db: Database,
    path: PathBuf,
    rx: mpsc::Receiver<Request>,
    shared: Arc<RwLock<State>>,
    next_lease: i64,
}

impl Writer {
    fn run(mut self) {
        loop {
            let wait = {
                let state = read(&self.shared);
                let now = Instant::now();
                state
                    .leases
                    .values()
                    .map(|l| l.deadline.saturating_duration_since(now))
                    .min()
                    .map_or(IDLE_WAKE, |d| d.min(IDLE_WAKE))
            };
            let mut batch = Vec::new();
            match self.rx.recv_timeout(wait) {
                Ok(req) => batch.push(req),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        let mut state = write(&self.shared);
        state.closed = true;
        for w in state.watchers.drain(..) {
            drop(w.tx.send(Err(StoreError::Closed)));
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut changes = Changes::default();
        let expired = {
            let base = read(&self.shared);
            changes.revision = base.revision;
            for req in batch {
                replies.push(match req {
                    Request::Txn { txn, reply } => {
                        Reply::Txn(reply, changes.apply_txn(&base, &txn))
                    }
                    Request::Grant { ttl, reply } => {
                        let mut id = LeaseId(self.next_lease);
                        while changes.lease_exists(&base, id) {
                            id = LeaseId(id.0 + 1);
                        }
                        self.next_lease = id.0 + 1;
                        changes.leases.insert(id, Some(ttl));
                        Reply::Grant(reply, Ok(id))
                    }
                    Request::Revoke { lease, reply } => {
                        Reply::Revoke(reply, changes.revoke(&base, lease))
                    }
                });
            }
            let now = Instant::now();
            let mut expired: Vec<LeaseId> = base
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            expired.sort();
            expired.retain(|id| changes.revoke(&base, *id).is_ok());
            expired
        };
        if !changes.is_empty()
            && let Err(e) = self.persist(&changes)
        {
            tracing::error!(store.path = %self.path.display(), error = %e, "embedded store commit failed");
            for r in replies {
                r.fail(&e).send();
            }
            return;
        }
        if !expired.is_empty() {
            tracing::debug!(leases = ?expired, "leases expired");
        }
        self.publish(changes);
        for r in replies {
            r.send();
        }
    }

    fn persist(&self, changes: &Changes) -> Result<(), StoreError> {
        let err = |what: &str, e: &dyn fmt::Display| unavailable(&self.path, what, e);
        let mut wtx = self.db.begin_write().map_err(|e| err("begin", &e))?;
        wtx.set_durability(Durability::Immediate)
            .map_err(|e| err("set durability", &e))?;
        {
            let mut kv = wtx.open_table(KV).map_err(|e| err("open table kv", &e))?;
            for (key, v) in &changes.kvs {
                match v {
                    Some(v) => {
                        kv.insert(key.as_str(), encode(v).as_slice())
                            .map_err(|e| err("write kv", &e))?;
                    }
                    None => {
                        kv.remove(key.as_str()).map_err(|e| err("delete kv", &e))?;
                    }
                }
            }
            let mut leases = wtx
                .open_table(LEASES)
                .map_err(|e| err("open table leases", &e))?;
            for (id, ttl) in &changes.leases {
                match ttl {
                    Some(ttl) => {
                        leases
                            .insert(id.0, ttl.secs())
                            .map_err(|e| err("write lease", &e))?;
                    }
                    None => {
                        leases.remove(id.0).map_err(|e| err("delete lease", &e))?;
                    }
                }
            }
            let mut meta = wtx
                .open_table(META)
                .map_err(|e| err("open table meta", &e))?;
            meta.insert(META_REVISION, changes.revision)
                .map_err(|e| err("write revision", &e))?;
        }
        wtx.commit().map_err(|e| err("commit", &e))
    }

    fn publish(&self, changes: Changes) {
        let now = Instant::now();
        let mut state = write(&self.shared);
        let state = &mut *state;
        for (id, ttl) in &changes.leases {
            if let Some(ttl) = ttl {
                state.leases.insert(
                    *id,
                    LeaseState {
                        ttl: *ttl,
                        deadline: now + ttl.as_duration(),
                        keys: BTreeSet::new(),
                    },
                );
            }
        }
        for (key, kv) in changes.kvs {
            let old = match kv {
                Some(kv) => {
                    if let Some(l) = kv.lease.and_then(|id| state.leases.get_mut(&id)) {
                        l.keys.insert(key.clone());
                    }
                    state.kvs.insert(key.clone(), kv)
                }
                None => state.kvs.remove(&key),
            };
            if let Some(old_lease) = old.and_then(|o| o.lease) {
                let still = state.kvs.get(&key).and_then(|kv| kv.lease) == Some(old_lease);
                if !still && let Some(l) = state.leases.get_mut(&old_lease) {
                    l.keys.remove(&key);
                }
            }
        }
        for (id, ttl) in &changes.leases {
            if ttl.is_none() {
                state.leases.remove(id);
            }
        }
        state.revision = changes.revision;
        for (rev, events) in changes.events {
            state.watchers.retain(|w| {
                if rev < w.from {
                    return !w.tx.is_closed();
                }
                let mine: Vec<WatchEvent> = events
                    .iter()
                    .filter(|e| event_key(e).starts_with(&w.prefix))
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    return !w.tx.is_closed();
                }
                w.tx.send(Ok(WatchItem::Events {
                    revision: rev,
                    events: mine,
                }))
                .is_ok()
            });
            state.history_events += events.len();
            state.history.push_back((rev, events));
        }
        while state.history_events > state.history_cap {
            match state.history.pop_front() {
                Some((rev, events)) => {
                    state.history_events -= events.len();
                    state.first_kept = state.first_kept.max(rev + 1);
                }
                None => break,
            }
        }
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
