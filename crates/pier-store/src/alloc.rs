//! The allocation rules: where VIPs and node ports come from, which are
//! free, and what a writer may ask for. [`crate::writes`] claims what these
//! pick, in the same transaction as the service.

use std::collections::BTreeSet;
use std::net::IpAddr;

use pier_model::{
    Allocation, Cidr, Name, Namespace, PortNum, Service, ServiceType, decode, encode, keys,
    keys::Key,
};

use crate::writes::WriteError;
use crate::{Store, StoreError};

/// Where VIPs and node ports come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocConfig {
    pub service_cidr: Cidr,
    /// The IPv6 service CIDR of a dual-stack cluster (`[network]
    /// service_cidr6`): every service given a VIP also gets an IPv6 VIP
    /// from it. `None`: IPv4 only.
    pub service_cidr6: Option<Cidr>,
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
                            endpoint: None,
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
pub fn pick_vip(cfg: &AllocConfig, used: &BTreeSet<IpAddr>) -> Result<IpAddr, WriteError> {
    pick_in(&cfg.service_cidr, used).ok_or(WriteError::Exhausted("virtual IP in the service CIDR"))
}

/// The first free IPv6 VIP of `service_cidr6`; `Ok(None)` when the cluster
/// has no IPv6 service CIDR.
pub fn pick_vip6(cfg: &AllocConfig, used: &BTreeSet<IpAddr>) -> Result<Option<IpAddr>, WriteError> {
    match &cfg.service_cidr6 {
        None => Ok(None),
        Some(c) => pick_in(c, used)
            .map(Some)
            .ok_or(WriteError::Exhausted("virtual IP in the IPv6 service CIDR")),
    }
}

fn pick_in(cidr: &Cidr, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    // .0 is the network, .1 is often a gateway, .10 is DNS: start at .11,
    // and stop before the last address (the broadcast address in IPv4).
    // IPv6 keeps the same offsets (::0 is the subnet-router anycast
    // address; ::a is kept for a DNS VIP).
    let size = cidr.size();
    let last = size.saturating_sub(1).min(1 << 20);
    (11..last)
        .filter_map(|n| cidr.nth(n))
        .find(|ip| !used.contains(ip))
}

/// A free address of the service CIDR for an endpoint VIP, searched from
/// an offset given by `seed` (the same range as [`pick_vip`]).
pub fn pick_endpoint_addr(
    cfg: &AllocConfig,
    used: &BTreeSet<IpAddr>,
    seed: u64,
) -> Result<IpAddr, WriteError> {
    let size = cfg.service_cidr.size();
    let last = size.saturating_sub(1).min(1 << 20);
    if last <= 11 {
        return Err(WriteError::Exhausted("virtual IP in the service CIDR"));
    }
    let span = last - 11;
    let start = u128::from(seed) % span;
    (0..span)
        .map(|i| 11 + (start + i) % span)
        .filter_map(|n| cfg.service_cidr.nth(n))
        .find(|ip| !used.contains(ip))
        .ok_or(WriteError::Exhausted("virtual IP in the service CIDR"))
}

/// Fill in node ports for a NodePort service, checking explicit ones.
/// Returns the node ports this service needs.
pub(crate) fn assign_node_ports(
    cfg: &AllocConfig,
    svc: &mut Service,
    used: &std::collections::BTreeMap<u16, Allocation>,
    own: &BTreeSet<u16>,
) -> Result<BTreeSet<u16>, WriteError> {
    let mut mine = BTreeSet::new();
    if svc.service_type != ServiceType::NodePort {
        for p in &mut svc.ports {
            if p.node_port.is_some() {
                return Err(WriteError::Invalid(format!(
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
                return Err(WriteError::NodePortTaken {
                    port: n,
                    by: by.clone(),
                });
            }
            if !mine.insert(n) {
                return Err(WriteError::Invalid(format!("node port {n} is given twice")));
            }
        }
    }
    for p in &mut svc.ports {
        if p.node_port.is_none() {
            let n = (cfg.node_port_min..=cfg.node_port_max)
                .find(|n| (!used.contains_key(n) || own.contains(n)) && !mine.contains(n))
                .ok_or(WriteError::Exhausted("node port in the node-port range"))?;
            mine.insert(n);
            p.node_port = Some(PortNum::new(n).map_err(|e| WriteError::Invalid(e.to_string()))?);
        }
    }
    Ok(mine)
}

pub(crate) fn node_ports_of(svc: &Service) -> BTreeSet<u16> {
    svc.ports
        .iter()
        .filter_map(|p| p.node_port.map(|n| n.get()))
        .collect()
}

pub(crate) fn alloc_value(svc: &Service) -> Vec<u8> {
    encode(&Allocation {
        namespace: svc.namespace.clone(),
        service: svc.name.clone(),
        endpoint: None,
    })
}

/// Checks what a writer asked for explicitly: each `node_port` must lie in
/// the node-port range (else a service could take :22 or :80 on every
/// host), and a `vip` must lie in the service CIDR, and be neither its
/// network, its last (broadcast) address nor the DNS VIP (else a service
/// could take any address, or DNS's). Every service write passes here, so
/// it also checks the ports' names and numbers ([`Service::check_ports`]).
pub fn check_explicit(cfg: &AllocConfig, svc: &Service) -> Result<(), WriteError> {
    svc.check_ports().map_err(WriteError::Invalid)?;
    for (i, p) in svc.ports.iter().enumerate() {
        if let Some(np) = p.node_port {
            let n = np.get();
            if n < cfg.node_port_min || n > cfg.node_port_max {
                return Err(WriteError::Invalid(format!(
                    "ports[{i}].node_port: {n} is outside the node-port range {}-{}; leave it out to be given one, or widen [network] node_port_min/node_port_max on every agent",
                    cfg.node_port_min, cfg.node_port_max
                )));
            }
        }
    }
    if let Some(host) = &svc.external_name {
        if let Err(why) = pier_model::check_external_name(host) {
            return Err(WriteError::Invalid(format!(
                "external_name: {host:?} {why}"
            )));
        }
        let extra = [
            (svc.vip.is_some(), "vip"),
            (svc.vip6.is_some(), "vip6"),
            (svc.headless, "headless"),
            (!svc.ports.is_empty(), "ports"),
            (!svc.selector.is_empty(), "selector"),
            (!svc.static_endpoints.is_empty(), "static_endpoints"),
            (svc.service_type == ServiceType::NodePort, "type NodePort"),
        ];
        if let Some((_, what)) = extra.iter().find(|(set, _)| *set) {
            return Err(WriteError::Invalid(format!(
                "external_name: a service that is a CNAME to {host} has no VIP, proxy, ports or endpoints, and {what} was given; leave it out"
            )));
        }
    }
    if svc.headless {
        if let Some(vip) = svc.vip.or(svc.vip6) {
            return Err(WriteError::Invalid(format!(
                "vip: a headless service has no VIP, and {vip} was given; leave vip out, or headless off"
            )));
        }
        if svc.service_type == ServiceType::NodePort {
            return Err(WriteError::Invalid(
                "type: a headless service has no proxy, so no node ports; use type ClusterIP, or leave headless off"
                    .into(),
            ));
        }
    }
    if let Some(vip) = svc.vip {
        check_vip_in("vip", vip, &cfg.service_cidr)?;
    }
    if let Some(vip6) = svc.vip6 {
        let Some(c) = &cfg.service_cidr6 else {
            return Err(WriteError::Invalid(format!(
                "vip6: {vip6} was given but this cluster has no IPv6 service CIDR; leave vip6 out, or set [network] service_cidr6 in every agent's config"
            )));
        };
        check_vip_in("vip6", vip6, c)?;
    }
    Ok(())
}

/// `vip` (the field `field`) lies in `c` and is not reserved in it: its
/// network address, its last (broadcast) address or the DNS VIP's offset.
fn check_vip_in(field: &str, vip: IpAddr, c: &Cidr) -> Result<(), WriteError> {
    if !c.contains(vip) {
        return Err(WriteError::Invalid(format!(
            "{field}: {vip} is outside the service CIDR {c}; leave it out to be given one"
        )));
    }
    let last = c.nth(c.size().saturating_sub(1));
    if Some(vip) == c.nth(0) || Some(vip) == last || Some(vip) == c.nth(10) {
        return Err(WriteError::Invalid(format!(
            "{field}: {vip} is reserved in the service CIDR {c} (its network address, last address or the DNS VIP); leave it out to be given one"
        )));
    }
    Ok(())
}

pub(crate) fn check_ports(svc: &Service) -> Result<(), WriteError> {
    if svc.external_name.is_some() {
        return Ok(()); // checked by check_explicit: it has none
    }
    if svc.ports.is_empty() {
        return Err(WriteError::Invalid(
            "ports: a service needs at least one port".into(),
        ));
    }
    let mut names = BTreeSet::new();
    let mut nums = BTreeSet::new();
    for p in &svc.ports {
        if !names.insert(p.name.as_str()) {
            return Err(WriteError::Invalid(format!(
                "ports: the name {:?} is used twice",
                p.name.as_str()
            )));
        }
        if !nums.insert(p.port) {
            return Err(WriteError::Invalid(format!(
                "ports: port {} is used twice",
                p.port
            )));
        }
    }
    Ok(())
}
