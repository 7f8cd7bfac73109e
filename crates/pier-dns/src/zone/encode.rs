//! Services to records: one service's names and PTRs ([`Frag`]), and the
//! encoding of a name's records into the bytes a query copies.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use pier_model::{Endpoint, EndpointMap, Name, Namespace, Protocol, Service, Snapshot};

use crate::wire::{self, Encoder, rtype};

use super::{Answer, FastHash, NameEntry, Names, Zone, ZoneParams, reverse_name};

#[derive(Default, Debug)]
pub(super) struct Pending {
    pub(super) a: Vec<(IpAddr, u32)>,
    /// (priority, weight, port, target)
    pub(super) srv: Vec<(u16, u16, u16, Vec<u8>)>,
    pub(super) srv_ttl: u32,
    pub(super) srv_glue: Vec<(Vec<u8>, IpAddr, u32)>,
    pub(super) ptr: Vec<(Vec<u8>, u32)>,
    pub(super) soa: bool,
    /// An ExternalName service's CNAME target (lower-case wire form), TTL.
    pub(super) cname: Option<(Vec<u8>, u32)>,
}

/// Build the zone from a snapshot.
pub fn build(snap: &Snapshot, params: ZoneParams) -> Zone {
    let d = params.domain.clone();
    let mut pend: HashMap<Vec<u8>, Pending, FastHash> =
        HashMap::with_capacity_and_hasher(snap.services.len() * 6 + 4, FastHash);
    pend.entry(d.clone()).or_default().soa = true;
    let svc_d = wire::prepend(&["svc"], &d);
    pend.entry(svc_d.clone()).or_default();

    for (key, svc) in snap.services.iter() {
        let (ns, name) = key;
        pend.entry(wire::prepend(&[ns.as_str()], &svc_d))
            .or_default();
        let f = service_frag(
            ns,
            name,
            svc,
            snap.endpoints.get(key).map(|m| &**m),
            &svc_d,
            &params,
        );
        // A service's own names are defined by no other service; PTRs at a
        // shared address add up in service order.
        pend.extend(f.own);
        for (ip, list) in f.ptr {
            pend.entry(reverse_name(ip)).or_default().ptr.extend(list);
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

pub(super) fn encode(
    pend: HashMap<Vec<u8>, Pending, FastHash>,
    params: ZoneParams,
    serial: u32,
) -> Zone {
    let mut names = Names::with_capacity(pend.len());
    for (name, p) in pend {
        let e = encode_entry(&name, &p, &params, serial);
        names.insert(name.into(), e);
    }
    names.shrink_to_fit();
    Zone {
        names,
        params,
        serial,
    }
}

pub(super) fn encode_entry(
    name: &[u8],
    p: &Pending,
    params: &ZoneParams,
    serial: u32,
) -> NameEntry {
    let mut types: Vec<(u16, Answer)> = Vec::new();
    if let Some((target, ttl)) = &p.cname {
        // A CNAME owns its name alone (RFC 1034 3.6.2).
        let mut enc = Encoder::new(name);
        enc.record(name, rtype::CNAME, *ttl, |e| e.name(target));
        types.push((rtype::CNAME, answer(enc, 1, 0, None)));
        return NameEntry {
            types: types.into(),
            alias: Some(Arc::new((target.clone(), *ttl))),
        };
    }
    let v4: Vec<_> = p.a.iter().filter(|(ip, _)| ip.is_ipv4()).collect();
    let v6: Vec<_> = p.a.iter().filter(|(ip, _)| ip.is_ipv6()).collect();
    for (t, set) in [(rtype::A, &v4), (rtype::AAAA, &v6)] {
        if set.is_empty() {
            continue;
        }
        let mut enc = Encoder::new(name);
        for (ip, ttl) in set.iter() {
            enc.record(name, t, *ttl, |e| match ip {
                IpAddr::V4(a) => e.buf.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => e.buf.extend_from_slice(&a.octets()),
            });
        }
        types.push((t, answer(enc, set.len(), 0, None)));
    }
    if !p.srv.is_empty() {
        let mut enc = Encoder::new(name);
        for (prio, weight, port, target) in &p.srv {
            enc.record(name, rtype::SRV, p.srv_ttl, |e| {
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
        let mut enc = Encoder::new(name);
        for (target, ttl) in &p.ptr {
            enc.record(name, rtype::PTR, *ttl, |e| e.name(target));
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
    NameEntry {
        types: types.into(),
        alias: None,
    }
}

pub(super) fn answer(enc: Encoder<'_>, an: usize, ar: usize, cut: Option<usize>) -> Answer {
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

/// PTR targets and TTLs at one address, in order.
pub(super) type PtrList = Vec<(Vec<u8>, u32)>;

/// One service's part of the zone: the names only it defines (its own name,
/// its pods', `_tcp`, `_udp` and the SRV names, none of which another service can
/// define) and its PTR records by address, in the order they are made.
#[derive(Default)]
pub(super) struct Frag {
    pub(super) own: HashMap<Vec<u8>, Pending, FastHash>,
    pub(super) ptr: Vec<(IpAddr, PtrList)>,
}

impl Frag {
    fn ptr_at(&mut self, ip: IpAddr) -> &mut PtrList {
        let i = match self.ptr.iter().position(|(a, _)| *a == ip) {
            Some(i) => i,
            None => {
                self.ptr.push((ip, Vec::new()));
                self.ptr.len() - 1
            }
        };
        &mut self.ptr[i].1
    }
}

/// One service's records, kept apart: [`build`] merges every service's,
/// [`ZoneUpdater`] swaps a changed service's old ones for its new ones.
pub(super) fn service_frag(
    ns: &Namespace,
    name: &Name,
    svc: &Service,
    eps: Option<&EndpointMap>,
    svc_d: &[u8],
    params: &ZoneParams,
) -> Frag {
    let mut f = Frag::default();
    let ns_d = wire::prepend(&[ns.as_str()], svc_d);
    let svc_name = wire::prepend(&[name.as_str()], &ns_d);
    f.own.entry(svc_name.clone()).or_default();
    if let Some(host) = &svc.external_name {
        // An ExternalName service: its name is a CNAME, and nothing else.
        if let Some(target) = wire::wire_name(&host.to_ascii_lowercase()) {
            f.own.entry(svc_name).or_default().cname = Some((target, params.vip_ttl));
        }
        return f;
    }
    // Ready endpoints with the address every host can reach them at.
    let ready: Vec<_> = eps
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|e| e.ready)
        .filter_map(|e| answer_addr(e).map(|ip| (ip, e)))
        .collect();
    match svc.vip {
        Some(_) => {
            // A, and AAAA for a dual-stack service's IPv6 VIP.
            for vip in svc.vips() {
                f.own
                    .entry(svc_name.clone())
                    .or_default()
                    .a
                    .push((vip, params.vip_ttl));
                f.ptr_at(vip).push((svc_name.clone(), params.vip_ttl));
            }
        }
        None => {
            let p = f.own.entry(svc_name.clone()).or_default();
            for (ip, _) in &ready {
                if !p.a.iter().any(|(a, _)| a == ip) {
                    p.a.push((*ip, params.headless_ttl));
                }
            }
        }
    }
    let mut targets = Vec::with_capacity(ready.len());
    for (ip, e) in &ready {
        let host = e.pod.as_ref().unwrap_or(&e.id);
        let pod_name = wire::prepend(&[host.as_str()], &svc_name);
        let p = f.own.entry(pod_name.clone()).or_default();
        if !p.a.iter().any(|(a, _)| a == ip) {
            p.a.push((*ip, params.pod_ttl));
        }
        let r = f.ptr_at(*ip);
        if !r.iter().any(|(n, _)| *n == pod_name) {
            r.push((pod_name.clone(), params.pod_ttl));
        }
        targets.push((pod_name, *ip, *e));
    }
    if !svc.ports.is_empty() {
        // `_tcp.<svc>` and `_udp.<svc>` exist (empty) as the parents of
        // their SRV names.
        let tcp = wire::prepend(&["_tcp"], &svc_name);
        let udp = wire::prepend(&["_udp"], &svc_name);
        for sp in &svc.ports {
            let parent = match sp.protocol {
                Protocol::Tcp => &tcp,
                Protocol::Udp => &udp,
            };
            f.own.entry(parent.clone()).or_default();
            let label = format!("_{}", sp.name);
            let srv_name = wire::prepend(&[label.as_str()], parent);
            let p = f.own.entry(srv_name).or_default();
            p.srv_ttl = params.headless_ttl;
            for (target, ip, e) in &targets {
                if let Some(port) = e.port_for(sp) {
                    p.srv.push((0, 10, port.get(), target.clone()));
                    p.srv_glue.push((target.clone(), *ip, params.pod_ttl));
                }
            }
        }
    }
    f
}

/// The address DNS gives for an endpoint: its endpoint VIP, which every
/// host's proxy forwards to it (a pod's bridge address is reachable only
/// on its own host); a static endpoint's own address. `None` for a pod
/// endpoint whose agent has not claimed an endpoint VIP yet: it is left out
/// until it has one.
pub(super) fn answer_addr(e: &Endpoint) -> Option<IpAddr> {
    if e.is_static { Some(e.ip) } else { e.addr }
}

/// The addresses a service has PTR records at: its VIP and its ready
/// endpoints' addresses (what [`service_frag`] puts in `ptr`).
pub(super) fn ptr_ips(svc: &Service, eps: Option<&Arc<EndpointMap>>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = svc.vips().collect();
    for e in eps.into_iter().flat_map(|m| m.values()) {
        if e.ready
            && let Some(ip) = answer_addr(e)
            && !v.contains(&ip)
        {
            v.push(ip);
        }
    }
    v
}
