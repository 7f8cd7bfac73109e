//! The mesh zone, pre-encoded from a snapshot.
//!
//! Every name the snapshot defines maps (lower-cased, in wire form) to the
//! encoded records of each type it has. A query copies the header, echoes its
//! own question and appends those bytes: the compression pointers in them
//! point at the question (offset 12), so they hold whatever case was asked.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

use pier_model::Snapshot;

use crate::wire::{self, Encoder, rtype};

/// TTLs and the domain, from the config.
#[derive(Debug, Clone)]
pub struct ZoneParams {
    /// Lower-case wire form of the domain.
    pub domain: Vec<u8>,
    pub vip_ttl: u32,
    pub headless_ttl: u32,
    pub pod_ttl: u32,
    pub negative_ttl: u32,
}

/// Pre-encoded records after the question.
#[derive(Debug)]
pub struct Answer {
    pub an: u16,
    pub ar: u16,
    /// Length of `body` without the additional section, which may be left
    /// out when it does not fit (RFC 2181 9: no TC for that).
    pub cut: usize,
    pub body: Box<[u8]>,
}

#[derive(Debug, Default)]
pub struct NameEntry {
    pub types: Box<[(u16, Answer)]>,
}

/// FxHash-style hasher: the keys are ours (inserted from the snapshot) and
/// short, so flooding is not a concern and SipHash's cost is.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHash;

#[derive(Debug, Default)]
pub struct FastHasher(u64);

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

const K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(K);
        }
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0.rotate_left(5) ^ n as u64).wrapping_mul(K);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the zone says about a name and type.
#[derive(Debug)]
pub enum Lookup<'a> {
    Answer(&'a Answer),
    /// The name exists without this type. `soa` when it is in the domain.
    NoData {
        soa: bool,
    },
    NxDomain,
    /// Not ours: forward.
    Forward,
}

#[derive(Debug)]
pub struct Zone {
    pub names: HashMap<Box<[u8]>, NameEntry, FastHash>,
    pub params: ZoneParams,
    /// The snapshot's revision, as the SOA serial.
    pub serial: u32,
}

impl Zone {
    pub fn empty(params: ZoneParams) -> Zone {
        build(&Snapshot::default(), params)
    }

    /// `name` is lower-case wire form.
    #[inline]
    pub fn lookup(&self, name: &[u8], qtype: u16) -> Lookup<'_> {
        if let Some(e) = self.names.get(name) {
            let hit = if qtype == rtype::ANY {
                // RFC 8482: a subset is enough; give the first RRset.
                e.types.first()
            } else {
                e.types.iter().find(|(t, _)| *t == qtype)
            };
            return match hit {
                Some((_, a)) => Lookup::Answer(a),
                None => Lookup::NoData {
                    soa: wire::suffix_at(name, &self.params.domain).is_some(),
                },
            };
        }
        if wire::suffix_at(name, &self.params.domain).is_some() {
            Lookup::NxDomain
        } else {
            Lookup::Forward
        }
    }
}

#[derive(Default)]
struct Pending {
    a: Vec<(IpAddr, u32)>,
    /// (priority, weight, port, target)
    srv: Vec<(u16, u16, u16, Vec<u8>)>,
    srv_ttl: u32,
    srv_glue: Vec<(Vec<u8>, IpAddr, u32)>,
    ptr: Vec<(Vec<u8>, u32)>,
    soa: bool,
}

/// The reverse name of an address: `d.c.b.a.in-addr.arpa` or the nibbles
/// under `ip6.arpa`.
pub fn reverse_name(ip: IpAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(74);
    match ip {
        IpAddr::V4(v4) => {
            for o in v4.octets().iter().rev() {
                let s = o.to_string();
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            out.extend_from_slice(b"\x07in-addr\x04arpa\x00");
        }
        IpAddr::V6(v6) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for o in v6.octets().iter().rev() {
                out.extend_from_slice(&[1, HEX[(o & 0xf) as usize], 1, HEX[(o >> 4) as usize]]);
            }
            out.extend_from_slice(b"\x03ip6\x04arpa\x00");
        }
    }
    out
}

/// Build the zone from a snapshot.
pub fn build(snap: &Snapshot, params: ZoneParams) -> Zone {
    let d = params.domain.clone();
    let mut pend: HashMap<Vec<u8>, Pending, FastHash> =
        HashMap::with_capacity_and_hasher(snap.services.len() * 6 + 4, FastHash);
    pend.entry(d.clone()).or_default().soa = true;
    let svc_d = wire::prepend(&["svc"], &d);
    pend.entry(svc_d.clone()).or_default();

    for ((ns, name), svc) in snap.services.iter() {
        let ns_d = wire::prepend(&[ns.as_str()], &svc_d);
        pend.entry(ns_d.clone()).or_default();
        let svc_name = wire::prepend(&[name.as_str()], &ns_d);
        pend.entry(svc_name.clone()).or_default();
        let ready: Vec<_> = snap.ready_endpoints_of(ns, name).collect();

        match svc.vip {
            Some(vip) => {
                pend.entry(svc_name.clone())
                    .or_default()
                    .a
                    .push((vip, params.vip_ttl));
                pend.entry(reverse_name(vip))
                    .or_default()
                    .ptr
                    .push((svc_name.clone(), params.vip_ttl));
            }
            None => {
                let p = pend.entry(svc_name.clone()).or_default();
                for e in &ready {
                    if !p.a.iter().any(|(ip, _)| *ip == e.ip) {
                        p.a.push((e.ip, params.headless_ttl));
                    }
                }
            }
        }
        // Pod names, their reverse names, and the SRV targets.
        let mut targets = Vec::with_capacity(ready.len());
        for e in &ready {
            let host = e.pod.as_ref().unwrap_or(&e.id);
            let pod_name = wire::prepend(&[host.as_str()], &svc_name);
            let p = pend.entry(pod_name.clone()).or_default();
            if !p.a.iter().any(|(ip, _)| *ip == e.ip) {
                p.a.push((e.ip, params.pod_ttl));
            }
            let r = pend.entry(reverse_name(e.ip)).or_default();
            if !r.ptr.iter().any(|(n, _)| *n == pod_name) {
                r.ptr.push((pod_name.clone(), params.pod_ttl));
            }
            targets.push((pod_name, *e));
        }
        if !svc.ports.is_empty() {
            let tcp = wire::prepend(&["_tcp"], &svc_name);
            pend.entry(tcp.clone()).or_default();
            for sp in &svc.ports {
                let label = format!("_{}", sp.name);
                let srv_name = wire::prepend(&[label.as_str()], &tcp);
                let p = pend.entry(srv_name).or_default();
                p.srv_ttl = params.headless_ttl;
                for (target, e) in &targets {
                    if let Some(port) = e.port_for(sp) {
                        // Equal weights: the client spreads over all of them.
                        p.srv.push((0, 10, port.get(), target.clone()));
                        p.srv_glue.push((target.clone(), e.ip, params.pod_ttl));
                    }
                }
            }
        }
    }

    encode(pend, params, snap.revision as u32)
}

/// A record for [`from_records`].
#[derive(Debug, Clone)]
pub enum StaticRecord {
    Addr(IpAddr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        /// Lower-case wire form.
        target: Vec<u8>,
    },
}

/// A zone from plain records (lower-case wire owner names under the domain,
/// TTL, data), with the targets' addresses as SRV glue. The benchmark uses
/// it to serve the reference servers' zone file through the same query path;
/// the agent always builds from a snapshot.
pub fn from_records(
    params: ZoneParams,
    serial: u32,
    records: Vec<(Vec<u8>, u32, StaticRecord)>,
) -> Zone {
    let mut pend: HashMap<Vec<u8>, Pending, FastHash> =
        HashMap::with_capacity_and_hasher(records.len() + 4, FastHash);
    pend.entry(params.domain.clone()).or_default().soa = true;
    let mut addrs: HashMap<Vec<u8>, Vec<(IpAddr, u32)>> = HashMap::new();
    for (name, ttl, r) in &records {
        if let StaticRecord::Addr(ip) = r {
            addrs.entry(name.clone()).or_default().push((*ip, *ttl));
        }
    }
    for (name, ttl, r) in records {
        // Empty non-terminals between the name and the domain exist too.
        if let Some(at) = wire::suffix_at(&name, &params.domain) {
            for s in wire::label_starts(&name).take_while(|&s| s < at) {
                pend.entry(name[s..].to_vec()).or_default();
            }
        }
        let p = pend.entry(name).or_default();
        match r {
            StaticRecord::Addr(ip) => p.a.push((ip, ttl)),
            StaticRecord::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                p.srv_ttl = ttl;
                for (ip, t) in addrs.get(&target).into_iter().flatten() {
                    if !p.srv_glue.iter().any(|(n, i, _)| *n == target && i == ip) {
                        p.srv_glue.push((target.clone(), *ip, *t));
                    }
                }
                p.srv.push((priority, weight, port, target));
            }
        }
    }
    encode(pend, params, serial)
}

fn encode(pend: HashMap<Vec<u8>, Pending, FastHash>, params: ZoneParams, serial: u32) -> Zone {
    let mut names: HashMap<Box<[u8]>, NameEntry, FastHash> =
        HashMap::with_capacity_and_hasher(pend.len(), FastHash);
    for (name, p) in pend {
        let mut types: Vec<(u16, Answer)> = Vec::new();
        let v4: Vec<_> = p.a.iter().filter(|(ip, _)| ip.is_ipv4()).collect();
        let v6: Vec<_> = p.a.iter().filter(|(ip, _)| ip.is_ipv6()).collect();
        for (t, set) in [(rtype::A, &v4), (rtype::AAAA, &v6)] {
            if set.is_empty() {
                continue;
            }
            let mut enc = Encoder::new(&name);
            for (ip, ttl) in set.iter() {
                enc.record(&name, t, *ttl, |e| match ip {
                    IpAddr::V4(a) => e.buf.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => e.buf.extend_from_slice(&a.octets()),
                });
            }
            types.push((t, answer(enc, set.len(), 0, None)));
        }
        if !p.srv.is_empty() {
            let mut enc = Encoder::new(&name);
            for (prio, weight, port, target) in &p.srv {
                enc.record(&name, rtype::SRV, p.srv_ttl, |e| {
                    e.buf.extend_from_slice(&prio.to_be_bytes());
                    e.buf.extend_from_slice(&weight.to_be_bytes());
                    e.buf.extend_from_slice(&port.to_be_bytes());
                    e.name(target);
                });
            }
            let cut = enc.buf.len();
            for (target, ip, ttl) in &p.srv_glue {
                let t = if ip.is_ipv4() { rtype::A } else { rtype::AAAA };
                enc.record(target, t, *ttl, |e| match ip {
                    IpAddr::V4(a) => e.buf.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => e.buf.extend_from_slice(&a.octets()),
                });
            }
            types.push((
                rtype::SRV,
                answer(enc, p.srv.len(), p.srv_glue.len(), Some(cut)),
            ));
        }
        if !p.ptr.is_empty() {
            let mut enc = Encoder::new(&name);
            for (target, ttl) in &p.ptr {
                enc.record(&name, rtype::PTR, *ttl, |e| e.name(target));
            }
            types.push((rtype::PTR, answer(enc, p.ptr.len(), 0, None)));
        }
        if p.soa {
            let mut body = Vec::with_capacity(50);
            wire::write_soa(
                &mut body,
                wire::HDR,
                params.negative_ttl,
                serial,
                params.negative_ttl,
            );
            types.push((
                rtype::SOA,
                Answer {
                    an: 1,
                    ar: 0,
                    cut: body.len(),
                    body: body.into_boxed_slice(),
                },
            ));
        }
        names.insert(
            name.into_boxed_slice(),
            NameEntry {
                types: types.into_boxed_slice(),
            },
        );
    }
    names.shrink_to_fit();
    Zone {
        names,
        params,
        serial,
    }
}

fn answer(enc: Encoder<'_>, an: usize, ar: usize, cut: Option<usize>) -> Answer {
    let len = enc.buf.len();
    Answer {
        an: an.min(u16::MAX as usize) as u16,
        ar: ar.min(u16::MAX as usize) as u16,
        cut: cut.unwrap_or(len),
        body: enc.buf.into_boxed_slice(),
    }
}

/// A small zone for the fuzz target and tests: A, AAAA, SRV with glue, a
/// PTR-less reverse-free set under `pier.internal`, including one answer too
/// big for UDP.
#[doc(hidden)]
pub fn sample_zone() -> Zone {
    let params = ZoneParams {
        domain: wire::wire_name("pier.internal").unwrap_or_else(|| vec![0]),
        vip_ttl: 30,
        headless_ttl: 1,
        pod_ttl: 1,
        negative_ttl: 1,
    };
    let n = |s: &str| wire::wire_name(s).unwrap_or_else(|| vec![0]);
    let mut recs = vec![
        (
            n("web.default.svc.pier.internal"),
            30,
            StaticRecord::Addr([10, 96, 0, 1].into()),
        ),
        (
            n("v6.default.svc.pier.internal"),
            30,
            StaticRecord::Addr("fd00::1".parse().unwrap_or(IpAddr::from([0u8; 16]))),
        ),
    ];
    for i in 0..120u8 {
        let pod = n(&format!("p{i}.big.default.svc.pier.internal"));
        recs.push((pod.clone(), 1, StaticRecord::Addr([172, 18, 0, i].into())));
        recs.push((
            n("big.default.svc.pier.internal"),
            1,
            StaticRecord::Addr([172, 18, 0, i].into()),
        ));
        recs.push((
            n("_http._tcp.big.default.svc.pier.internal"),
            1,
            StaticRecord::Srv {
                priority: 0,
                weight: 10,
                port: 8080,
                target: pod,
            },
        ));
    }
    from_records(params, 1, recs)
}
