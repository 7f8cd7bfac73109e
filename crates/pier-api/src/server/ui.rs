//! The dashboard under `/ui/`: its assets (built into the binary from
//! `crates/pier-api/ui/`), the login (`/ui/login?code=…` → session cookie
//! → redirect), and the one-time codes `pier dashboard` asks for. The page
//! reads the API's own lists and `?watch=true` streams with the session
//! cookie; nothing here computes a view of its own.

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use pier_model::api::DashboardLogin;
use pier_model::now_ms;

use super::Inner;
use super::plumbing::{Body, Fail, full, json};
use crate::session::{CODE_TTL_MS, SESSION_TTL_MS, cookie};

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// Only this origin's scripts, styles and requests; no frames, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn harden(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    harden(r)
}

/// A small page that says what happened and what to do.
pub(super) fn message_page(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pier: {t}</title>\
         <link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"/ui/app.css\"></head>\
         <body><main class=\"message\"><h1>{t}</h1><p>{x}</p></main></body></html>\n",
        t = esc(title),
        x = esc(text)
    );
    harden(full(status, "text/html; charset=utf-8", body))
}

/// The answer a `/ui/` request without a session gets.
pub(super) fn login_needed() -> Response<Body> {
    message_page(
        StatusCode::UNAUTHORIZED,
        "Log in to the dashboard",
        "This dashboard needs a login. On the agent's host, run `pier dashboard`: it prints a one-time link (and opens it when a browser is there).",
    )
}

/// `GET /ui…`.
pub(super) fn route(
    inner: &Arc<Inner>,
    path: &str,
    query: Option<&str>,
    headers: &http::HeaderMap,
) -> Response<Body> {
    match path {
        "/ui" => redirect("/ui/"),
        "/ui/" | "/ui/index.html" => {
            harden(full(StatusCode::OK, "text/html; charset=utf-8", INDEX))
        }
        "/ui/app.js" => harden(full(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            APP_JS,
        )),
        "/ui/app.css" => harden(full(StatusCode::OK, "text/css; charset=utf-8", APP_CSS)),
        "/ui/login" => login(inner, query),
        "/ui/logout" => logout(inner, headers),
        _ => message_page(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!(
                "There is no page {:?}; the dashboard is at /ui/.",
                path.chars().take(80).collect::<String>()
            ),
        ),
    }
}

/// `GET /ui/login?code=…`: spend the code, set the session cookie and
/// redirect to `/ui/`, so the code leaves the address bar and history.
fn login(inner: &Arc<Inner>, query: Option<&str>) -> Response<Body> {
    if inner.insecure {
        // No token, so no login: the API is open on loopback already.
        return redirect("/ui/");
    }
    let code = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("code="))
        .unwrap_or("");
    match inner.sessions.redeem(code, now_ms()) {
        Some(id) => {
            let mut r = redirect("/ui/");
            let c = format!(
                "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                inner.sessions.cookie_name(),
                SESSION_TTL_MS / 1000
            );
            r.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&c).expect("a hex id is a valid header value"),
            );
            r
        }
        None => message_page(
            StatusCode::UNAUTHORIZED,
            "This login link does not work",
            "The link was already used, has expired (a link lasts 2 minutes) or was made by another agent or before the agent restarted. Run `pier dashboard` again for a new one.",
        ),
    }
}

/// `GET /ui/logout`: end this session and clear the cookie.
fn logout(inner: &Arc<Inner>, headers: &http::HeaderMap) -> Response<Body> {
    for v in headers.get_all(header::COOKIE) {
        if let Some(id) = v
            .to_str()
            .ok()
            .and_then(|v| cookie(v, inner.sessions.cookie_name()))
        {
            inner.sessions.end(id);
        }
    }
    let mut r = message_page(
        StatusCode::OK,
        "Logged out",
        "The session has ended. Run `pier dashboard` on the agent's host to log in again.",
    );
    let clear = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        inner.sessions.cookie_name()
    );
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).expect("a cookie name is a valid header value"),
    );
    r
}

/// `POST /api/v1/dashboard/logins` (bearer token only: a session cannot
/// make codes): a new one-time code.
pub(super) fn new_login(inner: &Inner) -> Result<Response<Body>, Fail> {
    let code = inner.sessions.issue_code(now_ms());
    Ok(json(
        StatusCode::CREATED,
        &DashboardLogin {
            path: format!("/ui/login?code={code}"),
            code,
            expires_in_ms: CODE_TTL_MS,
        },
    ))
}

/// Whether a request carries a live dashboard session.
pub(super) fn has_session(sessions: &crate::session::Sessions, headers: &http::HeaderMap) -> bool {
    let now = now_ms();
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| cookie(v, sessions.cookie_name()))
        .any(|id| sessions.valid(id, now))
}
