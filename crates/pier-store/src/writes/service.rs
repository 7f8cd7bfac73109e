//! Services, with their VIP and node-port allocations claimed in the same
//! transaction.

use std::collections::BTreeSet;

use pier_model::api::Resource;
use pier_model::{Allocation, Name, Namespace, PortNum, Service, decode, encode, keys};

use super::{ATTEMPTS, Batch, Conflict, WriteError};
use crate::alloc::{
    AllocConfig, alloc_value, assign_node_ports, check_explicit, check_ports, node_ports_of,
    pick_vip, pick_vip6, used_node_ports, used_vips,
};
use crate::{Revision, Store};

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
        if (want_vip && !s.headless && s.external_name.is_none()) || s.vip.is_some() {
            let used = used_vips(store).await?;
            let vip = match s.vip {
                Some(v) if used.contains(&v) => {
                    return Err(WriteError::Invalid(format!("vip {v} is already in use")));
                }
                Some(v) => v,
                None => pick_vip(cfg, &used)?,
            };
            s.vip = Some(vip);
            // Dual stack: an IPv6 VIP beside it, when the cluster has an
            // IPv6 service CIDR.
            let vip6 = match s.vip6 {
                Some(v) if used.contains(&v) => {
                    return Err(WriteError::Invalid(format!("vip6 {v} is already in use")));
                }
                Some(v) => Some(v),
                None => pick_vip6(cfg, &used)?,
            };
            s.vip6 = vip6;
            b.claim(keys::vip_alloc(vip), alloc_value(&s));
            if let Some(v6) = vip6 {
                b.claim(keys::vip_alloc(v6), alloc_value(&s));
            }
        } else if let Some(v6) = s.vip6 {
            return Err(WriteError::Invalid(format!(
                "vip6: {v6} was given for a service without an IPv4 VIP; leave vip6 out"
            )));
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
    if s.external_name.is_some() != old.external_name.is_some() {
        return Err(WriteError::Invalid(
            "external_name: a service cannot change between a CNAME and a proxied service; delete and re-create it".into(),
        ));
    }
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
    // An update that leaves vip6 out keeps it (a client that predates it
    // does not drop it); giving another is refused below.
    if s.vip6.is_none() {
        s.vip6 = old.vip6;
    }
    if s.vip6 != old.vip6 {
        return Err(WriteError::Invalid(format!(
            "vip6: a service's IPv6 VIP cannot change (it is {:?}); delete and re-create the service",
            old.vip6
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
                for vip in svc.vip.into_iter().chain(svc.vip6) {
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
