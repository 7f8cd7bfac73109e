//! The relay's wire format: frames, pure encode and decode.
//!
//! A frame is a `u32` big-endian length (of what follows it), a `u8` tag
//! and the payload. Integers are big-endian; a string or byte string is a
//! `u32` length and the bytes. Decoding is bounds-checked everywhere: any
//! input, truncated or random, gives a frame or a [`WireError`], never a
//! panic, and no allocation larger than the input.
//!
//! Client → relay: [`Frame::Hello`] (once, first). Relay → client: for a
//! list, [`Frame::Kvs`] chunks then [`Frame::ListEnd`]; for a watch,
//! [`Frame::Opened`] (or `Compacted`/`Error`) then `Events`, `Progress`,
//! `Disconnected`, `Resumed` and, at the end, `Compacted`, `Error` or
//! `Closing` (the relay is stopping: reopen elsewhere at once).

use std::fmt;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{KeyValue, LeaseId, Revision, WatchEvent};

/// The protocol version a [`Frame::Hello`] names.
pub const VERSION: u16 = 1;
/// The largest frame (length field) either side accepts.
pub const MAX_FRAME: usize = 16 << 20;
/// A list answer's [`Frame::Kvs`] chunks are at most about this big.
pub const LIST_CHUNK: usize = 1 << 20;

const T_HELLO: u8 = 1;
const T_KVS: u8 = 0x10;
const T_LIST_END: u8 = 0x11;
const T_EVENTS: u8 = 0x12;
const T_PROGRESS: u8 = 0x13;
const T_DISCONNECTED: u8 = 0x14;
const T_RESUMED: u8 = 0x15;
const T_COMPACTED: u8 = 0x16;
const T_ERROR: u8 = 0x17;
const T_OPENED: u8 = 0x18;
const T_CLOSING: u8 = 0x19;

const OP_LIST: u8 = 0;
const OP_WATCH: u8 = 1;

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `list(keys::ROOT)`.
    List,
    /// `watch(keys::ROOT, from)` (0: from the relay's revision + 1).
    Watch { from: Revision },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        op: Op,
    },
    /// A chunk of a list answer.
    Kvs(Vec<KeyValue>),
    /// The list answer is complete, read at `revision`.
    ListEnd {
        revision: Revision,
    },
    /// A watch is open at the relay's `revision`; it sends a `Progress` at
    /// least every `heartbeat_ms` while its upstream is live.
    Opened {
        revision: Revision,
        heartbeat_ms: u32,
    },
    Events {
        revision: Revision,
        events: Vec<WatchEvent>,
    },
    Progress {
        revision: Revision,
    },
    Disconnected {
        reason: String,
    },
    Resumed,
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    Error {
        message: String,
    },
    /// The relay is stopping (an upgrade hands its socket to a successor,
    /// or a shutdown) and closes the watch after this frame: the client
    /// reopens from its next revision at once, on this address (where a
    /// successor serves) or another relay, before it reports a break.
    /// Added after version 1 without a new version: a client that does
    /// not know the tag treats it as the broken connection it was before.
    Closing {
        reason: String,
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The input ends inside a field.
    Truncated(&'static str),
    /// The length field is 0 or above [`MAX_FRAME`].
    BadLength(usize),
    UnknownTag(u8),
    /// A field holds a value no encoder writes.
    Invalid(&'static str),
    /// Bytes left over after the frame's payload.
    Trailing(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated(what) => write!(f, "relay frame truncated in {what}"),
            WireError::BadLength(n) => {
                write!(f, "relay frame length {n} is 0 or above {MAX_FRAME}")
            }
            WireError::UnknownTag(t) => write!(f, "relay frame tag {t:#x} is unknown"),
            WireError::Invalid(what) => write!(f, "relay frame has an invalid {what}"),
            WireError::Trailing(n) => write!(f, "relay frame has {n} bytes after its payload"),
        }
    }
}

impl std::error::Error for WireError {}

// ---- encoding ----

fn put_str(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    put_str(out, kv.key.as_bytes());
    put_str(out, &kv.value);
    out.extend_from_slice(&kv.create_revision.to_be_bytes());
    out.extend_from_slice(&kv.mod_revision.to_be_bytes());
    out.extend_from_slice(&kv.version.to_be_bytes());
    out.extend_from_slice(&kv.lease.map_or(0, |l| l.0).to_be_bytes());
}

/// The encoded size of `kv` (for chunking a list answer).
pub fn kv_size(kv: &KeyValue) -> usize {
    8 + kv.key.len() + kv.value.len() + 32
}

fn put_event(out: &mut Vec<u8>, e: &WatchEvent) {
    match e {
        WatchEvent::Put(kv) => {
            out.push(0);
            put_kv(out, kv);
        }
        WatchEvent::Delete { key, mod_revision } => {
            out.push(1);
            put_str(out, key.as_bytes());
            out.extend_from_slice(&mod_revision.to_be_bytes());
        }
    }
}

fn frame(tag: u8, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, tag];
    body(&mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// An `Events` frame from borrowed events (the relay encodes each batch
/// once, from the events it keeps nowhere else).
pub fn encode_events(revision: Revision, events: &[WatchEvent]) -> Vec<u8> {
    frame(T_EVENTS, |o| {
        o.extend_from_slice(&revision.to_be_bytes());
        o.extend_from_slice(&(events.len() as u32).to_be_bytes());
        for e in events {
            put_event(o, e);
        }
    })
}

/// A `Kvs` frame from borrowed key-values.
pub fn encode_kvs<'a>(kvs: impl ExactSizeIterator<Item = &'a KeyValue>) -> Vec<u8> {
    frame(T_KVS, |o| {
        o.extend_from_slice(&(kvs.len() as u32).to_be_bytes());
        for kv in kvs {
            put_kv(o, kv);
        }
    })
}

/// The frame's bytes, length prefix included.
pub fn encode(f: &Frame) -> Vec<u8> {
    match f {
        Frame::Hello { version, op } => frame(T_HELLO, |o| {
            o.extend_from_slice(&version.to_be_bytes());
            match op {
                Op::List => o.push(OP_LIST),
                Op::Watch { from } => {
                    o.push(OP_WATCH);
                    o.extend_from_slice(&from.to_be_bytes());
                }
            }
        }),
        Frame::Kvs(kvs) => encode_kvs(kvs.iter()),
        Frame::ListEnd { revision } => {
            frame(T_LIST_END, |o| o.extend_from_slice(&revision.to_be_bytes()))
        }
        Frame::Opened {
            revision,
            heartbeat_ms,
        } => frame(T_OPENED, |o| {
            o.extend_from_slice(&revision.to_be_bytes());
            o.extend_from_slice(&heartbeat_ms.to_be_bytes());
        }),
        Frame::Events { revision, events } => encode_events(*revision, events),
        Frame::Progress { revision } => {
            frame(T_PROGRESS, |o| o.extend_from_slice(&revision.to_be_bytes()))
        }
        Frame::Disconnected { reason } => frame(T_DISCONNECTED, |o| put_str(o, reason.as_bytes())),
        Frame::Resumed => frame(T_RESUMED, |_| {}),
        Frame::Compacted {
            requested,
            compact_revision,
        } => frame(T_COMPACTED, |o| {
            o.extend_from_slice(&requested.to_be_bytes());
            o.extend_from_slice(&compact_revision.to_be_bytes());
        }),
        Frame::Error { message } => frame(T_ERROR, |o| put_str(o, message.as_bytes())),
        Frame::Closing { reason } => frame(T_CLOSING, |o| put_str(o, reason.as_bytes())),
    }
}

// ---- decoding ----

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_be_bytes(a))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(i64::from_be_bytes(a))
    }
    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid(what))
    }
    /// A count of items each at least `min` bytes long: never more than
    /// the input could hold (so it bounds an allocation).
    fn count(&mut self, min: usize, what: &'static str) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        if n > self.buf.len() / min {
            return Err(WireError::Truncated(what));
        }
        Ok(n)
    }
    fn kv(&mut self) -> Result<KeyValue, WireError> {
        let key = self.string("key")?;
        let value = self.bytes("value")?.to_vec();
        let create_revision = self.i64("create_revision")?;
        let mod_revision = self.i64("mod_revision")?;
        let version = self.i64("version")?;
        let lease = self.i64("lease")?;
        Ok(KeyValue {
            key,
            value,
            create_revision,
            mod_revision,
            version,
            lease: (lease != 0).then_some(LeaseId(lease)),
        })
    }
    fn event(&mut self) -> Result<WatchEvent, WireError> {
        match self.u8("event kind")? {
            0 => Ok(WatchEvent::Put(self.kv()?)),
            1 => {
                let key = self.string("key")?;
                let mod_revision = self.i64("mod_revision")?;
                Ok(WatchEvent::Delete { key, mod_revision })
            }
            _ => Err(WireError::Invalid("event kind")),
        }
    }
}

/// Decodes one frame's body (tag and payload, without the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, WireError> {
    let mut r = Reader { buf: body };
    let tag = r.u8("tag")?;
    let f = match tag {
        T_HELLO => {
            let version = r.u16("version")?;
            let op = match r.u8("op")? {
                OP_LIST => Op::List,
                OP_WATCH => Op::Watch {
                    from: r.i64("from")?,
                },
                _ => return Err(WireError::Invalid("op")),
            };
            Frame::Hello { version, op }
        }
        T_KVS => {
            // A key-value is at least 40 bytes (two lengths, four i64s).
            let n = r.count(40, "key-value count")?;
            let mut kvs = Vec::with_capacity(n);
            for _ in 0..n {
                kvs.push(r.kv()?);
            }
            Frame::Kvs(kvs)
        }
        T_LIST_END => Frame::ListEnd {
            revision: r.i64("revision")?,
        },
        T_OPENED => Frame::Opened {
            revision: r.i64("revision")?,
            heartbeat_ms: r.u32("heartbeat")?,
        },
        T_EVENTS => {
            let revision = r.i64("revision")?;
            // A delete is at least 13 bytes.
            let n = r.count(13, "event count")?;
            let mut events = Vec::with_capacity(n);
            for _ in 0..n {
                events.push(r.event()?);
            }
            Frame::Events { revision, events }
        }
        T_PROGRESS => Frame::Progress {
            revision: r.i64("revision")?,
        },
        T_DISCONNECTED => Frame::Disconnected {
            reason: r.string("reason")?,
        },
        T_RESUMED => Frame::Resumed,
        T_COMPACTED => Frame::Compacted {
            requested: r.i64("requested")?,
            compact_revision: r.i64("compact_revision")?,
        },
        T_ERROR => Frame::Error {
            message: r.string("message")?,
        },
        T_CLOSING => Frame::Closing {
            reason: r.string("reason")?,
        },
        t => return Err(WireError::UnknownTag(t)),
    };
    if !r.buf.is_empty() {
        return Err(WireError::Trailing(r.buf.len()));
    }
    Ok(f)
}

/// The revision of an `Events` frame's body (tag and payload) without
/// decoding its events, or `None` for any other frame. For a client that
/// only follows the stream (the simulator's stand-ins for other hosts).
pub fn events_revision(body: &[u8]) -> Option<Revision> {
    match body {
        [T_EVENTS, r @ ..] if r.len() >= 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&r[..8]);
            Some(i64::from_be_bytes(a))
        }
        _ => None,
    }
}

/// Whether a frame's body is a `Compacted` (the stream is over).
pub fn is_compacted(body: &[u8]) -> bool {
    body.first() == Some(&T_COMPACTED)
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if `buf` does not
/// hold all of it yet, else the frame and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::BadLength(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((decode_body(&buf[4..4 + len])?, 4 + len)))
}

/// Reads one frame from `io`. A frame over [`MAX_FRAME`] or one that does
/// not decode is `InvalidData`; the end of the stream before a frame is
/// `UnexpectedEof`.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(io: &mut R) -> std::io::Result<Frame> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            WireError::BadLength(len),
        ));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    decode_body(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], rev: i64, lease: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: rev - 1,
            mod_revision: rev,
            version: 2,
            lease: (lease != 0).then_some(LeaseId(lease)),
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                op: Op::List,
            },
            Frame::Hello {
                version: VERSION,
                op: Op::Watch { from: 42 },
            },
            Frame::Kvs(vec![
                kv("/pier/v1/a", b"x", 5, 0),
                kv("/pier/v1/b", b"", 6, 7),
            ]),
            Frame::Kvs(vec![]),
            Frame::ListEnd { revision: 9 },
            Frame::Opened {
                revision: 9,
                heartbeat_ms: 1000,
            },
            Frame::Events {
                revision: 12,
                events: vec![
                    WatchEvent::Put(kv("/pier/v1/c", "é".as_bytes(), 11, 3)),
                    WatchEvent::Delete {
                        key: "/pier/v1/a".into(),
                        mod_revision: 12,
                    },
                ],
            },
            Frame::Progress { revision: 12 },
            Frame::Disconnected {
                reason: "etcd gone".into(),
            },
            Frame::Resumed,
            Frame::Compacted {
                requested: 3,
                compact_revision: 10,
            },
            Frame::Error {
                message: "not synced".into(),
            },
            Frame::Closing {
                reason: "upgrading".into(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        let mut all = Vec::new();
        for f in samples() {
            let bytes = encode(&f);
            assert_eq!(decode(&bytes), Ok(Some((f.clone(), bytes.len()))), "{f:?}");
            all.extend_from_slice(&bytes);
        }
        // Back to back, as on a stream.
        let mut at = 0;
        for f in samples() {
            let (g, n) = decode(&all[at..]).expect("decodes").expect("complete");
            assert_eq!(g, f);
            at += n;
        }
        assert_eq!(at, all.len());
    }

    #[test]
    fn truncated_frames_are_incomplete_or_errors_never_panics() {
        for f in samples() {
            let bytes = encode(&f);
            for cut in 0..bytes.len() {
                // A prefix of the stream: not complete yet.
                assert_eq!(decode(&bytes[..cut]), Ok(None), "{f:?} cut at {cut}");
                // A body cut short under a length that claims it whole.
                if cut > 4 {
                    let body = &bytes[4..cut];
                    assert!(decode_body(body).is_err(), "{f:?} body cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64*: deterministic, no dependency.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for i in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Half the time, a plausible length and tag, so that decoding
            // gets past the header into the payloads.
            if i % 2 == 0 && b.len() > 5 {
                let n = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&n.to_be_bytes());
                b[4] = [T_HELLO, T_KVS, T_EVENTS, T_ERROR, T_COMPACTED][(next() % 5) as usize];
            }
            let _ = decode(&b);
            let _ = decode_body(&b);
        }
        // Mutations of valid frames: flip one byte anywhere.
        for f in samples() {
            let bytes = encode(&f);
            for at in 0..bytes.len() {
                let mut b = bytes.clone();
                b[at] ^= (next() as u8) | 1;
                let _ = decode(&b);
            }
        }
    }

    #[test]
    fn the_events_revision_is_read_without_decoding() {
        for f in samples() {
            let bytes = encode(&f);
            let want = match &f {
                Frame::Events { revision, .. } => Some(*revision),
                _ => None,
            };
            assert_eq!(events_revision(&bytes[4..]), want, "{f:?}");
            assert_eq!(
                is_compacted(&bytes[4..]),
                matches!(f, Frame::Compacted { .. })
            );
        }
        assert_eq!(events_revision(&[T_EVENTS, 0, 0]), None);
    }

    #[test]
    fn a_huge_count_is_refused_without_allocating_it() {
        let mut b = vec![0, 0, 0, 0, T_KVS];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(decode(&b), Err(WireError::Truncated("key-value count")));
        let over = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(
            decode(&[over[0], over[1], over[2], over[3], 1]),
            Err(WireError::BadLength(MAX_FRAME + 1))
        );
    }
}
