//! How much the leader writes before it waits (pure: no I/O).
//!
//! The leader plans a batch of writes on one snapshot, writes it (at most
//! a few transactions in flight) and plans the next only once its snapshot
//! shows them. Each write goes to every watcher of the store: etcd queues
//! the events per watcher and sends them after it has applied the write.
//! A burst bigger than the watchers take in time leaves them behind; etcd
//! then catches them up from its history while holding the lock its apply
//! needs, its apply falls behind, and it renews no lease until it has
//! caught up: every host's lease can expire (BENCHMARKS.md, "Scale").
//!
//! So the batch size follows what the store takes, additive increase and
//! multiplicative decrease on how a batch went: its slowest transaction
//! (etcd answers once it has applied it) and the delay from its last
//! answer until the leader's snapshot showed it (the watchers' delay),
//! whichever is longer. Within the target (a fraction of the lease TTL),
//! the next full batch may be one step bigger; slower, half as big. It
//! never goes below one transaction or above the most the leader plans at
//! once. A healthy store is not held back: the signal does not grow with
//! the batch, only with the store's latency.

use std::time::Duration;

/// The batch size of a leader, in writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    limit: usize,
    min: usize,
    max: usize,
    step: usize,
    target: Duration,
}

impl Pace {
    /// Starting at `start` writes per batch, between `min` and `max`, one
    /// `step` more after each full batch whose round took at most `target`.
    pub fn new(start: usize, min: usize, max: usize, step: usize, target: Duration) -> Pace {
        let min = min.max(1);
        let max = max.max(min);
        Pace {
            limit: start.clamp(min, max),
            min,
            max,
            step,
            target,
        }
    }

    /// The most writes the next batch may plan.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn target(&self) -> Duration {
        self.target
    }

    /// After a batch of `writes` whose slower of its slowest transaction
    /// and its delay to the snapshot was `took`: `true` when the limit was
    /// cut (the store is behind).
    pub fn observe(&mut self, writes: usize, took: Duration) -> bool {
        if took > self.target {
            let cut = (self.limit / 2).max(self.min);
            let changed = cut != self.limit;
            self.limit = cut;
            return changed;
        }
        // Only a batch that used its limit says the limit held it back.
        if writes >= self.limit {
            self.limit = (self.limit + self.step).min(self.max);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pace() -> Pace {
        Pace::new(512, 128, 4096, 128, 1000 * MS)
    }

    #[test]
    fn starts_where_told_within_bounds() {
        assert_eq!(pace().limit(), 512);
        assert_eq!(Pace::new(10, 128, 4096, 128, MS).limit(), 128);
        assert_eq!(Pace::new(9000, 128, 4096, 128, MS).limit(), 4096);
        // A max below the min is the min.
        assert_eq!(Pace::new(5, 128, 64, 1, MS).limit(), 128);
    }

    #[test]
    fn a_full_batch_within_the_target_grows_by_one_step() {
        let mut p = pace();
        assert!(!p.observe(512, 200 * MS));
        assert_eq!(p.limit(), 640);
        assert!(!p.observe(640, 1000 * MS));
        assert_eq!(p.limit(), 768);
    }

    #[test]
    fn a_batch_below_its_limit_does_not_grow_it() {
        let mut p = pace();
        p.observe(100, 10 * MS);
        assert_eq!(p.limit(), 512);
    }

    #[test]
    fn a_slow_round_halves_down_to_one_transaction() {
        let mut p = pace();
        assert!(p.observe(512, 1001 * MS));
        assert_eq!(p.limit(), 256);
        // Slow even for a small batch: the store is behind, whatever the size.
        assert!(p.observe(3, 5000 * MS));
        assert_eq!(p.limit(), 128);
        assert!(!p.observe(128, 5000 * MS), "already at the floor");
        assert_eq!(p.limit(), 128);
    }

    #[test]
    fn growth_stops_at_the_max() {
        let mut p = Pace::new(4000, 128, 4096, 128, 1000 * MS);
        p.observe(4000, MS);
        assert_eq!(p.limit(), 4096);
        p.observe(4096, MS);
        assert_eq!(p.limit(), 4096);
    }

    #[test]
    fn recovers_additively_after_a_cut() {
        let mut p = pace();
        p.observe(512, 2000 * MS);
        p.observe(256, 2000 * MS);
        assert_eq!(p.limit(), 128);
        for _ in 0..3 {
            p.observe(p.limit(), 100 * MS);
        }
        assert_eq!(p.limit(), 512);
    }
}
