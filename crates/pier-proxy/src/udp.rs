//! UDP service ports: per-flow sessions keyed by the client's address.
//!
//! One task per listening socket (a VIP's port, a node port) reads the
//! clients' datagrams. The first datagram of a client picks an endpoint
//! (the balancer, or the session affinity) and opens a *flow*: a connected
//! socket to the endpoint (or a mesh tunnel to its node, which frames the
//! datagrams) and a task that sends the endpoint's replies back from the
//! listening socket, so the client sees them come from the address it sent
//! to. A flow ends after `udp_idle_timeout_ms` without a datagram either
//! way. The socket's own address, the protocol and the client's address
//! make the 5-tuple; the table is per socket, so its key is the client's
//! address.
//!
//! No stale-conntrack blackhole: on every datagram the flow's endpoint is
//! checked against the current balancer (a pointer compare, and a scan of
//! the ready endpoints only when the snapshot changed since the flow's
//! last check). An endpoint that died, was removed, is not ready, or
//! answered with ICMP port unreachable loses its flows, and the next
//! datagram of each opens a flow to a live endpoint.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{EpState, Route, now_ms};
use crate::conn::{Ctx, PortTarget};
use crate::error::ConnectCause;
use crate::limit::{ConnLimiter, Slot};

/// The largest UDP payload (65535 less the IPv4 and UDP headers).
pub(crate) const MAX_DATAGRAM: usize = 65_507;

/// What a UDP listener needs besides its socket.
pub(crate) struct UdpListen {
    pub target: Arc<ArcSwap<PortTarget>>,
    pub ctx: Arc<Ctx>,
    pub flows: TaskTracker,
    pub cancel: CancellationToken,
    pub idle: Duration,
    pub max_flows: usize,
    /// A node port's caps (a flow counts as a connection).
    pub limit: Option<(ConnLimiter, crate::server::RefusalCounter)>,
}

/// Where a flow sends the client's datagrams.
enum Up {
    Direct(Arc<UdpSocket>),
    /// To the flow's task, which writes them into the mesh tunnel; full:
    /// dropped, as a full socket buffer would.
    Mesh(mpsc::Sender<Vec<u8>>),
}

struct Flow {
    id: u64,
    ep: Arc<EpState>,
    up: Up,
    /// [`now_ms`] of the last datagram either way.
    last: Arc<AtomicU64>,
    /// The `PortTarget` the endpoint was last found in.
    checked: usize,
    /// Ends the flow's task.
    cancel: CancellationToken,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Serves one UDP listening socket until cancelled.
pub(crate) async fn serve(sock: UdpSocket, l: UdpListen) {
    let sock = Arc::new(sock);
    let mut table: HashMap<SocketAddr, Flow> = HashMap::new();
    let (gone_tx, mut gone_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Logged once per listener and reason.
    let mut warned = [false; 2];
    loop {
        let (n, client) = tokio::select! {
            _ = l.cancel.cancelled() => break,
            Some((client, id)) = gone_rx.recv() => {
                if table.get(&client).is_some_and(|f| f.id == id) {
                    table.remove(&client);
                }
                continue;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends, ENOBUFS: not fatal.
                    tracing::debug!(error = %e, "udp recv failed");
                    continue;
                }
            },
        };
        let t = l.target.load();
        let tp = Arc::as_ptr(&*t) as usize;
        if let Some(f) = table.get_mut(&client) {
            let alive = !f.ep.drain.is_cancelled()
                && !f.cancel.is_cancelled()
                && (f.checked == tp || t.bal.all.iter().any(|e| Arc::ptr_eq(e, &f.ep)));
            if alive {
                f.checked = tp;
                f.last.store(now_ms(), Relaxed);
                t.m.bytes_in.inc_by(n as u64);
                f.ep.m.bytes_in.inc_by(n as u64);
                match &f.up {
                    // Non-blocking: a full socket buffer drops the datagram,
                    // as the network may.
                    Up::Direct(s) => {
                        if let Err(e) = s.try_send(&buf[..n]) {
                            tracing::trace!(error = %e, "udp send to endpoint dropped");
                        }
                    }
                    Up::Mesh(tx) => {
                        let _ = tx.try_send(buf[..n].to_vec());
                    }
                }
                continue;
            }
            tracing::debug!(service = %t.service, client.addr = %client, endpoint = %f.ep.addr, "udp flow moves: its endpoint is gone");
            table.remove(&client);
        }
        if table.len() >= l.max_flows {
            if !warned[0] {
                warned[0] = true;
                tracing::warn!(service = %t.service, max = l.max_flows, "udp: flow table full (udp_max_flows); new clients' datagrams are dropped until flows go idle; logged once per listener");
            }
            t.m.no_endpoint.inc();
            continue;
        }
        let slot = match &l.limit {
            None => None,
            Some((lim, refusals)) => match lim.try_acquire(client.ip()) {
                Ok(s) => Some(s),
                Err(why) => {
                    refusals.get_or_create(&[("reason", why.as_str())]).inc();
                    if !warned[1] {
                        warned[1] = true;
                        tracing::warn!(client.addr = %client, reason = why.as_str(), "node port: udp flow refused by a cap (node_port_max_conns, node_port_max_conns_per_client); logged once per listener");
                    }
                    continue;
                }
            },
        };
        next_id += 1;
        match open(&l, &t, &sock, client, next_id, slot, gone_tx.clone()).await {
            Some(mut f) => {
                f.checked = tp;
                t.m.bytes_in.inc_by(n as u64);
                f.ep.m.bytes_in.inc_by(n as u64);
                match &f.up {
                    // Awaited: a new socket's writability is not known to
                    // tokio until the driver has polled it, and try_send
                    // would drop the flow's first datagram.
                    Up::Direct(s) => {
                        if let Err(e) = s.send(&buf[..n]).await {
                            tracing::debug!(error = %e, "udp send to endpoint failed");
                        }
                    }
                    Up::Mesh(tx) => {
                        let _ = tx.try_send(buf[..n].to_vec());
                    }
                }
                table.insert(client, f);
            }
            None => {
                tracing::debug!(service = %t.service, client.addr = %client, "udp: no endpoint could take the flow");
            }
        }
    }
    // Dropping the flows cancels their tasks.
    table.clear();
}

/// Opens a flow for `client`: picks an endpoint (another one when a socket
/// or tunnel to it cannot be had) and starts the flow's task.
async fn open(
    l: &UdpListen,
    t: &Arc<PortTarget>,
    sock: &Arc<UdpSocket>,
    client: SocketAddr,
    id: u64,
    slot: Option<Slot>,
    gone: mpsc::UnboundedSender<(SocketAddr, u64)>,
) -> Option<Flow> {
    let ctx = &l.ctx;
    let mut tried = [0usize; crate::MAX_CONNECT_ATTEMPTS as usize];
    let mut n = 0;
    while n < ctx.attempts as usize {
        let Some(ep) = t.pick(client.ip(), &tried[..n]) else {
            break;
        };
        tried[n] = Arc::as_ptr(ep) as usize;
        n += 1;
        let way = match &ep.route {
            Route::Direct => direct_socket(ep.addr).await.map(Way::Direct).map_err(|e| {
                tracing::debug!(endpoint = %ep.addr, error = %e, "udp socket to endpoint failed");
                ConnectCause::of_io(&e)
            }),
            Route::Mesh { peer, node } => match &ctx.mesh {
                Some(mesh) => match tokio::time::timeout(
                    ctx.connect_timeout,
                    mesh.connect_proto(*peer, node, ep.addr, pier_model::Protocol::Udp),
                )
                .await
                {
                    Ok(Ok(s)) => Ok(Way::Mesh(Box::new(s))),
                    Ok(Err(e)) => {
                        tracing::debug!(endpoint = %ep.addr, mesh.peer = %peer, error = %e, "udp: mesh connect failed");
                        Err(ConnectCause::Mesh)
                    }
                    Err(_) => Err(ConnectCause::Timeout),
                },
                None => Err(ConnectCause::Mesh),
            },
        };
        let way = match way {
            Ok(w) => w,
            Err(cause) => {
                ep.m.error(cause).inc();
                t.m.error(cause).inc();
                if let Some(ms) = ep.on_connect_failed(ctx.eject_after, ctx.eject_base_ms) {
                    tracing::info!(service = %t.service, endpoint = %ep.addr, cause = %cause, eject_ms = ms, "endpoint ejected after connect failures");
                }
                continue;
            }
        };
        ep.on_connect_ok(None);
        t.m.total.inc();
        t.m.active.inc();
        ep.m.total.inc();
        ep.m.active.inc();
        let last = Arc::new(AtomicU64::new(now_ms()));
        let cancel = CancellationToken::new();
        let f = FlowTask {
            ep: ep.clone(),
            t: t.clone(),
            ctx: ctx.clone(),
            sock: sock.clone(),
            client,
            last: last.clone(),
            idle: l.idle,
            cancel: cancel.clone(),
        };
        let (up, fut) = match way {
            Way::Direct(s) => {
                let s = Arc::new(s);
                (Up::Direct(s.clone()), Run::Direct(f, s))
            }
            Way::Mesh(m) => {
                // 256 datagrams queued towards the tunnel; more are dropped.
                let (tx, rx) = mpsc::channel(256);
                (Up::Mesh(tx), Run::Mesh(f, m, rx))
            }
        };
        let (t2, ep2) = (t.clone(), ep.clone());
        l.flows.spawn(async move {
            match fut {
                Run::Direct(f, s) => f.direct(s).await,
                Run::Mesh(f, m, rx) => f.mesh(*m, rx).await,
            }
            t2.m.active.dec();
            ep2.m.active.dec();
            drop(slot);
            let _ = gone.send((client, id));
        });
        return Some(Flow {
            id,
            ep: ep.clone(),
            up,
            last,
            checked: 0,
            cancel,
        });
    }
    if n == 0 {
        t.m.no_endpoint.inc();
    }
    None
}

enum Run {
    Direct(FlowTask, Arc<UdpSocket>),
    Mesh(
        FlowTask,
        Box<crate::mesh::MeshStream>,
        mpsc::Receiver<Vec<u8>>,
    ),
}

enum Way {
    Direct(UdpSocket),
    Mesh(Box<crate::mesh::MeshStream>),
}

/// A socket connected to the endpoint, from an ephemeral port.
async fn direct_socket(ep: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match ep {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).await?;
    s.connect(ep).await?;
    Ok(s)
}

/// One flow's replies, back to its client from the listening socket.
struct FlowTask {
    ep: Arc<EpState>,
    t: Arc<PortTarget>,
    ctx: Arc<Ctx>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
    idle: Duration,
    cancel: CancellationToken,
}

impl FlowTask {
    /// Ends when the flow has been idle for `idle`.
    async fn idle_out(&self) {
        let idle_ms = self.idle.as_millis() as u64;
        loop {
            let since = now_ms().saturating_sub(self.last.load(Relaxed));
            if since >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - since)).await;
        }
    }

    /// Until the flow is cancelled (moved, listener gone), its endpoint's
    /// drain ends, or shutdown's grace is over.
    async fn stopped(&self) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.ep.drain.cancelled() => {}
            _ = self.ctx.hard_stop.cancelled() => {}
        }
    }

    async fn reply(&self, d: &[u8]) {
        self.last.store(now_ms(), Relaxed);
        self.t.m.bytes_out.inc_by(d.len() as u64);
        self.ep.m.bytes_out.inc_by(d.len() as u64);
        if let Err(e) = self.sock.send_to(d, self.client).await {
            tracing::debug!(client.addr = %self.client, error = %e, "udp reply to client failed");
        }
    }

    async fn direct(self, up: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let relay = async {
            loop {
                match up.recv(&mut buf).await {
                    Ok(n) => self.reply(&buf[..n]).await,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        // ICMP port unreachable: nothing listens there (the
                        // server died in a live container). The flow ends,
                        // so the client's next datagram goes elsewhere.
                        self.ep.m.error(ConnectCause::Refused).inc();
                        self.t.m.error(ConnectCause::Refused).inc();
                        self.ep
                            .on_connect_failed(self.ctx.eject_after, self.ctx.eject_base_ms);
                        tracing::debug!(endpoint = %self.ep.addr, "udp: endpoint port unreachable; flow ends");
                        self.cancel.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(endpoint = %self.ep.addr, error = %e, "udp recv from endpoint failed");
                        self.cancel.cancel();
                        return;
                    }
                }
            }
        };
        tokio::select! {
            _ = relay => {}
            _ = self.idle_out() => self.cancel.cancel(),
            _ = self.stopped() => {}
        }
    }

    async fn mesh(self, tunnel: crate::mesh::MeshStream, mut rx: mpsc::Receiver<Vec<u8>>) {
        let (mut rd, mut wr) = tokio::io::split(tunnel);
        let to = async {
            while let Some(d) = rx.recv().await {
                if let Err(e) = crate::mesh::write_datagram(&mut wr, &d).await {
                    return e;
                }
            }
            io::Error::other("flow closed")
        };
        let from = async {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match crate::mesh::read_datagram(&mut rd, &mut buf).await {
                    Ok(n) => self.reply(&buf[..n]).await,
                    Err(e) => return e,
                }
            }
        };
        tokio::select! {
            e = to => tracing::debug!(endpoint = %self.ep.addr, error = %e, "udp: mesh flow ended (sending)"),
            e = from => tracing::debug!(endpoint = %self.ep.addr, error = %e, "udp: mesh flow ended (receiving)"),
            _ = self.idle_out() => {}
            _ = self.stopped() => {}
        }
        self.cancel.cancel();
    }
}
