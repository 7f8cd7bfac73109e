//! The mesh listener: mTLS, the target check against the snapshot, then
//! the tunnel to the target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pier_model::{Name, Protocol, Snapshot};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::stream::{MeshStream, Setup, peer_cut, reset_on_close};
use super::{
    DRAIN_TIMEOUT, HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, HeaderError, LocalTargets, MeshError,
    RELOAD_POLL, REPLY_OK, RefusalCode, TARGET_CONNECT_TIMEOUT, read_datagram, read_header_proto,
    write_datagram,
};
use crate::tls::{self, CertReloader, MeshConfig, PeerCert, Revoked, ServerSessionState};

type Labels = [(&'static str, &'static str); 1];

/// At most this many TLS handshakes run at once; more connections wait
/// (within the handshake timeout). 256: a full handshake costs well under
/// a millisecond of CPU, so a flood of unauthenticated connections cannot
/// pile up unbounded work.
const MAX_HANDSHAKES: usize = 256;
/// At most this many connections wait for or run a handshake (the
/// handshake queue); more are reset at accept, before a task or a TLS
/// session is made for them. 1024: four times the handshakes in flight,
/// enough for a burst of real peers' pools, while a flood of idle sockets
/// costs at most 1024 of them for the handshake timeout.
const MAX_PENDING_HANDSHAKES: usize = 1024;

#[derive(Debug, Clone, Default)]
struct ServerMetrics {
    handshakes: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    tunnels_active: Gauge,
    tunnels: Counter,
    reuses: Counter,
    bytes: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    cuts: Family<Labels, Counter>,
}

impl ServerMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_server_handshakes",
            "Completed mesh TLS handshakes as server, by kind (full, resumed)",
            self.handshakes.clone(),
        );
        r.register(
            "mesh_server_refusals",
            "Mesh connections refused, by reason",
            self.refusals.clone(),
        );
        r.register(
            "mesh_server_tunnels_active",
            "Proxied streams currently carried by mesh tunnels on this node",
            self.tunnels_active.clone(),
        );
        r.register(
            "mesh_server_tunnels",
            "Proxied streams carried by mesh tunnels on this node (one per proxied connection)",
            self.tunnels.clone(),
        );
        r.register(
            "mesh_server_tunnel_reuses",
            "Streams that came over a tunnel whose previous stream had ended cleanly (no TCP or TLS handshake)",
            self.reuses.clone(),
        );
        r.register(
            "mesh_server_bytes",
            "Bytes carried by mesh tunnels on this node, by direction (to_target, from_target)",
            self.bytes.clone(),
        );
        r.register(
            "mesh_server_cert_reloads",
            "Certificate reloads of the mesh listener, by result",
            self.reloads.clone(),
        );
        r.register(
            "mesh_server_tunnel_cuts",
            "Open tunnels cut because the peer's certificate was revoked or expired, by reason",
            self.cuts.clone(),
        );
    }
    fn refuse(&self, reason: &'static str) {
        self.refusals.get_or_create(&[("reason", reason)]).inc();
    }
}

/// What the snapshot says about one `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    // Ordered: when several endpoints share an address, the greatest wins.
    OtherNode,
    Static,
    NotReady,
    Ready,
}

/// The addresses of every endpoint's ports as the store has them, built
/// once per snapshot. It only names the reason of a refusal: what the
/// listener relays to comes from its own agent ([`LocalTargets`]).
#[derive(Debug)]
struct Targets {
    snapshot: Arc<Snapshot>,
    map: HashMap<SocketAddr, Verdict>,
}

impl Targets {
    fn build(node: &Name, snapshot: Arc<Snapshot>) -> Targets {
        let mut map = HashMap::new();
        for ((ns, svc), eps) in snapshot.endpoints.iter() {
            let service = snapshot.service(ns, svc);
            for ep in eps.values() {
                let v = if &ep.node != node {
                    Verdict::OtherNode
                } else if ep.is_static {
                    // A static endpoint is reached directly by the node that
                    // checks it; through the mesh it would make this node a
                    // relay to an arbitrary address.
                    Verdict::Static
                } else if ep.ready {
                    Verdict::Ready
                } else {
                    Verdict::NotReady
                };
                let mut add = |port: u16| {
                    let e = map.entry(SocketAddr::new(ep.ip, port)).or_insert(v);
                    if v > *e {
                        *e = v;
                    }
                };
                if ep.ports.is_empty() {
                    // `Endpoint::port_for` falls back to the target port.
                    for sp in service.iter().flat_map(|s| s.ports.iter()) {
                        add(sp.target_port.get());
                    }
                } else {
                    for p in &ep.ports {
                        add(p.port.get());
                    }
                }
            }
        }
        Targets { snapshot, map }
    }
}

/// The mesh listener of one node.
pub struct MeshServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshServer")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    node: Name,
    /// Polled by the accept loop's reload tick.
    certs: CertReloader<ServerConfig>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The ready endpoints this node's agent found in its own Docker.
    local: watch::Receiver<Arc<LocalTargets>>,
    /// The CA's revocation list as last loaded.
    revoked: watch::Receiver<Arc<Revoked>>,
    targets: ArcSwap<Targets>,
    metrics: ServerMetrics,
    handshake_slots: tokio::sync::Semaphore,
    /// Connections accepted whose handshake has not finished.
    pending: std::sync::atomic::AtomicUsize,
    max_pending: usize,
}

/// One place in the handshake queue, freed on drop.
struct Pending(Arc<Inner>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl MeshServer {
    /// Fails with a clear error if a file is missing/unreadable or the cert
    /// is expired/not yet valid.
    ///
    /// `local` is what the listener may relay to: the `ip:port`s of the
    /// ready endpoints this node's agent found in its own Docker (never the
    /// store's view, which anyone with write access to the store could
    /// forge). `snapshot` gives the cluster's nodes (a peer's certificate
    /// must name one) and the reason of a refusal.
    pub fn new(
        cfg: &MeshConfig,
        node: Name,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        local: watch::Receiver<Arc<LocalTargets>>,
        registry: &mut Registry,
    ) -> Result<MeshServer, MeshError> {
        // One ticketer and session store across renewals of this node's
        // certificate, so that tickets issued before still resume after;
        // a new one when the CA or the revocation list changes, so that no
        // session resumes past a check it would now fail. A std Mutex: the
        // reloader calls this from one place, no `.await` inside.
        let sessions: std::sync::Mutex<Option<(u64, ServerSessionState)>> =
            std::sync::Mutex::new(None);
        let metrics = ServerMetrics::default();
        let ca = cfg.ca.clone();
        let certs = CertReloader::new(
            cfg,
            node.clone(),
            "listener",
            metrics.reloads.clone(),
            move |id| {
                let mut g = sessions.lock().unwrap_or_else(|p| p.into_inner());
                if g.as_ref().is_none_or(|(t, _)| *t != id.trust_id) {
                    if g.is_some() {
                        info!("mesh: the CA or the revocation list changed; new session tickets");
                    }
                    *g = Some((id.trust_id, ServerSessionState::new()?));
                }
                let (_, st) = g.as_ref().expect("set above");
                tls::server_config(id, &ca, st)
            },
        )?;
        let revoked = certs.revoked();
        metrics.register(registry);
        let first = snapshot.borrow().clone();
        let targets = Targets::build(&node, first);
        Ok(MeshServer {
            inner: Arc::new(Inner {
                node,
                certs,
                snapshot,
                local,
                revoked,
                targets: ArcSwap::new(Arc::new(targets)),
                metrics,
                handshake_slots: tokio::sync::Semaphore::new(MAX_HANDSHAKES),
                pending: std::sync::atomic::AtomicUsize::new(0),
                max_pending: MAX_PENDING_HANDSHAKES,
            }),
        })
    }

    /// Caps other than the defaults (for tests): handshakes in flight, and
    /// connections queued for or in a handshake.
    pub fn with_handshake_limits(mut self, in_flight: usize, pending: usize) -> MeshServer {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.handshake_slots = tokio::sync::Semaphore::new(in_flight.max(1));
            inner.max_pending = pending.max(1);
        }
        self
    }

    /// Accept mesh connections until `cancel`; then stop accepting, give
    /// open tunnels [`DRAIN_TIMEOUT`] to finish, and cut the rest.
    pub async fn serve(
        self,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> Result<(), MeshError> {
        let local = listener.local_addr().map_err(MeshError::Listener)?;
        info!(mesh.addr = %local, node = %self.inner.node, "mesh: listening");
        let mut tasks = JoinSet::new();
        let mut reload = tokio::time::interval(RELOAD_POLL);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let Some(pending) = self.inner.enter_queue() else {
                            let n = self.inner.metrics.refusals
                                .get_or_create(&[("reason", "handshake_queue_full")]);
                            n.inc();
                            // Logged at 1, 2, 4, 8, ... refusals: a flood
                            // does not flood the log.
                            if n.get().is_power_of_two() {
                                warn!(peer.addr = %peer, refused = n.get(), max = self.inner.max_pending, "mesh: refused: the handshake queue is full");
                            }
                            super::stream::reset_on_close(&tcp);
                            continue;
                        };
                        let inner = self.inner.clone();
                        let cancel = cancel.clone();
                        tasks.spawn(async move { inner.handle(tcp, peer, cancel, pending).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "mesh: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                _ = reload.tick() => {
                    self.inner.certs.reload_if_changed();
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        let open = tasks.len();
        if open > 0 {
            debug!(open, "mesh: draining tunnels");
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!(
                    open = tasks.len(),
                    "mesh: cutting tunnels after the drain timeout"
                );
            }
            tasks.shutdown().await;
        }
        Ok(())
    }
}

impl Inner {
    /// Whether `target` is a ready endpoint this node's agent found in its
    /// own Docker; if not, why (from the snapshot, for the log).
    fn check(&self, target: SocketAddr) -> Result<(), (RefusalCode, &'static str)> {
        if self.local.borrow().contains(&target) {
            return Ok(());
        }
        let snap = self.snapshot.borrow().clone();
        let mut t = self.targets.load_full();
        if !Arc::ptr_eq(&t.snapshot, &snap) {
            t = Arc::new(Targets::build(&self.node, snap));
            self.targets.store(t.clone());
        }
        match t.map.get(&target) {
            // The store says so, this node's agent does not: a forged or
            // stale entry.
            Some(Verdict::Ready) => Err((RefusalCode::NotLocalEndpoint, "not_in_local_view")),
            Some(Verdict::NotReady) => Err((RefusalCode::NotReady, "not_ready")),
            Some(Verdict::Static) => Err((RefusalCode::NotLocalEndpoint, "static_endpoint")),
            Some(Verdict::OtherNode) => Err((RefusalCode::NotLocalEndpoint, "other_node")),
            None => Err((RefusalCode::NotLocalEndpoint, "not_an_endpoint")),
        }
    }

    /// A peer whose certificate the CA signed must still name a node of
    /// the cluster (a certificate issued for a node since removed, or for
    /// a name never used, gets no relay), and must not be revoked or
    /// expired. Checked after every handshake, resumed ones included (a
    /// resumed session skips the certificate checks of a full handshake).
    fn authorize_peer(&self, peer: Option<&PeerCert>) -> Result<(), &'static str> {
        let Some(peer) = peer else {
            return Err("no_peer_cert");
        };
        let known = Name::new(&peer.node)
            .ok()
            .is_some_and(|n| self.snapshot.borrow().nodes.contains_key(&n));
        if !known {
            return Err("unknown_node");
        }
        if let Some(why) = peer.refusal(&self.revoked.borrow()) {
            return Err(why);
        }
        Ok(())
    }

    /// A place in the handshake queue, if there is one.
    fn enter_queue(self: &Arc<Self>) -> Option<Pending> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.pending.fetch_add(1, Relaxed);
        let p = Pending(self.clone());
        (n < self.max_pending).then_some(p)
    }

    async fn handle(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        cancel: CancellationToken,
        pending: Pending,
    ) {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(peer.addr = %peer, error = %e, "mesh: set_nodelay");
        }
        let slot = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake_slots.acquire()) => r,
            _ = cancel.cancelled() => return,
        };
        let Ok(Ok(slot)) = slot else {
            self.metrics.refuse("overloaded");
            warn!(peer.addr = %peer, "mesh: refused: too many handshakes in progress");
            return;
        };
        let mut tls = match UnbufferedServerConnection::new(self.certs.current()) {
            Ok(c) => Setup::new(tcp, c),
            Err(e) => {
                warn!(peer.addr = %peer, error = %e, "mesh: cannot start a TLS session");
                return;
            }
        };
        let accepted = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.handshake()) => r,
            _ = cancel.cancelled() => return,
        };
        drop(slot);
        drop(pending);
        match accepted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let reason = handshake_reason(&e);
                self.metrics.refuse(reason);
                warn!(peer.addr = %peer, reason, error = %e, "mesh: refused: TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.refuse("handshake_timeout");
                warn!(peer.addr = %peer, "mesh: refused: TLS handshake timed out");
                return;
            }
        }
        let peer_cert = tls.peer().cloned();
        let (peer_node, kind) = {
            let conn = tls.common();
            let node = peer_cert
                .as_ref()
                .map(|p| p.node.clone())
                .unwrap_or_else(|| "?".to_owned());
            let kind = match conn.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => "resumed",
                _ => "full",
            };
            (node, kind)
        };
        self.metrics
            .handshakes
            .get_or_create(&[("kind", kind)])
            .inc();
        if let Err(reason) = self.authorize_peer(peer_cert.as_deref()) {
            self.metrics.refuse(reason);
            warn!(peer.addr = %peer, peer.node = %peer_node, reason, "mesh: refused: the peer's certificate is not allowed");
            Conn::Setup(tls).refuse(RefusalCode::PeerNotAllowed).await;
            return;
        }

        let Some(peer_cert) = peer_cert else { return };

        // The first stream's header comes through rustls; once a stream
        // has ended cleanly, the tunnel carries the next one.
        let mut conn = Conn::Setup(tls);
        loop {
            let header = tokio::select! {
                r = tokio::time::timeout(HEADER_TIMEOUT, conn.read_header()) => r,
                why = peer_cut(&peer_cert, self.revoked.clone()) => {
                    self.metrics.cuts.get_or_create(&[("reason", why)]).inc();
                    warn!(peer.addr = %peer, peer.node = %peer_node, reason = why, "mesh: idle tunnel closed: the peer's certificate is no longer valid");
                    reset_on_close(conn.tcp());
                    return;
                }
                _ = cancel.cancelled() => return,
            };
            let (target, proto) = match header {
                Ok(Ok(t)) => t,
                Ok(Err(HeaderError::Closed)) => {
                    debug!(peer.addr = %peer, peer.node = %peer_node, "mesh: closed before a header (unused warm connection)");
                    return;
                }
                Ok(Err(HeaderError::Io(e))) => {
                    debug!(peer.addr = %peer, peer.node = %peer_node, error = %e, "mesh: read header");
                    return;
                }
                Ok(Err(HeaderError::Bad(why))) => {
                    self.metrics.refuse("bad_header");
                    warn!(peer.addr = %peer, peer.node = %peer_node, why, "mesh: refused: bad header");
                    conn.refuse(RefusalCode::BadHeader).await;
                    return;
                }
                Err(_) => {
                    debug!(peer.addr = %peer, peer.node = %peer_node, "mesh: no header in time (idle warm connection)");
                    return;
                }
            };

            if let Err((code, reason)) = self.check(target) {
                self.metrics.refuse(reason);
                warn!(
                    peer.addr = %peer, peer.node = %peer_node, target = %target, reason,
                    "mesh: refused: target is not a ready endpoint of this node"
                );
                conn.refuse(code).await;
                return;
            }

            if proto == Protocol::Udp {
                self.relay_udp(conn, peer, &peer_node, target).await;
                return;
            }

            let upstream = match tokio::time::timeout(
                TARGET_CONNECT_TIMEOUT,
                TcpStream::connect(target),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.metrics.refuse("connect_failed");
                    warn!(peer.addr = %peer, peer.node = %peer_node, target = %target, error = %e, "mesh: connect to target failed");
                    conn.refuse(RefusalCode::ConnectFailed).await;
                    return;
                }
                Err(_) => {
                    self.metrics.refuse("connect_failed");
                    warn!(peer.addr = %peer, peer.node = %peer_node, target = %target, "mesh: connect to target timed out");
                    conn.refuse(RefusalCode::ConnectFailed).await;
                    return;
                }
            };

            if let Err(e) = upstream.set_nodelay(true) {
                debug!(target = %target, error = %e, "mesh: set_nodelay");
            }
            let mut tunnel = match conn.accept().await {
                Ok(mut t) => {
                    t.set_guard(self.revoked.clone());
                    t
                }
                Err(e) => {
                    debug!(peer.addr = %peer, peer.node = %peer_node, error = %e, "mesh: write reply");
                    return;
                }
            };
            if tunnel.streams() > 1 {
                self.metrics.reuses.inc();
            }

            self.metrics.tunnels.inc();
            self.metrics.tunnels_active.inc();
            debug!(peer.addr = %peer, peer.node = %peer_node, target = %target, "mesh: tunnel open");
            // Counted as they flow, so a long tunnel shows up while it lasts.
            let to_target = self
                .metrics
                .bytes
                .get_or_create_owned(&[("direction", "to_target")]);
            let from_target = self
                .metrics
                .bytes
                .get_or_create_owned(&[("direction", "from_target")]);
            let r = tunnel
                .relay(
                    &upstream,
                    crate::Side::Upstream,
                    crate::Side::Downstream,
                    crate::copy::Counters {
                        svc: &from_target,
                        ep: None,
                        first_byte: None,
                    },
                    crate::copy::Counters {
                        svc: &to_target,
                        ep: None,
                        first_byte: None,
                    },
                )
                .await;
            self.metrics.tunnels_active.dec();
            drop(upstream);
            match r {
                Ok(()) => {
                    debug!(peer.addr = %peer, target = %target, "mesh: stream ended");
                }
                Err((side, e)) => {
                    let side = if side == crate::Side::Downstream {
                        "mesh peer"
                    } else {
                        "target"
                    };
                    if e.kind() == std::io::ErrorKind::ConnectionAborted
                        && let Some(why) = tunnel.retired()
                    {
                        self.metrics.cuts.get_or_create(&[("reason", why)]).inc();
                        warn!(peer.addr = %peer, peer.node = %peer_node, target = %target, reason = why, "mesh: tunnel cut: the peer's certificate is no longer valid");
                    } else {
                        debug!(peer.addr = %peer, target = %target, side, error = %e, "mesh: tunnel ended with an error");
                    }
                    return;
                }
            }
            if cancel.is_cancelled() || tunnel.next_stream().is_err() {
                return;
            }
            tunnel.release_buffers();
            conn = Conn::Tunnel(tunnel);
        }
    }
}

impl Inner {
    /// A UDP target's stream: datagrams both ways between the tunnel and a
    /// socket connected to the target, until either side ends (the client
    /// closes the tunnel when its flow goes idle). Not reused.
    async fn relay_udp(&self, conn: Conn, peer: SocketAddr, peer_node: &str, target: SocketAddr) {
        let any: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = match tokio::net::UdpSocket::bind(any).await {
            Ok(s) => match s.connect(target).await {
                Ok(()) => s,
                Err(e) => {
                    self.metrics.refuse("connect_failed");
                    warn!(peer.addr = %peer, peer.node = %peer_node, target = %target, error = %e, "mesh: udp connect to target failed");
                    conn.refuse(RefusalCode::ConnectFailed).await;
                    return;
                }
            },
            Err(e) => {
                self.metrics.refuse("connect_failed");
                warn!(peer.addr = %peer, error = %e, "mesh: cannot open a udp socket");
                conn.refuse(RefusalCode::ConnectFailed).await;
                return;
            }
        };
        let mut tunnel = match conn.accept().await {
            Ok(t) => t,
            Err(e) => {
                debug!(peer.addr = %peer, peer.node = %peer_node, error = %e, "mesh: write reply");
                return;
            }
        };
        tunnel.set_guard(self.revoked.clone());
        self.metrics.tunnels.inc();
        self.metrics.tunnels_active.inc();
        let to_target = self
            .metrics
            .bytes
            .get_or_create_owned(&[("direction", "to_target")]);
        let from_target = self
            .metrics
            .bytes
            .get_or_create_owned(&[("direction", "from_target")]);
        let (mut rd, mut wr) = tokio::io::split(tunnel);
        let sock = &sock;
        let to = async {
            let mut buf = vec![0u8; crate::udp::MAX_DATAGRAM];
            loop {
                let n = read_datagram(&mut rd, &mut buf).await?;
                to_target.inc_by(n as u64);
                // Awaited (a new socket's writability is unknown to tokio
                // until polled); an error (ICMP unreachable) is the
                // target's, and ends nothing: the next datagram may pass.
                if let Err(e) = sock.send(&buf[..n]).await {
                    debug!(target = %target, error = %e, "mesh: udp send to target failed");
                }
            }
        };
        let from = async {
            let mut buf = vec![0u8; crate::udp::MAX_DATAGRAM];
            loop {
                let n = sock.recv(&mut buf).await?;
                from_target.inc_by(n as u64);
                write_datagram(&mut wr, &buf[..n]).await?;
            }
        };
        let r: std::io::Result<()> = tokio::select! {
            r = to => r,
            r = from => r,
        };
        self.metrics.tunnels_active.dec();
        if let Err(e) = r {
            debug!(peer.addr = %peer, target = %target, error = %e, "mesh: udp stream ended");
        }
    }
}

/// A connection between streams: before the first (rustls still has it),
/// or an established tunnel whose last stream ended cleanly.
enum Conn {
    Setup(Setup),
    Tunnel(MeshStream),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Setup(s) => s.tcp(),
            Conn::Tunnel(t) => t.get_ref(),
        }
    }

    async fn read_header(&mut self) -> Result<(SocketAddr, Protocol), HeaderError> {
        match self {
            Conn::Setup(s) => read_header_proto(s).await,
            Conn::Tunnel(t) => read_header_proto(t).await,
        }
    }

    /// The accept byte; the tunnel, ready for the stream.
    async fn accept(self) -> std::io::Result<MeshStream> {
        match self {
            Conn::Setup(mut s) => {
                s.write_all(&[REPLY_OK]).await?;
                s.into_stream()
            }
            Conn::Tunnel(mut t) => {
                t.write_all(&[REPLY_OK]).await?;
                t.flush().await?;
                Ok(t)
            }
        }
    }

    /// The refusal code, then the end of the connection.
    async fn refuse(self, code: RefusalCode) {
        let r = match self {
            Conn::Setup(s) => s.close_with(&[code as u8]).await,
            Conn::Tunnel(mut t) => {
                let r = async {
                    t.write_all(&[code as u8]).await?;
                    t.flush().await
                }
                .await;
                t.close().await;
                r
            }
        };
        if let Err(e) = r {
            debug!(error = %e, "mesh: write refusal");
        }
    }
}

/// The metric reason of a failed handshake: a rejected client certificate,
/// or anything else (plaintext, wrong protocol, reset).
pub(crate) fn handshake_reason(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)
            | rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        ) => "client_cert",
        _ => "tls_handshake",
    }
}
