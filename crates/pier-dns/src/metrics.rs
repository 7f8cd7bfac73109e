//! Metrics: queries by type and rcode, a latency histogram, cache hits and
//! misses, forwarding failures, zone rebuilds. The counters of every
//! (type, rcode) pair are created up front so that a query costs an index
//! and an atomic add, not a label lookup.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::wire::rtype;

const TYPES: [(u16, &str); 11] = [
    (rtype::A, "A"),
    (rtype::AAAA, "AAAA"),
    (rtype::SRV, "SRV"),
    (rtype::PTR, "PTR"),
    (rtype::SOA, "SOA"),
    (rtype::NS, "NS"),
    (rtype::ANY, "ANY"),
    (rtype::TXT, "TXT"),
    (rtype::MX, "MX"),
    (rtype::CNAME, "CNAME"),
    (0, "other"),
];
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

type Labels = [(&'static str, &'static str); 2];

#[derive(Debug)]
pub struct Metrics {
    queries: Vec<Counter>,
    pub latency: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub dropped: Counter,
    pub upstream_failures: Counter,
    pub zone_rebuilds: Counter,
    pub zone_names: Gauge,
}

#[inline]
fn type_index(t: u16) -> usize {
    TYPES
        .iter()
        .position(|(v, _)| *v == t)
        .unwrap_or(TYPES.len() - 1)
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let family = Family::<Labels, Counter>::default();
        let mut queries = Vec::with_capacity(TYPES.len() * RCODES.len());
        for (_, t) in TYPES {
            for r in RCODES {
                queries.push(family.get_or_create_owned(&[("type", t), ("rcode", r)]));
            }
        }
        // 10 µs to ~5 s: a cached answer to an upstream timeout.
        let latency = Histogram::new(exponential_buckets(10e-6, 2.0, 20));
        let m = Metrics {
            queries,
            latency,
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            dropped: Counter::default(),
            upstream_failures: Counter::default(),
            zone_rebuilds: Counter::default(),
            zone_names: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("dns");
        r.register("queries", "DNS queries answered, by type and rcode", family);
        r.register(
            "latency_seconds",
            "Time from receiving a query to sending its answer",
            m.latency.clone(),
        );
        r.register(
            "cache_hits",
            "Forwarded queries answered from the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Forwarded queries sent upstream",
            m.cache_misses.clone(),
        );
        r.register(
            "dropped",
            "Packets dropped without an answer (no header, or a response)",
            m.dropped.clone(),
        );
        r.register(
            "upstream_failures",
            "Forwarded queries answered SERVFAIL because no upstream answered in time",
            m.upstream_failures.clone(),
        );
        r.register(
            "zone_rebuilds",
            "Times the mesh zone was rebuilt from a snapshot",
            m.zone_rebuilds.clone(),
        );
        r.register("zone_names", "Names in the mesh zone", m.zone_names.clone());
        m
    }

    #[inline]
    pub fn count(&self, qtype: u16, rcode: u16) {
        let r = (rcode as usize).min(RCODES.len() - 1);
        self.queries[type_index(qtype) * RCODES.len() + r].inc();
    }
}
