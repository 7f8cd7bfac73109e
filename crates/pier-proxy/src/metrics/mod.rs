//! Prometheus metrics per service port and per endpoint, and the
//! service-level counters the stats sampler reads.
//!
//! Handles are resolved once, when a balancer is built; the connection path
//! only touches atomics (and the histogram's short lock).
//!
//! The autoscaler's signals ([`Signals`]): per service port and per
//! endpoint, the connect latency and the time to first response byte in
//! [`AtomicSketch`]es (pier_model's mergeable log-linear buckets, one
//! `fetch_add` per observation), read once per sample interval by the
//! sampler, which turns them into windows: new connections per second, and
//! the window's sketches and p50/p99, shown as gauges in /metrics. They
//! are in `signals`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ConnectCause;

mod signals;

pub(crate) use signals::{AtomicSketch, FirstByte, Signals};

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
type FGauge = Gauge<f64, AtomicU64>;

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
    svc_rate: Family<SvcLabels, FGauge>,
    svc_fb_p50: Family<SvcLabels, FGauge>,
    svc_fb_p99: Family<SvcLabels, FGauge>,
    svc_connect_p99: Family<SvcLabels, FGauge>,
    ep_rate: Family<EpLabels, FGauge>,
    ep_fb_p99: Family<EpLabels, FGauge>,
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
            svc_rate: Family::default(),
            svc_fb_p50: Family::default(),
            svc_fb_p99: Family::default(),
            svc_connect_p99: Family::default(),
            ep_rate: Family::default(),
            ep_fb_p99: Family::default(),
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
            "connection_rate",
            "New client connections per second over the last sample window, per service port",
            self.svc_rate.clone(),
        );
        r.register(
            "first_byte_p50_seconds",
            "Median time from the first client byte forwarded to the first byte back, over the last sample window, per service port",
            self.svc_fb_p50.clone(),
        );
        r.register(
            "first_byte_p99_seconds",
            "p99 time from the first client byte forwarded to the first byte back, over the last sample window, per service port",
            self.svc_fb_p99.clone(),
        );
        r.register(
            "connect_p99_seconds",
            "p99 connect latency over the last sample window, per service port",
            self.svc_connect_p99.clone(),
        );
        r.register(
            "endpoint_connection_rate",
            "New connections per second over the last sample window, per endpoint",
            self.ep_rate.clone(),
        );
        r.register(
            "endpoint_first_byte_p99_seconds",
            "p99 time to first response byte over the last sample window, per endpoint",
            self.ep_fb_p99.clone(),
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
            sig: Arc::new(Signals {
                connect: AtomicSketch::default(),
                first_byte: AtomicSketch::default(),
                prev: Mutex::default(),
                rate: self.svc_rate.get_or_create_owned(&l),
                fb_p50: Some(self.svc_fb_p50.get_or_create_owned(&l)),
                fb_p99: self.svc_fb_p99.get_or_create_owned(&l),
                connect_p99: Some(self.svc_connect_p99.get_or_create_owned(&l)),
            }),
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
        self.svc_rate.remove(&l);
        self.svc_fb_p50.remove(&l);
        self.svc_fb_p99.remove(&l);
        self.svc_connect_p99.remove(&l);
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
            sig: Arc::new(Signals::endpoint(
                self.ep_rate.get_or_create_owned(&l),
                self.ep_fb_p99.get_or_create_owned(&l),
            )),
            labels: Some(l),
        }
    }

    /// Drops a gone endpoint's series.
    pub fn remove_endpoint(&self, m: &EpMetrics) {
        let Some(l) = &m.labels else { return };
        self.ep_active.remove(l);
        self.ep_total.remove(l);
        self.ep_latency.remove(l);
        self.ep_rate.remove(l);
        self.ep_fb_p99.remove(l);
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
    pub sig: Arc<Signals>,
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
    /// First-byte times (its connect latency is in `latency`).
    pub sig: Arc<Signals>,
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
            sig: Arc::new(Signals::endpoint(FGauge::default(), FGauge::default())),
            labels: None,
        }
    }
    pub fn error(&self, c: ConnectCause) -> &Counter {
        &self.errors[cause_index(c)]
    }
}

#[cfg(test)]
mod tests;
