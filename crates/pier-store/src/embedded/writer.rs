//! The one writer thread: it takes every queued request (group commit),
//! applies them to one overlay, persists it in one redb transaction, then
//! publishes it to the in-memory state and the watchers and answers the
//! callers; it also expires leases.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use redb::{Database, Durability};
use tokio::sync::oneshot;

use super::changes::{Changes, TxnOutcome};
use super::disk::{KV, LEASES, META, META_REVISION, encode, unavailable};
use super::{LeaseState, State, event_key, read, write};
use crate::{LeaseId, StoreError, Ttl, Txn, WatchEvent, WatchItem};

/// Requests taken into one redb transaction at most; bounds the latency of
/// the first request of a batch.
pub(crate) const MAX_BATCH: usize = 4096;
/// How long the writer sleeps when no lease is due.
pub(crate) const IDLE_WAKE: Duration = Duration::from_secs(1);

pub(crate) enum Request {
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

pub(crate) enum Reply {
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
    pub(super) fn fail(self, err: &StoreError) -> Reply {
        match self {
            Reply::Txn(tx, Ok(_)) => Reply::Txn(tx, Err(err.clone())),
            Reply::Grant(tx, Ok(_)) => Reply::Grant(tx, Err(err.clone())),
            Reply::Revoke(tx, Ok(())) => Reply::Revoke(tx, Err(err.clone())),
            other => other,
        }
    }

    pub(super) fn send(self) {
        // A caller that went away (its future was dropped) no longer wants
        // the answer; the write itself is committed either way.
        match self {
            Reply::Txn(tx, r) => drop(tx.send(r)),
            Reply::Grant(tx, r) => drop(tx.send(r)),
            Reply::Revoke(tx, r) => drop(tx.send(r)),
        }
    }
}

pub(crate) struct Writer {
    pub(crate) db: Database,
    pub(crate) path: PathBuf,
    pub(crate) rx: mpsc::Receiver<Request>,
    pub(crate) shared: Arc<RwLock<State>>,
    pub(crate) next_lease: i64,
}

impl Writer {
    pub(super) fn run(mut self) {
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

    pub(super) fn process(&mut self, batch: Vec<Request>) {
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

    pub(super) fn persist(&self, changes: &Changes) -> Result<(), StoreError> {
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

    pub(super) fn publish(&self, changes: Changes) {
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
