//! pier's HTTP API and the typed client the CLI uses.
//!
//! The server ([`serve`]) is hyper 1 behind tower layers (tracing; the
//! Host, Origin and Content-Type checks and bearer token auth, see `guard`;
//! a request timeout; a body size limit). It refuses to start without a
//! token unless `insecure_no_auth`; the agent's token file is [`token`]. Reads are answered
//! from the agent's `Arc<Snapshot>`; writes go to the store with a revision
//! check (create-if-absent, or compare-and-swap on `mod_revision` with a few
//! retries before a 409). Watches (`?watch=true`) are chunked streams of JSON
//! lines, one [`pier_model::api::WatchEvent`] each, driven by the snapshot.
//!
//! Routes, all under `/api/v1`:
//!
//! ```text
//! GET    /version  /problems
//! GET    /nodes[?watch=true]                      GET /nodes/<node>
//! GET    /<kind>[?watch=true]                     (every namespace; kind: replicasets pods services endpoints)
//! GET    /namespaces/<ns>/<kind>[?watch=true]     GET /namespaces/<ns>/<kind>/<name>   (endpoints: of that service)
//! POST   /namespaces/<ns>/replicasets             body: ReplicaSet
//! POST   /namespaces/<ns>/services                body: Service (VIP and node ports allocated)
//! PUT    /namespaces/<ns>/replicasets/<rs>/scale  body: ScaleRequest
//! POST   /namespaces/<ns>/replicasets/<rs>/expose body: ExposeRequest
//! DELETE /namespaces/<ns>/{replicasets,pods,services}/<name>
//! GET    /signals[?watch=true]                    (traffic per service, autoscaler decisions)
//! POST   /dashboard/logins                        (a one-time dashboard login code)
//! ```
//! plus `/healthz`, `/readyz` and `/metrics` at the root, and the dashboard
//! under `/ui/` (see `session` for its login).
//!
//! This crate does not run anything but the API: it never talks to Docker,
//! and it writes only desired state (replica sets, services, pod deletions).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

mod client;
mod guard;
mod server;
mod session;
pub mod token;
mod views;

pub use client::{Client, Watch};
pub use guard::host_addrs;
pub use server::serve;

/// The API server's settings (`[api]` in pier.toml).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where the API listens. Anything but loopback needs a token.
    pub listen: SocketAddr,
    /// A bearer token every request but /healthz and /readyz must carry.
    /// When unset (the default) the agent makes one on first start and
    /// keeps it in `<data_dir>/api-token` (see [`token`]); the agent also
    /// takes it from the `PIER_TOKEN` environment variable.
    pub token: Option<String>,
    /// A group whose members may read the token file (made mode 0640 with
    /// this group; the data dir gets 0710 with it). Unset: root only
    /// (0600). A group name or a numeric gid.
    pub token_group: Option<String>,
    /// Serve without a token (development only; logged as a warning at
    /// start and shown by /readyz). Only on a loopback listener.
    pub insecure_no_auth: bool,
    /// Host header names (or addresses) clients may use besides the listen
    /// address, `localhost`, 127.0.0.1, [::1] and the node's own name and
    /// addresses. Any other Host is answered 421 (against DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Watches open at once on this API; more are answered 429.
    pub max_watches: usize,
    /// Watches open at once from one client address; more are answered 429.
    pub max_watches_per_client: usize,
    /// The largest request body accepted; more is a 413.
    pub max_body_bytes: usize,
    /// How long a request may take before it is answered 504 (watches are
    /// exempt once their stream has started).
    pub request_timeout_ms: u64,
}

impl ApiConfig {
    /// 7370: pier's default API port.
    pub fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7370))
    }
    /// 1 MiB: a replica set with a long environment is a few KiB.
    pub fn default_max_body_bytes() -> usize {
        1 << 20
    }
    /// 10 s: long enough for a store write retried a few times on a slow
    /// etcd, short enough that a stuck request does not hold a connection.
    pub fn default_request_timeout_ms() -> u64 {
        10_000
    }
    /// 256 watches: a few dozen `get -w` terminals and controllers, well
    /// below the file descriptors an agent has.
    pub fn default_max_watches() -> usize {
        256
    }
    /// 32 per client address: one runaway script cannot take them all.
    pub fn default_max_watches_per_client() -> usize {
        32
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(t) = &self.token
            && (t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ApiError::Config(
                "token: must be non-empty and contain no spaces or control characters".into(),
            ));
        }
        if self.insecure_no_auth && self.token.is_some() {
            return Err(ApiError::Config(
                "insecure_no_auth: a token is also set (token or PIER_TOKEN); drop one of them"
                    .into(),
            ));
        }
        if self.insecure_no_auth && !self.listen.ip().is_loopback() {
            return Err(ApiError::Config(format!(
                "insecure_no_auth: the API listens on {}, which is not loopback; serving without a token is allowed on loopback only",
                self.listen
            )));
        }
        if let Some(g) = &self.token_group
            && g.trim().is_empty()
        {
            return Err(ApiError::Config(
                "token_group: must be a group name or a numeric gid".into(),
            ));
        }
        for h in &self.allowed_hosts {
            if h.is_empty()
                || h.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '/')
            {
                return Err(ApiError::Config(format!(
                    "allowed_hosts: {h:?} is not a host name or address"
                )));
            }
        }
        if self.max_watches == 0 || self.max_watches_per_client == 0 {
            return Err(ApiError::Config(
                "max_watches and max_watches_per_client: must be at least 1".into(),
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(ApiError::Config(
                "max_body_bytes: must be at least 1".into(),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(ApiError::Config(
                "request_timeout_ms: must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: Self::default_listen(),
            token: None,
            token_group: None,
            insecure_no_auth: false,
            allowed_hosts: Vec::new(),
            max_watches: Self::default_max_watches(),
            max_watches_per_client: Self::default_max_watches_per_client(),
            max_body_bytes: Self::default_max_body_bytes(),
            request_timeout_ms: Self::default_request_timeout_ms(),
        }
    }
}

/// Per-object problems published by a subsystem.
pub type Problems = Arc<BTreeMap<pier_model::ObjectKey, String>>;

/// What the API serves from and writes to.
pub struct ApiState {
    pub store: Arc<dyn pier_store::Store>,
    pub snapshot: watch::Receiver<Arc<pier_model::Snapshot>>,
    pub alloc: pier_store::alloc::AllocConfig,
    /// The node whose agent runs this API.
    pub node: pier_model::Name,
    /// Encoded for `/metrics`.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// `/readyz` is 200 when every latch is true.
    pub readiness: Vec<(&'static str, watch::Receiver<bool>)>,
    /// Per-object problems (the proxy's node-port conflicts, the
    /// supervisor's replica-set problems), shown by `describe`.
    pub problems: Vec<watch::Receiver<Problems>>,
    /// Names and addresses the Host header may carry besides the listen
    /// address and the loopback names: the node's name and address.
    pub host_names: Vec<String>,
    /// Static endpoints inside these CIDRs are accepted even where
    /// [`pier_model::addr::check_static_ip`] refuses them
    /// (`[network] static_endpoint_allow`).
    pub static_endpoint_allow: Vec<pier_model::Cidr>,
    /// The DNS domain the agent serves (`[dns] domain`), shown by the
    /// dashboard in services' DNS names.
    pub dns_domain: String,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("store", &self.store)
            .field("node", &self.node)
            .field("alloc", &self.alloc)
            .field(
                "readiness",
                &self.readiness.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Errors of the server and of the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("api config: {0}")]
    Config(String),
    #[error("serving the API on {addr}: {source}")]
    Serve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad server URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error(
        "cannot reach the pier agent at {url}: {reason}; start it with `pier agent --node NAME`"
    )]
    Unreachable { url: String, reason: String },
    /// The agent answered with an error status; `message` is its one line.
    #[error("{message}")]
    Status { status: u16, message: String },
    #[error("talking to the pier agent at {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("the pier agent at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the pier agent's answer to {path} does not parse: {reason}")]
    Decode { path: String, reason: String },
}

impl ApiError {
    /// The HTTP status of an error answer, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rules() {
        let mut c = ApiConfig {
            listen: "0.0.0.0:7370".parse().unwrap(),
            ..ApiConfig::default()
        };
        c.validate().unwrap();
        c.insecure_no_auth = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("insecure_no_auth") && e.contains("loopback"),
            "{e}"
        );
        c.insecure_no_auth = false;
        c.token = Some("s3cret".into());
        c.validate().unwrap();
        c.token = Some("".into());
        assert!(c.validate().is_err());
        ApiConfig::default().validate().unwrap();
        let v6 = ApiConfig {
            listen: "[::1]:7370".parse().unwrap(),
            ..ApiConfig::default()
        };
        v6.validate().unwrap();
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let e = toml_like_json(r#"{"listen":"127.0.0.1:1","tokn":"x"}"#);
        assert!(e.contains("tokn"), "{e}");
    }

    fn toml_like_json(s: &str) -> String {
        serde_json::from_str::<ApiConfig>(s)
            .unwrap_err()
            .to_string()
    }
}
