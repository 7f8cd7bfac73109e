//! The synchronous request path: one packet in, one response (or a decision
//! to drop or forward) out. UDP, TCP and the fuzz target all go through
//! [`answer`]; it never allocates beyond growing `out`.

use crate::wire::{self, Head, MAX_NAME, Parsed, Query, rcode};
use crate::zone::{Lookup, Zone};

/// What to do with a packet.
#[derive(Debug)]
pub enum Step<'a> {
    /// `out` holds the response.
    Reply { qtype: u16, rcode: u16 },
    /// Say nothing.
    Drop,
    /// Not a mesh name: ask the upstreams. `lc` holds the lower-cased name.
    Forward(Query<'a>),
}

/// Answer `pkt`. `limit` is the transport's size bound (`None` for TCP:
/// 65535); `our_payload` is the EDNS payload size we advertise.
pub fn answer<'a>(
    zone: &Zone,
    pkt: &'a [u8],
    allowed: bool,
    udp: bool,
    our_payload: u16,
    out: &mut Vec<u8>,
    lc: &mut [u8; MAX_NAME],
) -> Step<'a> {
    let q = match wire::parse(pkt, lc) {
        Parsed::Drop => return Step::Drop,
        Parsed::Error {
            id,
            flags,
            rcode,
            question,
            edns,
        } => {
            wire::write_error(out, id, flags, rcode, question, edns, our_payload);
            let qtype = question.map(|q| wire::be16(q, q.len() - 4)).unwrap_or(0);
            return Step::Reply { qtype, rcode };
        }
        Parsed::Query(q) => q,
    };
    if !allowed {
        return error(out, &q, rcode::REFUSED as u16, our_payload);
    }
    if q.qclass != wire::CLASS_IN && q.qclass != wire::CLASS_ANY {
        return error(out, &q, rcode::REFUSED as u16, our_payload);
    }
    // Zone transfers (IXFR 251, AXFR 252) are not offered.
    if q.qtype == 251 || q.qtype == 252 {
        return error(out, &q, rcode::REFUSED as u16, our_payload);
    }
    let limit = if udp {
        wire::udp_limit(q.edns, our_payload)
    } else {
        u16::MAX as usize
    };
    let name = &lc[..q.name_len];
    let opt = if q.edns.is_some() { wire::OPT_LEN } else { 0 };
    let base = wire::HDR + q.question.len() + opt;
    match zone.lookup(name, q.qtype) {
        Lookup::Answer(a) => {
            let (body, ar) = if base + a.body.len() <= limit {
                (&a.body[..], a.ar)
            } else if base + a.cut <= limit {
                // RFC 2181 9: dropping the additional section needs no TC.
                (&a.body[..a.cut], 0)
            } else {
                wire::write_truncated(out, &q, true, 0, our_payload);
                return Step::Reply {
                    qtype: q.qtype,
                    rcode: 0,
                };
            };
            out.clear();
            wire::write_header(
                out,
                q.id,
                q.flags,
                Head {
                    aa: true,
                    tc: false,
                    rcode: 0,
                    qd: 1,
                    an: a.an,
                    ns: 0,
                    ar: ar + q.edns.is_some() as u16,
                },
            );
            out.extend_from_slice(q.question);
            out.extend_from_slice(body);
            if let Some(e) = q.edns {
                wire::write_opt(out, our_payload, 0, e.dnssec_ok);
            }
            Step::Reply {
                qtype: q.qtype,
                rcode: 0,
            }
        }
        Lookup::NoData { soa } => negative(zone, out, &q, rcode::NOERROR as u16, soa, our_payload),
        Lookup::NxDomain => negative(zone, out, &q, rcode::NXDOMAIN as u16, true, our_payload),
        Lookup::Forward => Step::Forward(q),
    }
}

fn error<'a>(out: &mut Vec<u8>, q: &Query<'_>, rcode: u16, our_payload: u16) -> Step<'a> {
    wire::write_error(
        out,
        q.id,
        q.flags,
        rcode,
        Some(q.question),
        q.edns,
        our_payload,
    );
    Step::Reply {
        qtype: q.qtype,
        rcode,
    }
}

/// NXDOMAIN or NODATA, with the SOA in the authority section when the name
/// is in our domain (RFC 2308 3). Always fits in 512 bytes.
fn negative<'a>(
    zone: &Zone,
    out: &mut Vec<u8>,
    q: &Query<'_>,
    rcode: u16,
    soa: bool,
    our_payload: u16,
) -> Step<'a> {
    out.clear();
    wire::write_header(
        out,
        q.id,
        q.flags,
        Head {
            aa: true,
            tc: false,
            rcode,
            qd: 1,
            an: 0,
            ns: soa as u16,
            ar: q.edns.is_some() as u16,
        },
    );
    out.extend_from_slice(q.question);
    if soa {
        let owner = wire::HDR + q.name_len - zone.params.domain.len();
        let ttl = zone.params.negative_ttl;
        wire::write_soa(out, owner, ttl, zone.serial, ttl);
    }
    if let Some(e) = q.edns {
        wire::write_opt(out, our_payload, rcode, e.dnssec_ok);
    }
    Step::Reply {
        qtype: q.qtype,
        rcode,
    }
}

/// Check that a response we wrote is well-formed: the question and every
/// record the header counts are there, and nothing follows them. The fuzz
/// target and the tests use it as an oracle.
pub fn well_formed(resp: &[u8]) -> bool {
    if resp.len() < wire::HDR {
        return false;
    }
    let qd = wire::be16(resp, 4) as usize;
    let rrs =
        wire::be16(resp, 6) as usize + wire::be16(resp, 8) as usize + wire::be16(resp, 10) as usize;
    let mut pos = wire::HDR;
    for _ in 0..qd {
        match wire::skip_name(resp, pos) {
            Some(p) if p + 4 <= resp.len() => pos = p + 4,
            _ => return false,
        }
    }
    for _ in 0..rrs {
        match wire::walk_record(resp, pos) {
            Some(r) => pos = r.end,
            None => return false,
        }
    }
    pos == resp.len()
}

/// Run one packet through the whole synchronous request path, over UDP and
/// over TCP, against a small fixed zone, and check the invariants: no
/// panic, a reply is well-formed, carries the query's ID, fits the UDP
/// limit. The entry point of `fuzz/fuzz_targets/request.rs`.
#[doc(hidden)]
pub fn fuzz_one(zone: &Zone, pkt: &[u8]) {
    let mut out = Vec::new();
    let mut lc = [0u8; MAX_NAME];
    for (udp, allowed) in [(true, true), (false, true), (true, false)] {
        match answer(zone, pkt, allowed, udp, 1232, &mut out, &mut lc) {
            Step::Reply { .. } => {
                assert!(well_formed(&out), "malformed reply {out:?} to {pkt:?}");
                assert_eq!(out[0..2], pkt[0..2], "reply id");
                assert!(out[2] & 0x80 != 0, "QR set");
                if udp {
                    assert!(out.len() <= 1232, "UDP reply of {} bytes", out.len());
                }
            }
            Step::Drop => assert!(pkt.len() < wire::HDR || pkt[2] & 0x80 != 0),
            Step::Forward(q) => {
                assert!(allowed);
                assert_eq!(q.name_len, q.question.len() - 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::sample_zone;

    fn query(name: &[u8], qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut p = vec![
            0xab,
            0xcd,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            edns.is_some() as u8,
        ];
        p.extend_from_slice(name);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        if let Some(size) = edns {
            p.extend_from_slice(&[0, 0, 41]);
            p.extend_from_slice(&size.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        p
    }

    /// Random and mutated packets through the request path (bounded: 60k
    /// cases, deterministic), with the fuzz target's invariants.
    #[test]
    fn random_and_mutated_packets_keep_the_invariants() {
        let zone = sample_zone();
        let seeds = [
            query(
                b"\x03web\x07default\x03svc\x04pier\x08internal\x00",
                1,
                None,
            ),
            query(
                b"\x03BIG\x07default\x03svc\x04pier\x08internal\x00",
                1,
                Some(4096),
            ),
            query(
                b"\x05_http\x04_tcp\x03big\x07default\x03svc\x04pier\x08internal\x00",
                33,
                Some(1232),
            ),
            query(b"\x05nosuch\x04pier\x08internal\x00", 28, None),
            query(b"\x07example\x03org\x00", 1, None),
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for seed in &seeds {
            fuzz_one(&zone, seed);
        }
        for i in 0..60_000 {
            let r = next();
            let mut p = seeds[(r % seeds.len() as u64) as usize].clone();
            if i % 5 == 0 {
                // Pure noise.
                let len = (next() % 100) as usize;
                p = (0..len).map(|_| next() as u8).collect();
            } else {
                for _ in 0..1 + next() % 4 {
                    let r = next();
                    match r % 4 {
                        0 if !p.is_empty() => {
                            let at = (next() as usize) % p.len();
                            p[at] = next() as u8;
                        }
                        1 if !p.is_empty() => {
                            let at = (next() as usize) % p.len();
                            p.truncate(at);
                        }
                        2 => p.push(next() as u8),
                        _ if p.len() > 2 => {
                            let at = 2 + (next() as usize) % (p.len() - 2);
                            p[at] ^= 1 << (next() % 8);
                        }
                        _ => {}
                    }
                }
            }
            fuzz_one(&zone, &p);
        }
    }

    #[test]
    fn zone_transfers_are_refused() {
        let zone = sample_zone();
        let mut out = Vec::new();
        let mut lc = [0u8; MAX_NAME];
        let q = query(b"\x04pier\x08internal\x00", 252, None);
        assert!(matches!(
            answer(&zone, &q, true, false, 1232, &mut out, &mut lc),
            Step::Reply { rcode: 5, .. }
        ));
        assert!(well_formed(&out));
    }

    #[test]
    fn big_answers_truncate_or_drop_glue() {
        let zone = sample_zone();
        let mut out = Vec::new();
        let mut lc = [0u8; MAX_NAME];
        let q = query(
            b"\x03big\x07default\x03svc\x04pier\x08internal\x00",
            1,
            None,
        );
        assert!(matches!(
            answer(&zone, &q, true, true, 1232, &mut out, &mut lc),
            Step::Reply { .. }
        ));
        assert!(out[2] & 0x02 != 0, "TC set");
        assert!(out.len() <= 512);
        let q = query(
            b"\x03big\x07default\x03svc\x04pier\x08internal\x00",
            1,
            None,
        );
        answer(&zone, &q, true, false, 1232, &mut out, &mut lc);
        assert_eq!(wire::be16(&out, 6), 120, "TCP has them all");
        assert!(well_formed(&out));
    }
}
