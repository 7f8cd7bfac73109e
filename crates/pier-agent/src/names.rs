//! Static endpoints given by name (`pier expose external --endpoint
//! db.example.com:5432`): each agent looks the name up for its own view,
//! through the `[dns] upstreams`, again at the record's TTL clamped to
//! [[`TTL_MIN`], [`TTL_MAX`]]. [`decide`] is the pure step, from (what is
//! held, the lookup's result, now) to (what is held next, when to look
//! again, what to say); the agent's loop (`agent::names`) runs the lookups
//! and carries the decisions out. The addresses held are checked like any
//! static endpoint's, by `desired::endpoints`, so a name cannot point a VIP
//! at this host.
//!
//! A failed lookup (no answer, SERVFAIL, NXDOMAIN, no A record) keeps the
//! last answer for at most `[agent] static_name_stale_ms` (default
//! [`STALE_DEFAULT_MS`], one hour) after it was last confirmed, asking again
//! every [`RETRY`], then drops it: the service has no endpoint from that
//! name until a lookup answers again. See ARCHITECTURE.md for why an hour.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use pier_dns::lookup::{Addresses, LookupError};

/// A TTL below this is looked up at this interval (a TTL of 0 would mean
/// a lookup per reconcile).
pub(crate) const TTL_MIN: Duration = Duration::from_secs(5);
/// A TTL above this is looked up at this interval, so a changed record is
/// followed within 5 minutes whatever its TTL.
pub(crate) const TTL_MAX: Duration = Duration::from_secs(300);
/// After a failed lookup, ask again this soon.
pub(crate) const RETRY: Duration = Duration::from_secs(5);
/// The default of `[agent] static_name_stale_ms`.
pub const STALE_DEFAULT_MS: u64 = 3_600_000;
/// At most this many addresses of one name become endpoints (the lowest,
/// in address order, so every agent takes the same ones).
pub(crate) const MAX_ADDRS: usize = 16;

/// The answer held for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    /// Sorted, without duplicates, at most [`MAX_ADDRS`].
    pub addrs: Vec<IpAddr>,
    /// When a lookup last gave these addresses (for the seed, the stored
    /// address: when the service was created, at most the bound ago).
    pub confirmed: Instant,
    /// Lookups failed in a row since.
    pub failures: u32,
}

impl Held {
    /// The address the writer (the CLI) resolved, given at `confirmed`,
    /// held until this agent's first lookup answers, under the same stale
    /// bound.
    pub(crate) fn seed(ip: IpAddr, confirmed: Instant) -> Held {
        Held {
            addrs: vec![ip],
            confirmed,
            failures: 0,
        }
    }
}

/// What a decision says, for the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameNote {
    /// The answer is what was held.
    Same,
    /// The answer differs from what was held (or nothing was).
    Changed { from: Vec<IpAddr>, to: Vec<IpAddr> },
    /// The lookup failed; the last answer is kept (it is `age` old).
    Stale {
        error: String,
        age: Duration,
        failures: u32,
    },
    /// The lookup failed and the last answer is older than the bound:
    /// dropped.
    Dropped { error: String, age: Duration },
    /// The lookup failed and nothing was held.
    Failed { error: String },
}

impl NameNote {
    /// The `outcome` label of `pier_static_name_lookups_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            NameNote::Same => "same",
            NameNote::Changed { .. } => "changed",
            NameNote::Stale { .. } => "stale",
            NameNote::Dropped { .. } => "dropped",
            NameNote::Failed { .. } => "failed",
        }
    }
}

/// What [`decide`] decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    /// `None`: the name gives no endpoint.
    pub held: Option<Held>,
    pub next: Instant,
    pub note: NameNote,
}

/// The step after one lookup of a name: `last` is what was held, `result`
/// the lookup's, `stale_max` how long a failed name keeps its last answer.
pub(crate) fn decide(
    last: Option<&Held>,
    result: Result<Addresses, LookupError>,
    now: Instant,
    stale_max: Duration,
) -> Decision {
    match result {
        Ok(a) if !a.addrs.is_empty() => {
            let mut addrs = a.addrs;
            addrs.sort();
            addrs.dedup();
            addrs.truncate(MAX_ADDRS);
            let ttl = Duration::from_secs(a.ttl_secs.into()).clamp(TTL_MIN, TTL_MAX);
            let note = match last {
                Some(l) if l.addrs == addrs => NameNote::Same,
                _ => NameNote::Changed {
                    from: last.map(|l| l.addrs.clone()).unwrap_or_default(),
                    to: addrs.clone(),
                },
            };
            Decision {
                held: Some(Held {
                    addrs,
                    confirmed: now,
                    failures: 0,
                }),
                next: now + ttl,
                note,
            }
        }
        other => {
            let error = match other {
                Err(e) => e.to_string(),
                Ok(_) => LookupError::NoAddress.to_string(),
            };
            let next = now + RETRY;
            match last {
                Some(l) => {
                    let age = now.saturating_duration_since(l.confirmed);
                    if age < stale_max {
                        let failures = l.failures + 1;
                        Decision {
                            held: Some(Held {
                                failures,
                                ..l.clone()
                            }),
                            next,
                            note: NameNote::Stale {
                                error,
                                age,
                                failures,
                            },
                        }
                    } else {
                        Decision {
                            held: None,
                            next,
                            note: NameNote::Dropped { error, age },
                        }
                    }
                }
                None => Decision {
                    held: None,
                    next,
                    note: NameNote::Failed { error },
                },
            }
        }
    }
}

/// A name as looked up and compared: lower-case, without a trailing dot.
pub(crate) fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn answer(s: &[&str], ttl_secs: u32) -> Result<Addresses, LookupError> {
        Ok(Addresses {
            addrs: ips(s),
            ttl_secs,
        })
    }

    #[test]
    fn an_answer_is_held_until_its_ttl_clamped() {
        let t0 = Instant::now();
        let seed = Held::seed("198.51.100.1".parse().unwrap(), t0);
        // The lookup moves the name: the new addresses, sorted, next at the TTL.
        let d = decide(
            Some(&seed),
            answer(&["198.51.100.9", "198.51.100.2", "198.51.100.9"], 60),
            t0,
            HOUR,
        );
        assert_eq!(d.next, t0 + Duration::from_secs(60));
        assert_eq!(
            d.note,
            NameNote::Changed {
                from: ips(&["198.51.100.1"]),
                to: ips(&["198.51.100.2", "198.51.100.9"])
            }
        );
        let held = d.held.unwrap();
        assert_eq!(held.addrs, ips(&["198.51.100.2", "198.51.100.9"]));
        // The same answer again: Same. TTL 0 and a day are clamped to [5 s, 5 min].
        let t1 = t0 + Duration::from_secs(60);
        let d = decide(
            Some(&held),
            answer(&["198.51.100.9", "198.51.100.2"], 0),
            t1,
            HOUR,
        );
        assert_eq!((d.note, d.next), (NameNote::Same, t1 + TTL_MIN));
        let d = decide(Some(&held), answer(&["198.51.100.2"], 86_400), t1, HOUR);
        assert_eq!(d.next, t1 + TTL_MAX);
        assert!(matches!(d.note, NameNote::Changed { .. }));
        // At most MAX_ADDRS addresses, the lowest.
        let many: Vec<String> = (1..=40).map(|i| format!("198.51.100.{i}")).collect();
        let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        let d = decide(None, answer(&many, 30), t1, HOUR);
        let h = d.held.unwrap();
        assert_eq!(h.addrs.len(), MAX_ADDRS);
        assert_eq!(h.addrs[0], "198.51.100.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_failure_keeps_the_last_answer_for_the_bound_then_drops_it() {
        let t0 = Instant::now();
        let held = decide(None, answer(&["198.51.100.7"], 30), t0, HOUR)
            .held
            .unwrap();
        // A minute of failures: kept, retried every RETRY, counted.
        let t1 = t0 + Duration::from_secs(60);
        let d = decide(
            Some(&held),
            Err(LookupError::NoAnswer(
                Duration::from_secs(2),
                "127.0.0.1:53".into(),
            )),
            t1,
            HOUR,
        );
        assert_eq!(d.next, t1 + RETRY);
        let kept = d.held.clone().unwrap();
        assert_eq!((kept.addrs.clone(), kept.failures), (held.addrs.clone(), 1));
        assert!(
            matches!(&d.note, NameNote::Stale { age, failures: 1, .. } if *age == Duration::from_secs(60)),
            "{d:?}"
        );
        // NXDOMAIN and an empty answer are failures too, not "no addresses now".
        let d = decide(Some(&kept), Err(LookupError::NoAddress), t1, HOUR);
        assert!(
            matches!(d.note, NameNote::Stale { failures: 2, .. }),
            "{d:?}"
        );
        let d = decide(Some(&kept), answer(&[], 30), t1, HOUR);
        assert!(matches!(d.note, NameNote::Stale { .. }), "{d:?}");
        // The bound is counted from the last confirmation, not the first failure.
        let late = t0 + HOUR;
        let d = decide(Some(&kept), Err(LookupError::NoAddress), late, HOUR);
        assert_eq!(d.held, None);
        assert!(matches!(d.note, NameNote::Dropped { .. }), "{d:?}");
        assert_eq!(d.next, late + RETRY);
        // Nothing held, still failing: nothing, retried.
        let d = decide(None, Err(LookupError::NoAddress), late, HOUR);
        assert_eq!((d.held, d.note.outcome()), (None, "failed"));
        // And the first answer after that brings it back.
        let d = decide(None, answer(&["198.51.100.8"], 30), late, HOUR);
        assert_eq!(d.held.unwrap().addrs, ips(&["198.51.100.8"]));
        assert_eq!(d.note.outcome(), "changed");
    }

    #[test]
    fn names_are_compared_lower_case_without_the_root_dot() {
        assert_eq!(normal("DB.Example.COM."), "db.example.com");
    }
}
