//! The client side of the mesh: handshakes (resumed when possible), a small
//! pool of warm connections per peer, the header and the reply.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pier_model::{Name, Protocol};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::stream::Setup;
use super::{
    DEFAULT_POOL_SIZE, HANDSHAKE_TIMEOUT, MAX_IDLE_TUNNELS, MeshError, MeshStream, POOL_IDLE_MAX,
    RELOAD_POLL, REPLY_OK, REPLY_TIMEOUT, RefusalCode, encode_header_proto, read_exact,
};
use crate::tls::{self, CertReloader, MeshConfig, Revoked};

type Labels = [(&'static str, &'static str); 1];
type PeerKey = (SocketAddr, Name);

#[derive(Debug, Clone, Default)]
struct ClientMetrics {
    handshakes: Family<Labels, Counter>,
    connects: Family<Labels, Counter>,
    pool_hits: Counter,
    reuses: Counter,
    reloads: Family<Labels, Counter>,
}

impl ClientMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_client_handshakes",
            "Completed mesh TLS handshakes as client, by kind (full, resumed)",
            self.handshakes.clone(),
        );
        r.register(
            "mesh_client_connects",
            "Mesh connects (one per proxied connection), by result (ok, refused, error)",
            self.connects.clone(),
        );
        r.register(
            "mesh_client_pool_hits",
            "Mesh connects served by a warm pre-handshaken connection",
            self.pool_hits.clone(),
        );
        r.register(
            "mesh_client_tunnel_reuses",
            "Mesh connects served by a tunnel whose previous stream had ended cleanly (no TCP or TLS handshake)",
            self.reuses.clone(),
        );
        r.register(
            "mesh_client_cert_reloads",
            "Certificate reloads of the mesh client, by result",
            self.reloads.clone(),
        );
    }
}

/// A connection waiting for its next header: fresh from a handshake, or a
/// tunnel whose last stream ended cleanly.
enum Idle {
    Fresh(Setup),
    Reused(MeshStream),
}

impl Idle {
    /// Why it must not carry another stream, if it must not (see
    /// [`MeshStream::retired`]).
    fn retired(&self, revoked: &Revoked) -> Option<&'static str> {
        match self {
            Idle::Reused(t) => t.retired(),
            Idle::Fresh(s) => {
                if s.born().elapsed() >= super::MAX_TUNNEL_AGE {
                    return Some("max_age");
                }
                match s.peer() {
                    Some(p) => p.refusal(revoked),
                    None => Some("no_peer_cert"),
                }
            }
        }
    }
}

struct Pooled {
    since: Instant,
    conn: Idle,
}

/// Dials other nodes' mesh ports. Cheap to clone; clones share the pool,
/// the session cache and the metrics.
#[derive(Clone)]
pub struct MeshConnector {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector")
            .field("node", &self.inner.node)
            .field("pool_size", &self.inner.pool_size)
            .finish_non_exhaustive()
    }
}

struct Inner {
    node: Name,
    certs: CertReloader<ClientConfig>,
    /// The CA's revocation list as last loaded.
    revoked: watch::Receiver<Arc<Revoked>>,
    /// When connects next look at the certificate files. A std Mutex:
    /// `try_lock` on the connect path, no `.await` inside.
    next_reload: Mutex<Instant>,
    pool_size: usize,
    /// A std Mutex: push/pop only, no `.await` inside.
    pool: Mutex<HashMap<PeerKey, VecDeque<Pooled>>>,
    refilling: Mutex<HashSet<PeerKey>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    metrics: ClientMetrics,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl MeshConnector {
    pub fn new(
        cfg: &MeshConfig,
        node: Name,
        registry: &mut Registry,
    ) -> Result<MeshConnector, MeshError> {
        Self::with_pool_size(cfg, node, registry, DEFAULT_POOL_SIZE)
    }

    /// [`MeshConnector::new`] with `pool_size` warm connections per peer
    /// (0 turns the pool off; every connect then handshakes, resuming).
    pub fn with_pool_size(
        cfg: &MeshConfig,
        node: Name,
        registry: &mut Registry,
        pool_size: usize,
    ) -> Result<MeshConnector, MeshError> {
        // 256 sessions: a few tickets for each of up to ~100 peers. One
        // store across renewals of this node's certificate, so sessions
        // resume after one; a new store when the CA or the revocation list
        // changes, so that no session resumes with a peer the new list
        // revokes. A std Mutex: the reloader calls this from one place.
        let sessions: Mutex<Option<(u64, Resumption)>> = Mutex::new(None);
        let metrics = ClientMetrics::default();
        let certs = CertReloader::new(
            cfg,
            node.clone(),
            "client",
            metrics.reloads.clone(),
            move |id| {
                let mut g = sessions.lock().unwrap_or_else(|p| p.into_inner());
                if g.as_ref().is_none_or(|(t, _)| *t != id.trust_id) {
                    *g = Some((id.trust_id, Resumption::in_memory_sessions(256)));
                }
                let (_, r) = g.as_ref().expect("set above");
                tls::client_config(id, r)
            },
        )?;
        metrics.register(registry);
        let revoked = certs.revoked();
        let inner = Arc::new(Inner {
            node,
            certs,
            revoked,
            next_reload: Mutex::new(Instant::now() + RELOAD_POLL),
            pool_size,
            pool: Mutex::new(HashMap::new()),
            refilling: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            metrics,
        });
        // The reload poll: a revocation list that lands on disk cuts the
        // open tunnels to the peers it revokes within RELOAD_POLL, whether
        // or not this node makes new connections.
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak = Arc::downgrade(&inner);
            let cancel = inner.cancel.clone();
            inner.tasks.spawn(async move {
                let mut tick = tokio::time::interval(RELOAD_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    inner.certs.reload_if_changed();
                    inner.prune_all();
                }
            });
        }
        Ok(MeshConnector { inner })
    }

    /// This node's name (the identity in its client certificate).
    pub fn node(&self) -> &Name {
        &self.inner.node
    }

    /// TLS 1.3 to the peer's mesh port (server name = peer node name,
    /// verified against the mesh CA), sends the header naming `target`,
    /// waits for the peer's accept byte, returns the stream ready for
    /// payload.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        peer_node: &Name,
        target: SocketAddr,
    ) -> Result<MeshStream, MeshError> {
        self.connect_proto(peer, peer_node, target, Protocol::Tcp)
            .await
    }

    /// [`connect`](Self::connect) to a target of `proto`: for UDP the
    /// stream carries length-prefixed datagrams (see the module doc).
    pub async fn connect_proto(
        &self,
        peer: SocketAddr,
        peer_node: &Name,
        target: SocketAddr,
        proto: Protocol,
    ) -> Result<MeshStream, MeshError> {
        self.inner.maybe_reload();
        let key = (peer, peer_node.clone());
        let r = self.connect_inner(&key, target, proto).await;
        let result = match &r {
            Ok(_) => "ok",
            Err(MeshError::Refused { .. }) => "refused",
            Err(_) => "error",
        };
        self.inner
            .metrics
            .connects
            .get_or_create(&[("result", result)])
            .inc();
        if r.is_ok() {
            self.refill(key);
        }
        r
    }

    /// Start warming `pool_size` connections to a peer in the background,
    /// e.g. as soon as one of its endpoints shows up, so that the first
    /// proxied connection does not wait for a handshake. A no-op when the
    /// pool is full, already filling, or off.
    pub fn warm(&self, peer: SocketAddr, peer_node: &Name) {
        self.refill((peer, peer_node.clone()));
    }

    async fn connect_inner(
        &self,
        key: &PeerKey,
        target: SocketAddr,
        proto: Protocol,
    ) -> Result<MeshStream, MeshError> {
        while let Some(idle) = self.inner.take_pooled(key) {
            let reused = matches!(idle, Idle::Reused(_));
            match request(idle, key, target, proto, &self.inner.revoked).await {
                Ok(s) => {
                    self.inner.metrics.pool_hits.inc();
                    if reused {
                        self.inner.metrics.reuses.inc();
                    }
                    return Ok(s);
                }
                Err(e @ MeshError::Refused { .. }) => return Err(e),
                // The peer closed it (restart, idle timeout): no payload has
                // been sent, so a fresh connection is safe.
                Err(e) => debug!(error = %e, "mesh: warm connection was stale"),
            }
        }
        let stream = self.inner.handshake(key).await?;
        request(Idle::Fresh(stream), key, target, proto, &self.inner.revoked).await
    }

    /// Returns a tunnel after its stream: if the stream ended cleanly both
    /// ways it waits in the peer's pool for the next connect (up to
    /// [`MAX_IDLE_TUNNELS`], for at most [`POOL_IDLE_MAX`]); otherwise it
    /// is closed. With the pool off, every tunnel is closed.
    pub fn give_back(&self, peer: SocketAddr, peer_node: &Name, mut stream: MeshStream) {
        let inner = &self.inner;
        if inner.pool_size == 0 || inner.cancel.is_cancelled() || !stream.reusable() {
            return;
        }
        stream.release_buffers();
        let revoked = inner.revoked.borrow().clone();
        if let Ok(mut p) = inner.pool.lock() {
            let q = p.entry((peer, peer_node.clone())).or_default();
            prune(q, &revoked);
            if q.len() < MAX_IDLE_TUNNELS {
                q.push_back(Pooled {
                    since: Instant::now(),
                    conn: Idle::Reused(stream),
                });
            }
        }
    }

    /// Top the peer's pool up to `pool_size` in the background.
    fn refill(&self, key: PeerKey) {
        let inner = &self.inner;
        if inner.pool_size == 0 || inner.cancel.is_cancelled() {
            return;
        }
        let have = inner
            .pool
            .lock()
            .map(|p| p.get(&key).map_or(0, VecDeque::len))
            .unwrap_or(0);
        if have >= inner.pool_size {
            return;
        }
        match inner.refilling.lock() {
            Ok(mut r) => {
                if !r.insert(key.clone()) {
                    return;
                }
            }
            Err(_) => return,
        }
        let weak = Arc::downgrade(inner);
        let cancel = inner.cancel.clone();
        inner.tasks.spawn(async move {
            let fill = async {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let have = inner
                        .pool
                        .lock()
                        .map(|p| p.get(&key).map_or(0, VecDeque::len))
                        .unwrap_or(usize::MAX);
                    if have >= inner.pool_size {
                        break;
                    }
                    match inner.handshake(&key).await {
                        Ok(conn) => {
                            if let Ok(mut p) = inner.pool.lock() {
                                p.entry(key.clone()).or_default().push_back(Pooled {
                                    since: Instant::now(),
                                    conn: Idle::Fresh(conn),
                                });
                            }
                        }
                        Err(e) => {
                            debug!(error = %e, "mesh: warming a connection failed");
                            break;
                        }
                    }
                }
            };
            tokio::select! {
                _ = fill => {}
                _ = cancel.cancelled() => {}
            }
            if let Some(inner) = weak.upgrade() {
                if let Ok(mut r) = inner.refilling.lock() {
                    r.remove(&key);
                }
            }
        });
    }

    /// Stop warming connections and close the pooled ones.
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        if let Ok(mut p) = self.inner.pool.lock() {
            p.clear();
        }
    }
}

impl Inner {
    /// The most recently pooled connection (the least likely to have been
    /// closed by the peer); expired ones are dropped on the way.
    fn take_pooled(&self, key: &PeerKey) -> Option<Idle> {
        let revoked = self.revoked.borrow().clone();
        let mut pool = self.pool.lock().ok()?;
        let q = pool.get_mut(key)?;
        prune(q, &revoked);
        q.pop_back().map(|p| p.conn)
    }

    /// Drops every pooled connection that may no longer be used.
    fn prune_all(&self) {
        let revoked = self.revoked.borrow().clone();
        if let Ok(mut pool) = self.pool.lock() {
            for q in pool.values_mut() {
                prune(q, &revoked);
            }
        }
    }

    async fn handshake(&self, (peer, node): &PeerKey) -> Result<Setup, MeshError> {
        let name: ServerName<'static> =
            tls::node_server_name(node).map_err(|_| MeshError::ServerName(node.to_string()))?;
        let handshake_err = |source| MeshError::Handshake {
            peer: *peer,
            node: node.to_string(),
            source,
        };
        let conn = UnbufferedClientConnection::new(self.certs.current(), name)
            .map_err(|e| handshake_err(std::io::Error::other(e)))?;
        let fut = async {
            let tcp = TcpStream::connect(peer)
                .await
                .map_err(|source| MeshError::Connect {
                    peer: *peer,
                    node: node.to_string(),
                    source,
                })?;
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(peer.addr = %peer, error = %e, "mesh: set_nodelay");
            }
            let mut s = Setup::new(tcp, conn);
            s.handshake().await.map_err(handshake_err)?;
            Ok::<_, MeshError>(s)
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
            .await
            .map_err(|_| MeshError::Timeout {
                what: "connecting to",
                peer: *peer,
                node: node.to_string(),
            })??;
        // A resumed session skips the certificate checks of a full
        // handshake: the peer's certificate (the one of the session) is
        // checked against the current revocation list here, every time.
        if let Some(reason) = stream
            .peer()
            .as_ref()
            .map_or(Some("no_peer_cert"), |p| p.refusal(&self.revoked.borrow()))
        {
            return Err(MeshError::PeerRejected {
                peer: *peer,
                node: node.to_string(),
                reason,
            });
        }
        let kind = match stream.common().handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        self.metrics
            .handshakes
            .get_or_create(&[("kind", kind)])
            .inc();
        Ok(stream)
    }

    /// Reload the certificates when the files changed; checked at most every
    /// [`RELOAD_POLL`], by whichever connect gets there first.
    fn maybe_reload(&self) {
        let Ok(mut next) = self.next_reload.try_lock() else {
            return;
        };
        let now = Instant::now();
        if now < *next {
            return;
        }
        *next = now + RELOAD_POLL;
        drop(next);
        self.certs.reload_if_changed();
    }
}

/// Drops pooled connections idle for [`POOL_IDLE_MAX`] (the oldest are
/// at the front), and any whose peer's certificate is now revoked or
/// expired, or which are older than [`super::MAX_TUNNEL_AGE`].
fn prune(q: &mut VecDeque<Pooled>, revoked: &Revoked) {
    while q
        .front()
        .is_some_and(|p| p.since.elapsed() >= POOL_IDLE_MAX)
    {
        q.pop_front();
    }
    q.retain(|p| p.conn.retired(revoked).is_none());
}

/// Send the header, wait for the reply byte (through rustls on a fresh
/// connection, then hand over to the record layer; through the tunnel on
/// a reused one); returns the tunnel, ready for the stream.
async fn request(
    idle: Idle,
    (peer, node): &PeerKey,
    target: SocketAddr,
    proto: Protocol,
    revoked: &watch::Receiver<Arc<Revoked>>,
) -> Result<MeshStream, MeshError> {
    let io = |source| MeshError::Io {
        peer: *peer,
        node: node.to_string(),
        target,
        source,
    };
    let header = encode_header_proto(target, proto);
    // Ok(tunnel) when accepted, Err(code) when refused.
    let fut = async {
        let mut code = [0u8; 1];
        match idle {
            Idle::Fresh(mut s) => {
                s.write_all(&header).await.map_err(io)?;
                read_exact(&mut s, &mut code).await.map_err(io)?;
                if code[0] != REPLY_OK {
                    return Ok::<_, MeshError>(Err(code[0]));
                }
                let mut t = s.into_stream().map_err(io)?;
                t.set_guard(revoked.clone());
                Ok(Ok(t))
            }
            Idle::Reused(mut t) => {
                t.next_stream().map_err(io)?;
                t.write_all(&header).await.map_err(io)?;
                t.flush().await.map_err(io)?;
                t.read_exact(&mut code).await.map_err(io)?;
                Ok((code[0] == REPLY_OK).then_some(t).ok_or(code[0]))
            }
        }
    };
    let reply: Result<MeshStream, u8> =
        tokio::time::timeout(REPLY_TIMEOUT, fut)
            .await
            .map_err(|_| MeshError::Timeout {
                what: "waiting for the reply of",
                peer: *peer,
                node: node.to_string(),
            })??;
    reply.map_err(|code| MeshError::Refused {
        peer: *peer,
        node: node.to_string(),
        target,
        code: RefusalCode::from_byte(code),
    })
}
