//! A mergeable latency sketch: fixed log-linear buckets (HDR-style), so
//! that the sketches of every host add up bucket by bucket, and a
//! service's p99 is the p99 of all its traffic, not an average of hosts'
//! p99s.
//!
//! Why fixed buckets rather than DDSketch or t-digest: every proxy uses the
//! same layout, so a merge is a sum of counts and is exact (t-digest's
//! merge is approximate); the bucket of a value is found with a
//! leading-zeros count and a shift (DDSketch takes a logarithm), so the
//! proxy can keep one `AtomicU64` per bucket and observe with one
//! `fetch_add`, no lock and no allocation.
//!
//! Layout, for a value `v` in µs: `v < 8` has bucket `v`; above, each power
//! of two `[2^e, 2^(e+1))` is cut into [`SUB`] equal buckets. A bucket is at
//! most 1/8 of its lower bound wide, so the midpoint that [`Sketch::quantile`]
//! returns is within 6.25% of every value in it. The last bucket holds
//! everything from 2^[`MAX_EXP`] µs (16.8 s) up.

use serde::{Deserialize, Serialize};

/// Buckets per power of two.
pub const SUB: usize = 8;
/// Values from `2^MAX_EXP` µs (about 16.8 s) share the last bucket.
pub const MAX_EXP: u32 = 24;
/// How many buckets a sketch has.
pub const BUCKETS: usize = SUB + (MAX_EXP as usize - 3) * SUB + 1;

/// The bucket of `us`.
pub fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros();
    if e >= MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = ((us >> (e - 3)) & (SUB as u64 - 1)) as usize;
    SUB + (e as usize - 3) * SUB + sub
}

/// The values of bucket `i`: `[lo, hi)`.
pub fn bounds(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, i as u64 + 1);
    }
    if i >= BUCKETS - 1 {
        return (1 << MAX_EXP, u64::MAX);
    }
    let e = ((i - SUB) / SUB + 3) as u32;
    let sub = ((i - SUB) % SUB) as u64;
    let w = 1u64 << (e - 3);
    let lo = (SUB as u64 + sub) * w;
    (lo, lo + w)
}

/// A sketch's non-empty buckets, sorted by index: `[[bucket, count], …]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sketch(pub Vec<(u16, u64)>);

impl Sketch {
    /// From dense bucket counts (as many as [`BUCKETS`]; more are ignored).
    pub fn from_counts(counts: &[u64]) -> Sketch {
        Sketch(
            counts
                .iter()
                .take(BUCKETS)
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (i as u16, *n))
                .collect(),
        )
    }

    /// The counts in `now` minus those in `prev` (dense, same layout).
    pub fn between(prev: &[u64], now: &[u64]) -> Sketch {
        Sketch(
            now.iter()
                .take(BUCKETS)
                .enumerate()
                .map(|(i, n)| {
                    (
                        i as u16,
                        n.saturating_sub(prev.get(i).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `other`'s counts to this one's. Buckets past the layout (from a
    /// record of a future version) are dropped.
    pub fn merge(&mut self, other: &Sketch) {
        let mut dense = vec![0u64; BUCKETS];
        for (i, n) in self.0.iter().chain(other.0.iter()) {
            if let Some(d) = dense.get_mut(*i as usize) {
                *d = d.saturating_add(*n);
            }
        }
        *self = Sketch::from_counts(&dense);
    }

    /// The `q` quantile (0..=1) in µs: the midpoint of the bucket that holds
    /// it (within 6.25% of the true value); `None` for an empty sketch.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the q quantile, 1-based: the smallest value with at
        // least q of the observations at or below it.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let mut sorted = self.0.clone();
        sorted.sort_unstable_by_key(|(i, _)| *i);
        for (i, n) in &sorted {
            seen += n;
            if seen >= rank {
                let (lo, hi) = bounds(*i as usize);
                if hi == u64::MAX {
                    return Some(lo);
                }
                return Some(lo + (hi - lo - 1) / 2);
            }
        }
        sorted.last().map(|(i, _)| bounds(*i as usize).0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_that_holds_it() {
        let mut v = 0u64;
        while v < (1 << MAX_EXP) {
            let i = bucket(v);
            let (lo, hi) = bounds(i);
            assert!(lo <= v && v < hi, "{v} in {i} = [{lo}, {hi})");
            // Within 1/8 of the lower bound wide: the midpoint is within
            // 6.25% of any value in it.
            assert!((hi - lo) * 8 <= lo.max(8), "{v}: [{lo}, {hi})");
            v = v * 9 / 8 + 1;
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket(1 << MAX_EXP), BUCKETS - 1);
        assert_eq!(bucket((1 << MAX_EXP) - 1), BUCKETS - 2);
        // Consecutive buckets tile the range.
        for i in 0..BUCKETS - 1 {
            assert_eq!(bounds(i).1, bounds(i + 1).0, "bucket {i}");
        }
    }

    #[test]
    fn quantiles_of_known_distributions() {
        let mut dense = vec![0u64; BUCKETS];
        for _ in 0..990 {
            dense[bucket(1000)] += 1;
        }
        for _ in 0..10 {
            dense[bucket(50_000)] += 1;
        }
        let s = Sketch::from_counts(&dense);
        let p50 = s.quantile(0.5).unwrap();
        let p99 = s.quantile(0.99).unwrap();
        let p999 = s.quantile(0.999).unwrap();
        assert!((940..=1060).contains(&p50), "{p50}");
        assert!((940..=1060).contains(&p99), "{p99}: 990 of 1000 are 1 ms");
        assert!((47_000..=53_000).contains(&p999), "{p999}");
        assert_eq!(Sketch::default().quantile(0.99), None);
    }

    /// Two hosts: one with 100 fast connections, one with 100 slow ones.
    /// The merged p99 is the slow host's latency (the p99 of all traffic),
    /// where an average of the two hosts' p99s would be half of it.
    #[test]
    fn merge_gives_the_quantile_of_all_traffic() {
        let mut a = vec![0u64; BUCKETS];
        let mut b = vec![0u64; BUCKETS];
        a[bucket(200)] = 100;
        b[bucket(20_000)] = 100;
        let mut m = Sketch::from_counts(&a);
        m.merge(&Sketch::from_counts(&b));
        assert_eq!(m.count(), 200);
        let p99 = m.quantile(0.99).unwrap();
        assert!((18_800..=21_300).contains(&p99), "{p99}");
        let p25 = m.quantile(0.25).unwrap();
        assert!((188..=213).contains(&p25), "{p25}");
    }

    #[test]
    fn between_is_the_window_and_serializes_sparse() {
        let mut prev = vec![0u64; BUCKETS];
        prev[3] = 5;
        let mut now = prev.clone();
        now[3] = 7;
        now[40] = 1;
        let s = Sketch::between(&prev, &now);
        assert_eq!(s.0, vec![(3, 2), (40, 1)]);
        assert_eq!(serde_json::to_string(&s).unwrap(), "[[3,2],[40,1]]");
        let back: Sketch = serde_json::from_str("[[3,2],[40,1]]").unwrap();
        assert_eq!(back, s);
        // A bucket index past the layout (a newer writer) is dropped.
        let mut m = Sketch::default();
        m.merge(&Sketch(vec![(9999, 4), (3, 1)]));
        assert_eq!(m.0, vec![(3, 1)]);
    }
}
