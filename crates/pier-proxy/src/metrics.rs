//! Prometheus metrics per service port and per endpoint, and the
//! service-level counters the stats sampler reads.
//!
//! Handles are resolved once, when a balancer is built; the connection path
//! only touches atomics (and the histogram's short lock).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ConnectCause;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SvcLabels {
    pub service: String,
    pub port: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SvcCauseLabels {
    pub service: String,
    pub port: String,
    pub cause: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SvcDirLabels {
    pub service: String,
    pub port: String,
    pub direction: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EpLabels {
    pub service: String,
    pub port: String,
    pub endpoint: String,
    /// `direct`, or `mesh` when the endpoint is on another node and is
    /// reached through that node's mesh port.
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EpCauseLabels {
    pub service: String,
    pub port: String,
    pub endpoint: String,
    pub route: String,
    pub cause: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EpDirLabels {
    pub service: String,
    pub port: String,
    pub endpoint: String,
    pub route: String,
    pub direction: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s: loopback connects take tens of µs, the connect
    // timeout is 1 s by default.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// `in` is client → endpoint, `out` is endpoint → client.
const IN: &str = "in";
const OUT: &str = "out";
/// Not a connect failure of an endpoint: the service had none to try.
pub(crate) const NO_ENDPOINT: &str = "no_endpoint";

/// Every metric family of the proxy.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    svc_active: Family<SvcLabels, Gauge>,
    svc_total: Family<SvcLabels, Counter>,
    svc_errors: Family<SvcCauseLabels, Counter>,
    svc_latency: HistFamily<SvcLabels>,
    svc_bytes: Family<SvcDirLabels, Counter>,
    ep_active: Family<EpLabels, Gauge>,
    ep_total: Family<EpLabels, Counter>,
    ep_errors: Family<EpCauseLabels, Counter>,
    ep_latency: HistFamily<EpLabels>,
    ep_bytes: Family<EpDirLabels, Counter>,
    pub(crate) node_port_refusals: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            svc_active: Family::default(),
            svc_total: Family::default(),
            svc_errors: Family::default(),
            svc_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            svc_bytes: Family::default(),
            ep_active: Family::default(),
            ep_total: Family::default(),
            ep_errors: Family::default(),
            ep_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ep_bytes: Family::default(),
            node_port_refusals: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        // The daemon's registry has the `pier` prefix: `pier_proxy_*`.
        let r = registry.sub_registry_with_prefix("proxy");
        r.register(
            "connections_active",
            "Open client connections per service port",
            self.svc_active.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted per service port",
            self.svc_total.clone(),
        );
        r.register(
            "connect_errors",
            "Failed connects to endpoints per service port, by cause",
            self.svc_errors.clone(),
        );
        r.register(
            "connect_latency_seconds",
            "Time to connect to an endpoint, per service port",
            self.svc_latency.clone(),
        );
        r.register(
            "bytes",
            "Bytes proxied per service port; in = client to endpoint",
            self.svc_bytes.clone(),
        );
        r.register(
            "endpoint_connections_active",
            "Open connections per endpoint",
            self.ep_active.clone(),
        );
        r.register(
            "endpoint_connections",
            "Connections made per endpoint",
            self.ep_total.clone(),
        );
        r.register(
            "endpoint_connect_errors",
            "Failed connects per endpoint, by cause",
            self.ep_errors.clone(),
        );
        r.register(
            "endpoint_connect_latency_seconds",
            "Time to connect, per endpoint",
            self.ep_latency.clone(),
        );
        r.register(
            "endpoint_bytes",
            "Bytes proxied per endpoint; in = client to endpoint",
            self.ep_bytes.clone(),
        );
        r.register(
            "node_port_refusals",
            "Node-port connections reset at accept because of a cap, by reason (total, per_client)",
            self.node_port_refusals.clone(),
        );
    }

    pub fn service(&self, service: &str, port: &str) -> SvcMetrics {
        let l = SvcLabels {
            service: service.into(),
            port: port.into(),
        };
        let cause = |c: &str| {
            self.svc_errors.get_or_create_owned(&SvcCauseLabels {
                service: service.into(),
                port: port.into(),
                cause: c.into(),
            })
        };
        let dir = |d: &str| {
            self.svc_bytes.get_or_create_owned(&SvcDirLabels {
                service: service.into(),
                port: port.into(),
                direction: d.into(),
            })
        };
        SvcMetrics {
            active: self.svc_active.get_or_create_owned(&l),
            total: self.svc_total.get_or_create_owned(&l),
            errors: ConnectCause::ALL.map(|c| cause(c.as_str())),
            no_endpoint: cause(NO_ENDPOINT),
            latency: self.svc_latency.get_or_create_owned(&l),
            bytes_in: dir(IN),
            bytes_out: dir(OUT),
            p99: Arc::new(LatencyBuckets::default()),
        }
    }

    pub fn remove_service(&self, service: &str, port: &str) {
        let l = SvcLabels {
            service: service.into(),
            port: port.into(),
        };
        self.svc_active.remove(&l);
        self.svc_total.remove(&l);
        self.svc_latency.remove(&l);
        for c in ConnectCause::ALL
            .map(|c| c.as_str())
            .into_iter()
            .chain([NO_ENDPOINT])
        {
            self.svc_errors.remove(&SvcCauseLabels {
                service: service.into(),
                port: port.into(),
                cause: c.into(),
            });
        }
        for d in [IN, OUT] {
            self.svc_bytes.remove(&SvcDirLabels {
                service: service.into(),
                port: port.into(),
                direction: d.into(),
            });
        }
    }

    /// `route`: `direct` or `mesh`.
    pub fn endpoint(&self, service: &str, port: &str, endpoint: &str, route: &str) -> EpMetrics {
        let l = EpLabels {
            service: service.into(),
            port: port.into(),
            endpoint: endpoint.into(),
            route: route.into(),
        };
        let cause = |c: ConnectCause| {
            self.ep_errors.get_or_create_owned(&EpCauseLabels {
                service: service.into(),
                port: port.into(),
                endpoint: endpoint.into(),
                route: route.into(),
                cause: c.as_str().into(),
            })
        };
        let dir = |d: &str| {
            self.ep_bytes.get_or_create_owned(&EpDirLabels {
                service: service.into(),
                port: port.into(),
                endpoint: endpoint.into(),
                route: route.into(),
                direction: d.into(),
            })
        };
        EpMetrics {
            active: self.ep_active.get_or_create_owned(&l),
            total: self.ep_total.get_or_create_owned(&l),
            errors: ConnectCause::ALL.map(cause),
            latency: self.ep_latency.get_or_create_owned(&l),
            bytes_in: dir(IN),
            bytes_out: dir(OUT),
            labels: Some(l),
        }
    }

    /// Drops a gone endpoint's series.
    pub fn remove_endpoint(&self, m: &EpMetrics) {
        let Some(l) = &m.labels else { return };
        self.ep_active.remove(l);
        self.ep_total.remove(l);
        self.ep_latency.remove(l);
        for c in ConnectCause::ALL {
            self.ep_errors.remove(&EpCauseLabels {
                service: l.service.clone(),
                port: l.port.clone(),
                endpoint: l.endpoint.clone(),
                route: l.route.clone(),
                cause: c.as_str().into(),
            });
        }
        for d in [IN, OUT] {
            self.ep_bytes.remove(&EpDirLabels {
                service: l.service.clone(),
                port: l.port.clone(),
                endpoint: l.endpoint.clone(),
                route: l.route.clone(),
                direction: d.into(),
            });
        }
    }
}

fn cause_index(c: ConnectCause) -> usize {
    ConnectCause::ALL.iter().position(|x| *x == c).unwrap_or(0)
}

/// One service port's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct SvcMetrics {
    pub active: Gauge,
    pub total: Counter,
    pub errors: [Counter; 5],
    pub no_endpoint: Counter,
    pub latency: Histogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub p99: Arc<LatencyBuckets>,
}

impl SvcMetrics {
    pub fn error(&self, c: ConnectCause) -> &Counter {
        &self.errors[cause_index(c)]
    }
    pub fn error_total(&self) -> u64 {
        self.errors.iter().map(|c| c.get()).sum::<u64>() + self.no_endpoint.get()
    }
}

/// One endpoint's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct EpMetrics {
    /// Outstanding connections, connecting ones included; P2C reads it.
    pub active: Gauge,
    pub total: Counter,
    pub errors: [Counter; 5],
    pub latency: Histogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    labels: Option<EpLabels>,
}

impl EpMetrics {
    /// Handles registered nowhere, for unit tests.
    #[cfg(test)]
    pub fn detached() -> Self {
        EpMetrics {
            active: Gauge::default(),
            total: Counter::default(),
            errors: Default::default(),
            latency: latency_histogram(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            labels: None,
        }
    }
    pub fn error(&self, c: ConnectCause) -> &Counter {
        &self.errors[cause_index(c)]
    }
}

/// Connect latencies in power-of-two microsecond buckets, for the p99 in
/// the stats the autoscaler reads.
#[derive(Debug, Default)]
pub(crate) struct LatencyBuckets {
    b: [AtomicU64; 25],
}

impl LatencyBuckets {
    pub fn observe(&self, us: u64) {
        let i = (64 - us.leading_zeros() as usize).min(24);
        self.b[i].fetch_add(1, Relaxed);
    }

    pub fn counts(&self) -> [u64; 25] {
        std::array::from_fn(|i| self.b[i].load(Relaxed))
    }

    /// The p99 upper bound in µs of the observations between `prev` and
    /// `now` (bucket counts); 0 when there were none.
    pub fn p99_between(prev: &[u64; 25], now: &[u64; 25]) -> u64 {
        let d: [u64; 25] = std::array::from_fn(|i| now[i].saturating_sub(prev[i]));
        let total: u64 = d.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = total - total / 100;
        let mut seen = 0;
        for (i, n) in d.iter().enumerate() {
            seen += n;
            if seen >= want {
                return 1u64 << i;
            }
        }
        1u64 << 24
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_of_latency_buckets() {
        let b = LatencyBuckets::default();
        let zero = b.counts();
        for _ in 0..990 {
            b.observe(100);
        }
        for _ in 0..10 {
            b.observe(5000);
        }
        let p = LatencyBuckets::p99_between(&zero, &b.counts());
        assert_eq!(p, 128);
        b.observe(5000);
        let mid = b.counts();
        assert_eq!(LatencyBuckets::p99_between(&mid, &mid), 0);
    }

    #[test]
    fn metrics_encode_with_service_and_endpoint_labels() {
        let m = Metrics::new();
        // As the daemon does: its registry prefixes everything `pier`.
        let mut r = Registry::with_prefix("pier");
        m.register(&mut r);
        let s = m.service("default/web", "http");
        s.total.inc();
        let e = m.endpoint("default/web", "http", "10.0.0.2:80", "mesh");
        e.error(ConnectCause::Refused).inc();
        e.bytes_out.inc_by(42);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(
            out.contains(r#"pier_proxy_connections_total{service="default/web",port="http"} 1"#),
            "{out}"
        );
        assert!(out.contains(r#"cause="refused""#), "{out}");
        assert!(out.contains(r#"pier_proxy_endpoint_bytes_total{service="default/web",port="http",endpoint="10.0.0.2:80",route="mesh",direction="out"} 42"#), "{out}");
        assert!(!out.contains("pier_pier_"), "{out}");
        m.remove_endpoint(&e);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(!out.contains("10.0.0.2:80"), "{out}");
    }
}
