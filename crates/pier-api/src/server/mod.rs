//! The API server. Each job has its own file:
//! - this one: the accept loop ([`serve`]) and the state the handlers share;
//! - `layers`: the tower layers (tracing, Host/Origin/token checks);
//! - `routes`: the routing table, method and path to handler;
//! - `reads` and `writes`: the handlers;
//! - `watch`: `?watch=true` streams;
//! - `validate`: the checks on a write's body;
//! - `plumbing`: error answers, JSON in and out, path and query parsing;
//! - `ui`: the dashboard's pages and its login; `signals`: the traffic and
//!   autoscaler records it charts.
//!
//! A new route is one arm in `routes` and one handler in `reads` or
//! `writes`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use pier_model::now_ms;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{ServiceBuilder, ServiceExt};
use tracing::{debug, info, warn};

use crate::guard::{self, HostCheck, WatchSlots};
use crate::session::Sessions;
use crate::{ApiConfig, ApiError, ApiState};

mod apps;
mod layers;
mod plumbing;
mod reads;
mod routes;
mod signals;
mod ui;
mod validate;
mod watch;
mod writes;

use layers::{Auth, Trace};
use routes::handle;

/// How long open connections may drain after the cancel before they are
/// dropped.
const DRAIN: Duration = Duration::from_secs(5);

struct Inner {
    st: ApiState,
    cancel: CancellationToken,
    /// The open watches, capped.
    watches: Arc<WatchSlots>,
    /// Served without a token (`--insecure-no-auth`).
    insecure: bool,
    /// The dashboard's login codes and sessions.
    sessions: Arc<Sessions>,
}

/// The client's address, put in each request's extensions by the accept
/// loop (for the per-client watch cap).
#[derive(Debug, Clone, Copy)]
struct Peer(std::net::SocketAddr);

/// Serve the API on `listener` until `cancel` fires, then stop accepting,
/// let open requests finish (watches end at once) for up to 5 s, and return.
pub async fn serve(
    cfg: ApiConfig,
    listener: TcpListener,
    state: ApiState,
    cancel: CancellationToken,
) -> Result<(), ApiError> {
    cfg.validate()?;
    let local = listener.local_addr().map_err(|source| ApiError::Serve {
        addr: cfg.listen.to_string(),
        source,
    })?;
    // No token and no explicit opt-out: refuse to serve an open API.
    if cfg.token.is_none() && !cfg.insecure_no_auth {
        return Err(ApiError::Config(
            "token: the API has no token; the agent makes one in its data dir (api-token), or set PIER_TOKEN or [api] token; for development only, --insecure-no-auth serves without one".into(),
        ));
    }
    // The listener, not only the config, decides what is exposed.
    if !local.ip().is_loopback() && cfg.token.is_none() {
        return Err(ApiError::Config(format!(
            "token: the API listener is on {local}, which is not loopback, so it needs a token: set PIER_TOKEN or [api] token"
        )));
    }
    let addr = local.to_string();
    let mut extra = state.host_names.clone();
    extra.extend(cfg.allowed_hosts.iter().cloned());
    let hosts = HostCheck::new(local, &guard::host_addrs(), &extra);
    debug!(hosts = ?hosts.names().collect::<Vec<_>>(), "API Host names");
    let sessions = Arc::new(Sessions::new(local.port()));
    let inner = Arc::new(Inner {
        st: state,
        cancel: cancel.clone(),
        watches: WatchSlots::new(cfg.max_watches, cfg.max_watches_per_client),
        insecure: cfg.insecure_no_auth,
        sessions: sessions.clone(),
    });
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let max_body = cfg.max_body_bytes;
    let svc = ServiceBuilder::new()
        .layer(tower::layer::layer_fn(|s| Trace { inner: s }))
        .layer(tower::layer::layer_fn(|s| Auth {
            inner: s,
            token: cfg.token.as_deref().map(Arc::from),
            hosts: Arc::new(hosts.clone()),
            sessions: sessions.clone(),
        }))
        .timeout(timeout)
        .service_fn(move |req: Request<Incoming>| {
            let inner = inner.clone();
            async move { Ok::<_, Infallible>(handle(inner, req, max_body).await) }
        });

    let tracker = TaskTracker::new();
    if cfg.insecure_no_auth {
        warn!(
            api.addr = %addr,
            "THE API HAS NO AUTHENTICATION (--insecure-no-auth): every local user and every process on this host can change the cluster; use this for development only"
        );
    }
    info!(api.addr = %addr, auth = cfg.token.is_some(), "API listening");
    loop {
        let (io, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let svc = svc.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let hsvc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                svc.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(io), hsvc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                debug!(client.addr = %peer, error = %e, "API connection ended");
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        warn!(
            open = tracker.len(),
            "API connections still open after the drain period; dropping them"
        );
    }
    Ok(())
}
