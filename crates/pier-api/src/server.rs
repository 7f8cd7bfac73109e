//! The API server: the accept loop, the tower layers and the handlers.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use pier_model::api::{
    ErrorBody, ExposeRequest, Problem, Readiness, Resource, ScaleRequest, StoreFreshness,
    VersionInfo, WatchEventType,
};
use pier_model::{
    Labels, Name, Namespace, ReplicaSet, Service, ServicePort, Snapshot, decode, encode, keys,
    labels,
};
use pier_store::alloc::{self, AllocError};
use pier_store::{Compare, StoreError, Txn, TxnOp};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{BoxError, Service as TowerService, ServiceBuilder, ServiceExt};
use tracing::{debug, info, warn};

use crate::guard::{self, HostCheck, WatchSlot, WatchSlots};
use crate::views::{self, Filter};
use crate::{ApiConfig, ApiError, ApiState};

pub(crate) type Body = BoxBody<Bytes, Infallible>;
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How often a scale retries a revision conflict before answering 409.
const SCALE_ATTEMPTS: u32 = 16;
/// How long a read waits for the first snapshot before answering 503.
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// How long a write waits for its own change to reach the snapshot, so that
/// a `get` right after a `run` shows it. A lagging reflector only delays the
/// answer; the write has happened.
const READ_YOUR_WRITE_WAIT: Duration = Duration::from_secs(2);
/// 30 s between blank lines on an idle watch.
const WATCH_HEARTBEAT: Duration = Duration::from_secs(30);
/// How long open connections may drain after the cancel before they are
/// dropped.
const DRAIN: Duration = Duration::from_secs(5);

struct Inner {
    st: ApiState,
    cancel: CancellationToken,
    /// Held from a scale's read to its compare-and-swap: scales sent to this
    /// server take turns instead of racing each other's revision (one
    /// client winning every round could make the other fail all its
    /// attempts). Scales through other hosts' APIs still meet the
    /// compare-and-swap and its retries.
    scale_turn: tokio::sync::Mutex<()>,
    /// The open watches, capped.
    watches: Arc<WatchSlots>,
    /// Served without a token (`--insecure-no-auth`).
    insecure: bool,
}

/// The client's address, put in each request's extensions by the accept
/// loop (for the per-client watch cap).
#[derive(Debug, Clone, Copy)]
struct Peer(std::net::SocketAddr);

/// An error answer.
#[derive(Debug)]
struct Fail {
    status: StatusCode,
    message: String,
}

impl Fail {
    fn new(status: StatusCode, message: impl Into<String>) -> Fail {
        Fail {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Fail {
        Fail::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Fail {
        Fail::new(StatusCode::NOT_FOUND, message)
    }
    fn conflict(message: impl Into<String>) -> Fail {
        Fail::new(StatusCode::CONFLICT, message)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        match e {
            StoreError::Unavailable(_) | StoreError::Closed => Fail::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; reads still answer from the last snapshot, writes need the store"),
            ),
            StoreError::Invalid(_) => Fail::bad(e.to_string()),
            _ => Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<AllocError> for Fail {
    fn from(e: AllocError) -> Fail {
        match e {
            AllocError::Store(s) => s.into(),
            AllocError::Invalid(_) => Fail::bad(e.to_string()),
            AllocError::NotFound => Fail::not_found(e.to_string()),
            AllocError::AlreadyExists(_)
            | AllocError::Exhausted(_)
            | AllocError::NodePortTaken { .. }
            | AllocError::Conflict(_) => Fail::conflict(e.to_string()),
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut b = serde_json::to_vec(v).expect("API responses serialize to JSON");
    b.push(b'\n');
    full(status, "application/json", b)
}

fn fail_response(f: Fail) -> Response<Body> {
    json(f.status, &ErrorBody { error: f.message })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
    let inner = Arc::new(Inner {
        st: state,
        cancel: cancel.clone(),
        scale_turn: tokio::sync::Mutex::new(()),
        watches: WatchSlots::new(cfg.max_watches, cfg.max_watches_per_client),
        insecure: cfg.insecure_no_auth,
    });
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let max_body = cfg.max_body_bytes;
    let svc = ServiceBuilder::new()
        .layer(tower::layer::layer_fn(|s| Trace { inner: s }))
        .layer(tower::layer::layer_fn(|s| Auth {
            inner: s,
            token: cfg.token.as_deref().map(Arc::from),
            hosts: Arc::new(hosts.clone()),
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

/// Logs every request with its status and latency; turns a layer error (a
/// timeout) into an answer.
#[derive(Clone)]
struct Trace<S> {
    inner: S,
}

impl<S> TowerService<Request<Incoming>> for Trace<S>
where
    S: TowerService<Request<Incoming>, Response = Response<Body>, Error = BoxError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner services are always ready (no concurrency limit).
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(e) if e.is::<tower::timeout::error::Elapsed>() => fail_response(Fail::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the request took too long (request_timeout_ms); the store may be slow or down",
                )),
                Err(e) => fail_response(Fail::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("internal error: {e}"),
                )),
            };
            let status = resp.status().as_u16();
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            if resp.status().is_server_error() {
                warn!(http.method = %method, http.path = %path, http.status = status, elapsed_ms = ms, "API request failed");
            } else {
                debug!(http.method = %method, http.path = %path, http.status = status, elapsed_ms = ms, "API request");
            }
            Ok(resp)
        })
    }
}

/// Checks, in order: the Host header (421, against DNS rebinding) and the
/// Origin header (403, against cross-site requests) on everything but the
/// health probes; the Content-Type of writes (415); then the bearer token
/// on everything but the health probes (401).
#[derive(Clone)]
struct Auth<S> {
    inner: S,
    token: Option<Arc<str>>,
    hosts: Arc<HostCheck>,
}

/// The refusal of a request by its headers, if any.
fn check_headers(hosts: &HostCheck, req: &Request<Incoming>) -> Option<Fail> {
    let open = matches!(req.uri().path(), "/healthz" | "/readyz");
    let h = req.headers();
    let text = |v: &HeaderValue| {
        String::from_utf8_lossy(v.as_bytes())
            .chars()
            .take(100)
            .collect::<String>()
    };
    if !open {
        // HTTP/1.1 requires a Host; browsers always send one. A request
        // without one cannot come from a rebinding page.
        if let Some(v) = h.get(header::HOST)
            && !v.to_str().is_ok_and(|s| hosts.allows(s))
        {
            return Some(Fail::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "the Host header {:?} does not name this API (a page using DNS rebinding would send such a Host); use the agent's address, or add the name to [api] allowed_hosts",
                    text(v)
                ),
            ));
        }
        if let Some(v) = h.get(header::ORIGIN)
            && !v.to_str().is_ok_and(|s| hosts.allows_origin(s))
        {
            return Some(Fail::new(
                StatusCode::FORBIDDEN,
                format!(
                    "the Origin header {:?} is not this API's own; cross-site requests are refused (the API serves no web pages)",
                    text(v)
                ),
            ));
        }
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        let ct = h.get(header::CONTENT_TYPE);
        if !ct.is_some_and(|v| v.to_str().is_ok_and(guard::is_json)) {
            return Some(Fail::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                match ct {
                    Some(v) => format!(
                        "the Content-Type header is {:?}; a {} must send Content-Type: application/json",
                        text(v),
                        req.method()
                    ),
                    None => format!(
                        "the Content-Type header is missing; a {} must send Content-Type: application/json",
                        req.method()
                    ),
                },
            ));
        }
    }
    None
}

/// Compares without an early exit, so the time taken does not say how much
/// of a guessed token was right.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S> TowerService<Request<Incoming>> for Auth<S>
where
    S: TowerService<Request<Incoming>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFut<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if let Some(f) = check_headers(&self.hosts, &req) {
            debug!(http.method = %req.method(), http.path = %req.uri().path(), status = f.status.as_u16(), reason = %f.message, "API request refused by its headers");
            let r = fail_response(f);
            return Box::pin(async move { Ok(r) });
        }
        if let Some(token) = &self.token {
            let open = matches!(req.uri().path(), "/healthz" | "/readyz");
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let ok = given.is_some_and(|g| same_token(g.trim().as_bytes(), token.as_bytes()));
            if !open && !ok {
                let mut r = fail_response(Fail::new(
                    StatusCode::UNAUTHORIZED,
                    if given.is_some() {
                        "the bearer token is wrong; the agent's token is in its data dir (api-token): run the CLI as root or in [api] token_group, or set PIER_TOKEN to it"
                    } else {
                        "this API needs a bearer token; the agent's token is in its data dir (api-token): run the CLI as root or in [api] token_group, or set PIER_TOKEN to it"
                    },
                ));
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Box::pin(async move { Ok(r) });
            }
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>, max_body: usize) -> Response<Body> {
    match route(inner, req, max_body).await {
        Ok(r) => r,
        Err(f) => fail_response(f),
    }
}

fn parse_ns(s: &str) -> Result<Namespace, Fail> {
    Namespace::new(s).map_err(|e| Fail::bad(format!("namespace: {e}")))
}

fn parse_name(s: &str) -> Result<Name, Fail> {
    Name::new(s).map_err(|e| Fail::bad(format!("name: {e}")))
}

fn parse_kind(s: &str) -> Result<Resource, Fail> {
    Resource::parse(s).ok_or_else(|| {
        Fail::not_found(format!(
            "unknown resource {:?}; the API serves {}",
            s.chars().take(40).collect::<String>(),
            Resource::VALID
        ))
    })
}

fn wants_watch(req: &Request<Incoming>) -> Result<bool, Fail> {
    let Some(q) = req.uri().query() else {
        return Ok(false);
    };
    let mut watch = false;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "true")) {
            ("watch", "true" | "1") => watch = true,
            ("watch", "false" | "0") => watch = false,
            ("watch", v) => {
                return Err(Fail::bad(format!("watch: {v:?} is not true or false")));
            }
            (k, _) => {
                return Err(Fail::bad(format!(
                    "query parameter {:?} is not known; only watch=true is",
                    k.chars().take(40).collect::<String>()
                )));
            }
        }
    }
    Ok(watch)
}

fn method_not_allowed(m: &Method, path: &str) -> Fail {
    Fail::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{m} is not allowed on {path}"),
    )
}

async fn route(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    max_body: usize,
) -> Result<Response<Body>, Fail> {
    let path = req.uri().path().to_owned();
    let m = req.method().clone();
    match path.as_str() {
        "/healthz" => return Ok(full(StatusCode::OK, "text/plain", "ok\n")),
        "/readyz" => return Ok(readyz(&inner)),
        "/metrics" => return metrics(&inner),
        _ => {}
    }
    let Some(rest) = path.strip_prefix(pier_model::api::PREFIX) else {
        return Err(Fail::not_found(format!(
            "no such path {path:?}; the API is under {}",
            pier_model::api::PREFIX
        )));
    };
    let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let watch = wants_watch(&req)?;
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let get = m == Method::GET;
    match segs.as_slice() {
        ["version"] if get => {
            let s = inner.st.snapshot.borrow().clone();
            Ok(json(
                StatusCode::OK,
                &VersionInfo {
                    version: env!("CARGO_PKG_VERSION").into(),
                    node: inner.st.node.clone(),
                    revision: s.revision,
                },
            ))
        }
        ["problems"] if get => Ok(json(StatusCode::OK, &problems(&inner))),
        [kind] if get => {
            let kind = parse_kind(kind)?;
            list(&inner, kind, Filter::default(), watch, peer).await
        }
        ["nodes", name] if get => {
            let f = Filter {
                namespace: None,
                name: Some(parse_name(name)?),
            };
            get_one(&inner, Resource::Nodes, f).await
        }
        ["namespaces", ns, kind] => {
            let ns = parse_ns(ns)?;
            let kind = parse_kind(kind)?;
            let f = Filter {
                namespace: Some(ns.clone()),
                name: None,
            };
            match (m.clone(), kind) {
                (Method::GET, Resource::Nodes) => Err(Fail::not_found(
                    "nodes are not namespaced; use /api/v1/nodes",
                )),
                (Method::GET, _) => list(&inner, kind, f, watch, peer).await,
                (Method::POST, Resource::ReplicaSets) => {
                    let rs: ReplicaSet = read_json(req, max_body).await?;
                    create_replicaset(&inner, ns, rs).await
                }
                (Method::POST, Resource::Services) => {
                    let svc: Service = read_json(req, max_body).await?;
                    create_service(&inner, ns, svc).await
                }
                _ => Err(method_not_allowed(&m, &path)),
            }
        }
        ["namespaces", ns, kind, name] => {
            let ns = parse_ns(ns)?;
            let kind = parse_kind(kind)?;
            let name = parse_name(name)?;
            match (m.clone(), kind) {
                (Method::GET, Resource::Endpoints) => {
                    let f = Filter {
                        namespace: Some(ns.clone()),
                        name: Some(name.clone()),
                    };
                    if watch {
                        return list(&inner, kind, f, true, peer).await;
                    }
                    let s = synced(&inner).await?;
                    if s.service(&ns, &name).is_none() {
                        return Err(Fail::not_found(format!(
                            "service {name:?} not found in namespace {ns:?}"
                        )));
                    }
                    list(&inner, kind, f, false, peer).await
                }
                (Method::GET, _) => {
                    let f = Filter {
                        namespace: Some(ns),
                        name: Some(name),
                    };
                    if watch {
                        list(&inner, kind, f, true, peer).await
                    } else {
                        get_one(&inner, kind, f).await
                    }
                }
                (Method::DELETE, Resource::ReplicaSets) => {
                    delete_key(&inner, kind, &ns, &name, keys::replicaset(&ns, &name)).await
                }
                (Method::DELETE, Resource::Pods) => {
                    delete_key(&inner, kind, &ns, &name, keys::pod(&ns, &name)).await
                }
                (Method::DELETE, Resource::Services) => delete_service(&inner, ns, name).await,
                _ => Err(method_not_allowed(&m, &path)),
            }
        }
        ["namespaces", ns, "replicasets", name, "scale"]
            if m == Method::PUT || m == Method::POST =>
        {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            let r: ScaleRequest = read_json(req, max_body).await?;
            scale(&inner, ns, name, r).await
        }
        ["namespaces", ns, "replicasets", name, "expose"] if m == Method::POST => {
            let ns = parse_ns(ns)?;
            let name = parse_name(name)?;
            let r: ExposeRequest = read_json(req, max_body).await?;
            expose(&inner, ns, name, r).await
        }
        _ => Err(Fail::not_found(format!("no such path {path:?} for {m}"))),
    }
}

fn readyz(inner: &Inner) -> Response<Body> {
    let mut checks = BTreeMap::new();
    let snap = inner.st.snapshot.borrow().clone();
    checks.insert("snapshot".to_owned(), is_synced(&snap));
    for (name, rx) in &inner.st.readiness {
        checks.insert((*name).to_owned(), *rx.borrow());
    }
    let ready = checks.values().all(|v| *v);
    let store = StoreFreshness {
        revision: snap.revision,
        stale_since_ms: snap.stale_since_ms,
        stale_for_ms: snap.stale_for_ms(now_ms()),
    };
    json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &Readiness {
            ready,
            checks,
            store,
            insecure_no_auth: inner.insecure,
        },
    )
}

fn metrics(inner: &Inner) -> Result<Response<Body>, Fail> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &inner.st.registry).map_err(|e| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
    })?;
    Ok(full(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        out,
    ))
}

/// This agent's own subsystems' problems (the proxy's node-port
/// conflicts), then the cluster-wide ones every agent sees in its snapshot
/// (the supervisor leader's replica-set reports); an identical report from
/// both is listed once.
fn problems(inner: &Inner) -> Vec<Problem> {
    let mut out = Vec::new();
    for rx in &inner.st.problems {
        for ((ns, name), msg) in rx.borrow().iter() {
            out.push(Problem {
                namespace: ns.clone(),
                name: name.clone(),
                message: msg.clone(),
            });
        }
    }
    let snap = inner.st.snapshot.borrow().clone();
    for ((ns, name), p) in snap.problems.iter() {
        let dup = out
            .iter()
            .any(|o| &o.namespace == ns && &o.name == name && o.message == p.message);
        if !dup {
            out.push(Problem {
                namespace: ns.clone(),
                name: name.clone(),
                message: p.message.clone(),
            });
        }
    }
    out
}

/// The reflector sets `synced_at_ms` once its first list is applied.
fn is_synced(s: &Snapshot) -> bool {
    s.synced_at_ms > 0
}

async fn synced(inner: &Inner) -> Result<Arc<Snapshot>, Fail> {
    let mut rx = inner.st.snapshot.clone();
    match tokio::time::timeout(SYNC_WAIT, rx.wait_for(|s| is_synced(s))).await {
        Ok(Ok(s)) => Ok(s.clone()),
        Ok(Err(_)) => Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )),
        Err(_) => Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent has not read the store yet (is the store reachable?); try again",
        )),
    }
}

/// Waits (bounded) until the snapshot satisfies `done`, so that a read right
/// after this write sees it.
async fn settle(inner: &Inner, done: impl FnMut(&Arc<Snapshot>) -> bool) {
    let mut rx = inner.st.snapshot.clone();
    if tokio::time::timeout(READ_YOUR_WRITE_WAIT, rx.wait_for(done))
        .await
        .is_err()
    {
        debug!("the snapshot did not catch up with a write within 2 s");
    }
}

async fn list(
    inner: &Arc<Inner>,
    kind: Resource,
    f: Filter,
    watch: bool,
    peer: std::net::IpAddr,
) -> Result<Response<Body>, Fail> {
    if watch {
        let slot = inner
            .watches
            .take(peer)
            .map_err(|m| Fail::new(StatusCode::TOO_MANY_REQUESTS, m))?;
        synced(inner).await?;
        return Ok(watch_response(inner.clone(), kind, f, slot));
    }
    let s = synced(inner).await?;
    let items: Vec<Value> = views::collect(kind, &s, &f).into_values().collect();
    Ok(json(StatusCode::OK, &items))
}

async fn get_one(inner: &Inner, kind: Resource, f: Filter) -> Result<Response<Body>, Fail> {
    let s = synced(inner).await?;
    match views::collect(kind, &s, &f).into_values().next() {
        Some(v) => Ok(json(StatusCode::OK, &v)),
        None => Err(not_found(kind, f.namespace.as_ref(), f.name.as_ref())),
    }
}

fn not_found(kind: Resource, ns: Option<&Namespace>, name: Option<&Name>) -> Fail {
    let name = name.map(|n| n.as_str()).unwrap_or("");
    Fail::not_found(match ns {
        Some(ns) => format!("{} {name:?} not found in namespace {ns:?}", kind.singular()),
        None => format!("{} {name:?} not found", kind.singular()),
    })
}

/// A chunked stream of JSON lines: first the current objects as ADDED, then
/// every change as the snapshot moves. Ends when the client goes away or the
/// server shuts down.
///
/// Cost: snapshots are coalesced (a slow watcher sees only the latest), and
/// a new snapshot is rebuilt and diffed only when a map this view reads was
/// replaced ([`views::unchanged`]): a pod flapping costs a services watch,
/// or an endpoints watch of another service, a few pointer compares.
fn watch_response(inner: Arc<Inner>, kind: Resource, f: Filter, slot: WatchSlot) -> Response<Body> {
    struct W {
        rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
        cancel: CancellationToken,
        last: Option<BTreeMap<String, Value>>,
        /// The snapshot `last` was built from.
        last_snap: Option<Arc<Snapshot>>,
        pending: VecDeque<Bytes>,
        kind: Resource,
        f: Filter,
        /// Given back when the stream is dropped.
        _slot: WatchSlot,
    }
    fn line(t: WatchEventType, v: &Value) -> Bytes {
        let mut b = serde_json::to_vec(&serde_json::json!({"type": t, "object": v}))
            .expect("watch events serialize");
        b.push(b'\n');
        Bytes::from(b)
    }
    let w = W {
        rx: inner.st.snapshot.clone(),
        cancel: inner.cancel.clone(),
        last: None,
        last_snap: None,
        pending: VecDeque::new(),
        kind,
        f,
        _slot: slot,
    };
    let stream = futures::stream::unfold(w, |mut w| async move {
        loop {
            if let Some(b) = w.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Frame::data(b)), w));
            }
            if w.last.is_some() {
                tokio::select! {
                    _ = w.cancel.cancelled() => return None,
                    r = w.rx.changed() => if r.is_err() { return None },
                    // A blank line now and then: writing is how a client
                    // that went away without closing is noticed.
                    _ = tokio::time::sleep(WATCH_HEARTBEAT) => {
                        return Some((Ok(Frame::data(Bytes::from_static(b"\n"))), w));
                    }
                }
            }
            let snap = w.rx.borrow_and_update().clone();
            if let Some(old) = &w.last_snap
                && views::unchanged(w.kind, &w.f, old, &snap)
            {
                continue;
            }
            let now = views::collect(w.kind, &snap, &w.f);
            let old = w.last.take().unwrap_or_default();
            for (k, v) in &now {
                match old.get(k) {
                    None => w.pending.push_back(line(WatchEventType::Added, v)),
                    Some(o) if o != v => w.pending.push_back(line(WatchEventType::Modified, v)),
                    Some(_) => {}
                }
            }
            for (k, v) in &old {
                if !now.contains_key(k) {
                    w.pending.push_back(line(WatchEventType::Deleted, v));
                }
            }
            w.last = Some(now);
            w.last_snap = Some(snap);
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, max: usize) -> Result<T, Fail> {
    let too_big = || {
        Fail::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {max} bytes (max_body_bytes)"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(too_big());
    }
    let bytes = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_big()
            } else {
                Fail::bad(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Err(Fail::bad("the request needs a JSON body"));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path.is_empty() {
            Fail::bad(e.inner().to_string())
        } else {
            Fail::bad(format!("{path}: {}", e.inner()))
        }
    })
}

/// The path's namespace wins; a body that names another one is an error.
fn check_ns(body: &mut Namespace, path: &Namespace) -> Result<(), Fail> {
    if body != path && body.as_str() != pier_model::DEFAULT_NAMESPACE {
        return Err(Fail::bad(format!(
            "namespace: the body says {body:?} but the path says {path:?}"
        )));
    }
    *body = path.clone();
    Ok(())
}

fn validate_replicaset(rs: &ReplicaSet) -> Result<(), Fail> {
    let t = &rs.template;
    if t.image.trim().is_empty() {
        return Err(Fail::bad("template.image: must not be empty"));
    }
    if t.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Fail::bad(format!(
            "template.image: {:?} contains spaces",
            t.image
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for (i, p) in t.ports.iter().enumerate() {
        if !names.insert(&p.name) {
            return Err(Fail::bad(format!(
                "template.ports[{i}].name: {:?} is used twice",
                p.name.as_str()
            )));
        }
        if !ports.insert(p.port) {
            return Err(Fail::bad(format!(
                "template.ports[{i}].port: {} is used twice",
                p.port
            )));
        }
    }
    for k in t.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Fail::bad(format!(
                "template.env: {k:?} is not a valid variable name"
            )));
        }
    }
    if let (Some(min), Some(max)) = (rs.min_replicas, rs.max_replicas)
        && min > max
    {
        return Err(Fail::bad(format!(
            "min_replicas: {min} is above max_replicas {max}"
        )));
    }
    Ok(())
}

async fn create_replicaset(
    inner: &Inner,
    ns: Namespace,
    mut rs: ReplicaSet,
) -> Result<Response<Body>, Fail> {
    check_ns(&mut rs.namespace, &ns)?;
    validate_replicaset(&rs)?;
    rs.created_at = now_ms();
    let key = keys::replicaset(&ns, &rs.name);
    let r = inner
        .st
        .store
        .txn(Txn {
            compares: vec![Compare::Absent(key.clone())],
            success: vec![TxnOp::Put {
                key,
                value: encode(&rs),
                lease: None,
            }],
            failure: vec![],
        })
        .await?;
    if !r.succeeded {
        return Err(Fail::conflict(format!(
            "replicaset {:?} already exists in namespace {ns:?}; scale it with `pier scale rs {} --replicas N` or delete it first",
            rs.name.as_str(),
            rs.name
        )));
    }
    info!(namespace = %ns, replicaset = %rs.name, replicas = rs.replicas.get(), "replica set created");
    settle(inner, |s| s.revision >= r.revision).await;
    let s = inner.st.snapshot.borrow().clone();
    Ok(json(StatusCode::CREATED, &views::replicaset_view(&s, &rs)))
}

/// Scale by compare-and-swap on the replica set's `mod_revision`: a racing
/// writer makes the txn fail, and the scale is recomputed from the new value,
/// so neither update is lost.
async fn scale(
    inner: &Inner,
    ns: Namespace,
    name: Name,
    req: ScaleRequest,
) -> Result<Response<Body>, Fail> {
    match (&req.replicas, &req.delta) {
        (Some(_), Some(_)) => {
            return Err(Fail::bad("delta: give either replicas or delta, not both"));
        }
        (None, None) => return Err(Fail::bad("replicas: missing (or give delta)")),
        _ => {}
    }
    let key = keys::replicaset(&ns, &name);
    let store = &inner.st.store;
    for attempt in 0..SCALE_ATTEMPTS {
        let turn = inner.scale_turn.lock().await;
        let kv = store
            .get(&key)
            .await?
            .ok_or_else(|| not_found(Resource::ReplicaSets, Some(&ns), Some(&name)))?;
        let mut rs: ReplicaSet = decode(&key, &kv.value).map_err(|e| {
            Fail::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e}; fix or delete it"),
            )
        })?;
        let new = match (req.replicas, req.delta) {
            (Some(r), _) => r,
            (None, Some(d)) => {
                let want = rs.replicas.get() as i64 + d;
                u32::try_from(want)
                    .ok()
                    .and_then(|w| pier_model::Replicas::new(w).ok())
                    .ok_or_else(|| {
                        Fail::bad(format!(
                            "delta: {d} would make {want} replicas; replicas are 0 to {}",
                            pier_model::Replicas::MAX
                        ))
                    })?
            }
            (None, None) => return Err(Fail::bad("replicas: missing (or give delta)")),
        };
        rs.replicas = new;
        let r = store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value: encode(&rs),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        drop(turn);
        if r.succeeded {
            info!(namespace = %ns, replicaset = %name, replicas = new.get(), attempt, "replica set scaled");
            settle(inner, |s| s.revision >= r.revision).await;
            let s = inner.st.snapshot.borrow().clone();
            return Ok(json(StatusCode::OK, &views::replicaset_view(&s, &rs)));
        }
        // Someone else wrote it between our read and our txn. Back off a
        // little, varying by attempt and clock so two racers separate.
        let jitter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 3_000)
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_micros(
            500 * u64::from(attempt + 1) + u64::from(jitter),
        ))
        .await;
    }
    Err(Fail::conflict(format!(
        "replicaset {name:?} kept changing while it was being scaled ({SCALE_ATTEMPTS} attempts); try again"
    )))
}

async fn delete_key(
    inner: &Inner,
    kind: Resource,
    ns: &Namespace,
    name: &Name,
    key: String,
) -> Result<Response<Body>, Fail> {
    let (existed, rev) = inner.st.store.delete(&key).await?;
    if !existed {
        return Err(not_found(kind, Some(ns), Some(name)));
    }
    info!(namespace = %ns, name = %name, kind = kind.singular(), "deleted");
    settle(inner, |s| s.revision >= rev).await;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"deleted": kind.singular(), "namespace": ns, "name": name}),
    ))
}

async fn create_service(
    inner: &Inner,
    ns: Namespace,
    mut svc: Service,
) -> Result<Response<Body>, Fail> {
    check_ns(&mut svc.namespace, &ns)?;
    if svc.ports.is_empty() {
        return Err(Fail::bad("ports: a service needs at least one port"));
    }
    if !svc.selector.is_empty() && !svc.static_endpoints.is_empty() {
        return Err(Fail::bad(
            "static_endpoints: a service has either a selector or static endpoints, not both",
        ));
    }
    validate_service(&inner.st, &svc)?;
    svc.created_at = now_ms();
    let created = alloc::create_service(&*inner.st.store, &inner.st.alloc, svc, true).await?;
    info!(namespace = %ns, service = %created.name, vip = ?created.vip, "service created");
    let key = (ns, created.name.clone());
    settle(inner, |s| s.services.contains_key(&key)).await;
    Ok(json(StatusCode::CREATED, &created))
}

/// What a writer asked for explicitly: node ports in the range, a VIP in
/// the service CIDR (the same check `alloc` makes), and static endpoints
/// that do not reach a host's own services.
fn validate_service(st: &ApiState, svc: &Service) -> Result<(), Fail> {
    alloc::check_explicit(&st.alloc, svc)?;
    if svc.static_endpoints.is_empty() {
        return Ok(());
    }
    let host = guard::host_addrs();
    for (i, ep) in svc.static_endpoints.iter().enumerate() {
        if let Err(r) = pier_model::addr::check_static_ip(
            ep.ip,
            &st.alloc.service_cidr,
            &host,
            &st.static_endpoint_allow,
        ) {
            return Err(Fail::bad(format!(
                "static_endpoints[{i}].ip: {} {r}; every host's proxy would connect to its own such address, so it is refused. To allow it anyway, add a CIDR holding it to [network] static_endpoint_allow in every agent's config",
                ep.ip
            )));
        }
    }
    Ok(())
}

async fn expose(
    inner: &Inner,
    ns: Namespace,
    rs_name: Name,
    req: ExposeRequest,
) -> Result<Response<Body>, Fail> {
    let key = keys::replicaset(&ns, &rs_name);
    let kv = inner.st.store.get(&key).await?.ok_or_else(|| {
        Fail::not_found(format!(
            "replicaset {:?} not found in namespace {ns:?}; create it with `pier run {} --image IMAGE`",
            rs_name.as_str(),
            rs_name
        ))
    })?;
    let rs: ReplicaSet = decode(&key, &kv.value).map_err(|e| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}; fix or delete it"),
        )
    })?;
    let target = req.target_port.unwrap_or(req.port);
    let port_name = match rs.template.ports.iter().find(|p| p.port == target) {
        Some(p) => p.name.clone(),
        None => Name::new(&format!("p{}", req.port)).expect("p<digits> is a valid name"),
    };
    let mut selector = Labels::new();
    selector.insert(labels::REPLICASET.into(), rs_name.to_string());
    let svc = Service {
        name: req.name.unwrap_or_else(|| rs_name.clone()),
        namespace: ns.clone(),
        vip: None,
        service_type: req.service_type,
        ports: vec![ServicePort {
            name: port_name,
            port: req.port,
            target_port: target,
            node_port: req.node_port,
        }],
        selector,
        static_endpoints: vec![],
        lb: Default::default(),
        proxy_protocol: false,
        prefer_local: req.prefer_local,
        accept_labelled: false,
        drain_timeout_ms: None,
        health: None,
        sla: None,
        created_at: 0,
    };
    create_service(inner, ns, svc).await
}

async fn delete_service(inner: &Inner, ns: Namespace, name: Name) -> Result<Response<Body>, Fail> {
    if !alloc::delete_service(&*inner.st.store, &ns, &name).await? {
        return Err(not_found(Resource::Services, Some(&ns), Some(&name)));
    }
    info!(namespace = %ns, service = %name, "service deleted");
    let key = (ns.clone(), name.clone());
    settle(inner, |s| !s.services.contains_key(&key)).await;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"deleted": "service", "namespace": ns, "name": name}),
    ))
}
