//! Creating, updating and deleting services together with their VIP and
//! node-port allocations, each in one transaction.
//!
//! An allocation is a key (`alloc/vip/<ip>`, `alloc/nodeport/<n>`) created
//! with a create-if-absent compare in the same txn as the service, so two
//! writers (two agents auto-creating the same service, or the API racing an
//! agent) can never hand out one address twice, nor create a service twice.

use std::collections::BTreeSet;
use std::net::IpAddr;

use pier_model::{
    Allocation, Cidr, Name, Namespace, PortNum, Service, ServiceType, decode, encode, keys,
    keys::Key,
};

use crate::{Compare, Revision, Store, StoreError, Txn, TxnOp};

/// Where VIPs and node ports come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocConfig {
    pub service_cidr: Cidr,
    pub node_port_min: u16,
    pub node_port_max: u16,
}

impl AllocConfig {
    /// The DNS server's own VIP: `.10` of the service CIDR, as `10.96.0.10`
    /// is kube-dns's.
    pub fn dns_vip(&self) -> Option<IpAddr> {
        self.service_cidr.nth(10)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service {}/{} already exists", .0.namespace, .0.name)]
    AlreadyExists(Box<Service>),
    #[error("no free {0} left; widen the range in the agent config")]
    Exhausted(&'static str),
    #[error("node port {port} is already used by service {}/{}", by.namespace, by.service)]
    NodePortTaken { port: u16, by: Allocation },
    #[error("{0}")]
    Invalid(String),
    #[error("the service changed while it was being written ({0}); try again")]
    Conflict(String),
    #[error("service not found")]
    NotFound,
}

/// Attempts before a racing writer is reported as a conflict.
const ATTEMPTS: usize = 8;

/// Every allocated VIP.
pub async fn used_vips(store: &dyn Store) -> Result<BTreeSet<IpAddr>, StoreError> {
    let l = store.list(keys::prefix::VIP_ALLOCS).await?;
    Ok(l.kvs
        .iter()
        .filter_map(|kv| match Key::parse(&kv.key) {
            Ok(Key::VipAlloc(ip)) => Some(ip),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping malformed allocation key");
                None
            }
        })
        .collect())
}

/// Every allocated node port, with its holder.
pub async fn used_node_ports(
    store: &dyn Store,
) -> Result<std::collections::BTreeMap<u16, Allocation>, StoreError> {
    let l = store.list(keys::prefix::NODE_PORT_ALLOCS).await?;
    let mut out = std::collections::BTreeMap::new();
    for kv in &l.kvs {
        match Key::parse(&kv.key) {
            Ok(Key::NodePortAlloc(p)) => match decode::<Allocation>(&kv.key, &kv.value) {
                Ok(a) => {
                    out.insert(p.get(), a);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "node port allocation does not parse; treating the port as used");
                    out.insert(
                        p.get(),
                        Allocation {
                            namespace: Namespace::default(),
                            service: Name::new("unknown").expect("valid"),
                        },
                    );
                }
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping malformed allocation key")
            }
        }
    }
    Ok(out)
}

/// The first free VIP of the service CIDR.
pub fn pick_vip(cfg: &AllocConfig, used: &BTreeSet<IpAddr>) -> Result<IpAddr, AllocError> {
    // .0 is the network, .1 is often a gateway, .10 is DNS: start at .11,
    // and stop before the last address (the broadcast address in IPv4).
    let size = cfg.service_cidr.size();
    let last = size.saturating_sub(1).min(1 << 20);
    (11..last)
        .filter_map(|n| cfg.service_cidr.nth(n))
        .find(|ip| !used.contains(ip))
        .ok_or(AllocError::Exhausted("virtual IP in the service CIDR"))
}

/// Fill in node ports for a NodePort service, checking explicit ones.
/// Returns the node ports this service needs.
fn assign_node_ports(
    cfg: &AllocConfig,
    svc: &mut Service,
    used: &std::collections::BTreeMap<u16, Allocation>,
    own: &BTreeSet<u16>,
) -> Result<BTreeSet<u16>, AllocError> {
    let mut mine = BTreeSet::new();
    if svc.service_type != ServiceType::NodePort {
        for p in &mut svc.ports {
            if p.node_port.is_some() {
                return Err(AllocError::Invalid(format!(
                    "ports[{}].node_port is set but the service type is ClusterIP; use --type NodePort",
                    p.name
                )));
            }
        }
        return Ok(mine);
    }
    for p in &svc.ports {
        if let Some(np) = p.node_port {
            let n = np.get();
            if let Some(by) = used.get(&n)
                && !own.contains(&n)
            {
                return Err(AllocError::NodePortTaken {
                    port: n,
                    by: by.clone(),
                });
            }
            if !mine.insert(n) {
                return Err(AllocError::Invalid(format!("node port {n} is given twice")));
            }
        }
    }
    for p in &mut svc.ports {
        if p.node_port.is_none() {
            let n = (cfg.node_port_min..=cfg.node_port_max)
                .find(|n| (!used.contains_key(n) || own.contains(n)) && !mine.contains(n))
                .ok_or(AllocError::Exhausted("node port in the node-port range"))?;
            mine.insert(n);
            p.node_port = Some(PortNum::new(n).map_err(|e| AllocError::Invalid(e.to_string()))?);
        }
    }
    Ok(mine)
}

fn node_ports_of(svc: &Service) -> BTreeSet<u16> {
    svc.ports
        .iter()
        .filter_map(|p| p.node_port.map(|n| n.get()))
        .collect()
}

fn alloc_value(svc: &Service) -> Vec<u8> {
    encode(&Allocation {
        namespace: svc.namespace.clone(),
        service: svc.name.clone(),
    })
}

/// Checks what a writer asked for explicitly: each `node_port` must lie in
/// the node-port range (else a service could take :22 or :80 on every
/// host), and a `vip` must lie in the service CIDR, and be neither its
/// network, its last (broadcast) address nor the DNS VIP (else a service
/// could take any address, or DNS's). Every service write passes here.
pub fn check_explicit(cfg: &AllocConfig, svc: &Service) -> Result<(), AllocError> {
    for (i, p) in svc.ports.iter().enumerate() {
        if let Some(np) = p.node_port {
            let n = np.get();
            if n < cfg.node_port_min || n > cfg.node_port_max {
                return Err(AllocError::Invalid(format!(
                    "ports[{i}].node_port: {n} is outside the node-port range {}-{}; leave it out to be given one, or widen [network] node_port_min/node_port_max on every agent",
                    cfg.node_port_min, cfg.node_port_max
                )));
            }
        }
    }
    if let Some(vip) = svc.vip {
        let c = &cfg.service_cidr;
        if !c.contains(vip) {
            return Err(AllocError::Invalid(format!(
                "vip: {vip} is outside the service CIDR {c}; leave it out to be given one"
            )));
        }
        let last = c.nth(c.size().saturating_sub(1));
        if Some(vip) == c.nth(0) || Some(vip) == last || Some(vip) == cfg.dns_vip() {
            return Err(AllocError::Invalid(format!(
                "vip: {vip} is reserved in the service CIDR {c} (its network address, last address or the DNS VIP); leave it out to be given one"
            )));
        }
    }
    Ok(())
}

fn check_ports(svc: &Service) -> Result<(), AllocError> {
    if svc.ports.is_empty() {
        return Err(AllocError::Invalid(
            "ports: a service needs at least one port".into(),
        ));
    }
    let mut names = BTreeSet::new();
    let mut nums = BTreeSet::new();
    for p in &svc.ports {
        if !names.insert(p.name.as_str()) {
            return Err(AllocError::Invalid(format!(
                "ports: the name {:?} is used twice",
                p.name.as_str()
            )));
        }
        if !nums.insert(p.port) {
            return Err(AllocError::Invalid(format!(
                "ports: port {} is used twice",
                p.port
            )));
        }
    }
    Ok(())
}

async fn get_service(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(Service, Revision)>, AllocError> {
    match store.get(key).await? {
        None => Ok(None),
        Some(kv) => {
            let svc: Service = decode(key, &kv.value)
                .map_err(|e| AllocError::Invalid(format!("{e}; delete the key or fix it")))?;
            Ok(Some((svc, kv.mod_revision)))
        }
    }
}

/// Create `svc` if absent, with its allocations, in one txn.
pub async fn create_service(
    store: &dyn Store,
    cfg: &AllocConfig,
    svc: Service,
    want_vip: bool,
) -> Result<Service, AllocError> {
    check_ports(&svc)?;
    check_explicit(cfg, &svc)?;
    let key = keys::service(&svc.namespace, &svc.name);
    for _ in 0..ATTEMPTS {
        if let Some((existing, _)) = get_service(store, &key).await? {
            return Err(AllocError::AlreadyExists(Box::new(existing)));
        }
        let mut s = svc.clone();
        let mut compares = vec![Compare::Absent(key.clone())];
        let mut ops = Vec::new();
        if want_vip || s.vip.is_some() {
            let used = used_vips(store).await?;
            let vip = match s.vip {
                Some(v) if used.contains(&v) => {
                    return Err(AllocError::Invalid(format!("vip {v} is already in use")));
                }
                Some(v) => v,
                None => pick_vip(cfg, &used)?,
            };
            s.vip = Some(vip);
            let k = keys::vip_alloc(vip);
            compares.push(Compare::Absent(k.clone()));
            ops.push(TxnOp::Put {
                key: k,
                value: alloc_value(&s),
                lease: None,
            });
        }
        let used = used_node_ports(store).await?;
        for n in assign_node_ports(cfg, &mut s, &used, &BTreeSet::new())? {
            let k = keys::node_port_alloc(
                PortNum::new(n).map_err(|e| AllocError::Invalid(e.to_string()))?,
            );
            compares.push(Compare::Absent(k.clone()));
            ops.push(TxnOp::Put {
                key: k,
                value: alloc_value(&s),
                lease: None,
            });
        }
        ops.push(TxnOp::Put {
            key: key.clone(),
            value: encode(&s),
            lease: None,
        });
        let r = store
            .txn(Txn {
                compares,
                success: ops,
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            return Ok(s);
        }
        // Someone created the service or took an address meanwhile: look again.
    }
    Err(AllocError::Conflict(format!(
        "creating {key} raced with other writers {ATTEMPTS} times"
    )))
}

/// Replace the service whose `mod_revision` is `rev`.
pub async fn update_service(
    store: &dyn Store,
    cfg: &AllocConfig,
    rev: Revision,
    svc: Service,
) -> Result<Service, AllocError> {
    check_ports(&svc)?;
    check_explicit(cfg, &svc)?;
    let key = keys::service(&svc.namespace, &svc.name);
    let (old, cur_rev) = get_service(store, &key)
        .await?
        .ok_or(AllocError::NotFound)?;
    if cur_rev != rev {
        return Err(AllocError::Conflict(format!(
            "{key} is at revision {cur_rev}, not {rev}"
        )));
    }
    let mut s = svc;
    if s.vip != old.vip {
        return Err(AllocError::Invalid(format!(
            "vip: a service's VIP cannot change (it is {:?}); delete and re-create the service",
            old.vip
        )));
    }
    let old_ports = node_ports_of(&old);
    let used = used_node_ports(store).await?;
    let new_ports = assign_node_ports(cfg, &mut s, &used, &old_ports)?;
    let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
    let mut ops = Vec::new();
    for n in new_ports.difference(&old_ports) {
        let k = keys::node_port_alloc(
            PortNum::new(*n).map_err(|e| AllocError::Invalid(e.to_string()))?,
        );
        compares.push(Compare::Absent(k.clone()));
        ops.push(TxnOp::Put {
            key: k,
            value: alloc_value(&s),
            lease: None,
        });
    }
    for n in old_ports.difference(&new_ports) {
        if let Ok(p) = PortNum::new(*n) {
            ops.push(TxnOp::Delete {
                key: keys::node_port_alloc(p),
            });
        }
    }
    ops.push(TxnOp::Put {
        key: key.clone(),
        value: encode(&s),
        lease: None,
    });
    let r = store
        .txn(Txn {
            compares,
            success: ops,
            failure: vec![],
        })
        .await?;
    if r.succeeded {
        Ok(s)
    } else {
        Err(AllocError::Conflict(format!(
            "{key} or one of its node ports changed meanwhile"
        )))
    }
}

/// Delete a service and free its allocations. `Ok(false)` if it did not
/// exist.
pub async fn delete_service(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
) -> Result<bool, AllocError> {
    let key = keys::service(ns, name);
    for _ in 0..ATTEMPTS {
        let kv = match store.get(&key).await? {
            None => return Ok(false),
            Some(kv) => kv,
        };
        let mut ops = vec![TxnOp::Delete { key: key.clone() }];
        match decode::<Service>(&key, &kv.value) {
            Ok(svc) => {
                if let Some(vip) = svc.vip {
                    ops.push(TxnOp::Delete {
                        key: keys::vip_alloc(vip),
                    });
                }
                for n in node_ports_of(&svc) {
                    if let Ok(p) = PortNum::new(n) {
                        ops.push(TxnOp::Delete {
                            key: keys::node_port_alloc(p),
                        });
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
                        {
                            ops.push(TxnOp::Delete { key: a.key });
                        }
                    }
                }
            }
        }
        let r = store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                success: ops,
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            return Ok(true);
        }
    }
    Err(AllocError::Conflict(format!(
        "deleting {key} raced with other writers {ATTEMPTS} times"
    )))
}
