//! Looking a name up for the agent (the addresses of a static endpoint
//! given by name, ARCHITECTURE.md "External endpoints by name"), through
//! the same upstreams and the same exchange as forwarding: a fresh socket
//! and a random ID per query, TCP when truncated, the whole bounded by
//! `[dns] upstream_timeout_ms`. No cache: the caller asks again at the TTL.
//! A rare path: it builds and reads messages with hickory-proto.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hickory_proto::op::{Message, Query as HQuery, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::forward::{Cache, Forwarder};
use crate::wire::{self, MAX_NAME};

/// The IPv4 addresses a name has now, with the least TTL of the answer
/// (its CNAME chain included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    pub addrs: Vec<IpAddr>,
    pub ttl_secs: u32,
}

/// Why a lookup gave no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("{0:?} is not a host name")]
    BadName(String),
    #[error("no upstream answered within {0:?} (upstreams: {1})")]
    NoAnswer(Duration, String),
    #[error("no upstream to ask: set [dns] upstreams, or nameservers in /etc/resolv.conf")]
    NoUpstreams,
    #[error("the upstream answered {0}")]
    Rcode(String),
    #[error("the name has no IPv4 address")]
    NoAddress,
    #[error("the upstream's answer does not parse: {0}")]
    Malformed(String),
}

/// Looks names up through the upstreams. Cheap to share.
#[derive(Debug)]
pub struct Resolver {
    fwd: Forwarder,
}

impl Resolver {
    /// Through `upstreams` (empty: every lookup fails with
    /// [`LookupError::NoUpstreams`]), bounded by `timeout` over all.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Resolver {
        Resolver {
            fwd: Forwarder {
                upstreams,
                timeout,
                cache: Mutex::new(Cache::new(0)),
            },
        }
    }

    /// Through the upstreams of `cfg`, as the DNS server forwards (its
    /// `upstreams`, else the nameservers of /etc/resolv.conf, read now).
    pub fn from_config(cfg: &crate::DnsConfig) -> Resolver {
        Resolver::new(
            cfg.effective_upstreams(),
            Duration::from_millis(cfg.upstream_timeout_ms),
        )
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.fwd.upstreams
    }

    /// The A records of `host` (a dotted name, trailing dot optional).
    pub async fn lookup_v4(&self, host: &str) -> Result<Addresses, LookupError> {
        if self.fwd.upstreams.is_empty() {
            return Err(LookupError::NoUpstreams);
        }
        let bad = || LookupError::BadName(host.chars().take(80).collect());
        let mut name = Name::from_ascii(host).map_err(|_| bad())?;
        name.set_fqdn(true);
        let mut m = Message::query();
        m.metadata.id = rand::random();
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(name, RecordType::A));
        let bytes = m.to_vec().map_err(|_| bad())?;
        let mut lc = [0u8; MAX_NAME];
        let wire::Parsed::Query(q) = wire::parse(&bytes, &mut lc) else {
            return Err(bad());
        };
        let Some(resp) = self.fwd.resolve(&bytes, &q, &lc[..q.name_len]).await else {
            let ups: Vec<String> = self.fwd.upstreams.iter().map(|u| u.to_string()).collect();
            return Err(LookupError::NoAnswer(self.fwd.timeout, ups.join(", ")));
        };
        addresses(&resp)
    }
}

/// The A records and least TTL of a response.
fn addresses(resp: &[u8]) -> Result<Addresses, LookupError> {
    let r = Message::from_vec(resp).map_err(|e| LookupError::Malformed(e.to_string()))?;
    let rc = r.metadata.response_code;
    if rc != ResponseCode::NoError {
        return Err(LookupError::Rcode(rc.to_str().to_owned()));
    }
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for rec in &r.answers {
        match &rec.data {
            RData::A(a) => {
                addrs.push(IpAddr::V4(a.0));
                ttl = ttl.min(rec.ttl);
            }
            RData::CNAME(_) => ttl = ttl.min(rec.ttl),
            _ => {}
        }
    }
    if addrs.is_empty() {
        return Err(LookupError::NoAddress);
    }
    addrs.sort();
    addrs.dedup();
    Ok(Addresses {
        addrs,
        ttl_secs: ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{RData, Record};

    fn response(rc: ResponseCode, records: Vec<Record>) -> Vec<u8> {
        let mut m = Message::response(7, OpCode::Query);
        m.metadata.response_code = rc;
        m.add_answers(records);
        m.to_vec().unwrap()
    }

    #[test]
    fn addresses_follow_the_chain_and_take_the_least_ttl() {
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let resp = response(
            ResponseCode::NoError,
            vec![
                Record::from_rdata(
                    n("db.example.com."),
                    60,
                    RData::CNAME(CNAME(n("a.example.net."))),
                ),
                Record::from_rdata(n("a.example.net."), 300, RData::A(A::new(198, 51, 100, 9))),
                Record::from_rdata(n("a.example.net."), 300, RData::A(A::new(198, 51, 100, 7))),
            ],
        );
        assert_eq!(
            addresses(&resp),
            Ok(Addresses {
                addrs: vec![
                    "198.51.100.7".parse().unwrap(),
                    "198.51.100.9".parse().unwrap()
                ],
                ttl_secs: 60
            })
        );
        assert_eq!(
            addresses(&response(ResponseCode::NXDomain, vec![])),
            Err(LookupError::Rcode("Non-Existent Domain".into()))
        );
        assert_eq!(
            addresses(&response(ResponseCode::NoError, vec![])),
            Err(LookupError::NoAddress)
        );
    }

    #[tokio::test]
    async fn no_upstream_is_an_error_not_a_hang() {
        let r = Resolver::new(Vec::new(), Duration::from_millis(100));
        assert_eq!(
            r.lookup_v4("db.example.com").await,
            Err(LookupError::NoUpstreams)
        );
    }
}
