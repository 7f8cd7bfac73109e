//! A mesh connection in its two phases.
//!
//! - [`Setup`]: rustls' unbuffered connection over the TCP stream for the
//!   handshake, the header and the reply. It consumes records from our own
//!   buffer and stops after each application_data record, so the byte
//!   where rustls stopped is always known.
//! - [`MeshStream`]: the tunnel after the reply. rustls hands its traffic
//!   keys over with a kernel connection (`dangerous_into_kernel_connection`,
//!   which refuses while output is queued) and [`super::record`] seals and
//!   opens the records in place; KeyUpdates and late session tickets go to
//!   the kernel connection.
//!   [`MeshStream::relay`] is the data path: plaintext is read straight
//!   into record slots and sealed there, records are opened where they
//!   were received and written out from there, so the only copies are the
//!   kernel's. It also implements `AsyncRead`/`AsyncWrite` for everything
//!   else (the PROXY header, tests).

use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::record::{
    self, APPLICATION_DATA, Content, FULL_RECORD, HEADER, Keys, MAX_PLAIN, MAX_RECORD,
};
use crate::Side;
use crate::copy::{CopyResult, Counters, send_fin, wouldblock, write_all};
use crate::tls::{PeerCert, Revoked};

/// The rustls connection of the handshake phase: rustls' unbuffered API,
/// whose `dangerous_into_kernel_connection` hands the keys over together
/// with a [`rustls::kernel::KernelConnection`] (new secrets for a
/// KeyUpdate, late session tickets).
pub(crate) enum Unbuffered {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

impl From<UnbufferedClientConnection> for Unbuffered {
    fn from(c: UnbufferedClientConnection) -> Self {
        Unbuffered::Client(c)
    }
}

impl From<UnbufferedServerConnection> for Unbuffered {
    fn from(c: UnbufferedServerConnection) -> Self {
        Unbuffered::Server(c)
    }
}

/// What one turn of rustls' state machine asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Encoded output was added: turn again.
    Again,
    /// Output is ready in `out`: send it.
    Transmit,
    /// The handshake needs more bytes from the peer.
    NeedRead,
    /// Plaintext was appended.
    Data,
    /// The handshake is over and nothing is pending.
    Idle,
    /// The peer sent close_notify.
    PeerClosed,
}

/// What to encrypt at the next `WriteTraffic`.
enum Send<'a> {
    Data(&'a [u8]),
    CloseNotify,
}

/// Appends what `f` writes to `out`, growing it as rustls asks.
fn encode_into(
    out: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), rustls::Error> {
    let at = out.len();
    out.resize(at + 4096, 0);
    loop {
        match f(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(Some(need)) => out.resize(at + need, 0),
            Err(None) => {
                out.truncate(at);
                return Err(rustls::Error::General(
                    "mesh: rustls refused to encode".into(),
                ));
            }
        }
    }
}

fn encode_size(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_size(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// One turn of rustls' state machine over `rbuf` (consumed bytes are
/// dropped from its front).
macro_rules! turn {
    ($conn:expr, $rbuf:expr, $out:expr, $plain:expr, $send:expr) => {{
        let UnbufferedStatus { discard, state } = $conn.process_tls_records(&mut $rbuf[..]);
        let r: Result<Step, rustls::Error> = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut t)) => {
                let mut r = Ok(Step::Data);
                while let Some(rec) = t.next_record() {
                    match rec {
                        Ok(rec) => $plain.extend_from_slice(rec.payload),
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    }
                }
                r
            }
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                encode_into($out, |b| e.encode(b).map_err(encode_size)).map(|_| Step::Again)
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // The bytes are in `out` and are sent before the next turn.
                t.done();
                Ok(Step::Transmit)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedRead),
            Ok(ConnectionState::WriteTraffic(mut w)) => match $send.take() {
                Some(Send::Data(d)) => encode_into($out, |b| w.encrypt(d, b).map_err(encrypt_size))
                    .map(|_| Step::Transmit),
                Some(Send::CloseNotify) => {
                    encode_into($out, |b| w.queue_close_notify(b).map_err(encrypt_size))
                        .map(|_| Step::Transmit)
                }
                None => Ok(Step::Idle),
            },
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => Ok(Step::PeerClosed),
            Ok(_) => Err(rustls::Error::General(
                "mesh: unexpected TLS state (early data is never enabled)".into(),
            )),
        };
        $rbuf.drain(..discard);
        r
    }};
}

/// The handshake phase: rustls' unbuffered connection, fed from our own
/// buffer, so the bytes rustls has not consumed are always known.
pub(crate) struct Setup {
    tcp: TcpStream,
    conn: Unbuffered,
    /// Received bytes not yet consumed by rustls.
    rbuf: Vec<u8>,
    /// Encoded TLS not yet sent.
    out: Vec<u8>,
    /// Plaintext received, not yet read (`plain[ppos..]`).
    plain: Vec<u8>,
    ppos: usize,
    born: Instant,
    /// The peer's certificate, read once when the handshake ends.
    peer: Option<Arc<PeerCert>>,
}

impl Setup {
    pub(crate) fn new(tcp: TcpStream, conn: impl Into<Unbuffered>) -> Setup {
        Setup {
            tcp,
            conn: conn.into(),
            rbuf: Vec::new(),
            out: Vec::new(),
            plain: Vec::new(),
            ppos: 0,
            born: Instant::now(),
            peer: None,
        }
    }

    /// The negotiated state: handshake kind, peer certificates, suite.
    pub(crate) fn common(&self) -> &rustls::CommonState {
        match &self.conn {
            Unbuffered::Client(c) => c,
            Unbuffered::Server(c) => c,
        }
    }

    /// The peer's certificate as the handshake verified it (or as the
    /// resumed session recorded it).
    pub(crate) fn peer(&self) -> Option<&Arc<PeerCert>> {
        self.peer.as_ref()
    }

    /// When the connection was made.
    pub(crate) fn born(&self) -> Instant {
        self.born
    }

    /// The TCP connection under it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn turn(&mut self, send: &mut Option<Send<'_>>) -> io::Result<Step> {
        let r = match &mut self.conn {
            Unbuffered::Client(c) => turn!(c, self.rbuf, &mut self.out, self.plain, send),
            Unbuffered::Server(c) => turn!(c, self.rbuf, &mut self.out, self.plain, send),
        };
        r.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Sends what rustls encoded.
    async fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let r = write_all(&self.tcp, &out).await;
        self.out = out;
        self.out.clear();
        r
    }

    /// Reads more bytes from the socket. `Ok(false)`: EOF.
    async fn read_more(&mut self) -> io::Result<bool> {
        self.rbuf.reserve(MAX_RECORD);
        loop {
            self.tcp.readable().await?;
            match self.tcp.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(e) if wouldblock(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// On an error, rustls may have encoded an alert: send it, best effort.
    async fn fail(&mut self, e: io::Error) -> io::Error {
        if !self.out.is_empty() {
            let _ = self.flush().await;
        }
        e
    }

    /// Runs the handshake to its end (and sends what it leaves queued,
    /// such as the server's session tickets).
    pub(crate) async fn handshake(&mut self) -> io::Result<()> {
        loop {
            let step = match self.turn(&mut None) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(e).await),
            };
            match step {
                Step::Again => {}
                Step::Transmit => self.flush().await?,
                Step::Idle | Step::Data if !self.common().is_handshaking() => {
                    self.flush().await?;
                    self.peer = self
                        .common()
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(PeerCert::of)
                        .map(Arc::new);
                    return Ok(());
                }
                Step::PeerClosed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ));
                }
                Step::NeedRead | Step::Idle | Step::Data => {
                    if !self.read_more().await? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed during the TLS handshake",
                        ));
                    }
                }
            }
        }
    }

    /// Up to `out.len()` bytes of plaintext; 0 when the peer closed
    /// (close_notify or EOF) before sending any.
    pub(crate) async fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.ppos < self.plain.len() {
                let n = out.len().min(self.plain.len() - self.ppos);
                out[..n].copy_from_slice(&self.plain[self.ppos..self.ppos + n]);
                self.ppos += n;
                if self.ppos == self.plain.len() {
                    self.plain.clear();
                    self.ppos = 0;
                }
                return Ok(n);
            }
            let step = match self.turn(&mut None) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(e).await),
            };
            match step {
                Step::Data => {}
                Step::Again => {}
                Step::Transmit => self.flush().await?,
                Step::PeerClosed => return Ok(0),
                Step::NeedRead | Step::Idle => {
                    if !self.read_more().await? {
                        if self.rbuf.is_empty() {
                            return Ok(0);
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed in the middle of a TLS record",
                        ));
                    }
                }
            }
        }
    }

    async fn send(&mut self, what: Send<'_>) -> io::Result<()> {
        let mut send = Some(what);
        while send.is_some() {
            let step = match self.turn(&mut send) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(e).await),
            };
            match step {
                Step::Transmit => self.flush().await?,
                Step::Again | Step::Data => {}
                Step::NeedRead | Step::Idle | Step::PeerClosed => {
                    if send.is_some() {
                        return Err(io::Error::other(
                            "mesh: cannot send before the handshake is over",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.send(Send::Data(data)).await
    }

    /// Sends `data`, a close_notify and a FIN: the end of a refused tunnel.
    pub(crate) async fn close_with(mut self, data: &[u8]) -> io::Result<()> {
        self.send(Send::Data(data)).await?;
        self.send(Send::CloseNotify).await?;
        rustix::net::shutdown(&self.tcp, rustix::net::Shutdown::Write)?;
        Ok(())
    }

    /// Hands the connection over to the record layer. Both sides wait for
    /// the other at this point (the client sends nothing after the header
    /// until the reply, the server writes the reply alone), so rustls
    /// holds no plaintext here; if it does, the peer broke the protocol.
    /// rustls' `dangerous_into_kernel_connection` refuses while it has
    /// output queued; the bytes it has not consumed (records the peer
    /// pipelined) stay for the record layer.
    pub(crate) fn into_stream(self) -> io::Result<MeshStream> {
        if self.common().is_handshaking() || !self.out.is_empty() {
            return Err(io::Error::other(
                "mesh: rustls still has a handshake or output queued at the handover",
            ));
        }
        if self.ppos < self.plain.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "mesh: the peer sent data before the tunnel was set up",
            ));
        }
        let peer_certificate = self
            .common()
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let handshake_kind = self.common().handshake_kind();
        let Setup {
            tcp,
            conn,
            rbuf,
            peer,
            born,
            ..
        } = self;
        let handover =
            |e: rustls::Error| io::Error::other(format!("mesh: rustls refused the handover: {e}"));
        let (secrets, kernel) = match conn {
            Unbuffered::Client(c) => {
                let (s, k) = c.dangerous_into_kernel_connection().map_err(handover)?;
                (s, Kernel::Client(k))
            }
            Unbuffered::Server(c) => {
                let (s, k) = c.dangerous_into_kernel_connection().map_err(handover)?;
                (s, Kernel::Server(k))
            }
        };
        let tx = Keys::new(secrets.tx.0, secrets.tx.1)?;
        let rx = Keys::new(secrets.rx.0, secrets.rx.1)?;
        let mut s = MeshStream::new(tcp, tx, rx, rbuf);
        s.kernel = Some(Arc::new(KernelShared {
            conn: std::sync::Mutex::new(kernel),
            tx_update: std::sync::atomic::AtomicBool::new(false),
        }));
        s.peer_certificate = peer_certificate;
        s.peer = peer;
        s.born = born;
        s.handshake_kind = handshake_kind;
        Ok(s)
    }
}

/// What rustls keeps after the handover: it derives the next traffic
/// secrets for a KeyUpdate and takes a client's late session tickets.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
    /// A late NewSessionTicket; only a client takes one.
    fn ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(payload),
            Kernel::Server(_) => Err(rustls::Error::General(
                "a client sent a session ticket".into(),
            )),
        }
    }
}

/// The kernel connection, shared by both directions of a relay.
pub(crate) struct KernelShared {
    /// A std Mutex: a secret derivation, no `.await` inside.
    conn: std::sync::Mutex<Kernel>,
    /// The peer asked for our KeyUpdate (update_requested): sent before
    /// our next record.
    tx_update: std::sync::atomic::AtomicBool,
}

impl KernelShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kernel> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handles the handshake messages of one record on an established tunnel
/// (RFC 8446 §4.6): a KeyUpdate switches `rx` to the next secret (and, if
/// the peer asks, schedules ours); a NewSessionTicket goes to rustls.
/// Anything else is refused with unexpected_message.
fn on_handshake(mut msgs: &[u8], rx: &mut Keys, kernel: Option<&KernelShared>) -> io::Result<()> {
    let Some(k) = kernel else {
        return Err(record::refused(
            record::alert::UNEXPECTED_MESSAGE,
            "mesh: unexpected handshake message on an established tunnel",
        ));
    };
    while !msgs.is_empty() {
        let [ty, a, b, c, rest @ ..] = msgs else {
            return Err(record::refused(
                record::alert::DECODE_ERROR,
                "mesh: a handshake message split across records",
            ));
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(record::refused(
                record::alert::DECODE_ERROR,
                "mesh: a handshake message split across records",
            ));
        }
        let (body, next) = rest.split_at(len);
        msgs = next;
        match *ty {
            record::KEY_UPDATE => {
                let requested = match body {
                    [0] => false,
                    [1] => true,
                    _ => {
                        return Err(record::refused(
                            record::alert::DECODE_ERROR,
                            "mesh: a malformed KeyUpdate",
                        ));
                    }
                };
                // RFC 8446 §5.1: a KeyUpdate ends its record.
                if !msgs.is_empty() {
                    return Err(record::refused(
                        record::alert::UNEXPECTED_MESSAGE,
                        "mesh: data after a KeyUpdate in its record",
                    ));
                }
                let (seq, secrets) = k.lock().update_rx().map_err(io::Error::other)?;
                *rx = Keys::new(seq, secrets)?;
                if requested {
                    k.tx_update
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            record::NEW_SESSION_TICKET => {
                k.lock().ticket(body).map_err(|e| {
                    record::refused(
                        record::alert::UNEXPECTED_MESSAGE,
                        if matches!(e, rustls::Error::General(_)) {
                            "mesh: a client sent a session ticket"
                        } else {
                            "mesh: a malformed session ticket"
                        },
                    )
                })?;
            }
            _ => {
                return Err(record::refused(
                    record::alert::UNEXPECTED_MESSAGE,
                    "mesh: unexpected handshake message on an established tunnel",
                ));
            }
        }
    }
    Ok(())
}

/// Whether this side must send a KeyUpdate before its next record: the
/// peer asked, or the key has sealed half of its confidentiality limit.
fn tx_update_due(tx: &Keys, kernel: Option<&KernelShared>) -> bool {
    let Some(k) = kernel else { return false };
    tx.used() >= tx.update_at()
        || k.tx_update
            .swap(false, std::sync::atomic::Ordering::Relaxed)
}

/// Seals a KeyUpdate (update_not_requested) with the current key into
/// `out`, then moves `tx` to the next secret.
fn push_key_update(tx: &mut Keys, kernel: &KernelShared, out: &mut Vec<u8>) -> io::Result<()> {
    record::push_record(
        tx,
        out,
        &[record::KEY_UPDATE, 0, 0, 1, 0],
        record::HANDSHAKE,
    )?;
    let (seq, secrets) = kernel.lock().update_tx().map_err(io::Error::other)?;
    *tx = Keys::new(seq, secrets)?;
    Ok(())
}

impl super::ReadPlain for Setup {
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.read(out).await
    }
}

/// How many records [`MeshStream::relay`] reads, seals and writes at once
/// in a bulk transfer: 256 KiB of plaintext per `readv` and per `write`.
const BULK_RECORDS: usize = 16;
/// The receive buffer of a bulk transfer: many records per `recv`.
const RECV_BULK: usize = BULK_RECORDS * FULL_RECORD + MAX_RECORD;
/// After this many small reads in a row, a grown buffer shrinks back.
const SHRINK_AFTER: u32 = 16;

/// An established mesh tunnel (either end). It carries one proxied stream
/// at a time. Each direction of a stream ends with an empty
/// application_data record (the stream's FIN); once both have, the tunnel
/// may carry the next stream ([`MeshStream::reusable`]). close_notify
/// ends the tunnel itself.
pub struct MeshStream {
    tcp: TcpStream,
    tx: Keys,
    rx: Keys,
    rx_state: Rx,
    /// Sealed records not yet written (`AsyncWrite`).
    wbuf: Vec<u8>,
    wpos: usize,
    /// This stream's end marker was sent.
    end_sent: bool,
    /// close_notify was sent, or something failed: no more streams.
    broken: bool,
    streams: u64,
    peer_certificate: Option<CertificateDer<'static>>,
    peer: Option<Arc<PeerCert>>,
    /// The CA's revocation list as this node last loaded it: a stream
    /// whose peer it revokes is cut (see [`MeshStream::relay`]).
    guard: Option<watch::Receiver<Arc<Revoked>>>,
    born: Instant,
    handshake_kind: Option<HandshakeKind>,
    /// rustls after the handover (None in tests that build keys by hand).
    kernel: Option<Arc<KernelShared>>,
}

/// Lengths and flags only: the buffers hold plaintext.
impl std::fmt::Debug for MeshStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStream")
            .field("tcp", &self.tcp)
            .field("tx", &self.tx)
            .field("rx", &self.rx)
            .field("unsent", &(self.wbuf.len() - self.wpos))
            .field("unread", &(self.rx_state.end - self.rx_state.start))
            .field("end_sent", &self.end_sent)
            .field("end_received", &self.rx_state.ended)
            .field("broken", &self.broken)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

/// Received bytes: `buf[plain]` is opened plaintext not yet handed out,
/// `buf[start..end]` ciphertext not yet opened.
#[derive(Default)]
struct Rx {
    buf: Vec<u8>,
    plain: std::ops::Range<usize>,
    start: usize,
    end: usize,
    /// The peer's end marker for this stream arrived.
    ended: bool,
    /// The peer's close_notify arrived: the tunnel is over.
    closed: bool,
}

/// What [`Rx::open_next`] found.
enum Next {
    Data(std::ops::Range<usize>),
    /// The stream's end in this direction (end marker or close_notify).
    End,
    /// No complete record buffered.
    Incomplete,
}

impl Rx {
    /// Opens the next complete record, if there is one; nothing after the
    /// stream's end.
    fn open_next(&mut self, keys: &mut Keys, kernel: Option<&KernelShared>) -> io::Result<Next> {
        let c = loop {
            if self.ended || self.closed {
                return Ok(Next::End);
            }
            let Some(len) = record::record_len(&self.buf[self.start..self.end])? else {
                return Ok(Next::Incomplete);
            };
            let at = self.start;
            let opened = record::open_tunnel_record(keys, &mut self.buf[at..at + len])?;
            self.start += len;
            match opened {
                record::Opened::Content(c) => break (at, c),
                record::Opened::Handshake(r) => {
                    on_handshake(&self.buf[at + r.start..at + r.end], keys, kernel)?;
                }
            }
        };
        let (at, c) = c;
        Ok(match c {
            Content::Data(r) if r.is_empty() => {
                self.ended = true;
                Next::End
            }
            Content::Data(r) => Next::Data(at + r.start..at + r.end),
            Content::Closed => {
                self.closed = true;
                Next::End
            }
        })
    }

    /// Makes room for at least one more full record after `end`, moving
    /// the unopened tail to the front; `bulk` sizes the buffer for many.
    fn make_room(&mut self, bulk: bool) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = if bulk { RECV_BULK } else { MAX_RECORD };
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        } else if self.buf.len() > want && self.end <= want {
            // The bulk transfer is over: give the big buffer back.
            self.buf.truncate(want);
            self.buf.shrink_to_fit();
        }
    }
}

fn unexpected_eof(mid_record: bool) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        if mid_record {
            "mesh: the peer closed in the middle of a record"
        } else {
            "mesh: the peer closed without ending the stream (it may be truncated)"
        },
    )
}

impl MeshStream {
    fn new(tcp: TcpStream, tx: Keys, rx: Keys, leftover: Vec<u8>) -> MeshStream {
        let end = leftover.len();
        MeshStream {
            tcp,
            tx,
            rx,
            rx_state: Rx {
                buf: leftover,
                end,
                ..Rx::default()
            },
            wbuf: Vec::new(),
            wpos: 0,
            end_sent: false,
            broken: false,
            streams: 1,
            peer_certificate: None,
            peer: None,
            guard: None,
            born: Instant::now(),
            handshake_kind: None,
            kernel: None,
        }
    }

    /// What the peer's certificate says (node, serial, expiry).
    pub fn peer(&self) -> Option<&PeerCert> {
        self.peer.as_deref()
    }

    /// Cut the stream if the revocation list (as reloaded) revokes the
    /// peer's certificate, or when that certificate expires.
    pub(crate) fn set_guard(&mut self, revoked: watch::Receiver<Arc<Revoked>>) {
        self.guard = Some(revoked);
    }

    /// Why this tunnel must carry no further stream, if it must not: it
    /// is older than [`super::MAX_TUNNEL_AGE`], or its peer's certificate
    /// is revoked or expired.
    pub(crate) fn retired(&self) -> Option<&'static str> {
        if self.born.elapsed() >= super::MAX_TUNNEL_AGE {
            return Some("max_age");
        }
        if self.tx.used() >= record::RETIRE_AT || self.rx.used() >= record::RETIRE_AT {
            return Some("key_use");
        }
        match (&self.peer, &self.guard) {
            (Some(p), Some(g)) => p.refusal(&g.borrow()),
            (Some(p), None) => p.refusal(&Revoked::default()),
            (None, _) => None,
        }
    }

    /// The peer's certificate, as verified in the handshake.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.peer_certificate.as_ref()
    }

    /// Whether the handshake was full or resumed.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.handshake_kind
    }

    /// How many streams this tunnel has carried, the current one included.
    pub fn streams(&self) -> u64 {
        self.streams
    }

    /// The TCP connection under the tunnel.
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Both directions of the current stream ended cleanly, nothing is
    /// left unsent or unread, and the tunnel is open: it can carry the
    /// next stream.
    pub fn reusable(&self) -> bool {
        let rx = &self.rx_state;
        self.retired().is_none()
            && !self.broken
            && self.end_sent
            && self.wpos == self.wbuf.len()
            && rx.ended
            && !rx.closed
            && rx.plain.is_empty()
    }

    /// Frees the buffers while the tunnel waits between streams (a bulk
    /// stream leaves them at a few hundred KiB); bytes already received
    /// for the next stream are kept.
    pub(crate) fn release_buffers(&mut self) {
        let rx = &mut self.rx_state;
        if rx.start == rx.end && rx.plain.is_empty() {
            rx.buf = Vec::new();
            rx.start = 0;
            rx.end = 0;
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
    }

    /// Starts the next stream on a [`reusable`](Self::reusable) tunnel.
    pub(crate) fn next_stream(&mut self) -> io::Result<()> {
        if !self.reusable() {
            return Err(io::Error::other(
                "mesh: the tunnel cannot carry another stream",
            ));
        }
        self.end_sent = false;
        self.rx_state.ended = false;
        self.streams += 1;
        Ok(())
    }

    /// Ends the tunnel: close_notify, then a FIN (best effort).
    pub(crate) async fn close(mut self) {
        self.broken = true;
        let mut out = std::mem::take(&mut self.wbuf);
        out.drain(..self.wpos);
        if record::push_close_notify(&mut self.tx, &mut out).is_ok()
            && write_all(&self.tcp, &out).await.is_ok()
        {
            let _ = rustix::net::shutdown(&self.tcp, rustix::net::Shutdown::Write);
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = match Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(r) => r,
                Poll::Pending => return Poll::Pending,
            };
            match n {
                Ok(n) => self.wpos += n,
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        // Keep a bulk-sized buffer only while bulk writes keep coming.
        if self.wbuf.capacity() > 2 * FULL_RECORD && self.wbuf.len() < FULL_RECORD {
            self.wbuf = Vec::new();
        } else {
            self.wbuf.clear();
        }
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Copies `plain` ↔ this tunnel until both directions of the stream
    /// have ended (plain's FIN becomes the end marker one way, the peer's
    /// end marker becomes a FIN the other way), or either breaks; after
    /// `Ok`, see [`reusable`](Self::reusable). `mesh_side`/`plain_side`
    /// name the two in errors.
    pub(crate) async fn relay(
        &mut self,
        plain: &TcpStream,
        plain_side: Side,
        mesh_side: Side,
        to_mesh: Counters<'_>,
        from_mesh: Counters<'_>,
    ) -> CopyResult {
        let cut = match (&self.peer, &self.guard) {
            (Some(p), Some(g)) => Some((p.clone(), g.clone())),
            _ => None,
        };
        let r = match cut {
            Some((peer, revoked)) => tokio::select! {
                r = self.relay_inner(plain, plain_side, mesh_side, to_mesh, from_mesh) => r,
                why = peer_cut(&peer, revoked) => Err((mesh_side, io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("mesh: tunnel cut: the peer's certificate ({}) is {why}", peer.node),
                ))),
            },
            None => {
                self.relay_inner(plain, plain_side, mesh_side, to_mesh, from_mesh)
                    .await
            }
        };
        if let Err((_, e)) = &r {
            // A cut stream must not look like a clean end at either end:
            // both sockets are reset when their owners close them. A
            // record this side refused is answered with its alert first
            // (then a FIN, so that the alert is not lost to the reset).
            self.broken = true;
            reset_on_close(plain);
            match record::alert_for(e) {
                Some(desc) if self.send_alert(desc) => {}
                _ => reset_on_close(&self.tcp),
            }
        }
        r
    }

    /// Queues a KeyUpdate (and moves to the next key) when one is due.
    fn key_update_if_due(&mut self) -> io::Result<()> {
        if let Some(k) = self.kernel.clone()
            && tx_update_due(&self.tx, Some(&k))
        {
            push_key_update(&mut self.tx, &k, &mut self.wbuf)?;
        }
        Ok(())
    }

    /// Sends fatal alert `desc` and a FIN, best effort and without
    /// waiting (the tunnel is over). False when it could not be sent.
    fn send_alert(&mut self, desc: u8) -> bool {
        self.broken = true;
        if self.wpos != self.wbuf.len() {
            return false; // a record half written: the alert would not parse
        }
        let mut out = Vec::with_capacity(HEADER + 2 + 1 + 16);
        if record::push_fatal_alert(&mut self.tx, &mut out, desc).is_err() {
            return false;
        }
        match self.tcp.try_write(&out) {
            Ok(n) if n == out.len() => {
                let _ = rustix::net::shutdown(&self.tcp, rustix::net::Shutdown::Write);
                true
            }
            _ => false,
        }
    }

    async fn relay_inner(
        &mut self,
        plain: &TcpStream,
        plain_side: Side,
        mesh_side: Side,
        to_mesh: Counters<'_>,
        from_mesh: Counters<'_>,
    ) -> CopyResult {
        // What the AsyncWrite side still holds goes first.
        write_all(&self.tcp, &self.wbuf[self.wpos..])
            .await
            .map_err(|e| (mesh_side, e))?;
        self.wpos = self.wbuf.len();
        let MeshStream {
            tcp,
            tx,
            rx,
            rx_state,
            end_sent,
            kernel,
            ..
        } = self;
        let kernel = kernel.as_deref();
        let up = async {
            if !*end_sent {
                seal_loop(plain, tcp, tx, kernel, plain_side, mesh_side, to_mesh).await?;
                *end_sent = true;
            }
            Ok(())
        };
        let down = open_loop(
            tcp, plain, rx, rx_state, kernel, mesh_side, plain_side, from_mesh,
        );
        crate::copy::both(up, down).await
    }
}

/// SO_LINGER 0: the socket's close sends a RST, not a FIN, so the other
/// end sees a reset connection rather than a clean end of stream.
pub(crate) fn reset_on_close(s: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0");
    }
}

/// Resolves once the peer behind `peer` may no longer be served: the
/// revocation list (as this node reloads it, every
/// [`super::RELOAD_POLL`]) revokes its certificate, or it expires. The
/// reason, for the log.
pub(crate) async fn peer_cut(
    peer: &PeerCert,
    mut revoked: watch::Receiver<Arc<Revoked>>,
) -> &'static str {
    let mut listening = true;
    loop {
        if let Some(why) = peer.refusal(&revoked.borrow_and_update()) {
            return why;
        }
        // Wake at the expiry (in steps of at most an hour: tokio's timer
        // takes long sleeps, an hour keeps the arithmetic obvious).
        let left = (peer.not_after_unix - crate::tls::unix_now()).clamp(0, 3600) as u64 + 1;
        tokio::select! {
            r = revoked.changed(), if listening => {
                // The reloader is gone (shutdown): only the expiry is left.
                if r.is_err() {
                    listening = false;
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(left)) => {}
        }
    }
}

async fn write_all_vectored(dst: &TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        dst.writable().await?;
        match dst.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if wouldblock(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// plain → tunnel: `readv` into the payload slots of up to
/// [`BULK_RECORDS`] records, seal each in place, write them with one call.
/// On plain's EOF: the end marker.
async fn seal_loop(
    src: &TcpStream,
    dst: &TcpStream,
    keys: &mut Keys,
    kernel: Option<&KernelShared>,
    src_side: Side,
    dst_side: Side,
    cnt: Counters<'_>,
) -> CopyResult {
    let mut slots = 1;
    let mut buf = vec![0u8; FULL_RECORD];
    let mut small = 0u32;
    loop {
        src.readable().await.map_err(|e| (src_side, e))?;
        let r = {
            let mut iov: Vec<IoSliceMut<'_>> = buf
                .chunks_mut(FULL_RECORD)
                .map(|c| IoSliceMut::new(&mut c[HEADER..HEADER + MAX_PLAIN]))
                .collect();
            src.try_read_vectored(&mut iov)
        };
        if !matches!(&r, Err(e) if wouldblock(e))
            && let Some(k) = kernel
            && tx_update_due(keys, kernel)
        {
            // A KeyUpdate goes before the next record (RFC 8446 §4.6.3).
            let mut ku = Vec::with_capacity(32);
            push_key_update(keys, k, &mut ku).map_err(|e| (dst_side, e))?;
            write_all(dst, &ku).await.map_err(|e| (dst_side, e))?;
        }
        let n = match r {
            Ok(0) => {
                let w = keys
                    .seal(&mut buf, 0, APPLICATION_DATA)
                    .map_err(|e| (dst_side, e))?;
                return write_all(dst, &buf[..w]).await.map_err(|e| (dst_side, e));
            }
            Ok(n) => n,
            Err(e) if wouldblock(&e) => continue,
            Err(e) => return Err((src_side, e)),
        };
        let mut total = 0;
        for (i, rec) in buf.chunks_mut(FULL_RECORD).enumerate() {
            let len = n.saturating_sub(i * MAX_PLAIN).min(MAX_PLAIN);
            if len == 0 {
                break;
            }
            let w = keys
                .seal(rec, len, APPLICATION_DATA)
                .map_err(|e| (dst_side, e))?;
            total = i * FULL_RECORD + w;
        }
        write_all(dst, &buf[..total])
            .await
            .map_err(|e| (dst_side, e))?;
        cnt.add(n);
        if n == slots * MAX_PLAIN {
            small = 0;
            if slots < BULK_RECORDS {
                slots = BULK_RECORDS;
                buf.resize(slots * FULL_RECORD, 0);
            }
        } else if slots > 1 && n < MAX_PLAIN {
            small += 1;
            if small >= SHRINK_AFTER {
                slots = 1;
                buf = vec![0u8; FULL_RECORD];
                small = 0;
            }
        }
    }
}

/// tunnel → plain: read many records per `recv`, open each where it lies,
/// write their plaintexts with one `writev`. At the stream's end: a FIN.
/// Bytes after the end marker stay buffered for the next stream.
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    src: &TcpStream,
    dst: &TcpStream,
    keys: &mut Keys,
    rx: &mut Rx,
    kernel: Option<&KernelShared>,
    src_side: Side,
    dst_side: Side,
    cnt: Counters<'_>,
) -> CopyResult {
    // Plaintext the AsyncRead side opened but did not hand out.
    if !rx.plain.is_empty() {
        let r = std::mem::replace(&mut rx.plain, 0..0);
        write_all(dst, &rx.buf[r.clone()])
            .await
            .map_err(|e| (dst_side, e))?;
        cnt.add(r.len());
    }
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(BULK_RECORDS + 1);
    let (mut bulk, mut small) = (false, 0u32);
    loop {
        let mut ended = false;
        loop {
            match rx.open_next(keys, kernel).map_err(|e| (src_side, e))? {
                Next::Data(r) => ranges.push(r),
                Next::End => {
                    ended = true;
                    break;
                }
                Next::Incomplete => break,
            }
        }
        if !ranges.is_empty() {
            let n: usize = ranges.iter().map(|r| r.len()).sum();
            let mut iov: Vec<IoSlice<'_>> = ranges
                .iter()
                .map(|r| IoSlice::new(&rx.buf[r.clone()]))
                .collect();
            write_all_vectored(dst, &mut iov)
                .await
                .map_err(|e| (dst_side, e))?;
            cnt.add(n);
            ranges.clear();
        }
        if ended {
            return send_fin(dst, dst_side);
        }
        rx.make_room(bulk);
        let n = loop {
            src.readable().await.map_err(|e| (src_side, e))?;
            match src.try_read(&mut rx.buf[rx.end..]) {
                Ok(n) => break n,
                Err(e) if wouldblock(&e) => {}
                Err(e) => return Err((src_side, e)),
            }
        };
        if n == 0 {
            return Err((src_side, unexpected_eof(rx.start < rx.end)));
        }
        if rx.end + n == rx.buf.len() {
            (bulk, small) = (true, 0);
        } else if bulk && n < MAX_PLAIN {
            small += 1;
            if small >= SHRINK_AFTER {
                (bulk, small) = (false, 0);
            }
        }
        rx.end += n;
    }
}

impl AsyncRead for MeshStream {
    /// The stream's bytes; EOF at its end marker (or close_notify); an
    /// error if the connection ends without either.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let kernel = me.kernel.as_deref();
        let r = poll_read_rx(&mut me.tcp, &mut me.rx, &mut me.rx_state, kernel, cx, out);
        if let Poll::Ready(Err(e)) = &r {
            me.broken = true;
            if let Some(desc) = record::alert_for(e) {
                me.send_alert(desc);
            }
        }
        r
    }
}

fn poll_read_rx(
    tcp: &mut TcpStream,
    keys: &mut Keys,
    rx: &mut Rx,
    kernel: Option<&KernelShared>,
    cx: &mut Context<'_>,
    out: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let mut copied = false;
    loop {
        if !rx.plain.is_empty() {
            let k = rx.plain.len().min(out.remaining());
            out.put_slice(&rx.buf[rx.plain.start..rx.plain.start + k]);
            rx.plain.start += k;
            copied = true;
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        match rx.open_next(keys, kernel)? {
            Next::Data(r) => {
                rx.plain = r;
                continue;
            }
            Next::End => return Poll::Ready(Ok(())),
            Next::Incomplete if copied => return Poll::Ready(Ok(())),
            Next::Incomplete => {}
        }
        rx.make_room(false);
        let mut rb = ReadBuf::new(&mut rx.buf[rx.end..]);
        ready!(Pin::new(&mut *tcp).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Err(unexpected_eof(rx.start < rx.end)));
        }
        rx.end += n;
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.end_sent || me.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(me.poll_drain(cx))?;
        me.key_update_if_due()?;
        let n = data.len().min(BULK_RECORDS * MAX_PLAIN);
        for chunk in data[..n].chunks(MAX_PLAIN) {
            record::push_record(&mut me.tx, &mut me.wbuf, chunk, APPLICATION_DATA)?;
        }
        // Start sending now; what the socket does not take waits for the
        // next write or flush.
        if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.tcp).poll_flush(cx)
    }

    /// Ends this stream's direction (the end marker); the tunnel stays open.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if !me.end_sent {
            ready!(me.poll_drain(cx))?;
            me.key_update_if_due()?;
            record::push_record(&mut me.tx, &mut me.wbuf, &[], APPLICATION_DATA)?;
            me.end_sent = true;
        }
        me.poll_drain(cx)
    }
}

impl super::ReadPlain for MeshStream {
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        tokio::io::AsyncReadExt::read(self, out).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::mesh::read_exact;
    use crate::mesh::record::tests::configs;

    /// Both ends handshaken over loopback.
    async fn handshaken() -> (Setup, Setup) {
        let (ccfg, scfg, name) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let client = UnbufferedClientConnection::new(ccfg, name).expect("client");
        let server = UnbufferedServerConnection::new(scfg).expect("server");
        let mut c = Setup::new(c.expect("connect"), client);
        let mut s = Setup::new(s.expect("accept").0, server);
        let (a, b) = tokio::join!(c.handshake(), s.handshake());
        a.expect("client handshake");
        b.expect("server handshake");
        (c, s)
    }

    /// [`handshaken`], then the client's first message (`header`) read by
    /// the server; the reply not yet sent.
    async fn set_up(header: &[u8]) -> (Setup, Setup) {
        let (mut c, mut s) = handshaken().await;
        c.write_all(header).await.expect("header");
        let mut got = vec![0u8; header.len()];
        read_exact(&mut s, &mut got)
            .await
            .expect("server reads the header");
        assert_eq!(got, header);
        (c, s)
    }

    /// The reply, then both ends hand over to the record layer.
    async fn tunnel(header: &[u8]) -> (MeshStream, MeshStream) {
        let (mut c, mut s) = set_up(header).await;
        s.write_all(&[0]).await.expect("reply");
        let s = s.into_stream().expect("server hands over");
        let mut b = [9u8];
        read_exact(&mut c, &mut b)
            .await
            .expect("client reads the reply");
        assert_eq!(b, [0]);
        (c.into_stream().expect("client hands over"), s)
    }

    #[tokio::test]
    async fn both_ends_hand_over_and_close_cleanly() {
        let (mut c, mut s) = tunnel(b"header").await;
        let up: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        c.write_all(&up).await.expect("write");
        c.shutdown().await.expect("close_notify + FIN");
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .expect("clean EOF at close_notify");
        assert_eq!(got, up);
        s.write_all(b"bye").await.expect("the other way still open");
        s.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.expect("clean EOF");
        assert_eq!(got, b"bye");
    }

    #[tokio::test]
    async fn a_tunnel_cut_mid_stream_is_an_error_not_an_eof() {
        let (mut c, mut s) = tunnel(b"header").await;
        s.write_all(b"partial").await.expect("write");
        s.flush().await.expect("flush");
        drop(s); // FIN without the end marker: a truncation
        let mut got = Vec::new();
        let e = c
            .read_to_end(&mut got)
            .await
            .expect_err("truncation must not look like EOF");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"partial");
    }

    #[tokio::test]
    async fn records_sent_before_the_handover_are_kept() {
        // The client pipelines a second record right behind the header;
        // rustls never sees it, the record layer opens it.
        let (mut c, mut s) = set_up(b"header").await;
        c.write_all(b"early").await.expect("early data");
        s.write_all(&[0]).await.expect("reply");
        let mut s = s.into_stream().expect("server hands over");
        let mut b = [0u8; 1];
        read_exact(&mut c, &mut b).await.expect("reply");
        let mut c = c.into_stream().expect("client hands over");
        let mut got = [0u8; 5];
        s.read_exact(&mut got)
            .await
            .expect("early record read after the handover");
        assert_eq!(&got, b"early");
        c.write_all(b"late").await.expect("write");
        c.flush().await.expect("flush");
        let mut got = [0u8; 4];
        s.read_exact(&mut got)
            .await
            .expect("sequence numbers carried over");
        assert_eq!(&got, b"late");
    }

    #[tokio::test]
    async fn data_in_the_header_record_is_a_protocol_error() {
        // One record: a 6-byte header and 2 bytes the server never asked
        // for; handing over would lose them, so it is refused.
        let (mut c, mut s) = handshaken().await;
        c.write_all(b"headerxx").await.expect("write");
        let mut header = [0u8; 6];
        read_exact(&mut s, &mut header).await.expect("header");
        s.write_all(&[0]).await.expect("reply");
        let e = s.into_stream().expect_err("leftover plaintext refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// An echo server for one connection; it half-closes after EOF.
    async fn echo_once() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = tokio::spawn(async move {
            let (mut t, _) = l.accept().await.expect("accept");
            let (mut r, mut w) = t.split();
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
            w.shutdown().await.expect("fin");
        });
        (addr, h)
    }

    /// Sends `data` through the client end (then its end marker) and
    /// returns what comes back until the server's end marker.
    async fn round_trip(c: &mut MeshStream, data: &[u8]) -> Vec<u8> {
        let (mut r, mut w) = tokio::io::split(c);
        let send = async {
            for chunk in data.chunks(70_000) {
                w.write_all(chunk).await.expect("send");
            }
            w.shutdown().await.expect("end marker");
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.expect("clean end of the stream back through the relay");
        got
    }

    #[tokio::test]
    async fn relay_carries_a_stream_then_the_tunnel_carries_the_next() {
        let (mut c, mut s) = tunnel(b"header").await;
        let counter = prometheus_client::metrics::counter::Counter::default();
        let cnt = Counters {
            svc: &counter,
            ep: None,
            first_byte: None,
        };
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for round in 0..2 {
            // The server end relays each stream to an echo target, as the
            // mesh server does.
            let (addr, echo) = echo_once().await;
            let plain = TcpStream::connect(addr).await.expect("connect");
            let (got, relayed) = tokio::join!(
                round_trip(&mut c, &data),
                s.relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
            );
            relayed.expect("relay ended cleanly");
            assert_eq!(got, data, "round {round}");
            echo.await.expect("echo");
            assert!(c.reusable() && s.reusable(), "round {round}");
            c.next_stream().expect("client: next stream");
            s.next_stream().expect("server: next stream");
        }
        assert_eq!((c.streams(), s.streams()), (3, 3));
        assert_eq!(counter.get(), 4 * data.len() as u64);
    }

    #[tokio::test]
    async fn a_stream_that_breaks_leaves_the_tunnel_unusable() {
        let (mut c, mut s) = tunnel(b"header").await;
        let counter = prometheus_client::metrics::counter::Counter::default();
        let cnt = Counters {
            svc: &counter,
            ep: None,
            first_byte: None,
        };
        // The target resets the connection mid-stream.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let target = tokio::spawn(async move {
            let (t, _) = l.accept().await.expect("accept");
            let mut b = [0u8; 4];
            let mut t = t;
            t.read_exact(&mut b).await.expect("read");
            socket2::SockRef::from(&t)
                .set_linger(Some(std::time::Duration::ZERO))
                .expect("linger");
            drop(t); // RST
        });
        let plain = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        c.flush().await.expect("flush");
        let r = s
            .relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
            .await;
        target.await.expect("target");
        assert!(r.is_err(), "a reset target ends the stream with an error");
        assert!(!s.reusable());
        assert!(s.next_stream().is_err());
    }

    /// Both directions of the current stream end cleanly (end markers).
    async fn end_both(c: &mut MeshStream, s: &mut MeshStream) {
        c.shutdown().await.expect("client end marker");
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.expect("server sees the end");
        s.shutdown().await.expect("server end marker");
        c.read_to_end(&mut v).await.expect("client sees the end");
    }

    /// R1: a tunnel whose keys have used a quarter of the AES-GCM record
    /// limit carries no further stream, though it ended cleanly.
    #[tokio::test]
    async fn a_tunnel_past_its_key_budget_is_not_reused() {
        let (mut c, mut s) = tunnel(b"header").await;
        end_both(&mut c, &mut s).await;
        assert!(
            c.reusable() && s.reusable(),
            "control: a fresh tunnel is reused"
        );
        c.next_stream().expect("next");
        s.next_stream().expect("next");
        // Both ends jump to the budget (their sequence numbers must agree).
        let at = record::RETIRE_AT;
        c.tx.set_used(at);
        s.rx.set_used(at);
        end_both(&mut c, &mut s).await;
        assert_eq!(c.retired(), Some("key_use"));
        assert_eq!(s.retired(), Some("key_use"));
        assert!(!c.reusable() && !s.reusable());
        assert!(c.next_stream().is_err());
    }

    /// Attack (R2): the peer sends an inner plaintext of 2^14 + 2 bytes on
    /// an established tunnel. The reader fails, and the peer gets a
    /// record_overflow alert (22), not a silent close.
    #[tokio::test]
    async fn an_oversized_record_is_answered_with_record_overflow() {
        let (mut c, mut s) = tunnel(b"header").await;
        let mut inner = vec![1u8; MAX_PLAIN + 1];
        inner.push(APPLICATION_DATA);
        let rec = record::tests::seal_inner(&mut s.tx, &inner);
        AsyncWriteExt::write_all(&mut s.tcp, &rec)
            .await
            .expect("raw write");
        let mut buf = vec![0u8; 1 << 16];
        let e = c.read(&mut buf).await.expect_err("oversized record read");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let e = s.read(&mut buf).await.expect_err("the alert arrives");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(e.to_string().contains("alert 22"), "{e}");
    }

    /// R2: the handover refuses while rustls still has output queued (it
    /// would be lost, or sent after records sealed with later sequence
    /// numbers).
    #[tokio::test]
    async fn no_handover_while_rustls_has_output_queued() {
        let (_c, mut s) = set_up(b"header").await;
        // The reply encoded but not yet sent.
        let mut send = Some(Send::Data(&[0]));
        assert_eq!(s.turn(&mut send).expect("encrypt"), Step::Transmit);
        assert!(!s.out.is_empty());
        let e = s.into_stream().expect_err("handover with output queued");
        assert!(e.to_string().contains("queued"), "{e}");
    }

    /// R1/R2: both ends pass half of the AES-GCM limit in the middle of a
    /// stream (their sequence numbers moved there by hand, in step). Each
    /// sends a KeyUpdate and moves to the next key (derived by rustls'
    /// kernel connection); the stream goes on intact through the relay,
    /// and the tunnel can carry the next one.
    #[tokio::test]
    async fn key_updates_keep_a_long_stream_going() {
        let (mut c, mut s) = tunnel(b"header").await;
        let counter = prometheus_client::metrics::counter::Counter::default();
        let cnt = Counters {
            svc: &counter,
            ep: None,
            first_byte: None,
        };
        let at = c.tx.update_at();
        c.tx.set_used(at);
        s.rx.set_used(at);
        s.tx.set_used(at);
        c.rx.set_used(at);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let (addr, echo) = echo_once().await;
        let plain = TcpStream::connect(addr).await.expect("connect");
        let (got, relayed) = tokio::join!(
            round_trip(&mut c, &data),
            s.relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
        );
        relayed.expect("relay across key updates");
        assert_eq!(got, data);
        echo.await.expect("echo");
        // 1 MB is 62 full records and an end marker, give or take the
        // chunking of the writes: far below `at` only after a new key.
        for (side, used) in [
            ("c.tx", c.tx.used()),
            ("s.tx", s.tx.used()),
            ("c.rx", c.rx.used()),
            ("s.rx", s.rx.used()),
        ] {
            assert!(used < 100, "{side} is still on the old key: {used}");
        }
        assert!(c.reusable() && s.reusable());
    }

    /// Interop (R2): a rustls peer (the buffered API, as any TLS 1.3 stack)
    /// sends a KeyUpdate asking for ours in the middle of the tunnel. Our
    /// end follows it, answers with its own before its next record, and
    /// rustls reads that record.
    #[tokio::test]
    async fn a_rustls_peer_key_update_is_followed_and_answered() {
        let (ccfg, scfg, name) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let peer = std::thread::spawn(move || {
            let tcp = std::net::TcpStream::connect(addr).expect("connect");
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .expect("timeout");
            let conn = rustls::ClientConnection::new(ccfg, name).expect("client");
            let mut t = rustls::StreamOwned::new(conn, tcp);
            std::io::Write::write_all(&mut t, b"h").expect("header");
            let mut b = [0u8; 1];
            std::io::Read::read_exact(&mut t, &mut b).expect("reply");
            t.conn.refresh_traffic_keys().expect("key update");
            std::io::Write::write_all(&mut t, b"after-update").expect("write");
            std::io::Write::flush(&mut t).expect("flush");
            let mut got = [0u8; 5];
            std::io::Read::read_exact(&mut t, &mut got).expect("rustls reads our record");
            got
        });
        let (tcp, _) = l.accept().await.expect("accept");
        let mut setup = Setup::new(tcp, UnbufferedServerConnection::new(scfg).expect("server"));
        setup.handshake().await.expect("handshake");
        let mut h = [0u8; 1];
        read_exact(&mut setup, &mut h).await.expect("header");
        setup.write_all(&[0]).await.expect("reply");
        let mut s = setup.into_stream().expect("hand over");
        let mut got = [0u8; 12];
        s.read_exact(&mut got)
            .await
            .expect("read across the peer's KeyUpdate");
        assert_eq!(&got, b"after-update");
        // rustls' KeyUpdate restarted the sequence: one record since.
        assert_eq!(s.rx.used(), 1, "rx did not move to the peer's new key");
        s.write_all(b"reply").await.expect("write");
        s.flush().await.expect("flush");
        // Ours went first (rustls asked for it: update_requested), so the
        // reply is record 0 of the new key.
        assert_eq!(s.tx.used(), 1, "no KeyUpdate of ours before the reply");
        let back = tokio::task::spawn_blocking(move || peer.join().expect("peer"))
            .await
            .expect("join");
        assert_eq!(&back, b"reply");
    }

    /// A TLS 1.3 NewSessionTicket message (RFC 8446 §4.6.1), its length
    /// and extensions filled in by the test: lifetime 60 s, age_add 1, an
    /// empty nonce, a 4-byte ticket.
    const TICKET: [u8; 19] = [
        record::NEW_SESSION_TICKET,
        0,
        0,
        0,
        0,
        0,
        0,
        60,
        0,
        0,
        0,
        1,
        0,
        0,
        4,
        1,
        2,
        3,
        4,
    ];

    /// A late session ticket from the listener (after the handover) goes to
    /// rustls' session store and the stream goes on; the same message from
    /// a client is refused with unexpected_message (attack: a client
    /// posing as a server).
    #[tokio::test]
    async fn late_tickets_are_taken_from_a_server_and_refused_from_a_client() {
        let mut ticket = TICKET.to_vec();
        ticket.extend_from_slice(&[0, 0]); // the extensions' length
        ticket[3] = (ticket.len() - 4) as u8;
        let (mut c, mut s) = tunnel(b"header").await;
        let mut wire = Vec::new();
        record::push_record(&mut s.tx, &mut wire, &ticket, record::HANDSHAKE).expect("seal");
        record::push_record(&mut s.tx, &mut wire, b"ok", APPLICATION_DATA).expect("seal");
        AsyncWriteExt::write_all(&mut s.tcp, &wire)
            .await
            .expect("raw write");
        let mut b = [0u8; 2];
        c.read_exact(&mut b)
            .await
            .expect("the ticket is taken, the stream goes on");
        assert_eq!(&b, b"ok");

        let mut wire = Vec::new();
        record::push_record(&mut c.tx, &mut wire, &ticket, record::HANDSHAKE).expect("seal");
        AsyncWriteExt::write_all(&mut c.tcp, &wire)
            .await
            .expect("raw write");
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).await.expect_err("a ticket from a client");
        assert_eq!(
            record::alert_for(&e),
            Some(record::alert::UNEXPECTED_MESSAGE),
            "{e}"
        );
        let e = c.read(&mut buf).await.expect_err("the alert arrives");
        assert!(e.to_string().contains("alert 10"), "{e}");
    }
}
