//! Endpoint state and the per-service-port balancer.
//!
//! A [`Balancer`] is immutable and rebuilt when the snapshot changes; the
//! per-endpoint [`EpState`] it points to lives across rebuilds, so
//! outstanding-connection counts, latency EWMAs and ejections survive. A
//! pick is a load of the current balancer (arc-swap, done by the caller) and
//! a few relaxed atomics.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use pier_model::{LbPolicy, Name};
use tokio_util::sync::CancellationToken;

use crate::metrics::EpMetrics;

/// How a proxy reaches an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// A TCP connect to the endpoint's address.
    Direct,
    /// Through the mTLS mesh port of the endpoint's node.
    Mesh { peer: SocketAddr, node: Name },
}

impl Route {
    /// The `route` label of the endpoint's metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Mesh { .. } => "mesh",
        }
    }
}

/// One endpoint of one service port, as this proxy sees it.
#[derive(Debug)]
pub(crate) struct EpState {
    pub addr: SocketAddr,
    pub route: Route,
    pub local: bool,
    pub m: EpMetrics,
    /// Connect latency EWMA in microseconds; 0 until the first connect.
    ewma_us: AtomicU64,
    /// [`now_ms`] of the last sample: the EWMA decays from then on (see
    /// [`EWMA_HALF_LIFE_MS`]).
    sampled_ms: AtomicU64,
    fails: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since [`clock_base`] until which the endpoint is
    /// ejected; 0 when it is not.
    ejected_until_ms: AtomicU64,
    /// Cancelled when a removed endpoint's drain timeout ends: its
    /// remaining connections close.
    pub drain: CancellationToken,
    /// Set while the endpoint is out of the snapshot.
    pub removed: AtomicBool,
}

/// Milliseconds since the first call, for ejection deadlines and EWMA
/// decay. Starts at 2^20 (about 17 minutes) rather than 0, so that "a while
/// ago" is always representable and 0 can mean "never".
pub(crate) fn now_ms() -> u64 {
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + (1 << 20)
}

impl EpState {
    pub fn new(addr: SocketAddr, route: Route, local: bool, m: EpMetrics) -> Self {
        EpState {
            addr,
            route,
            local,
            m,
            ewma_us: AtomicU64::new(0),
            sampled_ms: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            drain: CancellationToken::new(),
            removed: AtomicBool::new(false),
        }
    }

    pub fn outstanding(&self) -> u64 {
        self.m.active.get().max(0) as u64
    }

    /// The latency EWMA as of `now` (ms, from [`now_ms`]): halved for every
    /// [`EWMA_HALF_LIFE_MS`] since the last sample. 0: no sample yet.
    pub fn ewma_us_at(&self, now: u64) -> u64 {
        let v = self.ewma_us.load(Relaxed);
        let dt = now.saturating_sub(self.sampled_ms.load(Relaxed));
        if v == 0 || dt == 0 {
            return v;
        }
        let f = (-(dt as f64) / EWMA_HALF_LIFE_MS as f64).exp2();
        ((v as f64 * f) as u64).max(1)
    }

    #[cfg(test)]
    pub fn ewma_us(&self) -> u64 {
        self.ewma_us_at(now_ms())
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until_ms.load(Relaxed);
        until != 0 && now < until
    }

    /// A successful connect whose latency, when there is one worth
    /// comparing endpoints by, goes into the EWMA.
    pub fn on_connect_ok(&self, latency_us: Option<u64>) {
        if let Some(latency_us) = latency_us {
            // alpha = 1/4: a few samples move it, one outlier does not.
            let now = now_ms();
            let old = self.ewma_us_at(now);
            let new = if old == 0 {
                latency_us.max(1)
            } else {
                (old * 3 + latency_us) / 4
            };
            self.ewma_us.store(new.max(1), Relaxed);
            self.sampled_ms.store(now, Relaxed);
        }
        if self.fails.load(Relaxed) != 0 {
            self.fails.store(0, Relaxed);
        }
        if self.ejections.load(Relaxed) != 0 {
            self.ejections.store(0, Relaxed);
            self.ejected_until_ms.store(0, Relaxed);
        }
    }

    /// Records a failed connect; returns the ejection length in ms when
    /// this failure ejected the endpoint.
    pub fn on_connect_failed(&self, eject_after: u32, base_ms: u64) -> Option<u64> {
        let fails = self.fails.fetch_add(1, Relaxed) + 1;
        let ejections = self.ejections.load(Relaxed);
        // After a readmission that has not yet seen a success, one failure
        // is enough to eject again, for twice as long.
        if fails >= eject_after || (ejections > 0 && !self.is_ejected(now_ms())) {
            let n = self.ejections.fetch_add(1, Relaxed).min(6);
            let len = base_ms.saturating_mul(1 << n);
            self.ejected_until_ms.store(now_ms() + len, Relaxed);
            self.fails.store(0, Relaxed);
            return Some(len);
        }
        None
    }
}

/// The endpoints of one service port, rebuilt on every snapshot change.
#[derive(Debug)]
pub(crate) struct Balancer {
    pub lb: LbPolicy,
    /// Ready endpoints, removed ones excluded.
    pub all: Vec<Arc<EpState>>,
    /// Those of `all` on this node (or static), used first when the
    /// service prefers local endpoints and one is available.
    pub local: Vec<Arc<EpState>>,
    pub prefer_local: bool,
    rr: AtomicUsize,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let x = &0u8 as *const u8 as u64;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (x ^ t) | 1
    });
}

/// xorshift64*: fast, thread-local, good enough to pick among endpoints.
fn rand_below(n: usize) -> usize {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize % n
    })
}

impl Balancer {
    pub fn new(lb: LbPolicy, prefer_local: bool, all: Vec<Arc<EpState>>) -> Self {
        let local = all.iter().filter(|e| e.local).cloned().collect();
        Balancer {
            lb,
            all,
            local,
            prefer_local,
            rr: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint not in `tried` (pointers to endpoints already
    /// attempted for this client). Ejected endpoints are skipped unless
    /// every untried endpoint is ejected: a possibly dead endpoint beats a
    /// certain failure.
    pub fn pick(&self, tried: &[usize]) -> Option<&Arc<EpState>> {
        let now = now_ms();
        if self.prefer_local && !self.local.is_empty() {
            if let Some(e) = self.pick_in(&self.local, tried, now, false) {
                return Some(e);
            }
        }
        self.pick_in(&self.all, tried, now, false)
            .or_else(|| self.pick_in(&self.all, tried, now, true))
    }

    fn pick_in<'a>(
        &self,
        set: &'a [Arc<EpState>],
        tried: &[usize],
        now: u64,
        allow_ejected: bool,
    ) -> Option<&'a Arc<EpState>> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        let ok = |e: &Arc<EpState>| {
            (allow_ejected || !e.is_ejected(now)) && !tried.contains(&(Arc::as_ptr(e) as usize))
        };
        match self.lb {
            LbPolicy::RoundRobin => {
                let start = self.rr.fetch_add(1, Relaxed);
                (0..n).map(|i| &set[(start + i) % n]).find(|e| ok(e))
            }
            LbPolicy::P2c => {
                if n == 1 {
                    return ok(&set[0]).then_some(&set[0]);
                }
                let a = rand_below(n);
                let mut b = rand_below(n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&set[a], &set[b]);
                match (ok(ea), ok(eb)) {
                    (true, true) => Some(if better(eb, ea, now) { eb } else { ea }),
                    (true, false) => Some(ea),
                    (false, true) => Some(eb),
                    (false, false) => {
                        // Both unusable: the best of the rest, if any.
                        set.iter().filter(|e| ok(e)).min_by_key(|e| score(e, now))
                    }
                }
            }
        }
    }
}

/// Connect latencies below this count as equal. 1 ms: on a host or a LAN
/// connects take tens to hundreds of µs and their differences are noise;
/// without a floor the endpoint that happened to answer fastest would take
/// nearly all sequential connections.
const LATENCY_FLOOR_US: u64 = 1000;

/// How fast a latency EWMA decays while its endpoint gets no connections.
/// The EWMA only learns from connects, and P2C over two endpoints compares
/// both every time: without decay one slow sample (a busy moment, a
/// handshake) would make an endpoint lose every comparison for good, and
/// never get the connect that would clear it. 100 ms: an endpoint 10x
/// slower than the floor is tried again after about a third of a second.
pub(crate) const EWMA_HALF_LIFE_MS: u64 = 100;

/// The EWMA as of `now`, floored: below [`LATENCY_FLOOR_US`] latencies are
/// noise. An endpoint with no sample yet counts as the floor, so that it
/// gets tried.
fn latency(e: &EpState, now: u64) -> u64 {
    e.ewma_us_at(now).max(LATENCY_FLOOR_US)
}

/// Whether `a` is a better pick than `b`: fewer outstanding connections
/// (plus the one we would add), weighed by latency only when the two
/// latencies differ by more than 2x. Closer than that they are noise on a
/// busy host (one slow sample moves an EWMA by a quarter of itself), and
/// weighing them would hand every sequential connection to whichever
/// endpoint happened to sample a little faster; 10x slower still loses.
/// The comparison is pairwise, with no buckets: 1.9 and 2.1 ms are equal.
fn better(a: &EpState, b: &EpState, now: u64) -> bool {
    let (la, lb) = (latency(a, now), latency(b, now));
    let (oa, ob) = (a.outstanding() as u128 + 1, b.outstanding() as u128 + 1);
    if la <= 2 * lb && lb <= 2 * la {
        oa < ob
    } else {
        oa * u128::from(la) < ob * u128::from(lb)
    }
}

/// Lower is better: outstanding connections (plus the one we would add)
/// times the latency; for choosing among several at once.
fn score(e: &EpState, now: u64) -> u128 {
    (e.outstanding() as u128 + 1) * latency(e, now) as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::EpMetrics;

    fn ep(port: u16, local: bool) -> Arc<EpState> {
        Arc::new(EpState::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Route::Direct,
            local,
            EpMetrics::detached(),
        ))
    }

    #[test]
    fn round_robin_cycles_and_skips_tried() {
        let b = Balancer::new(
            LbPolicy::RoundRobin,
            false,
            vec![ep(1, false), ep(2, false), ep(3, false)],
        );
        let ports: Vec<u16> = (0..6).map(|_| b.pick(&[]).unwrap().addr.port()).collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
        let first = Arc::as_ptr(&b.all[0]) as usize;
        let second = Arc::as_ptr(&b.all[1]) as usize;
        for _ in 0..5 {
            assert_eq!(b.pick(&[first, second]).unwrap().addr.port(), 3);
        }
        assert!(
            b.pick(&[first, second, Arc::as_ptr(&b.all[2]) as usize])
                .is_none()
        );
    }

    #[test]
    fn p2c_prefers_fewer_outstanding_and_lower_latency() {
        let b = Balancer::new(LbPolicy::P2c, false, vec![ep(1, false), ep(2, false)]);
        b.all[0].on_connect_ok(Some(2000));
        b.all[1].on_connect_ok(Some(2000));
        b.all[0].m.active.inc_by(10);
        for _ in 0..50 {
            assert_eq!(b.pick(&[]).unwrap().addr.port(), 2);
        }
        b.all[0].m.active.dec_by(10);
        // Same load, 10x the latency: loses every comparison.
        for _ in 0..20 {
            b.all[1].on_connect_ok(Some(20_000));
        }
        for _ in 0..50 {
            assert_eq!(b.pick(&[]).unwrap().addr.port(), 1);
        }
    }

    #[test]
    fn latencies_within_2x_count_as_equal() {
        let b = Balancer::new(LbPolicy::P2c, false, vec![ep(1, false), ep(2, false)]);
        // Below the floor vs just under twice the floor; then two values
        // on either side of a power of two: all within 2x, all equal.
        for (x, y) in [(1900, 100), (2100, 1900), (3900, 2100)] {
            b.all[0].ewma_us.store(0, Relaxed);
            b.all[1].ewma_us.store(0, Relaxed);
            b.all[0].on_connect_ok(Some(x));
            b.all[1].on_connect_ok(Some(y));
            let first = (0..1000)
                .filter(|_| b.pick(&[]).unwrap().addr.port() == 1)
                .count();
            assert!(
                (350..=650).contains(&first),
                "{x} vs {y} µs: endpoint 1 got {first} of 1000"
            );
        }
        // More than 2x apart: the faster one wins every comparison.
        b.all[0].ewma_us.store(0, Relaxed);
        b.all[0].on_connect_ok(Some(8000));
        for _ in 0..50 {
            assert_eq!(b.pick(&[]).unwrap().addr.port(), 2);
        }
    }

    #[test]
    fn one_slow_sample_does_not_starve_an_endpoint() {
        let b = Balancer::new(LbPolicy::P2c, false, vec![ep(1, false), ep(2, false)]);
        // Sequential connections: nothing outstanding. Endpoint 1 had one
        // slow connect (say, a TLS handshake on a busy moment).
        b.all[0].on_connect_ok(Some(5000));
        b.all[1].on_connect_ok(Some(100));
        for _ in 0..50 {
            assert_eq!(b.pick(&[]).unwrap().addr.port(), 2);
        }
        // A while later (4 half-lives) the slow sample has decayed below
        // the floor: the two split evenly again.
        let back = now_ms() - 4 * EWMA_HALF_LIFE_MS;
        b.all[0].sampled_ms.store(back, Relaxed);
        assert!(
            b.all[0].ewma_us() < LATENCY_FLOOR_US,
            "{}",
            b.all[0].ewma_us()
        );
        let mut first = 0;
        for _ in 0..1000 {
            if b.pick(&[]).unwrap().addr.port() == 1 {
                first += 1;
            }
        }
        assert!(
            (350..=650).contains(&first),
            "endpoint 1 got {first} of 1000"
        );
        // The decayed value is what the next sample is averaged with.
        b.all[0].on_connect_ok(Some(100));
        assert!(b.all[0].ewma_us() < 400, "{}", b.all[0].ewma_us());
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_backoff_ends() {
        let b = Balancer::new(LbPolicy::P2c, false, vec![ep(1, false), ep(2, false)]);
        assert!(b.all[0].on_connect_failed(3, 60_000).is_none());
        assert!(b.all[0].on_connect_failed(3, 60_000).is_none());
        assert_eq!(b.all[0].on_connect_failed(3, 60_000), Some(60_000));
        for _ in 0..50 {
            assert_eq!(b.pick(&[]).unwrap().addr.port(), 2);
        }
        // All untried endpoints ejected: still picks rather than failing.
        assert_eq!(
            b.pick(&[Arc::as_ptr(&b.all[1]) as usize])
                .unwrap()
                .addr
                .port(),
            1
        );
        // Backoff doubles on a failure after readmission.
        b.all[0].ejected_until_ms.store(1, Relaxed);
        assert_eq!(b.all[0].on_connect_failed(3, 60_000), Some(120_000));
        b.all[0].on_connect_ok(Some(50));
        assert!(!b.all[0].is_ejected(now_ms()));
    }

    #[test]
    fn prefer_local_uses_local_endpoints_first() {
        let b = Balancer::new(
            LbPolicy::P2c,
            true,
            vec![ep(1, false), ep(2, true), ep(3, false)],
        );
        for _ in 0..30 {
            assert_eq!(b.pick(&[]).unwrap().addr.port(), 2);
        }
        let local = Arc::as_ptr(&b.all[1]) as usize;
        assert_ne!(b.pick(&[local]).unwrap().addr.port(), 2);
    }
}
