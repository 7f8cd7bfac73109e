//! Connection caps on node-port listeners: a total for the node and one
//! per client IP, so that one client (or a flood) cannot take every file
//! descriptor and every pipe of the proxy. The decision is the pure
//! [`admit`]; [`ConnLimiter`] holds the counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was refused; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The node's node ports hold `max_total` connections.
    Total,
    /// This client IP holds `max_per_client` connections.
    PerClient,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerClient => "per_client",
        }
    }
}

/// Whether one more connection fits, given the open ones.
pub(crate) fn admit(
    total: u32,
    of_client: u32,
    max_total: u32,
    max_per_client: u32,
) -> Result<(), Refusal> {
    if total >= max_total {
        Err(Refusal::Total)
    } else if of_client >= max_per_client {
        Err(Refusal::PerClient)
    } else {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
}

/// The open node-port connections, by client IP. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ConnLimiter {
    max_total: u32,
    max_per_client: u32,
    /// A std Mutex: a counter update and a map entry, no `.await` inside.
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection; its slot is freed on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl ConnLimiter {
    pub(crate) fn new(max_total: u32, max_per_client: u32) -> ConnLimiter {
        ConnLimiter {
            max_total,
            max_per_client,
            counts: Arc::default(),
        }
    }

    /// A slot for a connection from `ip`, or why not.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_client.get(&ip).copied().unwrap_or(0);
        admit(c.total, mine, self.max_total, self.max_per_client)?;
        c.total += 1;
        *c.per_client.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            ip,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_checks_the_total_then_the_client() {
        assert_eq!(admit(0, 0, 1, 1), Ok(()));
        assert_eq!(admit(1, 0, 1, 5), Err(Refusal::Total));
        assert_eq!(admit(3, 2, 10, 2), Err(Refusal::PerClient));
        assert_eq!(admit(9, 1, 10, 2), Ok(()));
    }

    #[test]
    fn slots_are_counted_per_client_and_freed_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = l.try_acquire(a).unwrap();
        let _a2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refusal::PerClient);
        let _b1 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), Refusal::Total);
        drop(a1);
        let _b2 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refusal::Total);
    }
}
