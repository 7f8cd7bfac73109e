//! [`Relay::serve`]: one client connection, a list or a watch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::wire::{self, Frame, Op};
use super::{Batch, Relay};
use crate::{KeyValue, Revision, WatchEvent};

/// How long a client has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// At most about this many bytes of history are taken per turn (then the
/// lock is let go and they are written).
const TURN_BYTES: usize = 1 << 20;
/// How long a stopping relay waits for a client to take its `Closing`.
const CLOSING_TIMEOUT: Duration = Duration::from_secs(1);

/// Counts a served client while it lives.
struct Counted(Arc<Relay>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a watch's client task does next.
enum Turn {
    /// Frames to write, and the revision they bring the client to.
    Send(Vec<Bytes>, Revision),
    /// The client is behind the history (it fell out, or the relay listed
    /// again): `Compacted`, then close.
    Behind(Revision),
    /// Nothing new: the upstream's state.
    Idle {
        live: bool,
        reason: String,
        revision: Revision,
    },
}

impl Relay {
    /// Serves one client connection (TLS and authentication already done by
    /// the caller; `peer` names it in logs) until it ends.
    pub async fn serve<IO>(self: Arc<Self>, io: IO, peer: String)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let hello = tokio::select! {
            _ = self.cancel.cancelled() => return,
            h = tokio::time::timeout(HELLO_TIMEOUT, wire::read_frame(&mut rd)) => h,
        };
        let op = match hello {
            Ok(Ok(Frame::Hello {
                version: wire::VERSION,
                op,
            })) => op,
            Ok(Ok(Frame::Hello { version, .. })) => {
                let message = format!(
                    "relay protocol version {version} is not supported (this relay speaks {})",
                    wire::VERSION
                );
                tracing::warn!(peer, "relay client refused: {message}");
                let _ = self
                    .send(&mut wr, &wire::encode(&Frame::Error { message }))
                    .await;
                return;
            }
            Ok(Ok(other)) => {
                tracing::warn!(peer, "relay client sent {other:?} before a Hello; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer, "relay client: no Hello: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(peer, "relay client: no Hello in {HELLO_TIMEOUT:?}");
                return;
            }
        };
        self.clients.fetch_add(1, Ordering::Relaxed);
        let _counted = Counted(self.clone());
        let res = match op {
            Op::List => self.serve_list(&mut wr).await,
            // A watch ends at the relay's stop with a `Closing` frame
            // (`serve_watch` sees the cancel between frames, never inside
            // one), a list when its answer is written.
            Op::Watch { from } => self.serve_watch(&mut rd, &mut wr, from).await,
        };
        match res {
            Ok(()) => tracing::debug!(peer, ?op, "relay client done"),
            Err(e) => tracing::info!(peer, ?op, "relay client cut off: {e}"),
        }
        // An orderly end of the stream (TLS: close_notify), bounded: a
        // stuck client does not hold the stop up.
        let _ = tokio::time::timeout(CLOSING_TIMEOUT, wr.shutdown()).await;
    }

    /// Writes `bytes`, or fails if the client does not take them within
    /// the write timeout.
    async fn send<W: AsyncWrite + Unpin>(&self, wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
        send_within(wr, bytes, self.opts.write_timeout).await
    }

    /// An error frame for a request the relay cannot answer now, or `None`.
    fn unready(&self) -> Option<String> {
        let st = self.lock();
        if !st.synced {
            Some("this relay has not listed etcd yet; try another relay".into())
        } else if !st.live {
            Some(format!(
                "this relay's view is not live ({}); try another relay",
                st.reason
            ))
        } else {
            None
        }
    }

    async fn serve_list<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> std::io::Result<()> {
        if let Some(message) = self.unready() {
            return self
                .send(wr, &wire::encode(&Frame::Error { message }))
                .await;
        }
        let (map, revision) = {
            let st = self.lock();
            (st.map.clone(), st.revision)
        };
        let mut chunk: Vec<&KeyValue> = Vec::new();
        let mut size = 0;
        for kv in map.values() {
            size += wire::kv_size(kv);
            chunk.push(kv);
            if size >= wire::LIST_CHUNK {
                self.send(wr, &wire::encode_kvs(chunk.iter().copied()))
                    .await?;
                chunk.clear();
                size = 0;
            }
        }
        if !chunk.is_empty() {
            self.send(wr, &wire::encode_kvs(chunk.iter().copied()))
                .await?;
        }
        self.send(wr, &wire::encode(&Frame::ListEnd { revision }))
            .await?;
        wr.flush().await
    }

    async fn serve_watch<R, W>(&self, rd: &mut R, wr: &mut W, from: Revision) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut rx = self.notify.subscribe();
        if let Some(message) = self.unready() {
            return self
                .send(wr, &wire::encode(&Frame::Error { message }))
                .await;
        }
        let (mut next, revision, base) = {
            let st = self.lock();
            let next = if from > 0 { from } else { st.revision + 1 };
            (next, st.revision, st.base)
        };
        if next <= base {
            let f = Frame::Compacted {
                requested: next,
                compact_revision: base + 1,
            };
            return self.send(wr, &wire::encode(&f)).await;
        }
        let heartbeat = self.opts.heartbeat;
        let opened = Frame::Opened {
            revision,
            heartbeat_ms: heartbeat.as_millis().min(u32::MAX as u128) as u32,
        };
        self.send(wr, &wire::encode(&opened)).await?;
        // The client sends nothing after its Hello: a read that returns is
        // the connection closing.
        let closed = async {
            let mut b = [0u8; 64];
            while let Ok(n) = rd.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::pin!(closed);
        let mut told_down = false;
        let mut quiet_since = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return self.closing(wr).await;
            }
            rx.borrow_and_update();
            match self.turn(next) {
                Turn::Send(frames, to) => {
                    // One write for the turn (at most about 1 MiB): a
                    // write per frame cost a system call per revision per
                    // client, half the relay's CPU when writes came one
                    // revision at a time.
                    match frames.as_slice() {
                        [one] => self.send(wr, one).await?,
                        many => self.send(wr, &many.concat()).await?,
                    }
                    next = to + 1;
                    quiet_since = Instant::now();
                    continue;
                }
                Turn::Behind(base) => {
                    let f = Frame::Compacted {
                        requested: next,
                        compact_revision: base + 1,
                    };
                    self.send(wr, &wire::encode(&f)).await?;
                    return Err(std::io::Error::other(format!(
                        "the client, at revision {next}, is behind the history (from {})",
                        base + 1
                    )));
                }
                Turn::Idle {
                    live,
                    reason,
                    revision,
                } => {
                    if !live && !told_down {
                        told_down = true;
                        self.send(wr, &wire::encode(&Frame::Disconnected { reason }))
                            .await?;
                        quiet_since = Instant::now();
                        continue;
                    }
                    if live && told_down {
                        told_down = false;
                        self.send(wr, &wire::encode(&Frame::Resumed)).await?;
                        quiet_since = Instant::now();
                        continue;
                    }
                    tokio::select! {
                        _ = self.cancel.cancelled() => return self.closing(wr).await,
                        c = rx.changed() => {
                            if c.is_err() {
                                return self.closing(wr).await;
                            }
                        }
                        _ = tokio::time::sleep_until(quiet_since + heartbeat) => {
                            if live {
                                self.send(wr, &wire::encode(&Frame::Progress { revision })).await?;
                            }
                            quiet_since = Instant::now();
                        }
                        _ = &mut closed => return Ok(()),
                    }
                }
            }
        }
    }

    /// The relay is stopping: tells the client to reopen elsewhere at once
    /// (the caller then closes the connection with TLS's close_notify).
    async fn closing<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> std::io::Result<()> {
        let f = Frame::Closing {
            reason: "the relay is stopping (an upgrade or a shutdown)".into(),
        };
        send_within(wr, &wire::encode(&f), CLOSING_TIMEOUT).await
    }

    /// What a client at `next` gets now.
    fn turn(&self, next: Revision) -> Turn {
        let st = self.lock();
        if next <= st.base {
            return Turn::Behind(st.base);
        }
        let i = st.history.partition_point(|b| b.revision < next);
        if i == st.history.len() {
            return Turn::Idle {
                live: st.live,
                reason: st.reason.clone(),
                revision: st.revision,
            };
        }
        let mut frames = Vec::new();
        let mut size = 0;
        let mut to = next;
        for b in st.history.range(i..) {
            if size >= TURN_BYTES {
                break;
            }
            size += b.frame.len();
            to = b.revision;
            frames.push(if b.first < next {
                trimmed(b, next)
            } else {
                b.frame.clone()
            });
        }
        Turn::Send(frames, to)
    }
}

/// Writes `bytes`, or fails if the client does not take them within `t`.
async fn send_within<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
    t: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(t, wr.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client did not take {} bytes in {t:?}", bytes.len()),
        )),
    }
}

/// `b`'s frame without its events before `next` (a client resuming inside
/// a batch that spans several revisions).
fn trimmed(b: &Batch, next: Revision) -> Bytes {
    let Ok(Frame::Events { revision, events }) = wire::decode_body(&b.frame[4..]) else {
        // The relay encoded it; it decodes.
        return b.frame.clone();
    };
    let events: Vec<WatchEvent> = events
        .into_iter()
        .filter(|e| super::event_revision(e) >= next)
        .collect();
    Bytes::from(wire::encode_events(revision, &events))
}
