//! The autoscaler's signals: latency sketches the connection path writes
//! with one atomic add ([`AtomicSketch`]), read once per sample interval
//! into windows ([`Window`]) of new connections and latency; and
//! [`FirstByte`], which times a connection's first response byte.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use pier_model::sketch::{self, Sketch};

use super::FGauge;

/// A latency sketch the connection path writes with one relaxed
/// `fetch_add`: pier_model's bucket layout in `AtomicU32`s (a window is a
/// wrapping difference, right while a bucket gets fewer than 2^32
/// observations per sample interval). 708 bytes.
#[derive(Debug)]
pub(crate) struct AtomicSketch {
    pub(crate) b: [AtomicU32; sketch::BUCKETS],
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
    pub(super) fn window(&self, prev: &mut Vec<(u16, u32)>) -> Sketch {
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
pub(crate) struct Prev {
    pub(crate) connect: Vec<(u16, u32)>,
    pub(crate) first_byte: Vec<(u16, u32)>,
    pub(crate) total: u64,
    pub(crate) at: Option<Instant>,
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
    pub(crate) prev: Mutex<Prev>,
    pub(crate) rate: FGauge,
    pub(crate) fb_p50: Option<FGauge>,
    pub(crate) fb_p99: FGauge,
    pub(crate) connect_p99: Option<FGauge>,
}

impl Signals {
    pub(super) fn endpoint(rate: FGauge, fb_p99: FGauge) -> Signals {
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
    pub(crate) t0: Instant,
    /// µs after `t0` + 1 when the first client byte went out; 0 before.
    pub(crate) sent: AtomicU64,
    pub(crate) done: AtomicBool,
    pub(crate) svc: &'a Signals,
    pub(crate) ep: &'a Signals,
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
