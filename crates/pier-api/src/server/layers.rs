//! The tower layers around every request: [`Trace`] (logs, and turns a
//! timeout into an answer) and [`Auth`] (Host, Origin, Content-Type and the
//! bearer token).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tower::{BoxError, Service as TowerService};
use tracing::{debug, warn};

use super::plumbing::{Body, BoxFut, Fail, fail_response};
use super::ui::{has_session, login_needed};
use crate::guard::{self, HostCheck};
use crate::session::Sessions;

/// Logs every request with its status and latency; turns a layer error (a
/// timeout) into an answer.
#[derive(Clone)]
pub(super) struct Trace<S> {
    pub(super) inner: S,
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
/// on everything but the health probes and the dashboard's login (401). A
/// dashboard session cookie stands in for the token on reads only: a GET
/// or HEAD of `/api/v1/…` or `/ui/…`.
#[derive(Clone)]
pub(super) struct Auth<S> {
    pub(super) inner: S,
    pub(super) token: Option<Arc<str>>,
    pub(super) hosts: Arc<HostCheck>,
    pub(super) sessions: Arc<Sessions>,
}

/// Whether a path is the dashboard's.
pub(super) fn is_ui(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// What a session may do: read the API and the dashboard's pages.
fn session_may(method: &Method, path: &str) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
        && (is_ui(path) || path.starts_with(pier_model::api::PREFIX))
}

/// The refusal of a request by its headers, if any.
pub(super) fn check_headers(hosts: &HostCheck, req: &Request<Incoming>) -> Option<Fail> {
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
                    "the Origin header {:?} is not this API's own; cross-site requests are refused (only the dashboard, served from this address, may send one; add a name it is reached by to [api] allowed_hosts)",
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
pub(super) fn same_token(a: &[u8], b: &[u8]) -> bool {
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
            let path = req.uri().path();
            let open = matches!(path, "/healthz" | "/readyz" | "/ui/login");
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let ok = given.is_some_and(|g| same_token(g.trim().as_bytes(), token.as_bytes()))
                || (given.is_none()
                    && session_may(req.method(), path)
                    && has_session(&self.sessions, req.headers()));
            if !open && !ok && is_ui(path) {
                let r = login_needed();
                return Box::pin(async move { Ok(r) });
            }
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
