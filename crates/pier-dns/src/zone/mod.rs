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
//!
//! This file holds the zone and its lookup; `encode` turns services into
//! records ([`build`], one service's `Frag`), `update` keeps the zone in
//! step with the snapshot ([`ZoneUpdater`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use pier_model::Snapshot;

use crate::wire::{self, rtype};

mod encode;
#[cfg(test)]
mod tests;
mod update;

pub use encode::{StaticRecord, build, from_records, sample_zone};
pub use update::{UpdateKind, ZoneUpdater};

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
    /// An ExternalName service's name: the CNAME's target (lower-case wire
    /// form) and TTL. A query for any other type than CNAME goes the
    /// forwarding path, which answers the CNAME followed by the target's
    /// own records (`server::chase`).
    pub alias: Option<Arc<(Vec<u8>, u32)>>,
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

    /// The CNAME target (lower-case wire form) and TTL of an ExternalName
    /// service's `name` (lower-case wire form).
    pub fn alias(&self, name: &[u8]) -> Option<Arc<(Vec<u8>, u32)>> {
        self.names.get(name).and_then(|e| e.alias.clone())
    }

    /// `name` is lower-case wire form.
    #[inline]
    pub fn lookup(&self, name: &[u8], qtype: u16) -> Lookup<'_> {
        if let Some(e) = self.names.get(name) {
            if e.alias.is_some() && qtype != rtype::CNAME && qtype != rtype::ANY {
                return Lookup::Forward;
            }
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
