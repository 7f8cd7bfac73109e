//! pier's DNS server: the mesh names from the snapshot, forwarding for
//! everything else, an ACL and metrics.
//!
//! What it answers, under the domain (default `pier.internal`):
//! - `<svc>.<ns>.svc.<domain>` A/AAAA: the VIP (TTL 30 s), or for a headless
//!   service the ready endpoints' addresses (TTL 1 s);
//! - `_<port>._tcp.<svc>.<ns>.svc.<domain>` SRV (`_udp` for a UDP port): one record per ready
//!   endpoint, target `<pod-or-id>.<svc>.<ns>.svc.<domain>`, with the
//!   targets' addresses in the additional section;
//! - `<pod-or-id>.<svc>.<ns>.svc.<domain>` A/AAAA: that endpoint;
//! - PTR for VIPs and ready endpoint addresses;
//! - NXDOMAIN and NODATA with the SOA in the authority section, whose TTL
//!   and MINIMUM are the negative TTL (1 s by default, RFC 2308).
//!
//! Everything else is forwarded to the upstreams (UDP, then TCP when the
//! answer is truncated), cached within its TTL, and answered SERVFAIL when no
//! upstream answers within the bound. Clients other than the host itself
//! (loopback and its own addresses), the container networks and the
//! configured CIDRs get REFUSED.
//!
//! [`lookup::Resolver`] asks the same upstreams for the agent: the
//! addresses of static endpoints given by name.
//!
//! It is not a recursive resolver, not DNSSEC-aware (the DO bit is echoed,
//! nothing is signed), and never reads the store: it works from the
//! `watch::Receiver<Arc<Snapshot>>` it is given.
//!
//! # Design
//!
//! Own loops over a pre-encoded zone ([`zone`]), not hickory-server: a
//! query is answered by copying pre-encoded bytes, on one synchronous path
//! ([`engine`]) shared by UDP (threads batching with recvmmsg/sendmmsg),
//! TCP and the fuzz target; only forwarding is asynchronous. The reasons
//! and the alternatives weighed are in ARCHITECTURE.md ("Design
//! decisions").

mod acl;
mod chase;
pub mod engine;
mod forward;
pub mod lookup;
#[doc(hidden)]
pub use forward::fuzz_response;
mod metrics;
mod mmsg;
mod server;
pub mod wire;
pub mod zone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pier_model::{Cidr, Snapshot};
use tokio::sync::watch;

pub use acl::Acl;

/// The DNS server's config: the `dns` section of the agent's config.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// The mesh domain: `<svc>.<ns>.svc.<domain>`.
    pub domain: String,
    pub vip_ttl_secs: u32,
    /// Headless A records and SRV records.
    pub headless_ttl_secs: u32,
    pub pod_ttl_secs: u32,
    /// SOA TTL and MINIMUM, hence how long NXDOMAIN/NODATA are cached.
    pub negative_ttl_secs: u32,
    /// Empty: the nameservers of /etc/resolv.conf, read at start.
    pub upstreams: Vec<SocketAddr>,
    /// SERVFAIL after this, over all upstreams together.
    pub upstream_timeout_ms: u64,
    /// Client networks answered besides loopback and the container networks.
    pub allow: Vec<Cidr>,
    /// Answer the host itself: loopback clients and clients whose source is
    /// one of the host's own addresses (a query the host sends to the DNS
    /// VIP leaves from the VIP's address). Turning it off makes the ACL
    /// testable on one host; the agent leaves it on.
    pub allow_loopback: bool,
    /// Forward cache size, in responses.
    pub cache_entries: usize,
    /// The EDNS UDP payload size we advertise and the most we send over UDP.
    pub max_udp_payload: u16,
    /// Forwarded queries in flight at once; more get SERVFAIL at once.
    pub max_inflight_forwards: usize,
    /// Open TCP connections at once; more wait to be accepted.
    pub max_tcp_connections: usize,
    /// Tasks receiving on each UDP socket; 0 = one per core, at most 4.
    pub udp_workers: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            domain: "pier.internal".into(),
            vip_ttl_secs: 30,
            headless_ttl_secs: 1,
            pod_ttl_secs: 1,
            negative_ttl_secs: 1,
            upstreams: Vec::new(),
            upstream_timeout_ms: 2000,
            allow: Vec::new(),
            allow_loopback: true,
            cache_entries: 10_000,
            // 1232: the DNS flag day 2020 size, which avoids IP fragmentation.
            max_udp_payload: 1232,
            max_inflight_forwards: 1024,
            max_tcp_connections: 256,
            udp_workers: 0,
        }
    }
}

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns config: {field} {why}")]
    Config { field: &'static str, why: String },
    #[error("dns socket {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("dns: no UDP socket and no TCP listener to serve on")]
    NothingToServe,
}

fn bad(field: &'static str, why: impl Into<String>) -> DnsError {
    DnsError::Config {
        field,
        why: why.into(),
    }
}

/// One week: longer TTLs would only make stale answers live longer.
const MAX_TTL: u32 = 7 * 86400;

impl DnsConfig {
    /// The upstreams names outside the mesh are asked of: `upstreams`, or
    /// when it is empty the nameservers of /etc/resolv.conf, read now.
    pub fn effective_upstreams(&self) -> Vec<SocketAddr> {
        if !self.upstreams.is_empty() {
            return self.upstreams.clone();
        }
        match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(t) => forward::resolv_conf_nameservers(&t),
            Err(error) => {
                tracing::warn!(%error, "cannot read /etc/resolv.conf: names outside the mesh will get SERVFAIL");
                Vec::new()
            }
        }
    }

    pub fn validate(&self) -> Result<(), DnsError> {
        let d = self.domain.trim_end_matches('.');
        if d.is_empty() {
            return Err(bad("domain", "is empty"));
        }
        if d.len() > 200 {
            return Err(bad(
                "domain",
                "is longer than 200 characters (names below it need room)",
            ));
        }
        for l in d.split('.') {
            if !pier_model::is_dns_label(l) {
                return Err(bad(
                    "domain",
                    format!("{:?} has a bad label {l:?} (RFC 1123)", self.domain),
                ));
            }
        }
        for (f, v) in [
            ("vip_ttl_secs", self.vip_ttl_secs),
            ("headless_ttl_secs", self.headless_ttl_secs),
            ("pod_ttl_secs", self.pod_ttl_secs),
            ("negative_ttl_secs", self.negative_ttl_secs),
        ] {
            if v > MAX_TTL {
                return Err(bad(f, format!("{v} is over a week ({MAX_TTL} s)")));
            }
        }
        if !(50..=30_000).contains(&self.upstream_timeout_ms) {
            return Err(bad(
                "upstream_timeout_ms",
                format!("{} is not within 50..=30000", self.upstream_timeout_ms),
            ));
        }
        if self.cache_entries > 10_000_000 {
            return Err(bad("cache_entries", "is over 10 000 000"));
        }
        if self.max_udp_payload < 512 {
            return Err(bad("max_udp_payload", "is below 512 (RFC 6891)"));
        }
        if self.max_inflight_forwards == 0 {
            return Err(bad("max_inflight_forwards", "must be at least 1"));
        }
        if self.max_tcp_connections == 0 {
            return Err(bad("max_tcp_connections", "must be at least 1"));
        }
        if self.udp_workers > 64 {
            return Err(bad("udp_workers", "is over 64"));
        }
        for u in &self.upstreams {
            if u.port() == 0 {
                return Err(bad("upstreams", format!("{u} has port 0")));
            }
        }
        Ok(())
    }

    fn zone_params(&self) -> zone::ZoneParams {
        zone::ZoneParams {
            domain: wire::wire_name(&self.domain).unwrap_or_else(|| vec![0]),
            vip_ttl: self.vip_ttl_secs,
            headless_ttl: self.headless_ttl_secs,
            pod_ttl: self.pod_ttl_secs,
            negative_ttl: self.negative_ttl_secs,
        }
    }
}

/// The state every loop shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub zone: Arc<ArcSwap<zone::Zone>>,
    pub acl: Arc<ArcSwap<Acl>>,
    /// What `acl` is built from; only the slow paths lock it.
    pub acl_inputs: std::sync::Mutex<acl::AclInputs>,
    pub fwd: forward::Forwarder,
    pub metrics: metrics::Metrics,
    pub our_payload: u16,
    pub forwards: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Rebuilds the ACL for these container networks, if they changed. A
    /// new network often comes with a new host address (its bridge's
    /// gateway), so the host's addresses are read again too.
    pub(crate) fn set_networks(&self, nets: Vec<Cidr>) {
        let mut inputs = self.acl_inputs.lock().unwrap_or_else(|p| p.into_inner());
        if inputs.nets == nets {
            return;
        }
        inputs.nets = nets;
        inputs.scan_local();
        self.acl.store(Arc::new(inputs.build()));
    }

    /// The slow path for a client the caller's (possibly cached) ACL
    /// refused: answer if the current ACL allows it, or if it is one of the
    /// host's own addresses added since they were last read (read again at
    /// most every [`acl::LOCAL_RESCAN`]).
    pub(crate) fn admit(&self, ip: std::net::IpAddr) -> bool {
        if self.acl.load().allows(ip) {
            return true;
        }
        let mut inputs = self.acl_inputs.lock().unwrap_or_else(|p| p.into_inner());
        if !inputs.may_rescan(std::time::Instant::now()) || !inputs.scan_local() {
            return false;
        }
        let acl = Arc::new(inputs.build());
        let ok = acl.allows(ip);
        self.acl.store(acl);
        ok
    }
}

/// The DNS server. Build with [`DnsServer::new`], run with [`DnsServer::serve`].
#[derive(Debug)]
pub struct DnsServer {
    cfg: DnsConfig,
    shared: Arc<Shared>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    networks: watch::Receiver<Vec<Cidr>>,
    /// Built in `new`, moved to the rebuild task by `serve`.
    updater: Option<zone::ZoneUpdater>,
}

impl DnsServer {
    /// Validate the config, build the zone from the current snapshot and
    /// register the metrics. Binds nothing.
    pub fn new(
        cfg: DnsConfig,
        mut snapshot: watch::Receiver<Arc<Snapshot>>,
        mut container_networks: watch::Receiver<Vec<Cidr>>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<DnsServer, DnsError> {
        cfg.validate()?;
        let upstreams = cfg.effective_upstreams();
        let metrics = metrics::Metrics::new(registry);
        let snap = snapshot.borrow_and_update().clone();
        let updater = zone::ZoneUpdater::new(snap, cfg.zone_params());
        let z = updater.zone();
        metrics.zone_names.set(z.names.len() as i64);
        let mut inputs = acl::AclInputs {
            host: cfg.allow_loopback,
            allow: cfg.allow.clone(),
            nets: container_networks.borrow_and_update().clone(),
            local: Vec::new(),
            scanned: None,
        };
        inputs.scan_local();
        let acl = inputs.build();
        let shared = Shared {
            zone: Arc::new(ArcSwap::new(z)),
            acl: Arc::new(ArcSwap::from_pointee(acl)),
            acl_inputs: std::sync::Mutex::new(inputs),
            fwd: forward::Forwarder {
                upstreams,
                timeout: Duration::from_millis(cfg.upstream_timeout_ms),
                cache: std::sync::Mutex::new(forward::Cache::new(cfg.cache_entries)),
            },
            metrics,
            our_payload: cfg.max_udp_payload,
            forwards: Arc::new(tokio::sync::Semaphore::new(cfg.max_inflight_forwards)),
        };
        Ok(DnsServer {
            cfg,
            shared: Arc::new(shared),
            snapshot,
            networks: container_networks,
            updater: Some(updater),
        })
    }

    /// Serve this zone instead of the snapshot's until the snapshot next
    /// changes. For the benchmark, which serves the reference servers' zone
    /// file through the same query path.
    #[doc(hidden)]
    pub fn replace_zone(&self, zone: zone::Zone) {
        self.shared.metrics.zone_names.set(zone.names.len() as i64);
        self.shared.zone.store(Arc::new(zone));
    }

    /// The zone parameters (domain, TTLs) this config gives.
    #[doc(hidden)]
    pub fn zone_params(&self) -> zone::ZoneParams {
        self.cfg.zone_params()
    }

    /// Names in the zone being served.
    #[doc(hidden)]
    pub fn zone_len(&self) -> usize {
        self.shared.zone.load().names.len()
    }

    /// The upstreams in use (the configured ones, or resolv.conf's).
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.shared.fwd.upstreams
    }

    /// Serves until `cancel`; takes already-bound sockets (tests bind
    /// 127.0.0.1:0). On cancel it stops receiving and accepting, gives open
    /// TCP connections and forwards up to the upstream timeout to finish,
    /// then returns.
    pub async fn serve(
        self,
        udp: Vec<tokio::net::UdpSocket>,
        tcp: Vec<tokio::net::TcpListener>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<(), DnsError> {
        server::serve(self, udp, tcp, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_unknown_keys_are_rejected() {
        DnsConfig::default().validate().expect("default validates");
        let e = serde_json::from_str::<DnsConfig>(r#"{"domain":"x.internal","bogus":1}"#)
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let c: DnsConfig =
            serde_json::from_str(r#"{"upstreams":["10.0.0.2:53"],"allow":["192.0.2.0/24"]}"#)
                .expect("partial config");
        assert_eq!(c.domain, "pier.internal");
        assert_eq!(c.upstreams.len(), 1);
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |c: DnsConfig| c.validate().expect_err("invalid").to_string();
        let e = bad(DnsConfig {
            domain: "pier..internal".into(),
            ..DnsConfig::default()
        });
        assert!(e.contains("domain"), "{e}");
        let e = bad(DnsConfig {
            upstream_timeout_ms: 0,
            ..DnsConfig::default()
        });
        assert!(e.contains("upstream_timeout_ms"), "{e}");
        let e = bad(DnsConfig {
            max_udp_payload: 100,
            ..DnsConfig::default()
        });
        assert!(e.contains("max_udp_payload"), "{e}");
    }
}
