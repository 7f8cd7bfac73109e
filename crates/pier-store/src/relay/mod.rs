//! Watch relays: a few hosts watch etcd, every other host lists and watches
//! `keys::ROOT` through them (issue 17 §3; ARCHITECTURE.md "Watch relays").
//!
//! - [`Relay`]: one upstream watch of `keys::ROOT` feeding a cache: the
//!   current key → [`KeyValue`] map at the relay's revision, and a bounded
//!   history of the event batches since `base` (each batch encoded once,
//!   as the bytes of its [`wire`] frame, shared by every client).
//!   [`Relay::serve`] answers one client connection: a list from the map,
//!   or a watch from a revision out of the history, then live.
//! - [`relayed`]: a [`Store`] whose `list(ROOT)` and `watch(ROOT, from)` go
//!   to the relays (rotating on failure, to etcd directly when every relay
//!   failed in a row), and everything else to etcd.
//! - Revisions are etcd's, so a client moves between relays (and etcd)
//!   resuming from the revision after the last it delivered.
//! - Bounded: frames (16 MiB), history (events), and clients: each client
//!   task reads the shared history at its own position; one whose socket
//!   does not take a frame within [`RelayOptions::write_timeout`], or who
//!   falls out of the history, is cut off (it resumes or lists again).
//! - Nothing here decodes values: key-values are forwarded as bytes.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use pier_model::Map;
use pier_model::keys;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{KeyValue, Revision, Store, StoreError, WatchEvent, WatchItem};

mod client;
mod server;
pub mod wire;

pub use client::{ClientStats, relayed, relayed_with_stats};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An upstream batch is cut into frames of about this size (between
/// revisions).
const BATCH_BYTES: usize = 1 << 20;
/// The shortest heartbeat and write timeout a relay takes.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How a [`Relay`] keeps history and talks to its clients.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Events kept for clients resuming from a revision (default 200,000).
    pub history_events: usize,
    /// A `Progress` frame goes to a client that has had nothing for this
    /// long, while the upstream watch is live (default 1 s, at least
    /// 100 ms). A client that hears nothing for 3 × this moves to another
    /// relay.
    pub heartbeat: Duration,
    /// A client whose socket does not take a frame within this long is cut
    /// off (default 10 s, at least 100 ms).
    pub write_timeout: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            history_events: 200_000,
            heartbeat: Duration::from_secs(1),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// What a relay is doing, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStats {
    /// Client connections being served (lists and watches).
    pub clients: usize,
    /// Whether it has listed its upstream once.
    pub synced: bool,
    /// Whether its upstream watch is live now.
    pub live: bool,
    /// The revision its map is at.
    pub revision: Revision,
    /// The oldest revision a client may watch from.
    pub history_from: Revision,
    /// Events in the history.
    pub history_events: usize,
    /// Keys in the map.
    pub keys: usize,
    /// The map's keys and values, in bytes (not counting the structure).
    pub map_bytes: usize,
    /// The history's frames, in bytes.
    pub history_bytes: usize,
}

/// One upstream event batch, as its frame.
#[derive(Clone)]
struct Batch {
    /// The revision it brings a watcher to (its last event's).
    revision: Revision,
    /// Its first event's revision (an etcd response may span several).
    first: Revision,
    events: usize,
    frame: Bytes,
}

struct State {
    synced: bool,
    live: bool,
    /// Why the upstream is not live.
    reason: String,
    revision: Revision,
    map: Map<String, Arc<KeyValue>>,
    /// The history holds every change after this revision.
    base: Revision,
    history: VecDeque<Batch>,
    events: usize,
    map_bytes: usize,
    history_bytes: usize,
}

/// A watch relay: see the module doc.
pub struct Relay {
    opts: RelayOptions,
    upstream: Arc<dyn Store>,
    state: Mutex<State>,
    /// Bumped on every change of `state`; client tasks wait on it.
    notify: watch::Sender<u64>,
    clients: AtomicUsize,
    cancel: CancellationToken,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("upstream", &self.upstream)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Something a client connection runs over.
pub trait RelayIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RelayIo for T {}

/// How a client reaches a relay (the agent: TCP + TLS with the mesh
/// certificates; the simulator and tests: [`TcpDial`]).
#[async_trait::async_trait]
pub trait Dial: Send + Sync + fmt::Debug + 'static {
    async fn dial(&self, relay: &str) -> std::io::Result<Box<dyn RelayIo>>;
}

/// Plain TCP, for tests and the simulator only (the agent never serves
/// plain TCP).
#[derive(Debug)]
pub struct TcpDial;

#[async_trait::async_trait]
impl Dial for TcpDial {
    async fn dial(&self, relay: &str) -> std::io::Result<Box<dyn RelayIo>> {
        let s = tokio::net::TcpStream::connect(relay).await?;
        s.set_nodelay(true)?;
        Ok(Box::new(s))
    }
}

/// A relay's own clients, in process: each dial is a pipe served by it.
#[derive(Debug)]
struct LocalDial(Weak<Relay>);

#[async_trait::async_trait]
impl Dial for LocalDial {
    async fn dial(&self, _relay: &str) -> std::io::Result<Box<dyn RelayIo>> {
        let relay = self
            .0
            .upgrade()
            .ok_or_else(|| std::io::Error::other("the local relay has stopped"))?;
        let (client, server) = tokio::io::duplex(256 << 10);
        tokio::spawn(relay.serve(server, "local".into()));
        Ok(Box::new(client))
    }
}

impl Relay {
    /// Lists `keys::ROOT` on `upstream` and keeps watching it (listing
    /// again after `Compacted` or a failed watch) until `cancel`.
    pub fn start(
        upstream: Arc<dyn Store>,
        mut opts: RelayOptions,
        cancel: CancellationToken,
    ) -> Arc<Relay> {
        // A zero heartbeat would send progress frames without pause, a
        // zero write timeout cut off every client.
        opts.heartbeat = opts.heartbeat.max(MIN_INTERVAL);
        opts.write_timeout = opts.write_timeout.max(MIN_INTERVAL);
        let relay = Arc::new(Relay {
            opts,
            upstream: upstream.clone(),
            state: Mutex::new(State {
                synced: false,
                live: false,
                reason: "not listed yet".into(),
                revision: 0,
                map: Map::new(),
                base: 0,
                history: VecDeque::new(),
                events: 0,
                map_bytes: 0,
                history_bytes: 0,
            }),
            notify: watch::channel(0).0,
            clients: AtomicUsize::new(0),
            cancel,
        });
        tokio::spawn(follow(
            Arc::downgrade(&relay),
            upstream,
            relay.cancel.clone(),
        ));
        relay
    }

    /// A Store for this host's own reflector: `list(ROOT)`/`watch(ROOT,
    /// from)` answered from the cache (in process, no socket), everything
    /// else passed to the upstream. A relay host adds no second watcher.
    pub fn local_store(self: &Arc<Self>) -> Arc<dyn Store> {
        relayed(
            self.upstream.clone(),
            vec!["local".into()],
            Arc::new(LocalDial(Arc::downgrade(self))),
        )
    }

    /// Clients connected, revision, history kept.
    pub fn stats(&self) -> RelayStats {
        let st = self.lock();
        RelayStats {
            clients: self.clients.load(Ordering::Relaxed),
            synced: st.synced,
            live: st.live,
            revision: st.revision,
            history_from: st.base + 1,
            history_events: st.events,
            keys: st.map.len(),
            map_bytes: st.map_bytes,
            history_bytes: st.history_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set_down(&self, reason: String) {
        let mut st = self.lock();
        if st.live || st.reason != reason {
            st.live = false;
            st.reason = reason;
            drop(st);
            self.changed();
        }
    }

    /// A fresh list: the history restarts at its revision (clients behind
    /// it get `Compacted` and list again).
    fn install(&self, kvs: Vec<KeyValue>, revision: Revision) {
        let map_bytes = kvs.iter().map(kv_bytes).sum();
        let map: Map<String, Arc<KeyValue>> = kvs
            .into_iter()
            .map(|kv| (kv.key.clone(), Arc::new(kv)))
            .collect();
        let mut st = self.lock();
        st.map = map;
        st.revision = revision;
        st.base = revision;
        st.history.clear();
        st.events = 0;
        st.map_bytes = map_bytes;
        st.history_bytes = 0;
        st.synced = true;
        // Live once its watch of etcd opens (`set_live`).
        st.reason = "listed; its watch of etcd is opening".into();
        drop(st);
        self.changed();
    }

    fn set_live(&self) {
        let mut st = self.lock();
        st.live = true;
        st.reason.clear();
        drop(st);
        self.changed();
    }

    fn apply(&self, revision: Revision, events: Vec<WatchEvent>) {
        let batches: Vec<Batch> = split(revision, &events, BATCH_BYTES)
            .into_iter()
            .map(|(rev, range)| Batch {
                revision: rev,
                first: event_revision(&events[range.start]),
                events: range.len(),
                frame: Bytes::from(wire::encode_events(rev, &events[range])),
            })
            .collect();
        if batches.is_empty() {
            return;
        }
        let mut st = self.lock();
        for e in events {
            let old = match e {
                WatchEvent::Put(kv) => {
                    st.map_bytes += kv_bytes(&kv);
                    st.map.insert(kv.key.clone(), Arc::new(kv))
                }
                WatchEvent::Delete { key, .. } => st.map.remove(&key),
            };
            if let Some(old) = old {
                st.map_bytes -= kv_bytes(&old);
            }
        }
        st.revision = revision;
        for b in batches {
            st.history_bytes += b.frame.len();
            st.events += b.events;
            st.history.push_back(b);
        }
        while st.events > self.opts.history_events {
            let Some(old) = st.history.pop_front() else {
                break;
            };
            st.events -= old.events;
            st.history_bytes -= old.frame.len();
            st.base = old.revision;
        }
        drop(st);
        self.changed();
    }
}

/// An upstream batch cut into frames of about `limit` bytes or less, only
/// between two revisions (one revision's events stay in one frame): each
/// part's revision (its last event's; the batch's for the last part) and
/// its events. etcd may send many revisions in one response (catching a
/// watch up); one frame of them all could pass the frame cap.
fn split(
    revision: Revision,
    events: &[WatchEvent],
    limit: usize,
) -> Vec<(Revision, std::ops::Range<usize>)> {
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        size += match e {
            WatchEvent::Put(kv) => wire::kv_size(kv) + 1,
            WatchEvent::Delete { key, .. } => key.len() + 13,
        };
        let last = i + 1 == events.len();
        let boundary = last || event_revision(&events[i + 1]) != event_revision(e);
        if last || (boundary && size >= limit) {
            let rev = if last { revision } else { event_revision(e) };
            parts.push((rev, start..i + 1));
            start = i + 1;
            size = 0;
        }
    }
    parts
}

fn kv_bytes(kv: &KeyValue) -> usize {
    kv.key.len() + kv.value.len()
}

fn event_revision(e: &WatchEvent) -> Revision {
    match e {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

/// The relay's upstream loop: list, then watch from the revision after
/// the list's, reopening a failed watch from the revision after the last
/// applied; list again only when that is compacted. Holds the relay
/// weakly: it ends when the relay is dropped.
async fn follow(relay: Weak<Relay>, upstream: Arc<dyn Store>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    'list: loop {
        let list = tokio::select! {
            _ = cancel.cancelled() => break,
            l = upstream.list(keys::ROOT) => l,
        };
        let Some(r) = relay.upgrade() else { return };
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "relay: list {} failed, retrying in {backoff:?}: {e}",
                    keys::ROOT
                );
                r.set_down(format!("the relay's list of etcd failed: {e}"));
                drop(r);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(
            revision = list.revision,
            keys = list.kvs.len(),
            "relay listed its upstream"
        );
        r.install(list.kvs, list.revision);
        drop(r);
        loop {
            let Some(from) = relay.upgrade().map(|r| r.lock().revision + 1) else {
                return;
            };
            let w = tokio::select! {
                _ = cancel.cancelled() => break 'list,
                w = upstream.watch(keys::ROOT, from) => w,
            };
            let Some(r) = relay.upgrade() else { return };
            let mut w = match w {
                Ok(w) => w,
                Err(e @ StoreError::Compacted { .. }) => {
                    tracing::info!(
                        "relay: watch {} from {from}: {e}; listing again",
                        keys::ROOT
                    );
                    r.set_down(format!("the relay's watch of etcd was compacted: {e}"));
                    continue 'list;
                }
                Err(e) => {
                    tracing::warn!(
                        "relay: watch {} from {from} failed, retrying in {backoff:?}: {e}",
                        keys::ROOT
                    );
                    r.set_down(format!("the relay's watch of etcd failed: {e}"));
                    drop(r);
                    tokio::select! {
                        _ = cancel.cancelled() => break 'list,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            r.set_live();
            drop(r);
            backoff = BACKOFF_MIN;
            loop {
                let item = tokio::select! {
                    _ = cancel.cancelled() => break 'list,
                    i = w.next() => i,
                };
                let Some(r) = relay.upgrade() else { return };
                match item {
                    Some(Ok(WatchItem::Events { revision, events })) => r.apply(revision, events),
                    Some(Ok(WatchItem::Disconnected { reason })) => {
                        tracing::warn!("relay: upstream watch disconnected: {reason}");
                        r.set_down(format!("the relay's watch of etcd is down: {reason}"));
                    }
                    Some(Ok(WatchItem::Resumed)) => {
                        tracing::info!("relay: upstream watch resumed");
                        r.set_live();
                    }
                    Some(Err(e @ StoreError::Compacted { .. })) => {
                        tracing::info!("relay: upstream watch: {e}; listing again");
                        r.set_down(format!("the relay's watch of etcd was compacted: {e}"));
                        continue 'list;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("relay: upstream watch failed: {e}; reopening");
                        r.set_down(format!("the relay's watch of etcd failed: {e}"));
                        break;
                    }
                    None => {
                        tracing::warn!("relay: upstream watch ended; reopening");
                        r.set_down("the relay's watch of etcd ended".into());
                        break;
                    }
                }
            }
        }
    }
    if let Some(r) = relay.upgrade() {
        r.set_down("the relay stopped".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, rev: Revision, value: usize) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: vec![b'x'; value],
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: None,
        })
    }

    fn del(key: &str, rev: Revision) -> WatchEvent {
        WatchEvent::Delete {
            key: key.into(),
            mod_revision: rev,
        }
    }

    #[test]
    fn a_batch_is_split_between_revisions_only() {
        // Revisions 10 (two puts of 600 bytes), 11 (a delete), 12 (a put):
        // with a 1,000-byte limit, 10 fills a frame on its own, 11 and 12
        // share the next.
        let events = vec![
            put("a", 10, 600),
            put("b", 10, 600),
            del("c", 11),
            put("d", 12, 10),
        ];
        assert_eq!(split(12, &events, 1000), vec![(10, 0..2), (12, 2..4)]);
        // No limit hit: one frame, at the batch's revision.
        assert_eq!(split(12, &events, 1 << 20), vec![(12, 0..4)]);
        // A limit below every revision: one frame per revision.
        assert_eq!(
            split(12, &events, 1),
            vec![(10, 0..2), (11, 2..3), (12, 3..4)]
        );
        assert!(split(12, &[], 1).is_empty());
    }
}
