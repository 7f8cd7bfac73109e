//! ExternalName services: a query for any type but CNAME at an alias name
//! is answered with the CNAME followed by the target's own records, as a
//! recursive resolver would, since stub resolvers (glibc, musl) do not
//! follow a CNAME themselves. The target is looked up in the zone when it
//! is pier's own name (one level: an alias of an alias is not followed),
//! else asked of the upstreams. A rare path: it builds messages with
//! hickory-proto rather than pier's pre-encoded bytes.

use hickory_proto::op::{Edns, Message, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{Name, RData, Record};

use crate::Shared;
use crate::engine::{self, Step};
use crate::wire::{self, MAX_NAME};

/// A wire-form name as hickory's `Name`.
fn name_of(wire_name: &[u8]) -> Option<Name> {
    let mut labels = Vec::new();
    let mut i = 0;
    while let Some(&len) = wire_name.get(i) {
        if len == 0 {
            return Name::from_labels(labels).ok().map(|mut n| {
                n.set_fqdn(true);
                n
            });
        }
        let l = wire_name.get(i + 1..i + 1 + len as usize)?;
        labels.push(l.to_vec());
        i += 1 + len as usize;
    }
    None
}

/// The response to `pkt` (a query for an alias name) whose CNAME points at
/// `target` (lower-case wire form) with `ttl`; `None` when `pkt` cannot be
/// decoded or the answer not encoded (the caller answers SERVFAIL).
pub(crate) async fn chase(shared: &Shared, pkt: &[u8], target: &[u8], ttl: u32) -> Option<Vec<u8>> {
    let orig = Message::from_vec(pkt).ok()?;
    let q = orig.queries.first()?.clone();
    let target_name = name_of(target)?;
    let mut tq = Message::query();
    tq.metadata.id = rand::random();
    tq.metadata.recursion_desired = true;
    tq.add_query(HQuery::query(target_name.clone(), q.query_type()));
    let tq_bytes = tq.to_vec().ok()?;
    let in_zone = {
        let zone = shared.zone.load();
        wire::suffix_at(target, &zone.params.domain).is_some()
    };
    let resp: Option<Vec<u8>> = if in_zone {
        let zone = shared.zone.load();
        let (mut out, mut lc) = (Vec::new(), [0u8; MAX_NAME]);
        match engine::answer(&zone, &tq_bytes, true, false, u16::MAX, &mut out, &mut lc) {
            Step::Reply { .. } => Some(out),
            // An alias of an alias: not followed.
            Step::Forward(_) | Step::Drop => None,
        }
    } else {
        let mut lc = [0u8; MAX_NAME];
        match wire::parse(&tq_bytes, &mut lc) {
            wire::Parsed::Query(tqq) => {
                shared
                    .fwd
                    .resolve(&tq_bytes, &tqq, &lc[..tqq.name_len])
                    .await
            }
            _ => None,
        }
    };
    let mut m = Message::response(orig.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = orig.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = false;
    m.add_queries(orig.queries.clone());
    m.add_answer(Record::from_rdata(
        q.name().clone(),
        ttl,
        RData::CNAME(CNAME(target_name)),
    ));
    match resp.and_then(|r| Message::from_vec(&r).ok()) {
        Some(r) => {
            m.metadata.response_code = r.metadata.response_code;
            m.add_answers(r.answers);
        }
        None => {
            shared.metrics.upstream_failures.inc();
            m.metadata.response_code = ResponseCode::ServFail;
        }
    }
    if orig.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(shared.our_payload);
        m.set_edns(e);
    }
    m.to_vec().ok()
}
