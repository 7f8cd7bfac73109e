//! [`relayed`]: the client side, a [`Store`] that lists and watches
//! `keys::ROOT` through relays.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pier_model::keys;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::wire::{self, Frame, Op};
use super::{BACKOFF_MAX, BACKOFF_MIN, Dial, RelayIo};
use crate::{
    KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Ttl, Txn, TxnResult, WatchItem,
    WatchStream,
};

/// How long dialling a relay (and its TLS, if any) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a relay has to answer a request's first frame, and each
/// further frame of a list.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// While watching etcd directly (every relay failed), how often the relays
/// are tried again.
const RETRY_RELAYS: Duration = Duration::from_secs(10);
/// How long relays that answer, but without a live view of etcd, are
/// waited for before a client lists and watches etcd directly.
const ALL_DOWN_FALLBACK: Duration = Duration::from_secs(30);
/// How long a watch whose relay said `Closing` tries to reopen before it
/// reports the break (a successor relay serves on the same socket before
/// its predecessor closes; another relay answers within a dial).
const CLOSING_REOPEN: Duration = Duration::from_secs(3);

/// A Store whose `list(keys::ROOT)` and `watch(keys::ROOT, from)` go to
/// `relays` (the first that answers, rotating on failure; etcd directly
/// for a round when every relay failed), and everything else to `upstream`.
pub fn relayed(
    upstream: Arc<dyn Store>,
    relays: Vec<String>,
    dial: Arc<dyn Dial>,
) -> Arc<dyn Store> {
    relayed_with_stats(upstream, relays, dial).0
}

/// [`relayed`], and its counters (an agent exports them as metrics).
pub fn relayed_with_stats(
    upstream: Arc<dyn Store>,
    relays: Vec<String>,
    dial: Arc<dyn Dial>,
) -> (Arc<dyn Store>, Arc<ClientStats>) {
    let stats = Arc::new(ClientStats::default());
    let store = Arc::new(Relayed {
        upstream,
        relays: Arc::new(Relays {
            addrs: relays,
            current: AtomicUsize::new(0),
            dial,
            down_since: Mutex::new(None),
            stats: stats.clone(),
        }),
    });
    (store, stats)
}

/// What a relayed store's lists and watches have done.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// `watch(keys::ROOT)` streams on etcd directly now (every relay had
    /// failed; 0 while all are on relays).
    pub watches_on_etcd: AtomicU64,
    /// Lists of `keys::ROOT` that went to etcd directly.
    pub lists_on_etcd: AtomicU64,
    /// Relayed watches broken (a relay crashed or went silent, a cut), each
    /// reported to the watcher as `Disconnected`.
    pub watch_breaks: AtomicU64,
    /// Relayed watches moved at once at a relay's orderly stop (`Closing`),
    /// with no break reported.
    pub watch_moves: AtomicU64,
}

/// A `watches_on_etcd` count held while a watch is on etcd directly.
struct OnEtcd(Arc<ClientStats>);

impl OnEtcd {
    fn new(stats: &Arc<ClientStats>) -> OnEtcd {
        stats.watches_on_etcd.fetch_add(1, Ordering::Relaxed);
        OnEtcd(stats.clone())
    }
}

impl Drop for OnEtcd {
    fn drop(&mut self) {
        self.0.watches_on_etcd.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Relayed {
    upstream: Arc<dyn Store>,
    relays: Arc<Relays>,
}

impl fmt::Debug for Relayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relayed")
            .field("relays", &self.relays.addrs)
            .field("upstream", &self.upstream)
            .finish()
    }
}

struct Relays {
    addrs: Vec<String>,
    /// The relay tried first.
    current: AtomicUsize,
    dial: Arc<dyn Dial>,
    /// Since when every relay reached has answered without a live view of
    /// etcd. A std Mutex: never held across an await.
    down_since: Mutex<Option<Instant>>,
    stats: Arc<ClientStats>,
}

/// Why a relay did not serve a request.
struct Fail {
    msg: String,
    /// It answered (it has no live view of etcd now), as opposed to not
    /// being reached or breaking off.
    answered: bool,
}

impl From<String> for Fail {
    fn from(msg: String) -> Fail {
        Fail {
            msg,
            answered: false,
        }
    }
}

/// An open watch on a relay.
struct Conn {
    idx: usize,
    io: BufReader<Box<dyn RelayIo>>,
    /// Silence longer than this means the connection is broken.
    silence: Duration,
    revision: Revision,
}

enum OpenError {
    Compacted(StoreError),
    /// Every relay failed: what each said, and whether one answered.
    AllFailed(String, bool),
}

impl Relays {
    async fn dial(&self, idx: usize, op: Op) -> Result<BufReader<Box<dyn RelayIo>>, String> {
        let addr = &self.addrs[idx];
        let mut io = match tokio::time::timeout(DIAL_TIMEOUT, self.dial.dial(addr)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(format!("{addr}: {e}")),
            Err(_) => return Err(format!("{addr}: no connection in {DIAL_TIMEOUT:?}")),
        };
        let hello = wire::encode(&Frame::Hello {
            version: wire::VERSION,
            op,
        });
        match tokio::time::timeout(DIAL_TIMEOUT, async {
            io.write_all(&hello).await?;
            io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(BufReader::new(io)),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!("{addr}: request not taken in {DIAL_TIMEOUT:?}")),
        }
    }

    async fn read(
        &self,
        idx: usize,
        io: &mut BufReader<Box<dyn RelayIo>>,
    ) -> Result<Frame, String> {
        let addr = &self.addrs[idx];
        match tokio::time::timeout(ANSWER_TIMEOUT, wire::read_frame(io)).await {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!("{addr}: no answer in {ANSWER_TIMEOUT:?}")),
        }
    }

    async fn list_one(&self, idx: usize) -> Result<ListResult, Fail> {
        let mut io = self.dial(idx, Op::List).await?;
        let mut kvs = Vec::new();
        loop {
            match self.read(idx, &mut io).await? {
                Frame::Kvs(mut chunk) => kvs.append(&mut chunk),
                Frame::ListEnd { revision } => return Ok(ListResult { kvs, revision }),
                Frame::Error { message } => {
                    return Err(Fail {
                        msg: format!("{}: {message}", self.addrs[idx]),
                        answered: true,
                    });
                }
                other => {
                    return Err(Fail::from(format!(
                        "{}: unexpected {other:?} in a list answer",
                        self.addrs[idx]
                    )));
                }
            }
        }
    }

    /// Lists through the first relay that answers, from the current one;
    /// else what each said, and whether one answered.
    async fn list(&self) -> Result<ListResult, (String, bool)> {
        let n = self.addrs.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        let mut answered = false;
        for idx in (0..n).map(|k| (start + k) % n) {
            match self.list_one(idx).await {
                Ok(l) => {
                    self.current.store(idx, Ordering::Relaxed);
                    self.served();
                    return Ok(l);
                }
                Err(f) => {
                    answered |= f.answered;
                    errors.push(f.msg);
                }
            }
        }
        Err((errors.join("; "), answered))
    }

    /// After a round in which every relay failed: whether to go to etcd
    /// directly. At once when no relay was reached (they are gone, etcd
    /// may be fine); when they were reached but none has a live view of
    /// etcd (etcd is in trouble, or their links to it), only after
    /// [`ALL_DOWN_FALLBACK`]: every host going to etcd at once, in the
    /// moment it is in trouble, is the herd the relays spare it.
    fn fall_back(&self, answered: bool) -> bool {
        let mut d = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if !answered {
            *d = None;
            return true;
        }
        d.get_or_insert_with(Instant::now).elapsed() >= ALL_DOWN_FALLBACK
    }

    /// A relay served a request.
    fn served(&self) {
        *self.down_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    async fn open_one(&self, idx: usize, from: Revision) -> Result<Conn, Result<StoreError, Fail>> {
        let mut io = self
            .dial(idx, Op::Watch { from })
            .await
            .map_err(|e| Err(e.into()))?;
        match self.read(idx, &mut io).await.map_err(|e| Err(e.into()))? {
            Frame::Opened {
                revision,
                heartbeat_ms,
            } => Ok(Conn {
                idx,
                io,
                silence: Duration::from_millis(u64::from(heartbeat_ms.max(100)) * 3),
                revision,
            }),
            Frame::Compacted {
                requested,
                compact_revision,
            } => Err(Ok(StoreError::Compacted {
                requested,
                compact_revision,
            })),
            Frame::Error { message } => Err(Err(Fail {
                msg: format!("{}: {message}", self.addrs[idx]),
                answered: true,
            })),
            other => Err(Err(Fail::from(format!(
                "{}: unexpected {other:?} opening a watch",
                self.addrs[idx]
            )))),
        }
    }

    /// Opens a watch from `from` on the first relay that answers, from
    /// the current one. A relay whose history does not reach back to
    /// `from` (one that restarted, or listed again) is passed over for
    /// one that does; `Compacted` only when none does.
    async fn open(&self, from: Revision) -> Result<Conn, OpenError> {
        let n = self.addrs.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        let mut compacted = None;
        let mut answered = false;
        for idx in (0..n).map(|k| (start + k) % n) {
            match self.open_one(idx, from).await {
                Ok(c) => {
                    self.current.store(idx, Ordering::Relaxed);
                    self.served();
                    return Ok(c);
                }
                Err(Ok(e)) => {
                    errors.push(format!("{}: {e}", self.addrs[idx]));
                    compacted.get_or_insert((idx, e));
                }
                Err(Err(f)) => {
                    answered |= f.answered;
                    errors.push(f.msg);
                }
            }
        }
        match compacted {
            Some((idx, e)) => {
                self.current.store(idx, Ordering::Relaxed);
                self.served();
                Err(OpenError::Compacted(e))
            }
            None => Err(OpenError::AllFailed(errors.join("; "), answered)),
        }
    }

    /// Moves on from relay `from` (if nobody did already).
    fn rotate(&self, from: usize) {
        let next = (from + 1) % self.addrs.len().max(1);
        let _ = self
            .current
            .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl Store for Relayed {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.upstream.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        if prefix != keys::ROOT || self.relays.addrs.is_empty() {
            return self.upstream.list(prefix).await;
        }
        match self.relays.list().await {
            Ok(l) => Ok(l),
            Err((why, answered)) if !self.relays.fall_back(answered) => {
                Err(StoreError::Unavailable(format!(
                    "no watch relay has a live view of etcd ({why}); waiting for them (up to {ALL_DOWN_FALLBACK:?}) rather than listing {prefix} on etcd directly"
                )))
            }
            Err((why, _)) => {
                tracing::warn!(
                    relays = ?self.relays.addrs,
                    "every watch relay failed ({why}); listing {prefix} on etcd directly"
                );
                self.relays
                    .stats
                    .lists_on_etcd
                    .fetch_add(1, Ordering::Relaxed);
                self.upstream.list(prefix).await
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.upstream.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> Result<(bool, Revision), StoreError> {
        self.upstream.delete(key).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.upstream.txn(txn).await
    }

    async fn lease_grant(&self, ttl: Ttl) -> Result<LeaseId, StoreError> {
        self.upstream.lease_grant(ttl).await
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<Ttl, StoreError> {
        self.upstream.lease_keepalive(lease).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.upstream.lease_revoke(lease).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        if prefix != keys::ROOT || self.relays.addrs.is_empty() {
            return self.upstream.watch(prefix, from).await;
        }
        let source = match self.relays.open(from).await {
            Ok(conn) => {
                let next = if from > 0 { from } else { conn.revision + 1 };
                (Source::Relay(conn), next)
            }
            Err(OpenError::Compacted(e)) => return Err(e),
            Err(OpenError::AllFailed(why, answered)) if !self.relays.fall_back(answered) => {
                return Err(StoreError::Unavailable(format!(
                    "no watch relay has a live view of etcd ({why}); waiting for them (up to {ALL_DOWN_FALLBACK:?}) rather than watching {prefix} on etcd directly"
                )));
            }
            Err(OpenError::AllFailed(why, _)) => {
                tracing::warn!(
                    relays = ?self.relays.addrs,
                    "every watch relay failed ({why}); watching {prefix} on etcd directly"
                );
                // "Now" as a revision, so that a later reopen resumes.
                let from = if from > 0 {
                    from
                } else {
                    self.upstream.txn(Txn::default()).await?.revision + 1
                };
                (
                    Source::Upstream(self.upstream.watch(prefix, from).await?),
                    from,
                )
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let follow = Follow {
            relays: self.relays.clone(),
            upstream: self.upstream.clone(),
            next: source.1,
            tx,
            disconnected: false,
        };
        tokio::spawn(follow.run(source.0));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.upstream.compact(revision).await
    }
}

enum Source {
    Relay(Conn),
    Upstream(WatchStream),
}

enum Step {
    /// The source broke: reopen from `next`.
    Broken(String),
    /// The relay said it is stopping (`Closing`): reopen from `next` at
    /// once, and report a break only if that fails.
    Closing(String),
    /// Relays answer again (while on etcd directly): switch to this one.
    Switch(Conn),
    /// The receiver is gone or the watch ended for good.
    Done,
}

/// One relayed watch, in its own task.
struct Follow {
    relays: Arc<Relays>,
    upstream: Arc<dyn Store>,
    /// One past the last revision delivered.
    next: Revision,
    tx: mpsc::Sender<Result<WatchItem, StoreError>>,
    /// `Disconnected` was yielded and `Resumed` not yet.
    disconnected: bool,
}

impl Follow {
    async fn run(mut self, first: Source) {
        let mut source = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            let step = match source.take() {
                Some(Source::Relay(conn)) => self.pump_relay(conn).await,
                Some(Source::Upstream(stream)) => self.pump_upstream(stream).await,
                None => {
                    let opened = tokio::select! {
                        _ = self.tx.closed() => return,
                        o = self.relays.open(self.next) => o,
                    };
                    match opened {
                        Ok(conn) => {
                            tracing::info!(relay = %self.relays.addrs[conn.idx], from = self.next, "relayed watch resumed");
                            backoff = BACKOFF_MIN;
                            source = Some(Source::Relay(conn));
                            if !self.resumed().await {
                                return;
                            }
                            continue;
                        }
                        Err(OpenError::Compacted(e)) => {
                            let _ = self.tx.send(Err(e)).await;
                            return;
                        }
                        Err(OpenError::AllFailed(why, answered))
                            if !self.relays.fall_back(answered) =>
                        {
                            tracing::debug!(
                                from = self.next,
                                "no watch relay has a live view of etcd ({why}); waiting for them"
                            );
                            tokio::select! {
                                _ = self.tx.closed() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                        Err(OpenError::AllFailed(why, _)) => {
                            tracing::warn!(
                                relays = ?self.relays.addrs,
                                from = self.next,
                                "every watch relay failed ({why}); watching {} on etcd directly",
                                keys::ROOT
                            );
                            let w = tokio::select! {
                                _ = self.tx.closed() => return,
                                w = self.upstream.watch(keys::ROOT, self.next) => w,
                            };
                            match w {
                                Ok(w) => {
                                    backoff = BACKOFF_MIN;
                                    source = Some(Source::Upstream(w));
                                    if !self.resumed().await {
                                        return;
                                    }
                                    continue;
                                }
                                Err(e @ StoreError::Compacted { .. }) => {
                                    let _ = self.tx.send(Err(e)).await;
                                    return;
                                }
                                Err(e) => {
                                    tracing::warn!("watch {} on etcd failed: {e}", keys::ROOT);
                                    tokio::select! {
                                        _ = self.tx.closed() => return,
                                        _ = tokio::time::sleep(backoff) => {}
                                    }
                                    backoff = (backoff * 2).min(BACKOFF_MAX);
                                    continue;
                                }
                            }
                        }
                    }
                }
            };
            match step {
                Step::Done => return,
                Step::Closing(reason) => match self.reopen_at_once(&reason).await {
                    Ok(Some(conn)) => {
                        source = Some(Source::Relay(conn));
                        // Only if the closed relay had said its own
                        // upstream was down (the new one is live).
                        if !self.resumed().await {
                            return;
                        }
                    }
                    Ok(None) => {
                        if !self.broken(reason).await {
                            return;
                        }
                    }
                    Err(()) => return,
                },
                Step::Broken(reason) => {
                    if !self.broken(reason).await {
                        return;
                    }
                }
                Step::Switch(conn) => {
                    tracing::info!(relay = %self.relays.addrs[conn.idx], from = self.next, "a watch relay answers again; leaving etcd");
                    source = Some(Source::Relay(conn));
                    if !self.resumed().await {
                        return;
                    }
                }
            }
        }
    }

    /// The source broke: yields `Disconnected` (once until `Resumed`);
    /// false when the receiver is gone.
    async fn broken(&mut self, reason: String) -> bool {
        tracing::warn!(from = self.next, "relayed watch broken: {reason}");
        self.relays
            .stats
            .watch_breaks
            .fetch_add(1, Ordering::Relaxed);
        if self.disconnected {
            return true;
        }
        self.disconnected = true;
        self.tx
            .send(Ok(WatchItem::Disconnected { reason }))
            .await
            .is_ok()
    }

    /// After a relay's `Closing`: one round of the relays (from the same
    /// address, where an upgraded relay's successor serves), within
    /// [`CLOSING_REOPEN`]. `Ok(Some)`: the watch goes on there, with no
    /// break reported (nothing was missed: it resumes from `next`).
    /// `Ok(None)`: no relay took it; the caller reports the break and
    /// goes the usual way. `Err`: the watch is over (the receiver is
    /// gone, or the revision is compacted everywhere, sent).
    async fn reopen_at_once(&mut self, reason: &str) -> Result<Option<Conn>, ()> {
        let opened = tokio::select! {
            _ = self.tx.closed() => return Err(()),
            o = tokio::time::timeout(CLOSING_REOPEN, self.relays.open(self.next)) => o,
        };
        match opened {
            Ok(Ok(conn)) => {
                self.relays
                    .stats
                    .watch_moves
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    relay = %self.relays.addrs[conn.idx],
                    from = self.next,
                    "relayed watch moved: its relay closed it ({reason})"
                );
                Ok(Some(conn))
            }
            Ok(Err(OpenError::Compacted(e))) => {
                let _ = self.tx.send(Err(e)).await;
                Err(())
            }
            Ok(Err(OpenError::AllFailed(why, _))) => {
                tracing::info!(
                    from = self.next,
                    "relay closed the watch ({reason}) and no relay took it at once ({why})"
                );
                Ok(None)
            }
            Err(_) => {
                tracing::info!(
                    from = self.next,
                    "relay closed the watch ({reason}) and no relay took it within {CLOSING_REOPEN:?}"
                );
                Ok(None)
            }
        }
    }

    /// Yields `Resumed` if `Disconnected` was yielded; false when the
    /// receiver is gone.
    async fn resumed(&mut self) -> bool {
        if !self.disconnected {
            return true;
        }
        self.disconnected = false;
        self.tx.send(Ok(WatchItem::Resumed)).await.is_ok()
    }

    async fn pump_relay(&mut self, mut conn: Conn) -> Step {
        let addr = self.relays.addrs[conn.idx].clone();
        let step = loop {
            let read = tokio::select! {
                _ = self.tx.closed() => break Step::Done,
                r = tokio::time::timeout(conn.silence, wire::read_frame(&mut conn.io)) => r,
            };
            let frame = match read {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => break Step::Broken(format!("relay {addr}: {}", read_error(&e))),
                Err(_) => {
                    break Step::Broken(format!(
                        "relay {addr}: nothing received in {:?}",
                        conn.silence
                    ));
                }
            };
            match frame {
                Frame::Events { revision, events } => {
                    if self
                        .tx
                        .send(Ok(WatchItem::Events { revision, events }))
                        .await
                        .is_err()
                    {
                        break Step::Done;
                    }
                    self.next = revision + 1;
                }
                Frame::Progress { .. } => {}
                Frame::Disconnected { reason } => {
                    if !self.disconnected {
                        self.disconnected = true;
                        let reason = format!("relay {addr}: {reason}");
                        if self
                            .tx
                            .send(Ok(WatchItem::Disconnected { reason }))
                            .await
                            .is_err()
                        {
                            break Step::Done;
                        }
                    }
                }
                Frame::Resumed => {
                    if !self.resumed().await {
                        break Step::Done;
                    }
                }
                Frame::Compacted {
                    requested,
                    compact_revision,
                } => {
                    let _ = self
                        .tx
                        .send(Err(StoreError::Compacted {
                            requested,
                            compact_revision,
                        }))
                        .await;
                    break Step::Done;
                }
                Frame::Error { message } => break Step::Broken(format!("relay {addr}: {message}")),
                Frame::Closing { reason } => {
                    break Step::Closing(format!("relay {addr}: {reason}"));
                }
                other => {
                    break Step::Broken(format!("relay {addr}: unexpected {other:?} in a watch"));
                }
            }
        };
        if matches!(step, Step::Broken(_)) {
            self.relays.rotate(conn.idx);
        }
        step
    }

    /// Forwards etcd's own watch (every relay had failed), trying the
    /// relays again every [`RETRY_RELAYS`].
    async fn pump_upstream(&mut self, mut stream: WatchStream) -> Step {
        let _on_etcd = OnEtcd::new(&self.relays.stats);
        let mut retry =
            tokio::time::interval_at(tokio::time::Instant::now() + RETRY_RELAYS, RETRY_RELAYS);
        loop {
            let item = tokio::select! {
                _ = self.tx.closed() => return Step::Done,
                i = stream.next() => i,
                _ = retry.tick() => {
                    if let Ok(conn) = self.relays.open(self.next).await {
                        return Step::Switch(conn);
                    }
                    continue;
                }
            };
            match item {
                Some(Ok(WatchItem::Events { revision, events })) => {
                    if self
                        .tx
                        .send(Ok(WatchItem::Events { revision, events }))
                        .await
                        .is_err()
                    {
                        return Step::Done;
                    }
                    self.next = revision + 1;
                }
                Some(Ok(WatchItem::Disconnected { reason })) => {
                    if !self.disconnected {
                        self.disconnected = true;
                        if self
                            .tx
                            .send(Ok(WatchItem::Disconnected { reason }))
                            .await
                            .is_err()
                        {
                            return Step::Done;
                        }
                    }
                }
                Some(Ok(WatchItem::Resumed)) => {
                    if !self.resumed().await {
                        return Step::Done;
                    }
                }
                Some(Err(e @ StoreError::Compacted { .. })) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Step::Done;
                }
                Some(Err(e)) => return Step::Broken(format!("watch on etcd: {e}")),
                None => return Step::Broken("watch on etcd ended".into()),
            }
        }
    }
}

/// A watch's read error, for its log line: an end of stream without the
/// relay's `Closing` (rustls's missing close_notify, or a plain EOF) said
/// in words.
fn read_error(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the connection closed without the relay's goodbye (the relay crashed or was killed, or the network cut it)".into()
    } else {
        e.to_string()
    }
}
