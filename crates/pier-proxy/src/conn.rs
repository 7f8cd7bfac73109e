//! One client connection: pick, connect (with retries), optional PROXY
//! header, copy until both sides are done or the endpoint's drain ends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balance::{EpState, Route};
use crate::config::MAX_CONNECT_ATTEMPTS;
use crate::copy::{self, Counters};
use crate::error::{ConnectCause, Side};
use crate::mesh::MeshConnector;
use crate::metrics::{FirstByte, SvcMetrics};
use crate::ppv2;

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub connect_timeout: Duration,
    pub attempts: u32,
    pub eject_after: u32,
    pub eject_base_ms: u64,
    pub splice: bool,
    pub mesh: Option<MeshConnector>,
    /// Cancelled when the shutdown grace period is over.
    pub hard_stop: CancellationToken,
}

/// What a listener hands to its connections: one service port's balancer
/// and settings, replaced as a whole when the snapshot changes.
#[derive(Debug)]
pub(crate) struct PortTarget {
    pub service: Arc<str>,
    pub m: SvcMetrics,
    pub bal: crate::balance::Balancer,
    pub proxy_protocol: bool,
    /// Session affinity by client IP, when the service asks for it.
    pub affinity: Option<Arc<crate::affinity::Affinity>>,
}

impl PortTarget {
    /// The endpoint for a new connection or flow from `client`, not in
    /// `tried`: the session affinity's when the service has one, else the
    /// balancer's.
    pub fn pick(&self, client: std::net::IpAddr, tried: &[usize]) -> Option<&Arc<EpState>> {
        match &self.affinity {
            Some(a) => a.pick(&self.bal, client, tried),
            None => self.bal.pick(tried),
        }
    }
}

/// The stream towards an endpoint: a plain TCP connection keeps splice;
/// the mesh's TLS stream goes through the copy loop.
pub(crate) enum Upstream {
    Direct(TcpStream),
    Mesh(Box<crate::mesh::MeshStream>),
}

/// 60 s idle, then probes every 10 s (the kernel's 9 of them): a dead peer
/// is found in about 2.5 minutes, while a healthy idle connection is never cut.
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
}

/// TCP_NODELAY and keepalive on a socket. Sockets accepted from a listener
/// that has them inherit them (Linux), so only listeners and upstream
/// sockets need this.
pub(crate) fn tune(s: SockRef<'_>) -> io::Result<()> {
    s.set_tcp_nodelay(true)?;
    s.set_tcp_keepalive(&keepalive())
}

/// A non-blocking connect, awaited on writability. tokio's
/// `TcpSocket::connect` reads SO_ERROR after every connect; here the
/// readiness says whether it failed (a refused or timed-out connect comes
/// with EPOLLHUP or EPOLLERR, which tokio reports as write-closed), so the
/// error is read only then: one system call fewer per connection.
async fn connect_direct(addr: SocketAddr) -> io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    tune(SockRef::from(&fd))?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let s = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    let ready = s.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed() {
        return Err(s
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::NotConnected.into()));
    }
    Ok(s)
}

struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);
impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Connects to one endpoint, recording latency, errors and ejection.
///
/// The balancer's latency sample is the whole connect for a direct route,
/// and there is none for a mesh route: what a mesh connect costs depends
/// on the peer's pool (a reused tunnel, a warm connection, a handshake),
/// not on the endpoint, and the header → reply round trip alone is too
/// small to tell endpoints apart from scheduling noise on a busy host.
/// Sampling either let the peer that happened to answer faster once take
/// nearly every sequential connection. Mesh endpoints are balanced by
/// outstanding connections (P2C least-loaded) and ejected on failures.
async fn connect_one(ctx: &Ctx, t: &PortTarget, ep: &EpState) -> Result<Upstream, ConnectCause> {
    let t0 = Instant::now();
    let r = match &ep.route {
        Route::Direct => {
            match tokio::time::timeout(ctx.connect_timeout, connect_direct(ep.addr)).await {
                Ok(Ok(s)) => Ok(Upstream::Direct(s)),
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %ep.addr, error = %e, "connect failed");
                    Err(ConnectCause::of_io(&e))
                }
                Err(_) => Err(ConnectCause::Timeout),
            }
        }
        Route::Mesh { peer, node } => match &ctx.mesh {
            // Boxed: the mesh connect's state (a TLS handshake) is large,
            // and inline it would be part of every connection's task.
            Some(mesh) => {
                match Box::pin(tokio::time::timeout(
                    ctx.connect_timeout,
                    mesh.connect(*peer, node, ep.addr),
                ))
                .await
                {
                    Ok(Ok(s)) => Ok(Upstream::Mesh(Box::new(s))),
                    Ok(Err(e)) => {
                        tracing::debug!(endpoint = %ep.addr, mesh.peer = %peer, error = %e, "mesh connect failed");
                        Err(ConnectCause::Mesh)
                    }
                    Err(_) => Err(ConnectCause::Timeout),
                }
            }
            None => Err(ConnectCause::Mesh),
        },
    };
    match &r {
        Ok(_) => {
            let us = t0.elapsed().as_micros() as u64;
            ep.on_connect_ok(match ep.route {
                Route::Direct => Some(us),
                Route::Mesh { .. } => None,
            });
            let secs = us as f64 / 1e6;
            ep.m.latency.observe(secs);
            t.m.latency.observe(secs);
            t.m.sig.connect.observe(us);
            ep.m.total.inc();
        }
        Err(cause) => {
            ep.m.error(*cause).inc();
            t.m.error(*cause).inc();
            if let Some(ms) = ep.on_connect_failed(ctx.eject_after, ctx.eject_base_ms) {
                tracing::info!(service = %t.service, endpoint = %ep.addr, cause = %cause, eject_ms = ms, "endpoint ejected after connect failures");
            }
        }
    }
    r
}

/// Serves one accepted client connection to the end.
pub(crate) async fn serve(ctx: Arc<Ctx>, t: Arc<PortTarget>, client: TcpStream, peer: SocketAddr) {
    t.m.total.inc();
    t.m.active.inc();
    let _active = GaugeGuard(&t.m.active);

    let mut tried = [0usize; MAX_CONNECT_ATTEMPTS as usize];
    let (mut n, mut from) = (0, 0);
    let mut chosen = None;
    let mut last_timeout = false;
    while n < ctx.attempts as usize {
        let ep = match t.pick(peer.ip(), &tried[from..n]) {
            Some(ep) => ep,
            // Every endpoint tried and the last one timed out (a SYN lost
            // to a full accept queue, say): go round again while attempts
            // remain. A refusal is final.
            None if n > from && last_timeout => {
                from = n;
                match t.pick(peer.ip(), &[]) {
                    Some(ep) => ep,
                    None => break,
                }
            }
            None => break,
        };
        tried[n] = Arc::as_ptr(ep) as usize;
        n += 1;
        ep.m.active.inc();
        match connect_one(&ctx, &t, ep).await {
            Ok(up) => {
                chosen = Some((ep, up));
                break;
            }
            Err(cause) => {
                last_timeout = cause == ConnectCause::Timeout;
                ep.m.active.dec();
            }
        }
    }
    let Some((ep, up)) = chosen else {
        if n == 0 {
            t.m.no_endpoint.inc();
            tracing::debug!(service = %t.service, client.addr = %peer, "no ready endpoint");
        } else {
            tracing::debug!(service = %t.service, client.addr = %peer, attempts = n, "every connect attempt failed");
        }
        return;
    };
    let _ep_active = GaugeGuard(&ep.m.active);

    let fb = FirstByte::new(&t.m.sig, &ep.m.sig);
    let c_in = Counters {
        svc: &t.m.bytes_in,
        ep: Some(&ep.m.bytes_in),
        first_byte: Some((&fb, true)),
    };
    let c_out = Counters {
        svc: &t.m.bytes_out,
        ep: Some(&ep.m.bytes_out),
        first_byte: Some((&fb, false)),
    };
    let mut up = up;
    let work = async {
        match &mut up {
            Upstream::Direct(s) => {
                if t.proxy_protocol {
                    send_proxy_header(&client, peer, s).await?;
                }
                copy::tcp_bidi(&client, s, ctx.splice, c_in, c_out).await
            }
            // Boxed, as the mesh connect above.
            Upstream::Mesh(s) => {
                Box::pin(async {
                    if t.proxy_protocol {
                        send_proxy_header(&client, peer, &mut **s).await?;
                    }
                    s.relay(&client, Side::Downstream, Side::Upstream, c_in, c_out)
                        .await
                })
                .await
            }
        }
    };
    let cut = tokio::select! {
        r = work => match r {
            Ok(()) => false,
            Err((side, e)) => {
                tracing::debug!(service = %t.service, client.addr = %peer, endpoint = %ep.addr, %side, error = %e, "connection ended");
                true
            }
        },
        _ = ep.drain.cancelled() => {
            tracing::debug!(service = %t.service, client.addr = %peer, endpoint = %ep.addr, "drain timeout: closing");
            true
        }
        _ = ctx.hard_stop.cancelled() => true,
    };
    if cut {
        // A connection cut in the middle (an error on either side, a
        // drain or shutdown deadline) ends with a reset on both sides, so
        // that neither client nor endpoint takes it for a clean end.
        crate::mesh::reset_on_close(&client);
        match &up {
            Upstream::Direct(s) => crate::mesh::reset_on_close(s),
            Upstream::Mesh(s) => crate::mesh::reset_on_close(s.get_ref()),
        }
    } else if let (Upstream::Mesh(s), Some(mesh), Route::Mesh { peer, node }) =
        (up, &ctx.mesh, &ep.route)
    {
        // Both directions ended cleanly: the tunnel can carry the next
        // connection to that peer.
        mesh.give_back(*peer, node, *s);
    }
}

async fn send_proxy_header<W: tokio::io::AsyncWrite + Unpin>(
    client: &TcpStream,
    peer: SocketAddr,
    up: &mut W,
) -> copy::CopyResult {
    let dst = client.local_addr().map_err(|e| (Side::Downstream, e))?;
    let mut buf = [0u8; ppv2::MAX_LEN];
    let n = ppv2::encode(peer, dst, &mut buf);
    up.write_all(&buf[..n])
        .await
        .map_err(|e| (Side::Upstream, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every accepted connection's task holds this future, and tokio
    /// copies it when the task is made and again when it ends: the mesh
    /// paths' large states (a TLS handshake, the record relay) are boxed so
    /// that a direct connection does not carry them. It was 8,432 bytes in
    /// a release build with them inline, 2,984 with them boxed.
    #[test]
    fn per_connection_future_stays_small() {
        let n = future_size(serve);
        assert!(
            n <= 4096,
            "conn::serve's future is {n} bytes: box the large, rare branch that grew it"
        );
    }
}
