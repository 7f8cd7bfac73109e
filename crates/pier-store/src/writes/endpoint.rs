//! Endpoint VIPs (`Endpoint.addr`): claimed by the endpoint's agent under
//! its node lease, from the same `alloc/vip/` keys as services' VIPs.

use pier_model::{Allocation, Name, Namespace, decode, encode, keys};

use super::{ATTEMPTS, Conflict, WriteError};
use crate::alloc::{AllocConfig, used_vips};
use crate::{Compare, Store, StoreError, Txn, TxnOp};

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
