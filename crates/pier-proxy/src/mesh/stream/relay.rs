//! The data path: [`MeshStream::relay`](super::MeshStream::relay) copies a
//! plain TCP stream ↔ the tunnel, sealing plaintext in record slots and
//! opening records where they were received (the seal and open loops), and
//! the socket helpers for a cut stream (reset on close, the peer's
//! certificate revoked).

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::kernel::{KernelShared, push_key_update, tx_update_due};
use super::{BULK_RECORDS, MeshStream, Next, Rx, SHRINK_AFTER, unexpected_eof};
use crate::Side;
use crate::copy::{CopyResult, Counters, send_fin, wouldblock, write_all};
use crate::mesh::record::{self, APPLICATION_DATA, FULL_RECORD, HEADER, Keys, MAX_PLAIN};
use crate::tls::{PeerCert, Revoked};

impl MeshStream {
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
/// [`crate::mesh::RELOAD_POLL`]) revokes its certificate, or it expires. The
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

pub(crate) async fn write_all_vectored(
    dst: &TcpStream,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
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
pub(crate) async fn seal_loop(
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
pub(crate) async fn open_loop(
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
