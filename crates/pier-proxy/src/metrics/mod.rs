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
//! the window's sketches and p50/p99, shown as gauges in /metrics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pier_model::sketch::{self, Sketch};

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

/// A latency sketch the connection path writes with one relaxed
/// `fetch_add`: pier_model's bucket layout in `AtomicU32`s (a window is a
/// wrapping difference, right while a bucket gets fewer than 2^32
/// observations per sample interval). 708 bytes.
#[derive(Debug)]
pub(crate) struct AtomicSketch {
    b: [AtomicU32; sketch::BUCKETS],
}

impl Default for AtomicSketch {
    fn default() -> Self {
        AtomicSketch {
            b: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl AtomicSketch {
    pub fn observe(&self, us: u64) {
        self.b[sketch::bucket(us)].fetch_add(1, Relaxed);
    }

    /// The observations since `prev` (the counts it returned last time,
    /// sparse), as a sketch; `prev` becomes the current counts.
    fn window(&self, prev: &mut Vec<(u16, u32)>) -> Sketch {
        let mut out = Vec::new();
        let mut now = Vec::with_capacity(prev.len().max(8));
        let mut j = 0;
        for (i, b) in self.b.iter().enumerate() {
            let c = b.load(Relaxed);
            let mut before = 0;
            while j < prev.len() && (prev[j].0 as usize) < i {
                j += 1;
            }
            if j < prev.len() && prev[j].0 as usize == i {
                before = prev[j].1;
            }
            if c != 0 {
                now.push((i as u16, c));
            }
            let d = c.wrapping_sub(before);
            if d != 0 {
                out.push((i as u16, d as u64));
            }
        }
        *prev = now;
        Sketch(out)
    }
}

/// What the sampler remembers between two windows.
#[derive(Debug, Default)]
struct Prev {
    connect: Vec<(u16, u32)>,
    first_byte: Vec<(u16, u32)>,
    total: u64,
    at: Option<Instant>,
}

/// One window of a service port's or an endpoint's signals.
#[derive(Debug, Default)]
pub(crate) struct Window {
    pub ms: u64,
    pub new_conns: u64,
    pub connect: Sketch,
    pub first_byte: Sketch,
}

/// The autoscaler's signals of a service port or an endpoint.
#[derive(Debug)]
pub(crate) struct Signals {
    pub connect: AtomicSketch,
    pub first_byte: AtomicSketch,
    /// The sampler's alone (one lock per port per sample interval, never
    /// on the connection path).
    prev: Mutex<Prev>,
    rate: FGauge,
    fb_p50: Option<FGauge>,
    fb_p99: FGauge,
    connect_p99: Option<FGauge>,
}

impl Signals {
    fn endpoint(rate: FGauge, fb_p99: FGauge) -> Signals {
        Signals {
            connect: AtomicSketch::default(),
            first_byte: AtomicSketch::default(),
            prev: Mutex::default(),
            rate,
            fb_p50: None,
            fb_p99,
            connect_p99: None,
        }
    }

    /// Closes the window that began at the last call (`total`: the
    /// connections counted so far) and sets the window's gauges. The first
    /// call's window starts at the handle's creation.
    pub fn window(&self, total: u64, now: Instant) -> Window {
        let mut p = self.prev.lock().unwrap_or_else(|e| e.into_inner());
        let ms =
            p.at.map(|a| now.duration_since(a).as_millis() as u64)
                .unwrap_or(0);
        let w = Window {
            ms,
            new_conns: total.saturating_sub(p.total),
            connect: self.connect.window(&mut p.connect),
            first_byte: self.first_byte.window(&mut p.first_byte),
        };
        p.total = total;
        p.at = Some(now);
        drop(p);
        let secs = |q: Option<u64>| q.map(|us| us as f64 / 1e6).unwrap_or(0.0);
        self.rate.set(if w.ms == 0 {
            0.0
        } else {
            w.new_conns as f64 * 1000.0 / w.ms as f64
        });
        self.fb_p99.set(secs(w.first_byte.quantile(0.99)));
        if let Some(g) = &self.fb_p50 {
            g.set(secs(w.first_byte.quantile(0.5)));
        }
        if let Some(g) = &self.connect_p99 {
            g.set(secs(w.connect.quantile(0.99)));
        }
        w
    }
}

/// Time to first response byte of one connection: from the first client
/// byte forwarded to the endpoint to the first byte forwarded back. A
/// connection whose endpoint speaks first (SMTP, MySQL) gives no sample;
/// only the first exchange of a connection is measured. On the stack of
/// the connection's task; the copy loops call [`FirstByte::on_bytes`].
#[derive(Debug)]
pub(crate) struct FirstByte<'a> {
    t0: Instant,
    /// µs after `t0` + 1 when the first client byte went out; 0 before.
    sent: AtomicU64,
    done: AtomicBool,
    svc: &'a Signals,
    ep: &'a Signals,
}

impl<'a> FirstByte<'a> {
    pub fn new(svc: &'a Signals, ep: &'a Signals) -> Self {
        FirstByte {
            t0: Instant::now(),
            sent: AtomicU64::new(0),
            done: AtomicBool::new(false),
            svc,
            ep,
        }
    }

    /// Bytes went to the endpoint (`to_endpoint`) or back to the client.
    /// After the sample, one relaxed load.
    #[inline]
    pub fn on_bytes(&self, to_endpoint: bool) {
        if self.done.load(Relaxed) {
            return;
        }
        if to_endpoint {
            if self.sent.load(Relaxed) == 0 {
                self.sent
                    .store(self.t0.elapsed().as_micros() as u64 + 1, Relaxed);
            }
            return;
        }
        self.done.store(true, Relaxed);
        let sent = self.sent.load(Relaxed);
        if sent != 0 {
            let us = (self.t0.elapsed().as_micros() as u64 + 1).saturating_sub(sent);
            self.svc.first_byte.observe(us);
            self.ep.first_byte.observe(us);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_what_happened_since_the_last_sample() {
        let m = Metrics::new();
        let s = m.service("default/web", "http");
        let e = m.endpoint("default/web", "http", "10.0.0.2:80", "direct");
        let t0 = Instant::now();
        let w0 = s.sig.window(0, t0);
        assert_eq!((w0.ms, w0.new_conns), (0, 0));
        for _ in 0..990 {
            s.sig.connect.observe(100);
        }
        for _ in 0..10 {
            s.sig.connect.observe(5000);
        }
        let w = s
            .sig
            .window(1000, t0 + std::time::Duration::from_millis(500));
        assert_eq!((w.ms, w.new_conns, w.connect.count()), (500, 1000, 1000));
        let p99 = w.connect.quantile(0.99).unwrap();
        assert!((94..=106).contains(&p99), "{p99}");
        assert_eq!(s.sig.rate.get(), 2000.0);
        // The next window holds only what came after.
        s.sig.connect.observe(5000);
        let w = s
            .sig
            .window(1001, t0 + std::time::Duration::from_millis(1500));
        assert_eq!((w.new_conns, w.connect.count()), (1, 1));
        let p = w.connect.quantile(0.99).unwrap();
        assert!((4700..=5300).contains(&p), "{p}");
        // First byte: a sample only once a client byte went out first.
        let fb = FirstByte::new(&s.sig, &e.sig);
        fb.on_bytes(true);
        std::thread::sleep(std::time::Duration::from_millis(3));
        fb.on_bytes(true);
        fb.on_bytes(false);
        fb.on_bytes(false);
        let server_first = FirstByte::new(&s.sig, &e.sig);
        server_first.on_bytes(false);
        server_first.on_bytes(true);
        server_first.on_bytes(false);
        let w = s
            .sig
            .window(1001, t0 + std::time::Duration::from_millis(2500));
        assert_eq!(w.first_byte.count(), 1);
        let p = w.first_byte.quantile(0.5).unwrap();
        assert!((2800..=200_000).contains(&p), "{p}");
        let we = e.sig.window(0, t0);
        assert_eq!(we.first_byte.count(), 1);
    }

    #[test]
    fn atomic_counts_wrap_within_a_window() {
        let a = AtomicSketch::default();
        a.b[5].store(u32::MAX - 1, Relaxed);
        let mut prev = Vec::new();
        a.window(&mut prev);
        a.observe(5);
        a.observe(5);
        a.observe(5);
        assert_eq!(a.window(&mut prev).0, vec![(5, 3)]);
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
