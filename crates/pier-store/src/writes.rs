//! Every write of a cluster object made on a user's behalf goes through
//! here: services with their VIP and node-port allocations, replica sets
//! (create, scale, delete) and pod deletes. The API's handlers and the
//! agent (services for labelled containers) both call it; nothing else
//! writes these keys (ARCHITECTURE.md, "Who writes each key", lists the
//! other writers: the agent's own endpoints and pod statuses, the
//! supervisor's pods, each node's record).
//!
//! Each write is one transaction whose compares make racing writers safe:
//! an object or an allocation is *claimed* ([`Batch::claim`]: put if
//! absent), an update is made against the revision it read. An allocation
//! is a key (`alloc/vip/<ip>`, `alloc/nodeport/<n>`) claimed in the same txn
//! as its service, so two writers (two agents auto-creating the same
//! service, or the API racing an agent) can never hand out one address
//! twice, nor create a service twice.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pier_model::api::Resource;
use pier_model::{
    Allocation, Name, Namespace, PortNum, ReplicaSet, Replicas, Service, Sla, decode, encode, keys,
};

use crate::alloc::{
    AllocConfig, alloc_value, assign_node_ports, check_explicit, check_ports, node_ports_of,
    pick_vip, used_node_ports, used_vips,
};
use crate::{Compare, Revision, Store, StoreError, Txn, TxnOp, TxnResult};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service {}/{} already exists", .0.namespace, .0.name)]
    AlreadyExists(Box<Service>),
    #[error(
        "replicaset {:?} already exists in namespace {:?}; scale it with `pier scale rs {} --replicas N` or delete it first",
        .name.as_str(), .namespace, .name
    )]
    ReplicaSetExists { namespace: Namespace, name: Name },
    #[error("no free {0} left; widen the range in the agent config")]
    Exhausted(&'static str),
    #[error("node port {port} is already used by service {}/{}", by.namespace, by.service)]
    NodePortTaken { port: u16, by: Allocation },
    #[error("{0}")]
    Invalid(String),
    /// The stored object does not parse: a write cannot start from it.
    #[error("{error}; fix or delete it")]
    Corrupt { error: pier_model::DecodeError },
    #[error("{0}")]
    Conflict(Conflict),
    /// A manual scale of a set whose count the autoscaler owns.
    #[error(
        "replicaset {:?} is autoscaled between {min} and {max} replicas, so its count is the autoscaler's; change the bounds with `pier autoscale rs {name} --min N --max M`, or turn autoscaling off with `pier autoscale rs {name} --off` and scale again",
        .name.as_str()
    )]
    Autoscaled {
        name: Name,
        min: Replicas,
        max: Replicas,
    },
    #[error("{} {:?} not found in namespace {:?}", .kind.singular(), .name.as_str(), .namespace)]
    NotFound {
        kind: Resource,
        namespace: Namespace,
        name: Name,
    },
}

/// What another writer changed under a write, which then gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// Every attempt to create or delete `key` lost a race.
    #[error(
        "the service changed while it was being written ({action} {key} raced with other writers {attempts} times); try again"
    )]
    Raced {
        action: &'static str,
        key: String,
        attempts: usize,
    },
    /// An update was made against revision `expected`, and `key` is at
    /// `found`.
    #[error(
        "the service changed while it was being written ({key} is at revision {found}, not {expected}); try again"
    )]
    Revision {
        key: String,
        found: Revision,
        expected: Revision,
    },
    /// The service or a node port it claims changed between the read and
    /// the write.
    #[error(
        "the service changed while it was being written ({key} or one of its node ports changed meanwhile); try again"
    )]
    NodePorts { key: String },
    /// Every attempt to update a replica set lost a race.
    #[error(
        "replicaset {:?} kept changing while {doing} ({attempts} attempts); try again",
        .name.as_str()
    )]
    Update {
        name: Name,
        doing: &'static str,
        attempts: u32,
    },
}

/// Attempts before a racing service writer is reported as a conflict.
const ATTEMPTS: usize = 8;
/// How often a replica-set update retries a revision conflict before
/// giving up.
const SCALE_ATTEMPTS: u32 = 16;

/// One transaction under construction: its compares and its operations.
#[derive(Debug, Default)]
struct Batch {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
}

impl Batch {
    /// Claims `key` for `value`: put it, and fail the txn if it exists.
    fn claim(&mut self, key: String, value: Vec<u8>) {
        self.compares.push(Compare::Absent(key.clone()));
        self.put(key, value);
    }

    /// Puts `key` (no lease: objects outlive their writer).
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.ops.push(TxnOp::Put {
            key,
            value,
            lease: None,
        });
    }

    fn delete(&mut self, key: String) {
        self.ops.push(TxnOp::Delete { key });
    }

    /// Fails the txn unless `key` is still at `rev`.
    fn at_revision(&mut self, key: String, rev: Revision) {
        self.compares.push(Compare::ModRevision(key, rev));
    }

    async fn commit(self, store: &dyn Store) -> Result<TxnResult, StoreError> {
        store
            .txn(Txn {
                compares: self.compares,
                success: self.ops,
                failure: vec![],
            })
            .await
    }
}

fn node_port_key(n: u16) -> Result<String, WriteError> {
    Ok(keys::node_port_alloc(
        PortNum::new(n).map_err(|e| WriteError::Invalid(e.to_string()))?,
    ))
}

async fn get_service(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(Service, Revision)>, WriteError> {
    match store.get(key).await? {
        None => Ok(None),
        Some(kv) => {
            let svc: Service = decode(key, &kv.value)
                .map_err(|e| WriteError::Invalid(format!("{e}; delete the key or fix it")))?;
            Ok(Some((svc, kv.mod_revision)))
        }
    }
}

/// Create `svc` if absent, with its allocations (a VIP if `want_vip` or
/// the service names one; node ports for a NodePort service), in one txn.
pub async fn create_service(
    store: &dyn Store,
    cfg: &AllocConfig,
    svc: Service,
    want_vip: bool,
) -> Result<Service, WriteError> {
    check_ports(&svc)?;
    check_explicit(cfg, &svc)?;
    let key = keys::service(&svc.namespace, &svc.name);
    for _ in 0..ATTEMPTS {
        if let Some((existing, _)) = get_service(store, &key).await? {
            return Err(WriteError::AlreadyExists(Box::new(existing)));
        }
        let mut s = svc.clone();
        let mut b = Batch::default();
        if (want_vip && !s.headless) || s.vip.is_some() {
            let used = used_vips(store).await?;
            let vip = match s.vip {
                Some(v) if used.contains(&v) => {
                    return Err(WriteError::Invalid(format!("vip {v} is already in use")));
                }
                Some(v) => v,
                None => pick_vip(cfg, &used)?,
            };
            s.vip = Some(vip);
            b.claim(keys::vip_alloc(vip), alloc_value(&s));
        }
        let used = used_node_ports(store).await?;
        for n in assign_node_ports(cfg, &mut s, &used, &BTreeSet::new())? {
            b.claim(node_port_key(n)?, alloc_value(&s));
        }
        b.claim(key.clone(), encode(&s));
        if b.commit(store).await?.succeeded {
            return Ok(s);
        }
        // Someone created the service or took an address meanwhile: look again.
    }
    Err(WriteError::Conflict(Conflict::Raced {
        action: "creating",
        key,
        attempts: ATTEMPTS,
    }))
}

/// Replace the service whose `mod_revision` is `rev`.
pub async fn update_service(
    store: &dyn Store,
    cfg: &AllocConfig,
    rev: Revision,
    svc: Service,
) -> Result<Service, WriteError> {
    check_ports(&svc)?;
    check_explicit(cfg, &svc)?;
    let key = keys::service(&svc.namespace, &svc.name);
    let (old, cur_rev) = get_service(store, &key)
        .await?
        .ok_or_else(|| WriteError::NotFound {
            kind: Resource::Services,
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
        })?;
    if cur_rev != rev {
        return Err(WriteError::Conflict(Conflict::Revision {
            key,
            found: cur_rev,
            expected: rev,
        }));
    }
    let mut s = svc;
    if s.headless != old.headless {
        return Err(WriteError::Invalid(format!(
            "headless: a service cannot change between headless and not (it is {}); delete and re-create the service",
            if old.headless {
                "headless"
            } else {
                "not headless"
            }
        )));
    }
    if s.vip != old.vip {
        return Err(WriteError::Invalid(format!(
            "vip: a service's VIP cannot change (it is {:?}); delete and re-create the service",
            old.vip
        )));
    }
    let old_ports = node_ports_of(&old);
    let used = used_node_ports(store).await?;
    let new_ports = assign_node_ports(cfg, &mut s, &used, &old_ports)?;
    let mut b = Batch::default();
    b.at_revision(key.clone(), rev);
    for n in new_ports.difference(&old_ports) {
        b.claim(node_port_key(*n)?, alloc_value(&s));
    }
    for n in old_ports.difference(&new_ports) {
        if let Ok(k) = node_port_key(*n) {
            b.delete(k);
        }
    }
    b.put(key.clone(), encode(&s));
    if b.commit(store).await?.succeeded {
        Ok(s)
    } else {
        Err(WriteError::Conflict(Conflict::NodePorts { key }))
    }
}

/// Delete a service and free its allocations. `Ok(false)` if it did not
/// exist.
pub async fn delete_service(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
) -> Result<bool, WriteError> {
    let key = keys::service(ns, name);
    for _ in 0..ATTEMPTS {
        let kv = match store.get(&key).await? {
            None => return Ok(false),
            Some(kv) => kv,
        };
        let mut b = Batch::default();
        b.at_revision(key.clone(), kv.mod_revision);
        b.delete(key.clone());
        match decode::<Service>(&key, &kv.value) {
            Ok(svc) => {
                if let Some(vip) = svc.vip {
                    b.delete(keys::vip_alloc(vip));
                }
                for n in node_ports_of(&svc) {
                    if let Ok(k) = node_port_key(n) {
                        b.delete(k);
                    }
                }
            }
            // An unparsable service is still deleted; its allocations, if
            // any, are found by their value.
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "deleting a service whose value does not parse");
                for prefix in [keys::prefix::VIP_ALLOCS, keys::prefix::NODE_PORT_ALLOCS] {
                    for a in store.list(prefix).await?.kvs {
                        if let Ok(al) = decode::<Allocation>(&a.key, &a.value)
                            && &al.namespace == ns
                            && &al.service == name
                            && al.endpoint.is_none()
                        {
                            b.delete(a.key);
                        }
                    }
                }
            }
        }
        if b.commit(store).await?.succeeded {
            return Ok(true);
        }
    }
    Err(WriteError::Conflict(Conflict::Raced {
        action: "deleting",
        key,
        attempts: ATTEMPTS,
    }))
}

/// Claims an endpoint VIP (`Endpoint.addr`) for the endpoint `node`/`id`
/// of `ns`/`service`: a free address of the service CIDR, claimed as
/// `alloc/vip/<ip>` (create-if-absent) under `lease`, so it is freed with
/// the node's lease and can never be a service's VIP or another endpoint's
/// at the same time. The endpoint's agent is the only caller; it deletes
/// the key when the endpoint goes. Addresses are picked from a point that
/// depends on the endpoint and the time, not the lowest free one, so an
/// address just freed (still in some client's DNS cache) is rarely handed
/// out again at once, and agents claiming together rarely collide.
pub async fn claim_endpoint_addr(
    store: &dyn Store,
    cfg: &AllocConfig,
    ns: &Namespace,
    service: &Name,
    node: &Name,
    id: &Name,
    lease: crate::LeaseId,
) -> Result<std::net::IpAddr, WriteError> {
    use std::hash::{Hash, Hasher};
    let value = encode(&Allocation {
        namespace: ns.clone(),
        service: service.clone(),
        endpoint: Some((node.clone(), id.clone())),
    });
    for attempt in 0..ATTEMPTS {
        let used = used_vips(store).await?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (ns, service, node, id, attempt, pier_model::now_ms()).hash(&mut h);
        let ip = crate::alloc::pick_endpoint_addr(cfg, &used, h.finish())?;
        let key = keys::vip_alloc(ip);
        let r = store
            .txn(Txn {
                compares: vec![Compare::Absent(key.clone())],
                success: vec![TxnOp::Put {
                    key,
                    value: value.clone(),
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            return Ok(ip);
        }
    }
    Err(WriteError::Conflict(Conflict::Raced {
        action: "claiming an endpoint address",
        key: keys::endpoint(ns, service, node, id),
        attempts: ATTEMPTS,
    }))
}

/// The endpoint VIPs held by `node`'s endpoints, by endpoint key, as
/// stored (for a successor process of that node's agent to adopt).
pub async fn endpoint_addrs_of(
    store: &dyn Store,
    node: &Name,
) -> Result<Vec<(String, std::net::IpAddr, crate::KeyValue)>, StoreError> {
    let l = store.list(keys::prefix::VIP_ALLOCS).await?;
    let mut out = Vec::new();
    for kv in l.kvs {
        let Ok(pier_model::keys::Key::VipAlloc(ip)) = pier_model::keys::Key::parse(&kv.key) else {
            continue;
        };
        if let Ok(a) = decode::<Allocation>(&kv.key, &kv.value)
            && let Some((n, id)) = &a.endpoint
            && n == node
        {
            out.push((keys::endpoint(&a.namespace, &a.service, n, id), ip, kv));
        }
    }
    Ok(out)
}

/// Create `rs` if absent. Returns the store's revision after the write.
pub async fn create_replicaset(store: &dyn Store, rs: &ReplicaSet) -> Result<Revision, WriteError> {
    let mut b = Batch::default();
    b.claim(keys::replicaset(&rs.namespace, &rs.name), encode(rs));
    let r = b.commit(store).await?;
    if !r.succeeded {
        return Err(WriteError::ReplicaSetExists {
            namespace: rs.namespace.clone(),
            name: rs.name.clone(),
        });
    }
    Ok(r.revision)
}

/// A new replica count: this one, or the current one plus or minus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(Replicas),
    By(i64),
}

/// Held from a replica-set update's read to its compare-and-swap: scales
/// made by this process take turns instead of racing each other's revision
/// (one client winning every round could make the other fail all its
/// attempts). Updates through other hosts' APIs still meet the
/// compare-and-swap and its retries.
static UPDATE_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scale by compare-and-swap on the replica set's `mod_revision`: a racing
/// writer makes the txn fail, and the scale is recomputed from the new value,
/// so neither update is lost. An autoscaled set's count is the
/// autoscaler's: scaling it is a [`WriteError::Autoscaled`]. Returns the
/// replica set as written and the store's revision after the write.
pub async fn scale_replicaset(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    scale: Scale,
) -> Result<(ReplicaSet, Revision), WriteError> {
    let r = update_replicaset(store, ns, name, "it was being scaled", |rs| {
        if let Some((min, max, _)) = rs.autoscale() {
            return Err(WriteError::Autoscaled {
                name: name.clone(),
                min,
                max,
            });
        }
        rs.replicas = match scale {
            Scale::To(r) => r,
            Scale::By(d) => {
                let want = rs.replicas.get() as i64 + d;
                u32::try_from(want)
                    .ok()
                    .and_then(|w| Replicas::new(w).ok())
                    .ok_or_else(|| {
                        WriteError::Invalid(format!(
                            "delta: {d} would make {want} replicas; replicas are 0 to {}",
                            Replicas::MAX
                        ))
                    })?
            }
        };
        Ok(())
    })
    .await?;
    tracing::info!(namespace = %ns, replicaset = %name, replicas = r.0.replicas.get(), "replica set scaled");
    Ok(r)
}

/// Sets a set's autoscaling bounds and targets (`Some((min, max, sla))`) or
/// turns it off (`None`), by compare-and-swap like [`scale_replicaset`].
pub async fn set_autoscale(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    bounds: Option<(Replicas, Replicas, Sla)>,
) -> Result<(ReplicaSet, Revision), WriteError> {
    update_replicaset(store, ns, name, "its autoscaling was being set", |rs| {
        match &bounds {
            Some((min, max, sla)) => {
                rs.min_replicas = Some(*min);
                rs.max_replicas = Some(*max);
                rs.sla = Some(sla.clone());
            }
            None => {
                rs.min_replicas = None;
                rs.max_replicas = None;
                rs.sla = None;
            }
        }
        Ok(())
    })
    .await
}

/// Read, `change`, and write back if nobody wrote in between (compare on
/// `mod_revision`); on a race, back off a little and start again from the
/// new value, [`SCALE_ATTEMPTS`] times. `doing` names the change in the
/// conflict ("it was being scaled").
async fn update_replicaset(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    doing: &'static str,
    mut change: impl FnMut(&mut ReplicaSet) -> Result<(), WriteError>,
) -> Result<(ReplicaSet, Revision), WriteError> {
    let key = keys::replicaset(ns, name);
    for attempt in 0..SCALE_ATTEMPTS {
        let turn = UPDATE_TURN.lock().await;
        let kv = store.get(&key).await?.ok_or_else(|| WriteError::NotFound {
            kind: Resource::ReplicaSets,
            namespace: ns.clone(),
            name: name.clone(),
        })?;
        let mut rs: ReplicaSet =
            decode(&key, &kv.value).map_err(|error| WriteError::Corrupt { error })?;
        change(&mut rs)?;
        let mut b = Batch::default();
        b.at_revision(key.clone(), kv.mod_revision);
        b.put(key.clone(), encode(&rs));
        let r = b.commit(store).await?;
        drop(turn);
        if r.succeeded {
            tracing::debug!(namespace = %ns, replicaset = %name, attempt, "replica set updated");
            return Ok((rs, r.revision));
        }
        // Someone else wrote it between our read and our txn. Back off a
        // little, varying by attempt and clock so two racers separate.
        let jitter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 3_000)
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_micros(
            500 * u64::from(attempt + 1) + u64::from(jitter),
        ))
        .await;
    }
    Err(WriteError::Conflict(Conflict::Update {
        name: name.clone(),
        doing,
        attempts: SCALE_ATTEMPTS,
    }))
}

/// Delete a replica set (the supervisor then deletes its pods). Returns
/// whether it existed, and the store's revision after the delete.
pub async fn delete_replicaset(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
) -> Result<(bool, Revision), WriteError> {
    Ok(store.delete(&keys::replicaset(ns, name)).await?)
}

/// Delete a pod (the supervisor replaces it). Returns whether it existed,
/// and the store's revision after the delete.
pub async fn delete_pod(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
) -> Result<(bool, Revision), WriteError> {
    Ok(store.delete(&keys::pod(ns, name)).await?)
}
