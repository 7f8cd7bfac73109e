//! The reflector: list + watch of `keys::ROOT` → `watch::Receiver<Arc<Snapshot>>`.
//!
//! - It lists everything, builds a fresh [`Snapshot`] and publishes it, then
//!   watches from the list revision + 1.
//! - Each batch of events is applied to a copy of the last snapshot. The
//!   maps are persistent (`pier_model::Map`), so a change to one pod copies
//!   only the tree path to it, and a change to one endpoint that service's
//!   endpoint map and the path to it: the work per batch is proportional
//!   to the batch, not to the store, and unchanged parts stay shared with
//!   the snapshots readers hold. All items already waiting in the watch
//!   are applied before one snapshot is published (bursts coalesce).
//! - On `Compacted`, or when the watch ends or fails, it lists again and
//!   replaces the state wholesale: nothing doubled, nothing kept that is gone.
//! - While the store is unreachable it keeps the last snapshot and sets
//!   `stale_since_ms`; a successful relist clears it. A `Resumed` watch
//!   does not: the reopened watch replays the changes made meanwhile
//!   *after* saying it is back, so the snapshot is still missing them
//!   (deletes included). A reflector with a node name (the agent's) then
//!   writes its *sync barrier* (`keys::sync(node)`) and stays stale until
//!   its own watch delivers a change at or past that write's revision:
//!   watch events come in revision order, so by then every change made
//!   before the barrier has arrived. It then deletes the barrier. Two
//!   writes per reopen; a failed barrier write relists instead. A
//!   reflector without a node name relists on `Resumed`. (etcd's progress
//!   notification cannot be that signal: etcd 3.4.23 answers a progress
//!   request before the replayed changes, etcd-io/etcd#15220.)
//!   With a lease health signal ([`Reflector::spawn_with_health`]), a
//!   failing lease renewal marks the snapshot stale too (a partition is
//!   seen within about one lease TTL, not only when the watch connection's
//!   keep-alive gives up); it is fresh again when both are fine, and, with
//!   a node name, once a sync barrier written when the lease renewed again
//!   has come back: a cut shorter than the watch's own liveness probe
//!   leaves the watch open but behind, and what changed meanwhile (a pod
//!   the leader deleted) arrives after the lease is back.
//! - A key that does not parse, or a value that does not decode, is logged
//!   with its key and skipped (and any older value under that key dropped).
//!   Keys it does not use (alloc, stats, election, autoscale, sync) are
//!   ignored.
//! - With a [`HoldPolicy`] (the agent's), a node whose lease expired while
//!   this view of the store was stale, or within a window after, is *held*:
//!   its record, endpoints and pod statuses stay in the published snapshot
//!   until it registers again or a grace passes (see `hold`), so a stalled
//!   store does not blank out every service when it comes back. A node
//!   lost while the view was live goes at once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use pier_model::keys::{self, Key};
use pier_model::{Name, Snapshot, decode, now_ms};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{KeyValue, Revision, Store, StoreError, WatchEvent, WatchItem};

mod hold;
pub use hold::HoldPolicy;
use hold::Holds;

const RELIST_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RELIST_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Handle on a running reflector. The task stops when `cancel` fires.
#[derive(Debug, Clone)]
pub struct Reflector {
    rx: watch::Receiver<Arc<Snapshot>>,
    synced: watch::Receiver<bool>,
}

impl Reflector {
    /// Lists `keys::ROOT`, then watches from the list revision + 1. Publishes
    /// a new `Arc<Snapshot>` per batch. Relists after `Compacted` or when a
    /// watch gives up, and on `Resumed` (it has no sync barrier); on
    /// `Disconnected` sets `stale_since_ms`, a relist clears it.
    /// Unparsable values are logged (key + error) and skipped.
    pub fn spawn(store: Arc<dyn Store>, cancel: CancellationToken) -> Reflector {
        Self::start(store, cancel, None, None, None)
    }

    /// [`Reflector::spawn`], also marking the snapshot stale while `health`
    /// (the node lease's, [`crate::lease::LeaseKeeper::health`]) is `false`.
    pub fn spawn_with_health(
        store: Arc<dyn Store>,
        cancel: CancellationToken,
        health: watch::Receiver<bool>,
    ) -> Reflector {
        Self::start(store, cancel, Some(health), None, None)
    }

    /// [`Reflector::spawn_with_health`], also holding the nodes lost to a
    /// store stall by `hold` (see the module doc), and after a watch
    /// reopens proving it caught up with node `node`'s sync barrier
    /// (`keys::sync(node)`, written by this reflector only) instead of
    /// relisting. What an agent runs.
    pub fn spawn_with_hold(
        store: Arc<dyn Store>,
        cancel: CancellationToken,
        health: watch::Receiver<bool>,
        hold: HoldPolicy,
        node: &Name,
    ) -> Reflector {
        Self::start(
            store,
            cancel,
            Some(health),
            Some(hold),
            Some(keys::sync(node)),
        )
    }

    fn start(
        store: Arc<dyn Store>,
        cancel: CancellationToken,
        health: Option<watch::Receiver<bool>>,
        hold: Option<HoldPolicy>,
        barrier: Option<String>,
    ) -> Reflector {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let (synced_tx, synced) = watch::channel(false);
        let opts = Opts {
            health,
            holds: Holds::new(hold),
            barrier,
        };
        tokio::spawn(run(store, tx, synced_tx, cancel, opts));
        Reflector { rx, synced }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Waits until the first full list has been applied. Returns at once if
    /// it has (or if the reflector stopped).
    pub async fn synced(&self) {
        let mut s = self.synced.clone();
        let _ = s.wait_for(|v| *v).await;
    }
}

/// Resolves when the lease health changes (never without a signal); `None`
/// when its sender is gone.
async fn health_changed(h: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    match h {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Sets or clears `stale_since_ms` from the two signals; `true` if it
/// changed.
fn freshen(snap: &mut Snapshot, watch_down: bool, lease_down: bool) -> bool {
    match (watch_down || lease_down, snap.stale_since_ms) {
        (true, None) => {
            snap.stale_since_ms = Some(now_ms());
            true
        }
        (false, Some(_)) => {
            snap.stale_since_ms = None;
            snap.synced_at_ms = now_ms();
            true
        }
        _ => false,
    }
}

/// Awaits `fut` (a list, or a watch being opened) while following the
/// lease health: a failing lease marks the published snapshot stale at
/// once, even while `fut` hangs on a silent connection. `None` on cancel.
async fn race_health<T>(
    fut: impl Future<Output = T>,
    health: &mut Option<watch::Receiver<bool>>,
    lease_down: &mut bool,
    tx: &watch::Sender<Arc<Snapshot>>,
    cancel: &CancellationToken,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = &mut fut => return Some(r),
            h = health_changed(health) => {
                on_health(h, health, lease_down);
                if *lease_down {
                    mark_stale(tx);
                }
            }
        }
    }
}

fn on_health(h: Option<bool>, health: &mut Option<watch::Receiver<bool>>, lease_down: &mut bool) {
    match h {
        Some(ok) => {
            *lease_down = !ok;
            if !ok {
                tracing::warn!(
                    "reflector: the node lease cannot be renewed; serving the last snapshot, marked stale"
                );
            }
        }
        None => {
            *health = None;
            *lease_down = false;
        }
    }
}

/// Publishes `truth` with the held nodes laid under it.
fn publish(tx: &watch::Sender<Arc<Snapshot>>, truth: &Snapshot, holds: &mut Holds) {
    holds.saw(truth.stale_since_ms.is_some(), now_ms());
    tx.send_replace(Arc::new(holds.view(truth)));
}

/// Resolves at the earliest held node's deadline; never when none is held.
async fn hold_deadline(holds: &Holds) {
    match holds.next_deadline_ms() {
        Some(at) => {
            let wait = at.saturating_sub(now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await
        }
        None => std::future::pending().await,
    }
}

/// What a reflector follows besides the store.
struct Opts {
    health: Option<watch::Receiver<bool>>,
    holds: Holds,
    /// The sync barrier's key, if this reflector has one.
    barrier: Option<String>,
}

/// A sync barrier after a watch reopened.
enum Barrier {
    /// Being written.
    Writing(BoxFuture<'static, Result<Revision, StoreError>>),
    /// Written at this revision: the snapshot is stale until it gets there.
    Written(Revision),
}

impl Barrier {
    /// Starts writing `key` (its value: when, for whoever reads etcd).
    fn write(store: &Arc<dyn Store>, key: &str) -> Barrier {
        let (store, key) = (store.clone(), key.to_owned());
        Barrier::Writing(Box::pin(async move {
            let value = format!("{{\"at_ms\":{}}}", now_ms()).into_bytes();
            store.put(&key, value, None).await
        }))
    }
}

/// Resolves when the barrier being written is written (or failed); never
/// otherwise.
async fn barrier_written(b: &mut Option<Barrier>) -> Result<Revision, StoreError> {
    match b {
        Some(Barrier::Writing(f)) => f.await,
        _ => std::future::pending().await,
    }
}

/// Deletes the barrier once it has served (best effort: a leftover is
/// overwritten and deleted at the next reopen).
fn delete_barrier(store: &Arc<dyn Store>, key: &str, cancel: &CancellationToken) {
    let (store, key, cancel) = (store.clone(), key.to_owned(), cancel.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            r = store.delete(&key) => {
                if let Err(e) = r {
                    tracing::debug!(key, "reflector: deleting the sync barrier: {e}");
                }
            }
        }
    });
}

async fn run(
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<Snapshot>>,
    synced_tx: watch::Sender<bool>,
    cancel: CancellationToken,
    opts: Opts,
) {
    let Opts {
        mut health,
        mut holds,
        barrier: barrier_key,
    } = opts;
    let mut backoff = RELIST_BACKOFF_MIN;
    let mut lease_down = health.as_ref().is_some_and(|h| !*h.borrow());
    // The store's state as last published, without holds: what a relist
    // is compared with.
    let mut last = Snapshot::default();
    loop {
        // List.
        let Some(list) = race_health(
            store.list(keys::ROOT),
            &mut health,
            &mut lease_down,
            &tx,
            &cancel,
        )
        .await
        else {
            return;
        };
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "reflector: list {} failed, retrying in {backoff:?}: {e}",
                    keys::ROOT
                );
                mark_stale(&tx);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RELIST_BACKOFF_MAX);
                continue;
            }
        };
        let revision = list.revision;
        let mut snap = build(&list.kvs, revision);
        let mut watch_down = false;
        // A relist follows a stall or a failed watch: compare with what
        // was shown before it, stale or not.
        let was_stale = tx.borrow().stale_since_ms.is_some();
        holds.update(&last, &snap, was_stale, now_ms());
        freshen(&mut snap, watch_down, lease_down);
        tracing::debug!(revision, keys = list.kvs.len(), "reflector listed");
        // The raw list is not kept while watching.
        drop(list);
        publish(&tx, &snap, &mut holds);
        last = snap.clone();
        synced_tx.send_replace(true);

        // Watch.
        let Some(w) = race_health(
            store.watch(keys::ROOT, revision + 1),
            &mut health,
            &mut lease_down,
            &tx,
            &cancel,
        )
        .await
        else {
            return;
        };
        let mut w = match w {
            Ok(w) => w,
            Err(e) => {
                log_watch_end(&e);
                if !matches!(e, StoreError::Compacted { .. }) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RELIST_BACKOFF_MAX);
                }
                continue;
            }
        };
        backoff = RELIST_BACKOFF_MIN;
        // After a reopen: the barrier that proves the replayed changes have
        // arrived. The snapshot is stale while it is pending.
        let mut barrier: Option<Barrier> = None;
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                item = w.next() => item,
                h = health_changed(&mut health) => {
                    let was_down = lease_down;
                    on_health(h, &mut health, &mut lease_down);
                    // The lease renews again, but the watch may still be
                    // delivering what changed while it could not (a short
                    // cut does not break the watch, it delays it): as after
                    // a resumed watch, fresh only once the barrier is back.
                    if was_down && !lease_down && !watch_down
                        && let Some(key) = &barrier_key
                    {
                        tracing::info!("reflector: the lease renews again; writing the sync barrier");
                        barrier = Some(Barrier::write(&store, key));
                    }
                    let stale = snap.stale_since_ms.is_some();
                    if freshen(&mut snap, watch_down || barrier.is_some(), lease_down) {
                        holds.saw(stale, now_ms());
                        publish(&tx, &snap, &mut holds);
                    }
                    continue;
                }
                _ = hold_deadline(&holds) => {
                    if holds.update(&snap, &snap, snap.stale_since_ms.is_some(), now_ms()) {
                        publish(&tx, &snap, &mut holds);
                    }
                    continue;
                }
                r = barrier_written(&mut barrier) => {
                    match r {
                        Ok(rev) => {
                            tracing::debug!(rev, "reflector: sync barrier written");
                            barrier = Some(Barrier::Written(rev));
                            if caught_up(&barrier, &snap) {
                                barrier = None;
                                on_caught_up(&store, barrier_key.as_deref(), &cancel);
                                if freshen(&mut snap, watch_down, lease_down) {
                                    holds.saw(true, now_ms());
                                    publish(&tx, &snap, &mut holds);
                                }
                            }
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!("reflector: could not write the sync barrier after the watch resumed ({e}); listing again");
                            break;
                        }
                    }
                }
            };
            let prev = snap.clone();
            let mut stale = snap.stale_since_ms.is_some();
            let mut turn = apply_item(&mut snap, first, &mut watch_down);
            // Coalesce: apply everything already waiting, then publish once.
            loop {
                match turn {
                    Turn::Ended => break,
                    Turn::Disconnected => barrier = None,
                    Turn::Resumed => match &barrier_key {
                        Some(key) => {
                            tracing::info!("reflector: watch resumed; writing the sync barrier");
                            // Stale now by the barrier, not the watch.
                            watch_down = false;
                            barrier = Some(Barrier::write(&store, key));
                        }
                        None => {
                            tracing::info!("reflector: watch resumed; listing again");
                            turn = Turn::Ended;
                            break;
                        }
                    },
                    Turn::Go => {}
                }
                stale |= watch_down || barrier.is_some();
                match w.next().now_or_never() {
                    Some(item) => turn = apply_item(&mut snap, item, &mut watch_down),
                    None => break,
                }
            }
            stale |= watch_down || barrier.is_some();
            if caught_up(&barrier, &snap) {
                barrier = None;
                on_caught_up(&store, barrier_key.as_deref(), &cancel);
            }
            holds.update(&prev, &snap, stale, now_ms());
            freshen(&mut snap, watch_down || barrier.is_some(), lease_down);
            publish(&tx, &snap, &mut holds);
            last = snap.clone();
            if matches!(turn, Turn::Ended) {
                break;
            }
        }
        // The watch ended: list again (the relist replaces everything).
    }
}

/// What one watch item means for the loop.
enum Turn {
    Go,
    /// The watch lost its connection: the snapshot is stale.
    Disconnected,
    /// The watch reopened; the changes it missed may not have arrived yet.
    Resumed,
    /// The watch is over: list again.
    Ended,
}

/// Whether the snapshot has reached the written barrier's revision.
fn caught_up(barrier: &Option<Barrier>, snap: &Snapshot) -> bool {
    matches!(barrier, Some(Barrier::Written(rev)) if snap.revision >= *rev)
}

fn on_caught_up(store: &Arc<dyn Store>, key: Option<&str>, cancel: &CancellationToken) {
    tracing::info!("reflector: caught up after the watch resumed");
    if let Some(key) = key {
        delete_barrier(store, key, cancel);
    }
}

/// Applies one watch item to `snap`. `watch_down` follows `Disconnected`
/// and events (not `Resumed`: the caller decides when a resumed watch has
/// caught up); the caller derives `stale_since_ms` from it, the barrier
/// and the lease health ([`freshen`]).
fn apply_item(
    snap: &mut Snapshot,
    item: Option<Result<WatchItem, StoreError>>,
    watch_down: &mut bool,
) -> Turn {
    match item {
        None => {
            tracing::warn!("reflector: watch ended; listing again");
            Turn::Ended
        }
        Some(Err(e)) => {
            log_watch_end(&e);
            Turn::Ended
        }
        Some(Ok(WatchItem::Disconnected { reason })) => {
            tracing::warn!("reflector: store disconnected ({reason}); serving the last snapshot");
            *watch_down = true;
            Turn::Disconnected
        }
        Some(Ok(WatchItem::Resumed)) => Turn::Resumed,
        Some(Ok(WatchItem::Events { revision, events })) => {
            apply_events(snap, &events, revision);
            *watch_down = false;
            snap.synced_at_ms = now_ms();
            Turn::Go
        }
    }
}

fn log_watch_end(e: &StoreError) {
    match e {
        StoreError::Compacted { .. } => tracing::info!("reflector: {e}; listing again"),
        _ => tracing::warn!("reflector: watch failed: {e}; listing again"),
    }
}

fn mark_stale(tx: &watch::Sender<Arc<Snapshot>>) {
    tx.send_if_modified(|s| {
        if s.stale_since_ms.is_some() {
            return false;
        }
        let mut n = Snapshot::clone(s);
        n.stale_since_ms = Some(now_ms());
        *s = Arc::new(n);
        true
    });
}

/// A fresh snapshot from a full list.
pub fn build(kvs: &[KeyValue], revision: i64) -> Snapshot {
    let mut snap = Snapshot {
        revision,
        synced_at_ms: now_ms(),
        ..Snapshot::default()
    };
    for kv in kvs {
        put(&mut snap, &kv.key, &kv.value);
    }
    snap
}

/// Applies one batch of watch events to `snap` (its persistent maps copy
/// only the paths to the keys changed) and sets its revision.
pub fn apply_events(snap: &mut Snapshot, events: &[WatchEvent], revision: i64) {
    for e in events {
        apply_event(snap, e);
    }
    snap.revision = revision;
}

fn apply_event(snap: &mut Snapshot, e: &WatchEvent) {
    match e {
        WatchEvent::Put(kv) => put(snap, &kv.key, &kv.value),
        WatchEvent::Delete { key, .. } => {
            if let Some(k) = parse(key) {
                remove(snap, &k);
            }
        }
    }
}

fn parse(key: &str) -> Option<Key> {
    match Key::parse(key) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(key, "reflector: skipping unparsable key: {e}");
            None
        }
    }
}

/// Applies a put of `value` at `key`. A value that does not decode is logged
/// and skipped, and the key's older value (if any) removed: the snapshot
/// holds only what the store holds and parses, as a relist would.
fn put(snap: &mut Snapshot, key: &str, value: &[u8]) {
    let Some(k) = parse(key) else { return };
    let ok = match &k {
        Key::Node(n) => decode(key, value).map(|v| {
            snap.nodes.insert(n.clone(), Arc::new(v));
        }),
        Key::Service(ns, n) => decode(key, value).map(|v| {
            snap.services.insert((ns.clone(), n.clone()), Arc::new(v));
        }),
        Key::ReplicaSet(ns, n) => decode(key, value).map(|v| {
            snap.replicasets
                .insert((ns.clone(), n.clone()), Arc::new(v));
        }),
        Key::Pod(ns, n) => decode(key, value).map(|v| {
            snap.pods.insert((ns.clone(), n.clone()), Arc::new(v));
        }),
        Key::PodStatus(ns, n) => decode(key, value).map(|v| {
            snap.pod_statuses
                .insert((ns.clone(), n.clone()), Arc::new(v));
        }),
        Key::Endpoint {
            namespace,
            service,
            node,
            id,
        } => decode(key, value).map(|v| {
            let outer = &mut snap.endpoints;
            let map = outer
                .entry((namespace.clone(), service.clone()))
                .or_default();
            Arc::make_mut(map).insert((node.clone(), id.clone()), Arc::new(v));
        }),
        Key::Problem(ns, n) => decode(key, value).map(|v| {
            snap.problems.insert((ns.clone(), n.clone()), Arc::new(v));
        }),
        Key::Rollout(ns, n) => decode(key, value).map(|v| {
            snap.rollouts.insert((ns.clone(), n.clone()), Arc::new(v));
        }),
        Key::NodeLabels(n) => decode(key, value).map(|v| {
            snap.node_labels.insert(n.clone(), Arc::new(v));
        }),
        Key::VipAlloc(_)
        | Key::NodePortAlloc(_)
        | Key::Stats { .. }
        | Key::Election(_)
        | Key::Autoscale(..)
        | Key::App(..)
        | Key::Sync(_) => Ok(()),
    };
    if let Err(e) = ok {
        tracing::warn!(key, "reflector: skipping value that does not decode: {e}");
        remove(snap, &k);
    }
}

fn remove(snap: &mut Snapshot, k: &Key) {
    match k {
        Key::Node(n) => {
            if snap.nodes.contains_key(n) {
                snap.nodes.remove(n);
            }
        }
        Key::Service(ns, n) => remove_obj(&mut snap.services, ns, n),
        Key::ReplicaSet(ns, n) => remove_obj(&mut snap.replicasets, ns, n),
        Key::Pod(ns, n) => remove_obj(&mut snap.pods, ns, n),
        Key::PodStatus(ns, n) => remove_obj(&mut snap.pod_statuses, ns, n),
        Key::Problem(ns, n) => remove_obj(&mut snap.problems, ns, n),
        Key::Rollout(ns, n) => remove_obj(&mut snap.rollouts, ns, n),
        Key::NodeLabels(n) => {
            if snap.node_labels.contains_key(n) {
                snap.node_labels.remove(n);
            }
        }
        Key::Endpoint {
            namespace,
            service,
            node,
            id,
        } => {
            let skey = (namespace.clone(), service.clone());
            let ekey = (node.clone(), id.clone());
            let present = snap
                .endpoints
                .get(&skey)
                .is_some_and(|m| m.contains_key(&ekey));
            if !present {
                return;
            }
            let outer = &mut snap.endpoints;
            let empty = match outer.get_mut(&skey) {
                Some(map) => {
                    let map = Arc::make_mut(map);
                    map.remove(&ekey);
                    map.is_empty()
                }
                None => false,
            };
            if empty {
                outer.remove(&skey);
            }
        }
        Key::VipAlloc(_)
        | Key::NodePortAlloc(_)
        | Key::Stats { .. }
        | Key::Election(_)
        | Key::Autoscale(..)
        | Key::App(..)
        | Key::Sync(_) => {}
    }
}

fn remove_obj<V>(
    map: &mut pier_model::Map<pier_model::ObjectKey, Arc<V>>,
    ns: &pier_model::Namespace,
    n: &pier_model::Name,
) {
    // A remove copies the path to where the key would be even when it is
    // absent: look first, so an unchanged map stays shared (`ptr_eq`).
    let k = (ns.clone(), n.clone());
    if map.contains_key(&k) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pier_model::{Name, Namespace, Pod};

    fn kv(key: String, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        }
    }

    fn pod(i: usize) -> (String, Vec<u8>) {
        let name = Name::new(&format!("p{i}")).unwrap();
        let p: Pod = serde_json::from_value(serde_json::json!({
            "name": name.as_str(), "replicaset": "web", "node": "n1",
            "template_hash": "h", "template": {"image": "i"}, "created_at": 1,
        }))
        .unwrap();
        (
            keys::pod(&Namespace::default(), &name),
            pier_model::encode(&p),
        )
    }

    /// An event batch copies only what it changes: the snapshot before it
    /// is untouched, the maps it does not touch stay shared, and the
    /// difference of the pods maps is the one pod put.
    #[test]
    fn a_batch_shares_what_it_does_not_change() {
        let mut kvs: Vec<KeyValue> = (0..1000).map(pod).map(|(k, v)| kv(k, v)).collect();
        let node = serde_json::json!({"name": "n1", "addr": "10.0.0.1", "version": "t"});
        kvs.push(kv(
            keys::node(&Name::new("n1").unwrap()),
            node.to_string().into_bytes(),
        ));
        let old = build(&kvs, 5);
        assert_eq!((old.pods.len(), old.nodes.len()), (1000, 1));
        let mut new = old.clone();
        let (k, v) = pod(1000);
        apply_events(&mut new, &[WatchEvent::Put(kv(k, v))], 6);
        // A delete of a key that is not there changes nothing.
        let (gone, _) = pod(5000);
        apply_events(
            &mut new,
            &[WatchEvent::Delete {
                key: gone,
                mod_revision: 7,
            }],
            7,
        );
        assert_eq!((old.pods.len(), new.pods.len()), (1000, 1001));
        assert!(new.nodes.ptr_eq(&old.nodes));
        assert!(new.pod_statuses.ptr_eq(&old.pod_statuses));
        assert!(!new.pods.ptr_eq(&old.pods));
        let diff: Vec<_> = old.pods.diff(&new.pods).collect();
        assert_eq!(diff.len(), 1);
        assert!(
            matches!(diff[0], pier_model::DiffItem::Add(k, _) if k.1.as_str() == "p1000"),
            "{diff:?}"
        );
    }
}
