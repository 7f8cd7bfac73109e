//! [`LeaseKeeper`]: grants a lease and keeps it alive on any [`Store`].
//!
//! It renews every TTL/3. A renewal that fails or hangs is tried again at
//! once: another attempt starts every TTL/20 (at least 50 ms; at most
//! [`MAX_INFLIGHT`] at once, each given the TTL) until one is answered, so
//! that a host whose connection to the store comes back renews within a
//! fraction of the TTL, not at its next period (a 1.3 s cut with a 2 s TTL
//! cost a host its lease when renewals were tried one after another, each
//! waited for up to the TTL and then a period). When the store says the
//! lease is gone (it expired
//! during a partition, or was revoked) it logs a warning, publishes `None`,
//! grants a new lease (retrying with backoff) and publishes `Some(new)`.
//! Holders watch [`LeaseKeeper::subscribe`] and re-put their keys under the
//! new lease. A store that cannot be reached is retried; only the store
//! saying "not found" counts as lost, since etcd extends leases across a
//! leader change or restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{LeaseId, Store, StoreError, Ttl};

const REGRANT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The most renewal attempts in flight while renewals fail.
const MAX_INFLIGHT: usize = 4;
/// The least time between two attempts while renewals fail.
const RETRY_MIN: Duration = Duration::from_millis(50);
const REGRANT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Keeps one lease alive; re-grants it when lost. Cheap to clone.
#[derive(Clone)]
pub struct LeaseKeeper {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    ttl: Ttl,
    tx: watch::Sender<Option<LeaseId>>,
    /// Whether the last renewal reached the store.
    healthy: watch::Sender<bool>,
    /// Stops the renewing task (a child of the caller's token).
    stop: CancellationToken,
    /// The renewing task; taken by `revoke`. A std Mutex: held only to take
    /// the handle, never across an await.
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("lease", &*self.inner.tx.borrow())
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

impl LeaseKeeper {
    /// Grants a lease and keeps it alive (renew every ttl/3). If the lease is
    /// lost, logs a warning, publishes `None`, grants a new lease (retrying
    /// with backoff) and publishes `Some(new_id)`; holders must re-put their
    /// keys. Stops renewing (without revoking) when `cancel` fires.
    pub async fn start(
        store: Arc<dyn Store>,
        ttl: Ttl,
        cancel: CancellationToken,
    ) -> Result<LeaseKeeper, StoreError> {
        let lease = store.lease_grant(ttl).await?;
        let (tx, _) = watch::channel(Some(lease));
        let (healthy, _) = watch::channel(true);
        let inner = Arc::new(Inner {
            store,
            ttl,
            tx,
            healthy,
            stop: cancel.child_token(),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(renew(inner.clone(), lease));
        if let Ok(mut slot) = inner.task.lock() {
            *slot = Some(task);
        }
        Ok(LeaseKeeper { inner })
    }

    /// The current lease: `Some(id)` while held, `None` while re-granting.
    pub fn subscribe(&self) -> watch::Receiver<Option<LeaseId>> {
        self.inner.tx.subscribe()
    }

    /// The current lease, if held.
    /// `true` while renewals reach the store; `false` from the first
    /// renewal that fails or gets no answer within the TTL until one
    /// succeeds (or a new lease is granted). A store that cannot renew a
    /// lease cannot be trusted to deliver a live watch either: the
    /// reflector marks its snapshot stale on `false`, within about one TTL,
    /// well before a silent connection's keep-alive gives up.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.inner.healthy.subscribe()
    }

    pub fn current(&self) -> Option<LeaseId> {
        *self.inner.tx.borrow()
    }

    pub fn ttl(&self) -> Ttl {
        self.inner.ttl
    }

    /// Stops renewing and revokes (graceful shutdown: the keys go at once).
    pub async fn revoke(&self) -> Result<(), StoreError> {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            // The task only ends by cancellation; a panic in it is a bug we
            // surface as an error.
            task.await.map_err(|e| StoreError::Task {
                task: "lease keeper task",
                message: e.to_string(),
            })?;
        }
        let lease = self.inner.tx.send_replace(None);
        match lease {
            Some(id) => match self.inner.store.lease_revoke(id).await {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        }
    }
}

/// Renews `lease` until stopped; re-grants when it is lost.
async fn renew(inner: Arc<Inner>, mut lease: LeaseId) {
    let ttl = inner.ttl.as_duration();
    let period = ttl / 3;
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match renewal(&inner, lease).await {
            None => return,
            Some(Ok(())) => {}
            Some(Err(_)) => {
                tracing::warn!(%lease, "lease lost (expired or revoked); granting a new one");
                inner.tx.send_replace(None);
                match regrant(&inner).await {
                    Some(new) => {
                        tracing::info!(old = %lease, new = %new, "lease re-granted");
                        lease = new;
                        inner.tx.send_replace(Some(new));
                        inner
                            .healthy
                            .send_if_modified(|h| !std::mem::replace(h, true));
                    }
                    None => return,
                }
            }
        }
    }
}

/// One renewal: tried until the store answers. After the first failure
/// (an error, or no answer within the TTL) it is unhealthy and another
/// attempt starts every TTL/20 while fewer than [`MAX_INFLIGHT`] are in
/// flight; the first answer ends them all. `Some(Ok)` renewed,
/// `Some(Err)` the lease is gone, `None` stopped.
async fn renewal(inner: &Inner, lease: LeaseId) -> Option<Result<(), ()>> {
    let ttl = inner.ttl.as_duration();
    let retry = (ttl / 20).max(RETRY_MIN);
    let attempt = || tokio::time::timeout(ttl, inner.store.lease_keepalive(lease));
    let mut inflight = futures::stream::FuturesUnordered::new();
    inflight.push(attempt());
    let mut failing_since: Option<std::time::Instant> = None;
    let mut next_try = tokio::time::Instant::now();
    loop {
        let can_try = failing_since.is_some() && inflight.len() < MAX_INFLIGHT;
        let res = tokio::select! {
            _ = inner.stop.cancelled() => return None,
            Some(r) = futures::StreamExt::next(&mut inflight) => r,
            _ = tokio::time::sleep_until(next_try), if can_try => {
                inflight.push(attempt());
                next_try = tokio::time::Instant::now() + retry;
                continue;
            }
        };
        let gone = match res {
            Ok(Ok(_)) => false,
            // An answer: the store is reachable.
            Ok(Err(StoreError::LeaseNotFound(_))) => true,
            Ok(Err(e)) => {
                fail(inner, lease, &mut failing_since, &e.to_string());
                next_try = next_try.min(tokio::time::Instant::now() + retry);
                continue;
            }
            Err(_) => {
                fail(
                    inner,
                    lease,
                    &mut failing_since,
                    &format!("no answer in {ttl:?}"),
                );
                next_try = next_try.min(tokio::time::Instant::now() + retry);
                continue;
            }
        };
        if let Some(since) = failing_since {
            tracing::info!(%lease, "lease keepalive answered again after {:?}", since.elapsed());
        }
        inner
            .healthy
            .send_if_modified(|h| !std::mem::replace(h, true));
        return Some(if gone { Err(()) } else { Ok(()) });
    }
}

/// A renewal attempt failed: unhealthy; logged once per failing spell.
fn fail(inner: &Inner, lease: LeaseId, failing_since: &mut Option<std::time::Instant>, why: &str) {
    inner
        .healthy
        .send_if_modified(|h| std::mem::replace(h, false));
    if failing_since.is_none() {
        *failing_since = Some(std::time::Instant::now());
        tracing::warn!(%lease, "lease keepalive failed, retrying: {why}");
    } else {
        tracing::debug!(%lease, "lease keepalive failed, retrying: {why}");
    }
}

/// Grants a new lease, backing off, until it works or the keeper stops.
async fn regrant(inner: &Inner) -> Option<LeaseId> {
    let mut backoff = REGRANT_BACKOFF_MIN;
    loop {
        let res = tokio::select! {
            _ = inner.stop.cancelled() => return None,
            r = inner.store.lease_grant(inner.ttl) => r,
        };
        match res {
            Ok(id) => return Some(id),
            Err(e) => {
                inner
                    .healthy
                    .send_if_modified(|h| std::mem::replace(h, false));
                tracing::warn!("lease grant failed, retrying in {backoff:?}: {e}");
            }
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(REGRANT_BACKOFF_MAX);
    }
}
