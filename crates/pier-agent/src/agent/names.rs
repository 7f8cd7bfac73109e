//! The lookups of static endpoint names: which names to hold (those the
//! snapshot's static endpoints are given by), when to ask, and the pure
//! `names::decide` step carried out (held addresses, log, metric). The
//! lookups run as tasks that report back as [`OpMsg::Looked`].

use std::time::Instant;

use super::*;
use crate::names::{self, Held, NameNote};

/// One name's state.
#[derive(Debug)]
pub(super) struct NameState {
    /// `None`: dropped (failed past the stale bound): no endpoint.
    pub held: Option<Held>,
    pub next: Instant,
    /// A lookup is under way.
    pub asking: bool,
}

impl Agent {
    /// Hold the names the snapshot's static endpoints are given by: a new
    /// one at its stored address (what the CLI resolved), looked up at
    /// once; a name no longer used is forgotten. The stored address counts
    /// as confirmed when the service was created (at most the stale bound
    /// ago), so an agent that starts while the resolver is down does not
    /// trust an old address for another full bound.
    pub(super) fn sync_names(&mut self) {
        let now = Instant::now();
        let (now_ms, stale_max) = (
            now_ms(),
            Duration::from_millis(self.cfg.static_name_stale_ms),
        );
        let mut want: HashMap<String, (std::net::IpAddr, Duration)> = HashMap::new();
        for svc in self.snap.services.values() {
            let age = Duration::from_millis(now_ms.saturating_sub(svc.created_at));
            for se in &svc.static_endpoints {
                if let Some(n) = &se.name {
                    want.entry(names::normal(n)).or_insert((se.ip, age));
                }
            }
        }
        self.names.retain(|n, _| want.contains_key(n));
        for (n, (ip, age)) in want {
            self.names.entry(n).or_insert_with(|| NameState {
                held: Some(Held::seed(
                    ip,
                    now.checked_sub(age.min(stale_max)).unwrap_or(now),
                )),
                next: now,
                asking: false,
            });
        }
    }

    /// The addresses held for each name, for `desired::endpoints`.
    pub(super) fn names_view(&self) -> HashMap<String, Vec<std::net::IpAddr>> {
        self.names
            .iter()
            .map(|(n, s)| {
                let addrs = s.held.as_ref().map(|h| h.addrs.clone()).unwrap_or_default();
                (n.clone(), addrs)
            })
            .collect()
    }

    /// When the next lookup is due, if any name waits for one.
    pub(super) fn next_lookup(&self) -> Option<tokio::time::Instant> {
        self.names
            .values()
            .filter(|s| !s.asking)
            .map(|s| s.next)
            .min()
            .map(tokio::time::Instant::from_std)
    }

    /// Start the lookups that are due, each bounded by the resolver's
    /// timeout and reporting back as [`OpMsg::Looked`].
    pub(super) fn start_lookups(&mut self) {
        let now = Instant::now();
        for (name, s) in self.names.iter_mut() {
            if s.asking || s.next > now {
                continue;
            }
            s.asking = true;
            let (name, tx) = (name.clone(), self.op_tx.clone());
            let resolver = self.name_lookup.resolver.clone();
            let cancel = self.tasks_cancel.clone();
            self.tracker.spawn(
                async move {
                    tokio::select! {
                        result = resolver.lookup_v4(&name) => {
                            let _ = tx.send(OpMsg::Looked { name, result });
                        }
                        _ = cancel.cancelled() => {}
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// Carry out `names::decide` for one lookup's result.
    pub(super) fn on_looked(
        &mut self,
        name: String,
        result: Result<pier_dns::lookup::Addresses, pier_dns::lookup::LookupError>,
    ) {
        let stale_max = Duration::from_millis(self.cfg.static_name_stale_ms);
        let Some(s) = self.names.get_mut(&name) else {
            return;
        };
        let d = names::decide(s.held.as_ref(), result, Instant::now(), stale_max);
        s.held = d.held;
        s.next = d.next;
        s.asking = false;
        self.name_lookup
            .lookups
            .get_or_create(&[("outcome", d.note.outcome())])
            .inc();
        let fmt = |a: &[std::net::IpAddr]| {
            a.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match d.note {
            NameNote::Same => debug!(name = %name, "static endpoint name: same answer"),
            NameNote::Changed { from, to } => {
                info!(name = %name, from = %fmt(&from), to = %fmt(&to),
                    "static endpoint name: new addresses");
            }
            NameNote::Stale {
                error,
                age,
                failures,
            } => {
                let bound = Duration::from_millis(self.cfg.static_name_stale_ms);
                if failures == 1 {
                    warn!(name = %name, error = %error, age_s = age.as_secs(), keep_for_s = bound.saturating_sub(age).as_secs(),
                        "static endpoint name: lookup failed; keeping its last answer (at most [agent] static_name_stale_ms after it), asking again every 5 s");
                } else {
                    debug!(name = %name, error = %error, failures, "static endpoint name: lookup failed again");
                }
            }
            NameNote::Dropped { error, age } => {
                warn!(name = %name, error = %error, age_s = age.as_secs(),
                    "static endpoint name: lookups failed for longer than [agent] static_name_stale_ms; its addresses are dropped until it resolves again");
            }
            NameNote::Failed { error } => {
                debug!(name = %name, error = %error, "static endpoint name: lookup failed; no addresses held");
            }
        }
    }
}
