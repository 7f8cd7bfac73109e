//! Docker networks: their driver and subnets (which the agent watches, and
//! which LAN drivers put containers on the host's own network).

use std::collections::HashMap;

use bollard::Docker;
use bollard::query_parameters::ListNetworksOptions;
use pier_model::Cidr;

use crate::AgentError;

/// One Docker network, as the DNS ACL sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Net {
    /// Its subnets (IPv4 and IPv6) that DNS answers; none for a LAN driver.
    pub subnets: Vec<Cidr>,
    /// `macvlan` or `ipvlan`: the network's subnet is usually the LAN
    /// itself, so its clients are not trusted (add its CIDR to `[dns]
    /// allow` to answer them).
    pub lan_driver: Option<String>,
}

/// The drivers whose networks put containers straight on the host's LAN.
pub(crate) const LAN_DRIVERS: &[&str] = &["macvlan", "ipvlan"];

/// A network as the DNS ACL sees it, from its driver and IPAM config.
pub(crate) fn net(driver: Option<&str>, ipam: Option<&bollard::models::Ipam>) -> Net {
    match driver.filter(|d| LAN_DRIVERS.contains(d)) {
        Some(d) => Net {
            subnets: Vec::new(),
            lan_driver: Some(d.to_owned()),
        },
        None => Net {
            subnets: subnets(ipam),
            lan_driver: None,
        },
    }
}

/// Docker's networks by id.
pub(crate) async fn networks(d: &Docker) -> Result<HashMap<String, Net>, AgentError> {
    let nets = d
        .list_networks(Some(ListNetworksOptions::default()))
        .await
        .map_err(|source| AgentError::Docker {
            what: "list networks".into(),
            source,
        })?;
    Ok(nets
        .into_iter()
        .filter_map(|n| Some((n.id?, net(n.driver.as_deref(), n.ipam.as_ref()))))
        .collect())
}

/// Inspect one network; `Ok(None)` when it is gone.
pub(crate) async fn inspect_network(d: &Docker, id: &str) -> Result<Option<Net>, AgentError> {
    match d.inspect_network(id, None).await {
        Ok(n) => Ok(Some(net(n.driver.as_deref(), n.ipam.as_ref()))),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(source) => Err(AgentError::Docker {
            what: format!("inspect network {id}"),
            source,
        }),
    }
}

pub(crate) fn subnets(ipam: Option<&bollard::models::Ipam>) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = ipam
        .iter()
        .flat_map(|i| i.config.iter().flatten())
        .filter_map(|c| c.subnet.as_deref())
        .filter_map(|s| match s.parse::<Cidr>() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(subnet = s, error = %e, "skipping a Docker subnet that does not parse");
                None
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The union of every network's subnets, sorted, without duplicates: what
/// the DNS ACL is given.
pub(crate) fn all_subnets(nets: &HashMap<String, Net>) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = nets.values().flat_map(|n| &n.subnets).copied().collect();
    out.sort();
    out.dedup();
    out
}
