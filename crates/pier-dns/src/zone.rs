//! The mesh zone, pre-encoded from a snapshot.
//!
//! Every name the snapshot defines maps (lower-cased, in wire form) to the
//! encoded records of each type it has. A query copies the header, echoes its
//! own question and appends those bytes: the compression pointers in them
//! point at the question (offset 12), so they hold whatever case was asked.
//!
//! The map is split into shards behind `Arc`s ([`Names`]) and
//! [`ZoneUpdater`] applies a new snapshot by re-encoding only the names of
//! the services that changed, copying only the shards it touches.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use pier_model::{EndpointMap, Name, Namespace, ObjectKey, Service, Snapshot};

use crate::wire::{self, Encoder, rtype};

/// TTLs and the domain, from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneParams {
    /// Lower-case wire form of the domain.
    pub domain: Vec<u8>,
    pub vip_ttl: u32,
    pub headless_ttl: u32,
    pub pod_ttl: u32,
    pub negative_ttl: u32,
}

/// Pre-encoded records after the question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub an: u16,
    pub ar: u16,
    /// Length of `body` without the additional section, which may be left
    /// out when it does not fit (RFC 2181 9: no TC for that).
    pub cut: usize,
    pub body: Box<[u8]>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NameEntry {
    /// Shared, so that copying a shard on update copies pointers.
    pub types: Arc<[(u16, Answer)]>,
}

/// FxHash-style hasher: the keys are ours (inserted from the snapshot) and
/// short, so flooding is not a concern and SipHash's cost is.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHash;

#[derive(Debug, Default)]
pub struct FastHasher(u64);

type Shard = HashMap<Arc<[u8]>, NameEntry, FastHash>;

/// The zone's names (lower-case wire form) and their entries, split by hash
/// into shards behind `Arc`s: an incremental update clones the outer slice
/// of pointers and copies only the shards whose names it changes
/// (copy-on-write), and a lookup costs one more pointer hop than a single
/// map.
#[derive(Debug, Clone)]
pub struct Names {
    shards: Box<[Arc<Shard>]>,
    mask: usize,
    len: usize,
}

impl Names {
    /// About 512 names per shard, 16 to 512 shards: few enough that the
    /// shard headers stay in cache (a lookup then costs about what one
    /// map's does), small enough that copying one on update is cheap (its
    /// keys and values are `Arc`s, so a copy is a table of pointers).
    fn with_capacity(n: usize) -> Names {
        let count = (n / 512).next_power_of_two().clamp(16, 1 << 9);
        let shards = (0..count)
            .map(|_| Arc::new(Shard::with_hasher(FastHash)))
            .collect();
        Names {
            shards,
            mask: count - 1,
            len: 0,
        }
    }

    #[inline]
    fn shard_of(&self, name: &[u8]) -> usize {
        let mut h = FastHasher(0x9e37_79b9_7f4a_7c15);
        h.write(name);
        // High bits: the shard's own table indexes by the low bits of its
        // (differently seeded) hash.
        ((h.0 >> 40) as usize) & self.mask
    }

    #[inline]
    pub fn get(&self, name: &[u8]) -> Option<&NameEntry> {
        self.shards[self.shard_of(name)].get(name)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &NameEntry)> {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(k, v)| (&k[..], v)))
    }

    /// The entries with their shared keys (for the benchmark's comparison
    /// with a single map).
    #[doc(hidden)]
    pub fn entries(&self) -> impl Iterator<Item = (&Arc<[u8]>, &NameEntry)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    fn insert(&mut self, name: Arc<[u8]>, entry: NameEntry) {
        let i = self.shard_of(&name);
        let shard = Arc::make_mut(&mut self.shards[i]);
        if shard.insert(name, entry).is_none() {
            self.len += 1;
        }
    }

    /// Insert unless the entry is already there, equal: no shard copy then.
    fn set(&mut self, name: Vec<u8>, entry: NameEntry) {
        if self.get(&name) != Some(&entry) {
            self.insert(name.into(), entry);
        }
    }

    fn remove(&mut self, name: &[u8]) {
        let i = self.shard_of(name);
        if self.shards[i].contains_key(name) {
            Arc::make_mut(&mut self.shards[i]).remove(name);
            self.len -= 1;
        }
    }

    fn shrink_to_fit(&mut self) {
        for s in self.shards.iter_mut() {
            if let Some(s) = Arc::get_mut(s) {
                s.shrink_to_fit();
            }
        }
    }
}

impl PartialEq for Names {
    fn eq(&self, other: &Names) -> bool {
        self.len == other.len && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

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

#[derive(Debug, PartialEq)]
pub struct Zone {
    pub names: Names,
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

#[derive(Default, Debug)]
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

fn encode(pend: HashMap<Vec<u8>, Pending, FastHash>, params: ZoneParams, serial: u32) -> Zone {
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

fn encode_entry(name: &[u8], p: &Pending, params: &ZoneParams, serial: u32) -> NameEntry {
    let mut types: Vec<(u16, Answer)> = Vec::new();
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

/// PTR targets and TTLs at one address, in order.
type PtrList = Vec<(Vec<u8>, u32)>;

/// One service's part of the zone: the names only it defines (its own name,
/// its pods', `_tcp` and the SRV names, none of which another service can
/// define) and its PTR records by address, in the order they are made.
#[derive(Default)]
struct Frag {
    own: HashMap<Vec<u8>, Pending, FastHash>,
    ptr: Vec<(IpAddr, PtrList)>,
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
fn service_frag(
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
    let ready: Vec<_> = eps
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|e| e.ready)
        .collect();
    match svc.vip {
        Some(vip) => {
            f.own
                .entry(svc_name.clone())
                .or_default()
                .a
                .push((vip, params.vip_ttl));
            f.ptr_at(vip).push((svc_name.clone(), params.vip_ttl));
        }
        None => {
            let p = f.own.entry(svc_name.clone()).or_default();
            for e in &ready {
                if !p.a.iter().any(|(ip, _)| *ip == e.ip) {
                    p.a.push((e.ip, params.headless_ttl));
                }
            }
        }
    }
    let mut targets = Vec::with_capacity(ready.len());
    for e in &ready {
        let host = e.pod.as_ref().unwrap_or(&e.id);
        let pod_name = wire::prepend(&[host.as_str()], &svc_name);
        let p = f.own.entry(pod_name.clone()).or_default();
        if !p.a.iter().any(|(ip, _)| *ip == e.ip) {
            p.a.push((e.ip, params.pod_ttl));
        }
        let r = f.ptr_at(e.ip);
        if !r.iter().any(|(n, _)| *n == pod_name) {
            r.push((pod_name.clone(), params.pod_ttl));
        }
        targets.push((pod_name, *e));
    }
    if !svc.ports.is_empty() {
        let tcp = wire::prepend(&["_tcp"], &svc_name);
        f.own.entry(tcp.clone()).or_default();
        for sp in &svc.ports {
            let label = format!("_{}", sp.name);
            let srv_name = wire::prepend(&[label.as_str()], &tcp);
            let p = f.own.entry(srv_name).or_default();
            p.srv_ttl = params.headless_ttl;
            for (target, e) in &targets {
                if let Some(port) = e.port_for(sp) {
                    p.srv.push((0, 10, port.get(), target.clone()));
                    p.srv_glue.push((target.clone(), e.ip, params.pod_ttl));
                }
            }
        }
    }
    f
}

/// The addresses a service has PTR records at: its VIP and its ready
/// endpoints' addresses (what [`service_frag`] puts in `ptr`).
fn ptr_ips(svc: &Service, eps: Option<&Arc<EndpointMap>>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = svc.vip.into_iter().collect();
    for e in eps.into_iter().flat_map(|m| m.values()) {
        if e.ready && !v.contains(&e.ip) {
            v.push(e.ip);
        }
    }
    v
}

/// The keys of the services whose `Arc<Service>` or endpoint map differ
/// (by pointer) between two snapshots, sorted. Both maps are walked in key
/// order together, so it costs one pass and no lookups when a map is shared.
fn changed_services(old: &Snapshot, new: &Snapshot) -> Vec<ObjectKey> {
    fn diff<V>(
        a: &std::collections::BTreeMap<ObjectKey, Arc<V>>,
        b: &std::collections::BTreeMap<ObjectKey, Arc<V>>,
        out: &mut Vec<ObjectKey>,
    ) {
        let (mut ia, mut ib) = (a.iter().peekable(), b.iter().peekable());
        loop {
            match (ia.peek(), ib.peek()) {
                (None, None) => return,
                (Some((k, _)), None) => {
                    out.push((*k).clone());
                    ia.next();
                }
                (None, Some((k, _))) => {
                    out.push((*k).clone());
                    ib.next();
                }
                (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                    std::cmp::Ordering::Less => {
                        out.push((*ka).clone());
                        ia.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push((*kb).clone());
                        ib.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(va, vb) {
                            out.push((*ka).clone());
                        }
                        ia.next();
                        ib.next();
                    }
                },
            }
        }
    }
    let mut out = Vec::new();
    if !Arc::ptr_eq(&old.services, &new.services) {
        diff(&old.services, &new.services, &mut out);
    }
    if !Arc::ptr_eq(&old.endpoints, &new.endpoints) {
        let mut eps = Vec::new();
        diff(&old.endpoints, &new.endpoints, &mut eps);
        // Endpoints of a service that exists in neither snapshot do not
        // show in the zone.
        out.extend(
            eps.into_iter()
                .filter(|k| old.services.contains_key(k) || new.services.contains_key(k)),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// How [`ZoneUpdater::update`] applied a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// Neither services nor endpoints changed: only the SOA serial.
    Unchanged,
    /// Only the names of this many changed services were rebuilt.
    Incremental { services: usize },
    /// The whole zone was rebuilt.
    Full,
}

/// Keeps the zone in step with the snapshot, rebuilding only the names of
/// services whose `Arc<Service>` or endpoint map changed (the reflector
/// changes them copy-on-write, so a pointer comparison finds them), and
/// the PTR names at the addresses those services had or have. The zone it
/// produces is equal, name by name and byte by byte, to what [`build`] makes
/// from the same snapshot (a property test checks this); when more than a
/// quarter of the services changed it simply calls [`build`].
pub struct ZoneUpdater {
    params: ZoneParams,
    svc_d: Vec<u8>,
    snap: Arc<Snapshot>,
    zone: Arc<Zone>,
    /// Address → the service (slot) with PTR records there. Most addresses
    /// have one; [`MANY`] sends to `shared_ips`, which lists them.
    ips: HashMap<IpAddr, u32, FastHash>,
    shared_ips: HashMap<IpAddr, Vec<u32>, FastHash>,
    /// Slot → service key, so that the index holds 4 bytes per service.
    slots: Vec<Option<ObjectKey>>,
    slot_of: HashMap<ObjectKey, u32, FastHash>,
    free: Vec<u32>,
    /// Services per namespace: `<ns>.svc.<domain>` exists while any does.
    namespaces: HashMap<Namespace, usize, FastHash>,
}

impl std::fmt::Debug for ZoneUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneUpdater")
            .field("revision", &self.snap.revision)
            .field("names", &self.zone.names.len())
            .field("addresses", &self.ips.len())
            .finish_non_exhaustive()
    }
}

/// In `ZoneUpdater::ips`: several services, see `shared_ips`.
const MANY: u32 = u32::MAX;

/// Below this many changed services the update is always incremental.
const INCREMENTAL_MIN: usize = 64;

impl ZoneUpdater {
    /// A full build of `snap`.
    pub fn new(snap: Arc<Snapshot>, params: ZoneParams) -> ZoneUpdater {
        let zone = Arc::new(build(&snap, params.clone()));
        let mut u = ZoneUpdater {
            svc_d: wire::prepend(&["svc"], &params.domain),
            params,
            snap: snap.clone(),
            zone,
            ips: HashMap::with_capacity_and_hasher(snap.services.len() * 2, FastHash),
            shared_ips: HashMap::with_hasher(FastHash),
            slots: Vec::with_capacity(snap.services.len()),
            slot_of: HashMap::with_capacity_and_hasher(snap.services.len(), FastHash),
            free: Vec::new(),
            namespaces: HashMap::with_hasher(FastHash),
        };
        for (key, svc) in snap.services.iter() {
            let slot = u.slot_for(key);
            *u.namespaces.entry(key.0.clone()).or_default() += 1;
            for ip in ptr_ips(svc, snap.endpoints.get(key)) {
                u.ip_add(ip, slot);
            }
        }
        u.ips.shrink_to_fit();
        u
    }

    /// The zone for the last snapshot given.
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.clone()
    }

    pub fn params(&self) -> &ZoneParams {
        &self.params
    }

    fn slot_for(&mut self, key: &ObjectKey) -> u32 {
        if let Some(s) = self.slot_of.get(key) {
            return *s;
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(key.clone());
                s
            }
            None => {
                self.slots.push(Some(key.clone()));
                (self.slots.len() - 1) as u32
            }
        };
        self.slot_of.insert(key.clone(), s);
        s
    }

    fn ip_add(&mut self, ip: IpAddr, slot: u32) {
        match self.ips.get_mut(&ip) {
            None => {
                self.ips.insert(ip, slot);
            }
            Some(s) if *s == slot => {}
            Some(s) if *s == MANY => {
                let v = self.shared_ips.entry(ip).or_default();
                if !v.contains(&slot) {
                    v.push(slot);
                }
            }
            Some(s) => {
                let first = std::mem::replace(s, MANY);
                self.shared_ips.insert(ip, vec![first, slot]);
            }
        }
    }

    fn ip_remove(&mut self, ip: IpAddr, slot: u32) {
        match self.ips.get(&ip) {
            Some(&MANY) => {
                let left = match self.shared_ips.get_mut(&ip) {
                    Some(v) => {
                        v.retain(|s| *s != slot);
                        v.clone()
                    }
                    None => Vec::new(),
                };
                match left[..] {
                    [] => {
                        self.shared_ips.remove(&ip);
                        self.ips.remove(&ip);
                    }
                    [only] => {
                        self.shared_ips.remove(&ip);
                        self.ips.insert(ip, only);
                    }
                    _ => {}
                }
            }
            Some(&s) if s == slot => {
                self.ips.remove(&ip);
            }
            _ => {}
        }
    }

    fn ip_who(&self, ip: IpAddr) -> Vec<u32> {
        match self.ips.get(&ip) {
            None => Vec::new(),
            Some(&MANY) => self.shared_ips.get(&ip).cloned().unwrap_or_default(),
            Some(&s) => vec![s],
        }
    }

    fn release_slot(&mut self, key: &ObjectKey) {
        if let Some(s) = self.slot_of.remove(key) {
            self.slots[s as usize] = None;
            self.free.push(s);
        }
    }

    /// Bring the zone to `snap`. Returns how; [`ZoneUpdater::zone`] then
    /// gives the new zone (a new `Arc`; zones already handed out are not
    /// changed).
    pub fn update(&mut self, snap: Arc<Snapshot>) -> UpdateKind {
        let old = std::mem::replace(&mut self.snap, snap.clone());
        let changed = changed_services(&old, &snap);
        let total = old.services.len().max(snap.services.len());
        // A domain under .arpa could make a service name and a reverse name
        // the same name, which `build` merges: rare enough to always build.
        let arpa = self.params.domain.ends_with(b"\x04arpa\x00");
        if arpa || (changed.len() > INCREMENTAL_MIN && changed.len() * 4 > total) {
            *self = ZoneUpdater::new(snap, self.params.clone());
            return UpdateKind::Full;
        }
        let serial = snap.revision as u32;
        let mut names = self.zone.names.clone();
        let kind = if changed.is_empty() {
            UpdateKind::Unchanged
        } else {
            UpdateKind::Incremental {
                services: changed.len(),
            }
        };
        let mut touched: Vec<IpAddr> = Vec::new();
        // The new fragments' PTR lists, reused when the PTR names are redone.
        let mut new_ptrs: HashMap<ObjectKey, Vec<(IpAddr, PtrList)>, FastHash> =
            HashMap::with_capacity_and_hasher(changed.len(), FastHash);
        for key in &changed {
            let (ns, name) = key;
            let before = old.services.get(key);
            let after = snap.services.get(key);
            if let Some(svc) = before {
                let f = service_frag(
                    ns,
                    name,
                    svc,
                    old.endpoints.get(key).map(|m| &**m),
                    &self.svc_d,
                    &self.params,
                );
                for n in f.own.keys() {
                    names.remove(n);
                }
                if let Some(&slot) = self.slot_of.get(key) {
                    for (ip, _) in &f.ptr {
                        self.ip_remove(*ip, slot);
                        touched.push(*ip);
                    }
                }
            }
            if let Some(svc) = after {
                let f = service_frag(
                    ns,
                    name,
                    svc,
                    snap.endpoints.get(key).map(|m| &**m),
                    &self.svc_d,
                    &self.params,
                );
                for (n, p) in &f.own {
                    let e = encode_entry(n, p, &self.params, serial);
                    names.insert(n[..].into(), e);
                }
                let slot = self.slot_for(key);
                for (ip, _) in &f.ptr {
                    self.ip_add(*ip, slot);
                    touched.push(*ip);
                }
                new_ptrs.insert(key.clone(), f.ptr);
            }
            let ns_name = wire::prepend(&[ns.as_str()], &self.svc_d);
            match (before.is_some(), after.is_some()) {
                (true, false) => {
                    self.release_slot(key);
                    let gone = match self.namespaces.get_mut(ns) {
                        Some(c) => {
                            *c = c.saturating_sub(1);
                            *c == 0
                        }
                        None => true,
                    };
                    if gone {
                        self.namespaces.remove(ns);
                        names.remove(&ns_name);
                    }
                }
                (false, true) => {
                    *self.namespaces.entry(ns.clone()).or_default() += 1;
                    names.set(ns_name, NameEntry::default());
                }
                _ => {}
            }
        }
        // PTR names: every service with a record at the address, in key
        // order (as `build` adds them), each with its records in its order.
        touched.sort_unstable();
        touched.dedup();
        for ip in touched {
            let rev = reverse_name(ip);
            let mut who: Vec<&ObjectKey> = self
                .ip_who(ip)
                .into_iter()
                .filter_map(|s| self.slots.get(s as usize).and_then(|k| k.as_ref()))
                .collect();
            if who.is_empty() {
                names.remove(&rev);
                continue;
            }
            who.sort_unstable();
            let mut p = Pending::default();
            for key in who {
                let list = match new_ptrs.get(key) {
                    Some(l) => l.iter().find(|(a, _)| *a == ip).map(|(_, l)| l.clone()),
                    None => snap.services.get(key).and_then(|svc| {
                        let mut f = service_frag(
                            &key.0,
                            &key.1,
                            svc,
                            snap.endpoints.get(key).map(|m| &**m),
                            &self.svc_d,
                            &self.params,
                        );
                        f.ptr
                            .iter_mut()
                            .find(|(a, _)| *a == ip)
                            .map(|(_, l)| std::mem::take(l))
                    }),
                };
                p.ptr.extend(list.into_iter().flatten());
            }
            let e = encode_entry(&rev, &p, &self.params, serial);
            names.set(rev, e);
        }
        // The SOA carries the serial.
        if serial != self.zone.serial || !changed.is_empty() {
            let soa = Pending {
                soa: true,
                ..Pending::default()
            };
            let e = encode_entry(&self.params.domain, &soa, &self.params, serial);
            names.set(self.params.domain.clone(), e);
        }
        self.zone = Arc::new(Zone {
            names,
            params: self.params.clone(),
            serial,
        });
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pier_model::{Endpoint, EndpointPort, PortNum};
    use std::collections::BTreeMap;

    /// splitmix64: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len())]
        }
    }

    fn params() -> ZoneParams {
        ZoneParams {
            domain: wire::wire_name("pier.internal").unwrap_or_else(|| vec![0]),
            vip_ttl: 30,
            headless_ttl: 1,
            pod_ttl: 2,
            negative_ttl: 3,
        }
    }

    fn name(s: &str) -> Name {
        Name::new(s).expect("valid name")
    }

    /// Small pools so that names, pods and addresses collide: VIPs that are
    /// also pod addresses, an address shared by pods of several services,
    /// two endpoints with the same pod name, IPv6.
    const IPS: &[&str] = &[
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.3",
        "fd00::1",
        "172.16.0.1",
        "172.16.0.2",
        "172.16.0.3",
        "172.16.0.4",
        "172.16.0.5",
        "fd01::5",
    ];

    fn ip(r: &mut Rng) -> IpAddr {
        r.pick(IPS).parse().expect("ip")
    }

    fn key(r: &mut Rng) -> ObjectKey {
        let ns = *r.pick(&["default", "a", "b"]);
        let n = *r.pick(&["s0", "s1", "s2", "s3", "s4", "s5"]);
        (Namespace::new(ns).expect("ns"), name(n))
    }

    fn service(r: &mut Rng, k: &ObjectKey) -> Service {
        let vip = if r.below(4) == 0 { None } else { Some(ip(r)) };
        let mut ports = Vec::new();
        for _ in 0..r.below(3) {
            let n = *r.pick(&["http", "grpc", "http"]);
            let tp = *r.pick(&[8080u16, 9090]);
            ports.push(serde_json::json!({"name": n, "port": 80, "target_port": tp}));
        }
        serde_json::from_value(serde_json::json!({
            "name": k.1, "namespace": k.0, "vip": vip, "ports": ports,
        }))
        .expect("service")
    }

    fn endpoint(r: &mut Rng, k: &ObjectKey, node: &Name, id: &Name) -> Endpoint {
        let ports = match r.below(3) {
            0 => vec![],
            1 => vec![EndpointPort {
                name: name("http"),
                port: PortNum::new(8080).expect("port"),
            }],
            _ => vec![EndpointPort {
                name: name("metrics"),
                port: PortNum::new(9090).expect("port"),
            }],
        };
        Endpoint {
            service: k.1.clone(),
            namespace: k.0.clone(),
            node: node.clone(),
            id: id.clone(),
            pod: if r.below(3) == 0 {
                None
            } else {
                Some(name(r.pick::<&str>(&["p0", "p1", "p2"])))
            },
            hostname: None,
            ip: ip(r),
            ports,
            ready: r.below(4) != 0,
            is_static: false,
        }
    }

    /// One random change, copy-on-write as the reflector makes it.
    fn mutate(r: &mut Rng, s: &mut Snapshot) {
        match r.below(9) {
            0 | 1 => {
                let k = key(r);
                let svc = service(r, &k);
                Arc::make_mut(&mut s.services).insert(k, Arc::new(svc));
            }
            2 => {
                let k = key(r);
                Arc::make_mut(&mut s.services).remove(&k);
            }
            3 | 4 => {
                // Endpoints of any key, also of services that do not exist.
                let k = key(r);
                let node = name(r.pick::<&str>(&["n1", "n2"]));
                let id = name(r.pick::<&str>(&["c0", "c1", "c2", "c3"]));
                let e = endpoint(r, &k, &node, &id);
                let m = Arc::make_mut(&mut s.endpoints).entry(k).or_default();
                Arc::make_mut(m).insert((node, id), Arc::new(e));
            }
            5 => {
                // Flip readiness of an existing endpoint.
                let keys: Vec<ObjectKey> = s.endpoints.keys().cloned().collect();
                if keys.is_empty() {
                    return;
                }
                let k = r.pick(&keys).clone();
                let eps = Arc::make_mut(&mut s.endpoints);
                if let Some(m) = eps.get_mut(&k) {
                    let ek: Vec<_> = m.keys().cloned().collect();
                    if ek.is_empty() {
                        return;
                    }
                    let ek = r.pick(&ek).clone();
                    let m = Arc::make_mut(m);
                    if let Some(e) = m.get_mut(&ek) {
                        Arc::make_mut(e).ready ^= true;
                    }
                }
            }
            6 => {
                // Remove one endpoint, or a service's whole map.
                let keys: Vec<ObjectKey> = s.endpoints.keys().cloned().collect();
                if keys.is_empty() {
                    return;
                }
                let k = r.pick(&keys).clone();
                let eps = Arc::make_mut(&mut s.endpoints);
                if r.below(3) == 0 {
                    eps.remove(&k);
                } else if let Some(m) = eps.get_mut(&k) {
                    let ek: Vec<_> = m.keys().cloned().collect();
                    if let Some(first) = ek.first() {
                        Arc::make_mut(m).remove(first);
                    }
                }
            }
            7 => {
                // A new Arc with the same content: changed by pointer only.
                let keys: Vec<ObjectKey> = s.services.keys().cloned().collect();
                if keys.is_empty() {
                    return;
                }
                let k = r.pick(&keys).clone();
                let svcs = Arc::make_mut(&mut s.services);
                if let Some(v) = svcs.get_mut(&k) {
                    *v = Arc::new((**v).clone());
                }
                if let Some(m) = Arc::make_mut(&mut s.endpoints).get_mut(&k) {
                    *m = Arc::new((**m).clone());
                }
            }
            _ => {
                // Only the VIP changes (or the service becomes headless).
                let keys: Vec<ObjectKey> = s.services.keys().cloned().collect();
                if keys.is_empty() {
                    return;
                }
                let k = r.pick(&keys).clone();
                let vip = if r.below(3) == 0 { None } else { Some(ip(r)) };
                if let Some(v) = Arc::make_mut(&mut s.services).get_mut(&k) {
                    Arc::make_mut(v).vip = vip;
                }
            }
        }
    }

    fn diff(got: &Zone, want: &Zone) -> String {
        let mut out = String::new();
        for (k, v) in want.names.iter() {
            if got.names.get(k) != Some(v) {
                out += &format!(
                    "{:?}: want {v:?} got {:?}\n",
                    String::from_utf8_lossy(k),
                    got.names.get(k)
                );
            }
        }
        for (k, v) in got.names.iter() {
            if want.names.get(k).is_none() {
                out += &format!("{:?}: extra {v:?}\n", String::from_utf8_lossy(k));
            }
        }
        out
    }

    #[test]
    fn incremental_updates_equal_full_rebuilds() {
        let mut stats = [0usize; 3];
        let mut shared_ptr = 0usize;
        for seed in 0..150u64 {
            let mut r = Rng(seed);
            let mut s = Snapshot::default();
            for _ in 0..r.below(12) {
                mutate(&mut r, &mut s);
            }
            let mut up = ZoneUpdater::new(Arc::new(s.clone()), params());
            for step in 0..40 {
                for _ in 0..1 + r.below(4) {
                    mutate(&mut r, &mut s);
                }
                if r.below(5) != 0 {
                    s.revision += 1;
                }
                let kind = up.update(Arc::new(s.clone()));
                stats[match kind {
                    UpdateKind::Unchanged => 0,
                    UpdateKind::Incremental { .. } => 1,
                    UpdateKind::Full => 2,
                }] += 1;
                let want = build(&s, params());
                let got = up.zone();
                assert!(
                    *got == want,
                    "seed {seed} step {step} ({kind:?}):\n{}",
                    diff(&got, &want)
                );
                assert_eq!(got.serial, want.serial);
                shared_ptr += want
                    .names
                    .iter()
                    .filter(|(_, e)| e.types.iter().any(|(t, a)| *t == rtype::PTR && a.an > 1))
                    .count();
            }
        }
        // The sequences did exercise the incremental path and PTR names
        // shared by several services.
        assert!(stats[1] > 4000, "{stats:?}");
        assert!(shared_ptr > 1000, "{shared_ptr}");
    }

    #[test]
    fn many_changes_fall_back_to_a_full_build_and_agree() {
        let mut r = Rng(7);
        let mut s = Snapshot::default();
        let mut svcs = BTreeMap::new();
        for i in 0..400 {
            let k = (Namespace::default(), name(&format!("m{i}")));
            svcs.insert(k.clone(), Arc::new(service(&mut r, &k)));
        }
        s.services = Arc::new(svcs);
        let mut up = ZoneUpdater::new(Arc::new(s.clone()), params());
        // One change: incremental.
        let k = (Namespace::default(), name("m3"));
        Arc::make_mut(&mut s.services).insert(k.clone(), Arc::new(service(&mut r, &k)));
        s.revision = 2;
        assert_eq!(
            up.update(Arc::new(s.clone())),
            UpdateKind::Incremental { services: 1 }
        );
        assert!(*up.zone() == build(&s, params()));
        // Half of them: full.
        for i in 0..200 {
            let k = (Namespace::default(), name(&format!("m{i}")));
            Arc::make_mut(&mut s.services).remove(&k);
        }
        s.revision = 3;
        assert_eq!(up.update(Arc::new(s.clone())), UpdateKind::Full);
        assert!(*up.zone() == build(&s, params()));
        // Nothing but the revision: the SOA serial follows.
        s.revision = 4;
        assert_eq!(up.update(Arc::new(s.clone())), UpdateKind::Unchanged);
        let z = up.zone();
        assert!(*z == build(&s, params()));
        assert_eq!(z.serial, 4);
    }

    #[test]
    fn an_update_copies_only_the_shards_it_touches() {
        let mut r = Rng(11);
        let mut s = Snapshot::default();
        let mut svcs = BTreeMap::new();
        for i in 0..6000 {
            let k = (Namespace::default(), name(&format!("m{i}")));
            svcs.insert(k.clone(), Arc::new(service(&mut r, &k)));
        }
        s.services = Arc::new(svcs);
        let mut up = ZoneUpdater::new(Arc::new(s.clone()), params());
        let before = up.zone();
        let k = (Namespace::default(), name("m5"));
        let mut svc = service(&mut r, &k);
        svc.vip = Some("10.200.0.9".parse().expect("ip"));
        Arc::make_mut(&mut s.services).insert(k, Arc::new(svc));
        s.revision = 9;
        up.update(Arc::new(s.clone()));
        let after = up.zone();
        assert!(*after == build(&s, params()));
        let copied = before
            .names
            .shards
            .iter()
            .zip(after.names.shards.iter())
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count();
        assert!(
            before.names.shard_count() >= 32,
            "{}",
            before.names.shard_count()
        );
        // The service's names, two reverse names and the SOA: a handful.
        assert!((1..=8).contains(&copied), "{copied} shards copied");
    }
}
