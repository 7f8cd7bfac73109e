//! Keeping the zone in step with the snapshot: only the names of the
//! services that changed are encoded again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use pier_model::{DiffItem, Map, Namespace, ObjectKey, Snapshot};

use crate::wire;

use super::encode::{Pending, PtrList, build, encode_entry, ptr_ips, service_frag};
use super::{FastHash, NameEntry, Zone, ZoneParams, reverse_name};

/// The keys of the services whose `Service` or endpoint map differ between
/// two snapshots, sorted. The maps are persistent and share what did not
/// change, and `Map::diff` skips the shared parts, so this costs in
/// proportion to the change, not to the number of services.
pub(super) fn changed_services(old: &Snapshot, new: &Snapshot) -> Vec<ObjectKey> {
    fn diff<V: PartialEq + Clone>(
        a: &Map<ObjectKey, V>,
        b: &Map<ObjectKey, V>,
        out: &mut Vec<ObjectKey>,
    ) {
        out.extend(a.diff(b).map(|d| match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => {
                k.clone()
            }
        }));
    }
    let mut out = Vec::new();
    if !old.services.ptr_eq(&new.services) {
        diff(&old.services, &new.services, &mut out);
    }
    if !old.endpoints.ptr_eq(&new.endpoints) {
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
/// services whose `Service` or endpoint map changed (the snapshot's maps
/// are persistent, so a diff skips what two snapshots share), and
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
pub(super) const MANY: u32 = u32::MAX;

/// Below this many changed services the update is always incremental.
pub(super) const INCREMENTAL_MIN: usize = 64;

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
