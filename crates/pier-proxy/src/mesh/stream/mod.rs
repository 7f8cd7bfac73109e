//! A mesh connection in its two phases.
//!
//! - [`Setup`]: rustls' unbuffered connection over the TCP stream for the
//!   handshake, the header and the reply. It consumes records from our own
//!   buffer and stops after each application_data record, so the byte
//!   where rustls stopped is always known.
//! - [`MeshStream`]: the tunnel after the reply. rustls hands its traffic
//!   keys over with a kernel connection (`dangerous_into_kernel_connection`,
//!   which refuses while output is queued) and [`crate::mesh::record`] seals and
//!   opens the records in place; KeyUpdates and late session tickets go to
//!   the kernel connection.
//!   [`MeshStream::relay`] is the data path: plaintext is read straight
//!   into record slots and sealed there, records are opened where they
//!   were received and written out from there, so the only copies are the
//!   kernel's. It also implements `AsyncRead`/`AsyncWrite` for everything
//!   else (the PROXY header, tests).
//!
//! `setup` holds the handshake phase, `kernel` what the kernel
//! connection keeps after the handover, and `relay` the data path; this
//! module holds the tunnel itself and its `AsyncRead`/`AsyncWrite`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use rustls::HandshakeKind;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::copy::write_all;
use crate::mesh::record::{
    self, APPLICATION_DATA, Content, FULL_RECORD, HEADER, Keys, MAX_PLAIN, MAX_RECORD,
};
use crate::tls::{PeerCert, Revoked};

mod kernel;
mod relay;
mod setup;

pub(crate) use kernel::KernelShared;
use kernel::{on_handshake, push_key_update, tx_update_due};
pub(crate) use relay::{peer_cut, reset_on_close};
pub(crate) use setup::Setup;

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
    /// is older than [`crate::mesh::MAX_TUNNEL_AGE`], or its peer's certificate
    /// is revoked or expired.
    pub(crate) fn retired(&self) -> Option<&'static str> {
        if self.born.elapsed() >= crate::mesh::MAX_TUNNEL_AGE {
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

impl crate::mesh::ReadPlain for MeshStream {
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        tokio::io::AsyncReadExt::read(self, out).await
    }
}

#[cfg(test)]
mod tests;
