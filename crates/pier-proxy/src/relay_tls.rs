//! The TLS of pier's watch relays: the relay's listener ([`RelayAcceptor`])
//! and its clients' dialer ([`RelayDialer`]), with the mesh's files, CA,
//! revocation list and reload ([`crate::tls`]).
//!
//! What goes over the connection is `pier_store::relay`'s business; this
//! module only authenticates both ends: the client presents a node
//! certificate of the mesh CA (refused at the handshake otherwise), the
//! relay proves it is a node of the same mesh. The pier binary glues the
//! two (pier-store does not know TLS, this crate does not know the store).
//!
//! A connection whose client certificate is revoked by a reloaded
//! revocation list, or expires, is cut (as the mesh cuts its tunnels); the
//! client then dials again and is refused.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pier_model::Name;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::mesh::{HANDSHAKE_TIMEOUT, RELOAD_POLL};
use crate::tls::{self, CertReloader, MeshConfig, PeerCert};

pub use tokio_rustls::client::TlsStream as ClientTlsStream;
pub use tokio_rustls::server::TlsStream as ServerTlsStream;

/// Handshakes in progress at once on the listener; more connections wait
/// (each bounded by [`HANDSHAKE_TIMEOUT`]).
const MAX_HANDSHAKES: usize = 64;
/// At a stop, how long a connection's `serve` has to say goodbye and close
/// (a relay: a `Closing` frame, then close_notify) before it is dropped.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a dial's TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// While a dial's TCP connect is unanswered, another is started this
/// often: a SYN lost in a cut is sent again by the kernel only after 1 s,
/// then 2 s more, so a dial that straddles the heal would wait out its
/// timeout (in the chaos run with relays: 0.6 s after the heal, with the
/// relay client's 2 s). Only the TCP connect is repeated, never the TLS
/// handshake: a busy relay gets no more handshakes for it.
const CONNECT_AGAIN: Duration = Duration::from_millis(250);

type Labels = [(&'static str, &'static str); 1];

#[derive(Debug, Clone, Default)]
struct Metrics {
    refusals: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    clients: Gauge,
}

/// The relay's TLS listener.
pub struct RelayAcceptor {
    node: Name,
    certs: Arc<CertReloader<ServerConfig>>,
    metrics: Metrics,
}

impl std::fmt::Debug for RelayAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayAcceptor")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl RelayAcceptor {
    /// Loads this node's mesh files (`[mesh]`), checked as the mesh checks
    /// them; registers `relay_*` metrics.
    pub fn new(
        mesh: &MeshConfig,
        node: Name,
        registry: &mut Registry,
    ) -> Result<RelayAcceptor, tls::TlsError> {
        let metrics = Metrics::default();
        let ca = mesh.ca.clone();
        let certs = CertReloader::new(
            mesh,
            node.clone(),
            "relay listener",
            metrics.reloads.clone(),
            move |id| tls::relay_server_config(id, &ca),
        )?;
        registry.register(
            "relay_refusals",
            "Connections the watch relay's listener refused, by reason (client_cert, tls_handshake, handshake_timeout, revoked, peer_cert_expired)",
            metrics.refusals.clone(),
        );
        registry.register(
            "relay_tls_reloads",
            "Reloads of the watch relay listener's certificates and revocation list, by result",
            metrics.reloads.clone(),
        );
        registry.register(
            "relay_clients",
            "Clients connected to this agent's watch relay (after the TLS handshake)",
            metrics.clients.clone(),
        );
        Ok(RelayAcceptor {
            node,
            certs: Arc::new(certs),
            metrics,
        })
    }

    /// Accepts until `cancel`: each connection that completes the TLS
    /// handshake with a valid client certificate is handed to `serve` with
    /// a description of the peer (`node@addr`) for its logs; a refused one
    /// is logged with the peer's address. At `cancel`, each open connection's
    /// `serve` has [`STOP_GRACE`] to end (it sees the stop itself) before it
    /// is dropped, and each one is cut when its client certificate is revoked
    /// (the revocation list reloaded) or expires.
    pub async fn run<F, Fut>(self, listener: TcpListener, cancel: CancellationToken, serve: F)
    where
        F: Fn(ServerTlsStream<TcpStream>, String) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        match listener.local_addr() {
            Ok(a) => {
                info!(relay.addr = %a, node = %self.node, "relay: listening (TLS, mesh client certificates)")
            }
            Err(e) => warn!(error = %e, "relay: listener has no local address"),
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let mut tasks = JoinSet::new();
        let mut reload = tokio::time::interval(RELOAD_POLL);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let conn = Conn {
                            acceptor: tokio_rustls::TlsAcceptor::from(self.certs.current()),
                            revoked: self.certs.revoked(),
                            metrics: self.metrics.clone(),
                            slots: slots.clone(),
                            cancel: cancel.clone(),
                        };
                        tasks.spawn(conn.run(tcp, peer, serve.clone()));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "relay: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = reload.tick() => {
                    self.certs.reload_if_changed();
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        // Each connection has STOP_GRACE to close in order (above).
        let _ = tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.shutdown().await;
    }
}

/// One accepted connection: its handshake, then `serve` until it ends, the
/// listener stops, or the client's certificate stops being valid.
struct Conn {
    acceptor: tokio_rustls::TlsAcceptor,
    revoked: tokio::sync::watch::Receiver<Arc<tls::Revoked>>,
    metrics: Metrics,
    slots: Arc<tokio::sync::Semaphore>,
    cancel: CancellationToken,
}

impl Conn {
    async fn run<F, Fut>(self, tcp: TcpStream, peer: SocketAddr, serve: F)
    where
        F: Fn(ServerTlsStream<TcpStream>, String) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(peer.addr = %peer, error = %e, "relay: set_nodelay");
        }
        let handshake = async {
            let _slot = self.slots.acquire().await;
            self.acceptor.accept(tcp).await
        };
        let accepted = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => r,
            _ = self.cancel.cancelled() => return,
        };
        let stream = match accepted {
            Ok(Ok(s)) => s,
            // Closed before a ClientHello: nothing was asked, nothing
            // refused (a client's extra connect attempt, dropped once
            // another connected; a port check).
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(peer.addr = %peer, "relay: connection closed before its TLS handshake");
                return;
            }
            Ok(Err(e)) => {
                let reason = crate::mesh::handshake_reason(&e);
                self.refuse(reason);
                warn!(peer.addr = %peer, reason, error = %e, "relay: refused: TLS handshake failed");
                return;
            }
            Err(_) => {
                self.refuse("handshake_timeout");
                warn!(peer.addr = %peer, "relay: refused: TLS handshake timed out");
                return;
            }
        };
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(PeerCert::of);
        let Some(cert) = cert else {
            // The verifier requires one; a certificate without a node name.
            self.refuse("client_cert");
            warn!(peer.addr = %peer, "relay: refused: the client certificate names no node");
            return;
        };
        let who = format!("{}@{peer}", cert.node);
        debug!(peer = %who, "relay: client connected");
        self.metrics.clients.inc();
        let serving = serve(stream, who.clone());
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => {}
            why = crate::mesh::peer_cut(&cert, self.revoked.clone()) => {
                self.refuse(why);
                warn!(peer = %who, reason = why, "relay: client cut: its certificate is no longer valid");
            }
            _ = self.cancel.cancelled() => {
                // `serve` sees the stop too: it says goodbye and closes
                // with close_notify, so that the client reopens at once.
                if tokio::time::timeout(STOP_GRACE, &mut serving).await.is_err() {
                    debug!(peer = %who, "relay: client not closed within {STOP_GRACE:?} of the stop; dropped");
                }
            }
        }
        self.metrics.clients.dec();
        debug!(peer = %who, "relay: client gone");
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics
            .refusals
            .get_or_create(&[("reason", reason)])
            .inc();
    }
}

/// The relays' clients' dialer: TCP, then TLS with this node's mesh
/// certificate; the relay must show a node certificate of the same CA.
pub struct RelayDialer {
    certs: CertReloader<ClientConfig>,
}

impl std::fmt::Debug for RelayDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayDialer").finish_non_exhaustive()
    }
}

impl RelayDialer {
    /// Loads this node's mesh files (`[mesh]`), checked as the mesh checks
    /// them. `registry` gets `relay_client_tls_reloads`.
    pub fn new(
        mesh: &MeshConfig,
        node: Name,
        registry: &mut Registry,
    ) -> Result<RelayDialer, tls::TlsError> {
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "relay_client_tls_reloads",
            "Reloads of the watch relay client's certificates and revocation list, by result",
            reloads.clone(),
        );
        let certs = CertReloader::new(mesh, node, "relay client", reloads, |id| {
            tls::relay_client_config(id)
        })?;
        Ok(RelayDialer { certs })
    }

    /// Connects to `addr` (`HOST:PORT`) within [`CONNECT_TIMEOUT`] and makes
    /// the TLS handshake within [`HANDSHAKE_TIMEOUT`]. Returns the stream
    /// and the relay's node name (from its certificate). The error says
    /// which step failed.
    pub async fn dial(&self, addr: &str) -> std::io::Result<(ClientTlsStream<TcpStream>, String)> {
        use std::io::{Error, ErrorKind};
        // A renewed certificate or a new revocation list on disk is picked
        // up by the next dial (a stat of four files: nothing next to a dial).
        self.certs.reload_if_changed();
        let tcp = staggered(CONNECT_AGAIN, CONNECT_TIMEOUT, || TcpStream::connect(addr))
            .await
            .map_err(|e| match e {
                Some(e) => Error::new(e.kind(), format!("connecting to {addr}: {e}")),
                None => Error::new(
                    ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                ),
            })?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(self.certs.current());
        // The name is not checked (see `tls::relay_client_config`) nor sent.
        let name = rustls::pki_types::ServerName::try_from("pier-relay").expect("a DNS name");
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::TimedOut,
                    format!("TLS handshake with {addr} timed out"),
                )
            })?
            .map_err(|e| Error::new(e.kind(), format!("TLS handshake with {addr}: {e}")))?;
        let node = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::peer_node_name)
            .unwrap_or_default();
        Ok((stream, node))
    }
}

/// The first of `attempt()`s to succeed: one at once and another every
/// `every` while none has, within `limit`; the rest are dropped. `Err(Some)`
/// as soon as an attempt failed and none is left in flight (a refused
/// connection fails at once, as a single attempt would); `Err(None)` at
/// `limit`.
async fn staggered<F, Fut, T>(
    every: Duration,
    limit: Duration,
    attempt: F,
) -> Result<T, Option<std::io::Error>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    use futures::StreamExt;
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let mut again = tokio::time::interval(every);
    again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempts = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = &mut deadline => return Err(None),
            _ = again.tick() => attempts.push(attempt()),
            Some(r) = attempts.next(), if !attempts.is_empty() => match r {
                Ok(t) => return Ok(t),
                Err(e) if attempts.is_empty() => return Err(Some(e)),
                Err(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const EVERY: Duration = Duration::from_millis(20);
    const LIMIT: Duration = Duration::from_secs(10);

    /// The first attempt never answers (its SYN lost in a cut); the
    /// second does: the connect succeeds with it, long before the limit
    /// (a single attempt would have waited the limit out).
    #[tokio::test]
    async fn an_unanswered_attempt_is_overtaken_by_the_next() {
        let n = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let got = staggered(EVERY, LIMIT, || {
            let i = n.fetch_add(1, Ordering::SeqCst);
            async move {
                if i == 0 {
                    std::future::pending::<()>().await;
                }
                Ok(i)
            }
        })
        .await;
        assert_eq!(got.ok(), Some(1));
        assert!(started.elapsed() < LIMIT / 2);
    }

    /// A refused connection fails at once, as one attempt would.
    #[tokio::test]
    async fn a_failure_with_nothing_in_flight_is_returned_at_once() {
        let n = AtomicUsize::new(0);
        let got: Result<(), _> = staggered(EVERY, LIMIT, || {
            n.fetch_add(1, Ordering::SeqCst);
            async { Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) }
        })
        .await;
        let e = got.expect_err("refused").expect("the attempt's error");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    /// Nothing answers: `None` at the limit, after an attempt per `every`.
    #[tokio::test]
    async fn nothing_answering_times_out_with_an_attempt_per_interval() {
        let n = AtomicUsize::new(0);
        let got: Result<(), _> = staggered(EVERY, EVERY * 5 + EVERY / 2, || {
            n.fetch_add(1, Ordering::SeqCst);
            std::future::pending()
        })
        .await;
        assert!(matches!(got, Err(None)));
        // 6 on time; fewer when the machine delays the timer.
        assert!((2..=6).contains(&n.load(Ordering::SeqCst)), "{n:?}");
    }
}
