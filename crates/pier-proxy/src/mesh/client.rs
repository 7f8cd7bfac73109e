//! The client side of the mesh: handshakes (resumed when possible), a small
//! pool of warm connections per peer, the header and the reply.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pier_model::Name;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::stream::Setup;
use super::{
    DEFAULT_POOL_SIZE, HANDSHAKE_TIMEOUT, MAX_IDLE_TUNNELS, MeshError, MeshStream, POOL_IDLE_MAX,
    RELOAD_POLL, REPLY_OK, REPLY_TIMEOUT, RefusalCode, encode_header, read_exact,
};
use crate::tls::{self, CertReloader, MeshConfig};

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
        // 256 sessions: a few tickets for each of up to ~100 peers; one
        // store across reloads, so sessions resume after a renewal.
        let resumption = Resumption::in_memory_sessions(256);
        let metrics = ClientMetrics::default();
        let certs = CertReloader::new(
            cfg,
            node.clone(),
            "client",
            metrics.reloads.clone(),
            move |id| tls::client_config(id, &resumption),
        )?;
        metrics.register(registry);
        Ok(MeshConnector {
            inner: Arc::new(Inner {
                node,
                certs,
                next_reload: Mutex::new(Instant::now() + RELOAD_POLL),
                pool_size,
                pool: Mutex::new(HashMap::new()),
                refilling: Mutex::new(HashSet::new()),
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                metrics,
            }),
        })
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
        self.inner.maybe_reload();
        let key = (peer, peer_node.clone());
        let r = self.connect_inner(&key, target).await;
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
    ) -> Result<MeshStream, MeshError> {
        while let Some(idle) = self.inner.take_pooled(key) {
            let reused = matches!(idle, Idle::Reused(_));
            match request(idle, key, target).await {
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
        request(Idle::Fresh(stream), key, target).await
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
        if let Ok(mut p) = inner.pool.lock() {
            let q = p.entry((peer, peer_node.clone())).or_default();
            prune(q);
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
        let mut pool = self.pool.lock().ok()?;
        let q = pool.get_mut(key)?;
        prune(q);
        q.pop_back().map(|p| p.conn)
    }

    async fn handshake(&self, (peer, node): &PeerKey) -> Result<Setup, MeshError> {
        let name: ServerName<'static> =
            tls::node_server_name(node).map_err(|_| MeshError::ServerName(node.to_string()))?;
        let handshake_err = |source| MeshError::Handshake {
            peer: *peer,
            node: node.to_string(),
            source,
        };
        let conn = ClientConnection::new(self.certs.current(), name)
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
        let kind = match stream.conn().handshake_kind() {
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

/// Drops pooled connections older than [`POOL_IDLE_MAX`] (the oldest are
/// at the front).
fn prune(q: &mut VecDeque<Pooled>) {
    while q
        .front()
        .is_some_and(|p| p.since.elapsed() >= POOL_IDLE_MAX)
    {
        q.pop_front();
    }
}

/// Send the header, wait for the reply byte (through rustls on a fresh
/// connection, then hand over to the record layer; through the tunnel on
/// a reused one); returns the tunnel, ready for the stream.
async fn request(
    idle: Idle,
    (peer, node): &PeerKey,
    target: SocketAddr,
) -> Result<MeshStream, MeshError> {
    let io = |source| MeshError::Io {
        peer: *peer,
        node: node.to_string(),
        target,
        source,
    };
    let header = encode_header(target);
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
                Ok(Ok(s.into_stream().map_err(io)?))
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
