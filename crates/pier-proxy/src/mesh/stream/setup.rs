//! The handshake phase ([`Setup`]): rustls' unbuffered connection over the
//! TCP stream for the handshake, the header and the reply, fed from our own
//! buffer so that the byte where rustls stopped is always known; it hands
//! over to a [`MeshStream`](super::MeshStream) with `into_stream`.

use std::io::{self};
use std::sync::Arc;
use std::time::Instant;

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::net::TcpStream;

use super::MeshStream;
use super::kernel::{Kernel, KernelShared};
use crate::copy::{wouldblock, write_all};
use crate::mesh::record::{Keys, MAX_RECORD};
use crate::tls::PeerCert;

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
pub(crate) enum Step {
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
pub(crate) enum Send<'a> {
    Data(&'a [u8]),
    CloseNotify,
}

/// Appends what `f` writes to `out`, growing it as rustls asks.
pub(crate) fn encode_into(
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

pub(crate) fn encode_size(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

pub(crate) fn encrypt_size(e: EncryptError) -> Option<usize> {
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
    pub(crate) tcp: TcpStream,
    pub(crate) conn: Unbuffered,
    /// Received bytes not yet consumed by rustls.
    pub(crate) rbuf: Vec<u8>,
    /// Encoded TLS not yet sent.
    pub(crate) out: Vec<u8>,
    /// Plaintext received, not yet read (`plain[ppos..]`).
    pub(crate) plain: Vec<u8>,
    pub(crate) ppos: usize,
    pub(crate) born: Instant,
    /// The peer's certificate, read once when the handshake ends.
    pub(crate) peer: Option<Arc<PeerCert>>,
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

    pub(super) fn turn(&mut self, send: &mut Option<Send<'_>>) -> io::Result<Step> {
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

impl crate::mesh::ReadPlain for Setup {
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.read(out).await
    }
}
