//! Leader election on any [`Store`]: create-if-absent of
//! `keys::election(name)` under a lease, and a watch on that key.
//!
//! - The winner's key holds its candidate string and lives under its lease
//!   ([`LeaseKeeper`]). When the winner stops renewing, etcd deletes the key
//!   after the TTL and a waiting contender's create succeeds.
//! - A contender waits on a watch of the key for its deletion, then tries
//!   again; it never polls.
//! - A leader loses when its lease is lost (or re-granted: the key went with
//!   the old lease), or the key is deleted or changed by someone else.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pier_model::{Name, keys};
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseKeeper;
use crate::{
    Compare, LeaseId, Revision, Store, StoreError, Ttl, Txn, TxnOp, WatchEvent, WatchItem,
};

const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// Held by the leader of one election.
pub struct Leadership {
    key: String,
    lease: LeaseId,
    keeper: LeaseKeeper,
    lost: CancellationToken,
    /// Stops the monitor and the keeper.
    stop: CancellationToken,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.key)
            .field("lease", &self.lease)
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

/// Blocks until `candidate` leads election `name` (key
/// `keys::election(name)`), or `cancel` fires (`Err(StoreError::Closed)`).
pub async fn campaign(
    store: Arc<dyn Store>,
    name: &Name,
    candidate: &str,
    ttl: Ttl,
    cancel: &CancellationToken,
) -> Result<Leadership, StoreError> {
    let key = keys::election(name);
    let stop = cancel.child_token();
    let keeper = tokio::select! {
        _ = cancel.cancelled() => return Err(StoreError::Closed),
        r = LeaseKeeper::start(store.clone(), ttl, stop.clone()) => r?,
    };
    let res = tokio::select! {
        _ = cancel.cancelled() => Err(StoreError::Closed),
        r = win(&*store, &key, candidate, &keeper) => r,
    };
    let (lease, revision) = match res {
        Ok(v) => v,
        Err(e) => {
            // Do not leave a lease behind.
            let _ = keeper.revoke().await;
            return Err(e);
        }
    };
    tracing::info!(%key, candidate, %lease, "won election");
    let lost = CancellationToken::new();
    tokio::spawn(monitor(
        store.clone(),
        key.clone(),
        lease,
        revision,
        keeper.clone(),
        lost.clone(),
        stop.clone(),
    ));
    Ok(Leadership {
        key,
        lease,
        keeper,
        lost,
        stop,
    })
}

/// Tries create-if-absent until it succeeds; between tries waits for the key
/// to be deleted. Returns the lease and the revision of the winning put.
async fn win(
    store: &dyn Store,
    key: &str,
    candidate: &str,
    keeper: &LeaseKeeper,
) -> Result<(LeaseId, Revision), StoreError> {
    let mut lease_rx = keeper.subscribe();
    loop {
        let current = *lease_rx.borrow_and_update();
        let lease = match current {
            Some(l) => l,
            None => {
                // Re-granting after a loss: wait for the new lease.
                lease_rx.changed().await.map_err(|_| StoreError::Closed)?;
                continue;
            }
        };
        let txn = Txn {
            compares: vec![Compare::Absent(key.to_owned())],
            success: vec![TxnOp::Put {
                key: key.to_owned(),
                value: candidate.as_bytes().to_vec(),
                lease: Some(lease),
            }],
            failure: vec![],
        };
        match store.txn(txn).await {
            Ok(r) if r.succeeded => return Ok((lease, r.revision)),
            Ok(_) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                // The keeper notices too and re-grants.
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(%key, "campaign: {e}; retrying");
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
        }
        let current = match store.get(key).await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(%key, "campaign: {e}; retrying");
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
        };
        let Some(current) = current else { continue };
        if current.lease == Some(lease) {
            // Our own earlier attempt won (its answer was lost and retried).
            return Ok((lease, current.mod_revision));
        }
        wait_for_change(store, key, current.mod_revision + 1).await;
    }
}

/// Returns when `key` may have changed since `from - 1`: it was deleted or
/// rewritten, or the watch broke (the caller looks again).
async fn wait_for_change(store: &dyn Store, key: &str, from: Revision) {
    let mut w = match store.watch(key, from).await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(%key, "election watch: {e}");
            tokio::time::sleep(RETRY_BACKOFF).await;
            return;
        }
    };
    while let Some(item) = w.next().await {
        match item {
            Ok(WatchItem::Events { events, .. }) => {
                if events.iter().any(|e| event_key(e) == key) {
                    return;
                }
            }
            Ok(WatchItem::Disconnected { .. }) | Ok(WatchItem::Resumed) => {}
            Err(e) => {
                tracing::debug!(%key, "election watch: {e}");
                return;
            }
        }
    }
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

/// Cancels `lost` when the lease is lost or the key stops being ours.
async fn monitor(
    store: Arc<dyn Store>,
    key: String,
    lease: LeaseId,
    revision: Revision,
    keeper: LeaseKeeper,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let mut lease_rx = keeper.subscribe();
    let mut from = revision + 1;
    let reason = 'outer: loop {
        let mut w = tokio::select! {
            _ = stop.cancelled() => break 'outer "stopped".to_string(),
            r = store.watch(&key, from) => match r {
                Ok(w) => w,
                Err(e) => {
                    // Compacted or unavailable: check the key directly.
                    match check(&*store, &key, lease).await {
                        Ok(Some(rev)) => { from = rev + 1; tokio::time::sleep(RETRY_BACKOFF).await; continue; }
                        Ok(None) => break 'outer format!("key no longer ours ({e})"),
                        Err(_) => { tokio::time::sleep(RETRY_BACKOFF).await; continue; }
                    }
                }
            },
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => break 'outer "stopped".to_string(),
                changed = lease_rx.changed() => {
                    if changed.is_err() || *lease_rx.borrow() != Some(lease) {
                        break 'outer "lease lost".to_string();
                    }
                }
                item = w.next() => match item {
                    Some(Ok(WatchItem::Events { revision, events })) => {
                        from = revision + 1;
                        for e in &events {
                            match e {
                                WatchEvent::Put(kv) if kv.key == key && kv.lease != Some(lease) => {
                                    break 'outer "key taken over".to_string();
                                }
                                WatchEvent::Delete { key: k, .. } if *k == key => {
                                    break 'outer "key deleted".to_string();
                                }
                                _ => {}
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => continue 'outer,
                },
            }
        }
    };
    if reason != "stopped" {
        tracing::warn!(%key, %lease, "leadership lost: {reason}");
    }
    lost.cancel();
}

/// `Some(mod_revision)` when `key` is still held under `lease`.
async fn check(
    store: &dyn Store,
    key: &str,
    lease: LeaseId,
) -> Result<Option<Revision>, StoreError> {
    Ok(store
        .get(key)
        .await?
        .filter(|kv| kv.lease == Some(lease))
        .map(|kv| kv.mod_revision))
}

impl Leadership {
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The election key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Resolves when leadership is lost (lease lost, key deleted or changed).
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Gives up leadership: revokes the lease, which deletes the key at once.
    pub async fn resign(self) -> Result<(), StoreError> {
        self.stop.cancel();
        let res = self.keeper.revoke().await;
        self.lost.cancel();
        res
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Stop renewing; the key goes after the TTL.
        self.stop.cancel();
    }
}

/// The fence of a leader's writes: the election key and the revision at
/// which this leader holds it. Every write a leader makes compares it
/// (`Compare::ModRevision(fence.0, fence.1)`), so that a deposed leader's
/// late write fails instead of landing.
pub type Fence = (String, Revision);

/// Campaigns until `candidate` leads election `name`, then reads the
/// election key for the [`Fence`]. A failed campaign or read is logged and
/// tried again after `retry`; a key that is no longer ours right after
/// winning means campaigning again. `None`: `cancel` fired.
pub async fn campaign_fenced(
    store: &Arc<dyn Store>,
    name: &Name,
    candidate: &str,
    ttl: Ttl,
    retry: Duration,
    cancel: &CancellationToken,
) -> Option<(Leadership, Fence)> {
    loop {
        let leadership = match campaign(store.clone(), name, candidate, ttl, cancel).await {
            Ok(l) => l,
            Err(_) if cancel.is_cancelled() => return None,
            Err(e) => {
                tracing::warn!(election = %name, error = %e, "campaign failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        match store.get(leadership.key()).await {
            Ok(Some(kv)) if kv.lease == Some(leadership.lease()) => {
                return Some((leadership, (kv.key, kv.mod_revision)));
            }
            Ok(_) => {
                tracing::warn!(election = %name, "election key no longer ours right after winning; campaigning again");
            }
            Err(e) => {
                tracing::warn!(election = %name, error = %e, "reading the election key failed; campaigning again");
                drop(leadership);
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

/// The current leader's candidate string.
pub async fn leader(store: &dyn Store, name: &Name) -> Result<Option<String>, StoreError> {
    let key = keys::election(name);
    Ok(store
        .get(&key)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}
