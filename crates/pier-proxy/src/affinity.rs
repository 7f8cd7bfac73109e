//! Session affinity by client IP (`--session-affinity ClientIP`).
//!
//! A client's first pick is a rendezvous (highest-random-weight) hash of
//! its address over the service port's ready endpoints: a pure function of
//! the client and the ready set, so every host's proxy makes the same
//! choice with no shared state, and when an endpoint leaves only its own
//! clients move (each to the same next endpoint on every host). The pick is
//! then pinned in a per-port table for `timeout`, so that a client keeps
//! its endpoint when another one is added (rendezvous alone would move a
//! share of the clients to the newcomer). A pinned endpoint that is no
//! longer ready (out of the balancer), is ejected, or failed this
//! connection's connect is replaced by the rendezvous pick over what is
//! left.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::balance::{Balancer, EpState, now_ms};

/// At most this many clients are remembered per service port (about 64
/// bytes each): past it, expired entries are swept and, if none expired,
/// a new client is still served by its rendezvous pick, just not pinned.
const MAX_CLIENTS: usize = 65_536;

/// The pinned endpoints of one service port, kept across balancer
/// rebuilds.
#[derive(Debug)]
pub(crate) struct Affinity {
    timeout_ms: u64,
    /// Client address → (endpoint address, last use in [`now_ms`]). A std
    /// mutex: a lookup and an insert, no await inside.
    table: Mutex<HashMap<IpAddr, (SocketAddr, u64)>>,
}

impl Affinity {
    pub fn new(timeout_s: u32) -> Self {
        Affinity {
            timeout_ms: u64::from(timeout_s) * 1000,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    /// The endpoint for `client`, not in `tried`: its pinned one while that
    /// is usable, else the rendezvous pick over the usable ready endpoints
    /// (ejected ones only when nothing else is left), which is then pinned.
    pub fn pick<'a>(
        &self,
        bal: &'a Balancer,
        client: IpAddr,
        tried: &[usize],
    ) -> Option<&'a Arc<EpState>> {
        let now = now_ms();
        let untried = |e: &Arc<EpState>| !tried.contains(&(Arc::as_ptr(e) as usize));
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addr, last)) = t.get_mut(&client)
            && now.saturating_sub(*last) < self.timeout_ms
            && let Some(e) = bal
                .all
                .iter()
                .find(|e| e.addr == *addr && untried(e) && !e.is_ejected(now))
        {
            *last = now;
            return Some(e);
        }
        let e = rendezvous(
            client,
            bal.all.iter().filter(|e| untried(e) && !e.is_ejected(now)),
        )
        .or_else(|| rendezvous(client, bal.all.iter().filter(|e| untried(e))))?;
        if t.len() >= MAX_CLIENTS && !t.contains_key(&client) {
            let timeout = self.timeout_ms;
            t.retain(|_, (_, last)| now.saturating_sub(*last) < timeout);
        }
        if t.len() < MAX_CLIENTS || t.contains_key(&client) {
            t.insert(client, (e.addr, now));
        }
        Some(e)
    }

    /// Forgets clients idle past the timeout.
    pub fn sweep(&self) {
        let now = now_ms();
        let timeout = self.timeout_ms;
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, last)| now.saturating_sub(*last) < timeout);
    }

    #[cfg(test)]
    pub fn pinned(&self, client: IpAddr) -> Option<SocketAddr> {
        self.table.lock().unwrap().get(&client).map(|(a, _)| *a)
    }
}

/// The endpoint with the highest weight for `client`.
fn rendezvous<'a>(
    client: IpAddr,
    eps: impl Iterator<Item = &'a Arc<EpState>>,
) -> Option<&'a Arc<EpState>> {
    eps.max_by_key(|e| (weight(client, e.addr), e.addr))
}

/// A fixed hash of (client, endpoint): the same on every host and in every
/// version of the binary (no per-process seed), which is what makes the
/// picks agree across hosts. FNV-1a over the bytes, then a 64-bit finalizer
/// (splitmix64's) so that nearby addresses spread.
pub(crate) fn weight(client: IpAddr, ep: SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= u64::from(x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    match client.to_canonical() {
        IpAddr::V4(a) => eat(&a.octets()),
        IpAddr::V6(a) => eat(&a.octets()),
    }
    eat(&[0xff]);
    match ep.ip().to_canonical() {
        IpAddr::V4(a) => eat(&a.octets()),
        IpAddr::V6(a) => eat(&a.octets()),
    }
    eat(&ep.port().to_be_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Route;
    use crate::metrics::EpMetrics;
    use pier_model::LbPolicy;

    fn ep(last: u8) -> Arc<EpState> {
        Arc::new(EpState::new(
            SocketAddr::from(([10, 0, 0, last], 53)),
            Route::Direct,
            false,
            EpMetrics::detached(),
        ))
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::from((0xac10_0000u32 + i).to_be_bytes())
    }

    /// The weight is a fixed function: these values must never change, or
    /// hosts running different versions would disagree.
    #[test]
    fn weights_are_fixed_across_processes() {
        let c: IpAddr = "172.16.0.1".parse().unwrap();
        let e: SocketAddr = "10.0.0.1:53".parse().unwrap();
        assert_eq!(weight(c, e), 0x4a11_a0ae_1b7e_a7a0);
        // IPv4-mapped IPv6 is the same client.
        let mapped: IpAddr = "::ffff:172.16.0.1".parse().unwrap();
        assert_eq!(weight(mapped, e), weight(c, e));
    }

    /// Two hosts (two tables, two balancers built separately in different
    /// orders) pick the same endpoint for every client; when that
    /// endpoint goes, both move its clients to the same next one and no
    /// other client moves.
    #[test]
    fn hosts_agree_and_only_a_dead_pods_clients_move() {
        let (a, b) = (Affinity::new(3600), Affinity::new(3600));
        let eps: Vec<_> = (1..=4).map(ep).collect();
        let mut rev = eps.clone();
        rev.reverse();
        let ba = Balancer::new(LbPolicy::P2c, false, eps.clone());
        let bb = Balancer::new(LbPolicy::RoundRobin, false, rev);
        let mut before = Vec::new();
        let mut per_ep = HashMap::new();
        for i in 0..400 {
            let pa = a.pick(&ba, client(i), &[]).unwrap().addr;
            let pb = b.pick(&bb, client(i), &[]).unwrap().addr;
            assert_eq!(pa, pb, "client {i}");
            // Sticky: asked again, the same.
            assert_eq!(a.pick(&ba, client(i), &[]).unwrap().addr, pa);
            *per_ep.entry(pa).or_insert(0) += 1;
            before.push(pa);
        }
        // Spread: each of 4 endpoints has between 60 and 140 of 400.
        for (e, n) in &per_ep {
            assert!((60..=140).contains(n), "{e}: {n} of 400");
        }
        // Endpoint .2 dies: the balancers are rebuilt without it.
        let dead = eps[1].addr;
        let left: Vec<_> = eps.iter().filter(|e| e.addr != dead).cloned().collect();
        let ba = Balancer::new(LbPolicy::P2c, false, left.clone());
        let bb = Balancer::new(LbPolicy::P2c, false, left.into_iter().rev().collect());
        for (i, was) in before.iter().enumerate() {
            let pa = a.pick(&ba, client(i as u32), &[]).unwrap().addr;
            let pb = b.pick(&bb, client(i as u32), &[]).unwrap().addr;
            assert_eq!(pa, pb, "client {i}");
            if *was == dead {
                assert_ne!(pa, dead);
            } else {
                assert_eq!(pa, *was, "client {i} moved although its pod lives");
            }
        }
    }

    /// A new endpoint takes no pinned client; a fresh host (no table) would
    /// send some to it, which is the documented divergence after a
    /// scale-up.
    #[test]
    fn pinned_clients_stay_when_an_endpoint_is_added() {
        let a = Affinity::new(3600);
        let eps: Vec<_> = (1..=3).map(ep).collect();
        let b3 = Balancer::new(LbPolicy::P2c, false, eps.clone());
        let first: Vec<_> = (0..200)
            .map(|i| a.pick(&b3, client(i), &[]).unwrap().addr)
            .collect();
        let mut more = eps.clone();
        more.push(ep(9));
        let b4 = Balancer::new(LbPolicy::P2c, false, more);
        for (i, was) in first.iter().enumerate() {
            assert_eq!(a.pick(&b4, client(i as u32), &[]).unwrap().addr, *was);
        }
        // A new client may land on the new endpoint.
        let fresh = (1000..1400)
            .filter(|i| a.pick(&b4, client(*i), &[]).unwrap().addr.ip().to_string() == "10.0.0.9")
            .count();
        assert!(fresh > 40, "{fresh} of 400 new clients on the new endpoint");
    }

    /// A failed connect (the endpoint in `tried`) or an ejection moves the
    /// client, and the new pick is pinned; an idle client past the timeout
    /// is forgotten.
    #[test]
    fn a_failed_or_ejected_pin_moves_and_timeouts_forget() {
        let a = Affinity::new(1);
        let eps: Vec<_> = (1..=3).map(ep).collect();
        let bal = Balancer::new(LbPolicy::P2c, false, eps);
        let c = client(7);
        let first = a.pick(&bal, c, &[]).unwrap().clone();
        let second = a
            .pick(&bal, c, &[Arc::as_ptr(&first) as usize])
            .unwrap()
            .clone();
        assert_ne!(second.addr, first.addr);
        assert_eq!(a.pinned(c), Some(second.addr));
        assert_eq!(a.pick(&bal, c, &[]).unwrap().addr, second.addr);
        for _ in 0..3 {
            second.on_connect_failed(3, 60_000);
        }
        let third = a.pick(&bal, c, &[]).unwrap().addr;
        assert_ne!(third, second.addr);
        // Idle past 1 s: swept.
        a.table.lock().unwrap().get_mut(&c).unwrap().1 -= 2000;
        a.sweep();
        assert_eq!(a.pinned(c), None);
    }
}
