//! pier-agent: the part of `pier agent` that touches Docker.
//!
//! - **Discovery**: a Docker event stream (filtered by label on the server)
//!   plus full resyncs (at start, on every reconnect to Docker or to the
//!   store, and every `resync_interval_ms`) keep a map of this host's
//!   containers. Each container that belongs to a service (by its
//!   `pier.service` label or the service's selector) is registered as
//!   `endpoints/<ns>/<svc>/<node>/<id>` under the node's lease, `ready=false`
//!   until its health check passes. `die`/`kill` remove it at once.
//! - **Health**: `tcp`, `http:/path`, `docker` (the image's HEALTHCHECK) and
//!   `none`, from labels or defaults; static endpoints of services are
//!   checked and registered by every node as `static-<n>`.
//! - **Registration**: the node record, endpoints and pod statuses, all
//!   leased, re-put whenever the lease changes. A missing service named by a
//!   `pier.service` label is created once, with a VIP, through
//!   `pier_store::writes::create_service`.
//! - **Pod runtime**: pods assigned to this node become containers; the
//!   containers of deleted or reassigned pods are stopped and removed.
//!
//! Unnamed container ports (`pier.port=8080`) are named after the service
//! port that targets them, else `p<port>` (`p8080`); an auto-created service
//! uses the same names, with `port == target_port`.
//!
//! It is not the HTTP API, DNS or the proxy, and it neither grants nor
//! revokes the lease: the caller owns the `LeaseKeeper`. On shutdown it
//! deletes this node's endpoints and leaves containers running.

use std::sync::Arc;

use pier_model::Labels;
use pier_store::StoreError;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod agent;
mod desired;
mod docker;
mod health;
mod names;
mod spec;
mod stats;

/// The agent's config section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Full resync with Docker and the store, as a safety net.
    pub resync_interval_ms: u64,
    /// Only containers carrying all these labels are seen (tests set
    /// `pier.test-run=<id>`). Pod containers get them too.
    pub filter_labels: Labels,
    /// Extra labels put on pod containers.
    pub pod_labels: Labels,
    /// The Docker network for pods; `None` is Docker's default bridge.
    pub pod_network: Option<String>,
    /// Pull missing images (from this registry) only when set.
    pub registry: Option<String>,
    pub default_health_interval_ms: u64,
    pub default_health_timeout_ms: u64,
    /// The namespaces that labelled containers (containers pier did not
    /// start that ask for a service by their labels) may join; `*` is
    /// every namespace.
    pub label_namespaces: Vec<String>,
    /// Whether a labelled container may say `pier.health=none` (ready at
    /// once, never checked).
    pub allow_health_none: bool,
    /// How long a static endpoint name whose lookups fail keeps the
    /// addresses of its last answer (counted from that answer) before
    /// they are dropped. ARCHITECTURE.md, "External endpoints by name".
    pub static_name_stale_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            // 10 s: events carry the changes; the resync only repairs missed ones.
            resync_interval_ms: 10_000,
            filter_labels: Labels::new(),
            pod_labels: Labels::new(),
            pod_network: None,
            registry: None,
            default_health_interval_ms: pier_model::HealthCheck::default_interval_ms(),
            default_health_timeout_ms: pier_model::HealthCheck::default_timeout_ms(),
            label_namespaces: vec!["default".to_owned()],
            allow_health_none: false,
            static_name_stale_ms: names::STALE_DEFAULT_MS,
        }
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |s: String| Err(AgentError::Config(s));
        if self.resync_interval_ms < 100 {
            return bad(format!(
                "agent.resync_interval_ms = {} is too small; use at least 100",
                self.resync_interval_ms
            ));
        }
        if self.default_health_interval_ms < 10 || self.default_health_timeout_ms < 10 {
            return bad(
                "agent.default_health_interval_ms and default_health_timeout_ms must be at least 10"
                    .into(),
            );
        }
        for (what, l) in [
            ("filter_labels", &self.filter_labels),
            ("pod_labels", &self.pod_labels),
        ] {
            if let Some(k) = l
                .keys()
                .find(|k| k.is_empty() || k.contains(['=', ',']) || k.trim() != *k)
            {
                return bad(format!(
                    "agent.{what} has an invalid label key {k:?}; use a non-empty key without '=', ',' or spaces"
                ));
            }
        }
        if self
            .pod_network
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return bad(
                "agent.pod_network is empty; remove it to use Docker's default bridge".into(),
            );
        }
        if let Some(n) = self
            .label_namespaces
            .iter()
            .find(|n| n.as_str() != "*" && pier_model::Namespace::new(n).is_err())
        {
            return bad(format!(
                "agent.label_namespaces has {n:?}, which is neither a namespace name nor \"*\""
            ));
        }
        if self.static_name_stale_ms < 1000 {
            return bad(format!(
                "agent.static_name_stale_ms = {} is too small; use at least 1000 (the default, {}, is an hour)",
                self.static_name_stale_ms,
                names::STALE_DEFAULT_MS
            ));
        }
        if self
            .registry
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return bad("agent.registry is empty; remove it to never pull".into());
        }
        Ok(())
    }
}

/// What the agent needs from the rest of `pier agent`.
#[derive(Debug)]
pub struct AgentContext {
    /// Registered at `nodes/<name>` under the lease.
    pub node: pier_model::Node,
    pub store: Arc<dyn pier_store::Store>,
    /// From `LeaseKeeper::subscribe()`. On a new lease id the node,
    /// endpoints and pod statuses are written again.
    pub lease: tokio::sync::watch::Receiver<Option<pier_store::LeaseId>>,
    /// From the reflector.
    pub snapshot: tokio::sync::watch::Receiver<Arc<pier_model::Snapshot>>,
    /// To auto-create a missing service.
    pub alloc: pier_store::alloc::AllocConfig,
    /// Pod DNS search domains, e.g. `["default.svc.pier.internal",
    /// "svc.pier.internal"]`; an entry starting with `default.` gets the
    /// pod's namespace instead.
    pub dns_search: Vec<String>,
    /// The subnets of Docker's networks are published here.
    pub networks: tokio::sync::watch::Sender<Vec<pier_model::Cidr>>,
    /// The `ip:port`s of this node's ready container endpoints, as found in
    /// its own Docker (not read back from the store), for the mesh
    /// listener: it relays to nothing else.
    pub local_targets:
        tokio::sync::watch::Sender<Arc<std::collections::HashSet<std::net::SocketAddr>>>,
    /// `[network] static_endpoint_allow`: static endpoint addresses let
    /// through although [`pier_model::addr::check_static_ip`] refuses them.
    pub static_allow: Vec<pier_model::Cidr>,
    /// Looks up static endpoints given by name.
    pub names: NameLookup,
}

/// How the agent looks up the static endpoints given by name (through the
/// `[dns] upstreams`), and the counter of what came of each lookup,
/// `pier_static_name_lookups_total{outcome}`: `same`, `changed`, `stale`
/// (failed, last answer kept), `dropped` (failed past the bound) and
/// `failed` (failed, nothing held).
#[derive(Debug, Clone)]
pub struct NameLookup {
    resolver: Arc<pier_dns::lookup::Resolver>,
    lookups: prometheus_client::metrics::family::Family<
        [(&'static str, &'static str); 1],
        prometheus_client::metrics::counter::Counter,
    >,
}

impl NameLookup {
    pub fn new(
        resolver: pier_dns::lookup::Resolver,
        registry: &mut prometheus_client::registry::Registry,
    ) -> NameLookup {
        let lookups = prometheus_client::metrics::family::Family::default();
        registry.register(
            "static_name_lookups",
            "Lookups of static endpoint names, by outcome (same, changed, stale, dropped, failed)",
            lookups.clone(),
        );
        NameLookup {
            resolver: Arc::new(resolver),
            lookups,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent config: {0}")]
    Config(String),
    #[error("docker: {what}: {source}")]
    Docker {
        what: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("store: {what}: {source}")]
    Store {
        what: String,
        #[source]
        source: StoreError,
    },
}

/// Run discovery, health checks, registration and the pod runtime until
/// `cancel` fires, then delete this node's endpoints and return. Docker
/// being down is not an error: the agent reconnects with backoff.
pub async fn run(
    cfg: AgentConfig,
    ctx: AgentContext,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    use tracing::Instrument;
    cfg.validate()?;
    let span = tracing::info_span!("agent", node = %ctx.node.name);
    agent::Agent::new(cfg, ctx)
        .run(cancel, CancellationToken::new())
        .instrument(span)
        .await
}

/// [`run`], except that when `handoff` is cancelled before `cancel`, the
/// agent stops without deregistering: this node's endpoints stay in the
/// store for the process that takes over (an upgrade), which writes them
/// again under its own lease.
pub async fn run_with_handoff(
    cfg: AgentConfig,
    ctx: AgentContext,
    cancel: CancellationToken,
    handoff: CancellationToken,
) -> Result<(), AgentError> {
    use tracing::Instrument;
    cfg.validate()?;
    let span = tracing::info_span!("agent", node = %ctx.node.name);
    agent::Agent::new(cfg, ctx)
        .run(cancel, handoff)
        .instrument(span)
        .await
}

pub use stats::write_stats;
