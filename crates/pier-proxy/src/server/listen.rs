//! Sockets: binding the TCP and UDP listeners (backlog, reuse, transparent
//! VIPs), and the accept loop of one TCP listener with its node-port caps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol as Protocol_, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BACKLOG, RefusalCounter};
use crate::conn::{self, Ctx, PortTarget};
use crate::limit::ConnLimiter;

/// Binds a listener with SO_REUSEADDR, TCP_NODELAY and keepalive (which
/// accepted sockets inherit).
pub(crate) fn bind(a: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol_::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    conn::tune(SockRef::from(&s))?;
    s.bind(&a.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Binds a UDP service port's socket.
pub(crate) fn bind_udp(a: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(a), Type::DGRAM, Some(Protocol_::UDP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.bind(&a.into())?;
    Ok(s.into())
}

/// A node port's caps and where its refusals are counted.
pub(crate) struct Limit {
    pub(crate) limiter: ConnLimiter,
    pub(crate) refusals: RefusalCounter,
}

pub(crate) async fn accept_loop(
    l: TcpListener,
    target: Arc<ArcSwap<PortTarget>>,
    ctx: Arc<Ctx>,
    conns: TaskTracker,
    cancel: CancellationToken,
    limit: Option<Limit>,
) {
    // Logged once per listener and reason, not per refused connection.
    let mut warned: [bool; 2] = [false; 2];
    // One wait for the cancellation, not one per accept: each new one
    // would take the token's lock twice (register, then drop).
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let r = tokio::select! {
            _ = &mut cancelled => return,
            r = l.accept() => r,
        };
        match r {
            Ok((s, peer)) => {
                let slot = match limit.as_ref().map(|lm| lm.limiter.try_acquire(peer.ip())) {
                    None => None,
                    Some(Ok(slot)) => Some(slot),
                    Some(Err(why)) => {
                        let lm = limit.as_ref().expect("Some above");
                        lm.refusals.get_or_create(&[("reason", why.as_str())]).inc();
                        let i = why as usize;
                        if !warned[i] {
                            warned[i] = true;
                            tracing::warn!(client.addr = %peer, reason = why.as_str(), "node port: connection refused by a cap (node_port_max_conns, node_port_max_conns_per_client); logged once per listener");
                        }
                        crate::mesh::reset_on_close(&s);
                        continue;
                    }
                };
                let t = target.load_full();
                let ctx = ctx.clone();
                conns.spawn(async move {
                    conn::serve(ctx, t, s, peer).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = &mut cancelled => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}
