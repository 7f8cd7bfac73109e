//! A mesh connection in its two phases.
//!
//! - [`Setup`]: rustls over the TCP stream for the handshake, the header
//!   and the reply. Records are handed to rustls one at a time, so the
//!   byte where rustls stopped is always known.
//! - [`MeshStream`]: the tunnel after the reply. rustls hands its traffic
//!   keys over and [`super::record`] seals and opens the records in place.
//!   [`MeshStream::relay`] is the data path: plaintext is read straight
//!   into record slots and sealed there, records are opened where they
//!   were received and written out from there, so the only copies are the
//!   kernel's. It also implements `AsyncRead`/`AsyncWrite` for everything
//!   else (the PROXY header, tests).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll, ready};

use rustls::pki_types::CertificateDer;
use rustls::{Connection, HandshakeKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::record::{
    self, APPLICATION_DATA, CHANGE_CIPHER_SPEC, Content, FULL_RECORD, HEADER, Keys, MAX_PLAIN,
    MAX_RECORD,
};
use crate::Side;
use crate::copy::{CopyResult, Counters, shutdown_write, wouldblock, write_all};

/// `std::io::Write` over a non-blocking tokio socket, for rustls'
/// `write_tls`.
struct TryWrite<'a>(&'a TcpStream);

impl Write for TryWrite<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.try_write(b)
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The length of the complete handshake-phase record at the start of
/// `buf`: `Ok(None)` while incomplete, `Err(())` when `buf` does not start
/// with a TLS record header at all (rustls then gets the bytes and says
/// what is wrong with them).
fn setup_record_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let ty_ok = (CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&buf[0]);
    if !ty_ok || buf[1] != 3 || buf[2] > 4 {
        return Err(());
    }
    let len = HEADER + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_RECORD + 2048 {
        return Err(());
    }
    Ok((buf.len() >= len).then_some(len))
}

/// The handshake phase: rustls, fed one record at a time.
pub(crate) struct Setup {
    tcp: TcpStream,
    conn: Connection,
    /// Received bytes not yet given to rustls.
    rbuf: Vec<u8>,
}

impl Setup {
    pub(crate) fn new(tcp: TcpStream, conn: impl Into<Connection>) -> Setup {
        Setup {
            tcp,
            conn: conn.into(),
            rbuf: Vec::new(),
        }
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Runs the handshake to its end (and sends what it leaves queued,
    /// such as the server's session tickets).
    pub(crate) async fn handshake(&mut self) -> io::Result<()> {
        loop {
            self.flush().await?;
            if !self.conn.is_handshaking() {
                return Ok(());
            }
            if !self.feed_one().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed during the TLS handshake",
                ));
            }
        }
    }

    /// Writes whatever rustls has queued.
    async fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.tcp.writable().await?;
            match self.conn.write_tls(&mut TryWrite(&self.tcp)) {
                Ok(_) => {}
                Err(e) if wouldblock(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Hands rustls one complete record, reading from the socket as needed.
    /// `Ok(false)`: the peer closed before another record began.
    async fn feed_one(&mut self) -> io::Result<bool> {
        let len = loop {
            match setup_record_len(&self.rbuf) {
                Ok(Some(len)) => break len,
                Ok(None) => {}
                // Not TLS: rustls reads it and fails with its own error.
                Err(()) => break self.rbuf.len(),
            }
            self.rbuf.reserve(MAX_RECORD);
            self.tcp.readable().await?;
            match self.tcp.try_read_buf(&mut self.rbuf) {
                Ok(0) if self.rbuf.is_empty() => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed in the middle of a TLS record",
                    ));
                }
                Ok(_) => {}
                Err(e) if wouldblock(&e) => {}
                Err(e) => return Err(e),
            }
        };
        let mut rec = &self.rbuf[..len];
        while !rec.is_empty() {
            self.conn.read_tls(&mut rec)?;
        }
        self.rbuf.drain(..len);
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert saying why: send it, best effort.
            let _ = self.flush().await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(true)
    }

    /// Up to `out.len()` bytes of plaintext; 0 when the peer closed
    /// (close_notify or EOF) before sending any.
    pub(crate) async fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if wouldblock(&e) => {}
                Err(e) => return Err(e),
            }
            if !self.feed_one().await? {
                return Ok(0);
            }
        }
    }

    pub(crate) async fn read_exact(&mut self, mut out: &mut [u8]) -> io::Result<()> {
        while !out.is_empty() {
            match self.read(out).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => out = &mut out[n..],
            }
        }
        Ok(())
    }

    pub(crate) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(data)?;
        self.flush().await
    }

    /// Sends `data`, a close_notify and a FIN: the end of a refused tunnel.
    pub(crate) async fn close_with(mut self, data: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(data)?;
        self.conn.send_close_notify();
        self.flush().await?;
        rustix::net::shutdown(&self.tcp, rustix::net::Shutdown::Write)?;
        Ok(())
    }

    /// Hands the connection over to the record layer. Both sides wait for
    /// the other at this point (the client sends nothing after the header
    /// until the reply, the server writes the reply alone), so rustls
    /// holds no plaintext here; if it does, the peer broke the protocol.
    pub(crate) fn into_stream(mut self) -> io::Result<MeshStream> {
        let state = self
            .conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if state.plaintext_bytes_to_read() > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "mesh: the peer sent data before the tunnel was set up",
            ));
        }
        let peer_certificate = self
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let handshake_kind = self.conn.handshake_kind();
        let secrets = self
            .conn
            .dangerous_extract_secrets()
            .map_err(io::Error::other)?;
        let tx = Keys::new(secrets.tx.0, secrets.tx.1)?;
        let rx = Keys::new(secrets.rx.0, secrets.rx.1)?;
        let mut s = MeshStream::new(self.tcp, tx, rx, self.rbuf);
        s.peer_certificate = peer_certificate;
        s.handshake_kind = handshake_kind;
        Ok(s)
    }
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

/// An established mesh tunnel (either end).
#[derive(Debug)]
pub struct MeshStream {
    tcp: TcpStream,
    tx: Keys,
    rx: Keys,
    rx_state: Rx,
    /// Sealed records not yet written (`AsyncWrite`).
    wbuf: Vec<u8>,
    wpos: usize,
    /// close_notify queued.
    write_closed: bool,
    peer_certificate: Option<CertificateDer<'static>>,
    handshake_kind: Option<HandshakeKind>,
}

/// Received bytes: `buf[plain]` is opened plaintext not yet handed out,
/// `buf[start..end]` ciphertext not yet opened.
#[derive(Debug, Default)]
struct Rx {
    buf: Vec<u8>,
    plain: std::ops::Range<usize>,
    start: usize,
    end: usize,
    /// The peer's close_notify arrived.
    closed: bool,
}

impl Rx {
    /// Opens the next complete record, if there is one.
    fn open_next(&mut self, keys: &mut Keys) -> io::Result<Option<Content>> {
        let Some(len) = record::record_len(&self.buf[self.start..self.end])? else {
            return Ok(None);
        };
        let at = self.start;
        let c = record::open_record(keys, &mut self.buf[at..at + len])?;
        self.start += len;
        Ok(Some(match c {
            Content::Data(r) => Content::Data(at + r.start..at + r.end),
            Content::Closed => {
                self.closed = true;
                Content::Closed
            }
        }))
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
            "mesh: the peer closed without close_notify (the stream may be truncated)"
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
                plain: 0..0,
                start: 0,
                end,
                closed: false,
            },
            wbuf: Vec::new(),
            wpos: 0,
            write_closed: false,
            peer_certificate: None,
            handshake_kind: None,
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

    /// The TCP connection under the tunnel.
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
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

    /// Copies `plain` ↔ this tunnel until both directions have passed an
    /// EOF on (close_notify one way, a FIN the other), or either breaks.
    /// `mesh_side`/`plain_side` name the two in errors.
    pub(crate) async fn relay(
        mut self,
        plain: &TcpStream,
        plain_side: Side,
        mesh_side: Side,
        to_mesh: Counters<'_>,
        from_mesh: Counters<'_>,
    ) -> CopyResult {
        // What the AsyncWrite side still holds goes first.
        let pending = std::mem::take(&mut self.wbuf);
        write_all(&self.tcp, &pending[self.wpos..])
            .await
            .map_err(|e| (mesh_side, e))?;
        let MeshStream {
            tcp,
            tx,
            rx,
            rx_state,
            write_closed,
            ..
        } = &mut self;
        if *write_closed {
            return Err((mesh_side, io::ErrorKind::BrokenPipe.into()));
        }
        let ended = AtomicBool::new(false);
        let up = seal_loop(plain, tcp, tx, &ended, plain_side, mesh_side, to_mesh);
        let down = open_loop(
            tcp, plain, rx, rx_state, &ended, mesh_side, plain_side, from_mesh,
        );
        crate::copy::both(up, down).await
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
/// On EOF: close_notify, then a FIN.
async fn seal_loop(
    src: &TcpStream,
    dst: &TcpStream,
    keys: &mut Keys,
    ended: &AtomicBool,
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
        let n = match r {
            Ok(0) => {
                let mut out = Vec::new();
                record::push_close_notify(keys, &mut out).map_err(|e| (dst_side, e))?;
                write_all(dst, &out).await.map_err(|e| (dst_side, e))?;
                return shutdown_write(dst, dst_side, ended);
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
/// write their plaintexts with one `writev`. On close_notify: a FIN.
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    src: &TcpStream,
    dst: &TcpStream,
    keys: &mut Keys,
    rx: &mut Rx,
    ended: &AtomicBool,
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
        while !rx.closed {
            match rx.open_next(keys).map_err(|e| (src_side, e))? {
                Some(Content::Data(r)) if !r.is_empty() => ranges.push(r),
                Some(_) => {}
                None => break,
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
        if rx.closed {
            return shutdown_write(dst, dst_side, ended);
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
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let rx = &mut me.rx_state;
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
            if rx.closed {
                return Poll::Ready(Ok(()));
            }
            match rx.open_next(&mut me.rx)? {
                Some(Content::Data(r)) => {
                    rx.plain = r;
                    continue;
                }
                Some(Content::Closed) => continue,
                None if copied => return Poll::Ready(Ok(())),
                None => {}
            }
            rx.make_room(false);
            let mut rb = ReadBuf::new(&mut rx.buf[rx.end..]);
            ready!(Pin::new(&mut me.tcp).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Err(unexpected_eof(rx.start < rx.end)));
            }
            rx.end += n;
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(me.poll_drain(cx))?;
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if !me.write_closed {
            ready!(me.poll_drain(cx))?;
            record::push_close_notify(&mut me.tx, &mut me.wbuf)?;
            me.write_closed = true;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::mesh::record::tests::configs;

    /// Both ends handshaken over loopback.
    async fn handshaken() -> (Setup, Setup) {
        let (ccfg, scfg, name) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let client = rustls::ClientConnection::new(ccfg, name).expect("client");
        let server = rustls::ServerConnection::new(scfg).expect("server");
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
        s.read_exact(&mut got)
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
        c.read_exact(&mut b).await.expect("client reads the reply");
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
    async fn a_tunnel_cut_without_close_notify_is_an_error_not_an_eof() {
        let (mut c, mut s) = tunnel(b"header").await;
        s.write_all(b"partial").await.expect("write");
        s.flush().await.expect("flush");
        drop(s); // FIN, no close_notify: a truncation
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
        c.read_exact(&mut b).await.expect("reply");
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
        s.read_exact(&mut header).await.expect("header");
        s.write_all(&[0]).await.expect("reply");
        let e = s.into_stream().expect_err("leftover plaintext refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn relay_carries_a_plain_socket_both_ways() {
        let (c, s) = tunnel(b"header").await;
        // The server end relays to a plain TCP peer that echoes.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let echo = tokio::spawn(async move {
            let (mut t, _) = l.accept().await.expect("accept");
            let (mut r, mut w) = t.split();
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
            w.shutdown().await.expect("fin");
        });
        let plain = TcpStream::connect(addr).await.expect("connect");
        let counter = prometheus_client::metrics::counter::Counter::default();
        let relay = tokio::spawn(async move {
            let cnt = Counters {
                svc: &counter,
                ep: None,
            };
            s.relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
                .await
                .map_err(|(side, e)| format!("{side}: {e}"))
        });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(c);
        let send = async {
            for chunk in data.chunks(70_000) {
                w.write_all(chunk).await.expect("send");
            }
            w.shutdown().await.expect("close");
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(send, recv);
        n.expect("clean EOF back through the relay");
        assert_eq!(got, data);
        relay.await.expect("join").expect("relay ended cleanly");
        echo.await.expect("echo");
    }
}
