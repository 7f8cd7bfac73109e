//! The `pier0` link, its VIP addresses and the unreachable routes for the
//! service CIDRs (IPv4, and IPv6 when dual stack), over rtnetlink.

use std::net::IpAddr;

use futures::TryStreamExt;
use pier_model::Cidr;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::{Handle, LinkBridge, LinkDummy, LinkUnspec, RouteMessageBuilder};

use crate::{ProxyConfig, ProxyError};

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;
const ENODEV: i32 = 19;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// A netlink handle bound to one link.
#[derive(Debug)]
pub(crate) struct Iface {
    handle: Handle,
    name: String,
    index: u32,
}

impl Iface {
    fn err(&self, op: impl Into<String>, source: rtnetlink::Error) -> ProxyError {
        ProxyError::Netlink {
            iface: self.name.clone(),
            op: op.into(),
            source,
        }
    }

    fn connect(name: &str) -> Result<Handle, ProxyError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| ProxyError::Iface {
            iface: name.into(),
            why: format!("open a netlink socket: {e}"),
        })?;
        tokio::spawn(conn);
        Ok(handle)
    }

    async fn find(handle: &Handle, name: &str) -> Result<Option<u32>, ProxyError> {
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(source) => Err(ProxyError::Netlink {
                iface: name.into(),
                op: "look up the link".into(),
                source,
            }),
        }
    }

    /// Opens an existing link.
    pub async fn open(name: &str) -> Result<Iface, ProxyError> {
        let handle = Self::connect(name)?;
        match Self::find(&handle, name).await? {
            Some(index) => Ok(Iface {
                handle,
                name: name.into(),
                index,
            }),
            None => Err(ProxyError::Iface {
                iface: name.into(),
                why: "the link does not exist; setup_iface creates it".into(),
            }),
        }
    }

    /// Opens the link, creating it (dummy, else an empty bridge) and
    /// bringing it up.
    async fn open_or_create(name: &str) -> Result<Iface, ProxyError> {
        let handle = Self::connect(name)?;
        let index = match Self::find(&handle, name).await? {
            Some(i) => i,
            None => {
                let dummy = handle
                    .link()
                    .add(LinkDummy::new(name).build())
                    .execute()
                    .await;
                if let Err(e) = dummy {
                    // No CONFIG_DUMMY (this kernel): "Operation not supported".
                    tracing::info!(iface = name, error = %e, "no dummy link type; using an empty bridge");
                    handle
                        .link()
                        .add(LinkBridge::new(name).build())
                        .execute()
                        .await
                        .map_err(|source| ProxyError::Netlink {
                            iface: name.into(),
                            op: "create a bridge link".into(),
                            source,
                        })?;
                }
                Self::find(&handle, name)
                    .await?
                    .ok_or_else(|| ProxyError::Iface {
                        iface: name.into(),
                        why: "created but not found".into(),
                    })?
            }
        };
        let me = Iface {
            handle,
            name: name.into(),
            index,
        };
        me.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| me.err("set the link up", e))?;
        Ok(me)
    }

    /// Adds `ip/32` (or /128); present already is fine. An IPv6 address is
    /// added without duplicate address detection (`nodad`): it is a VIP
    /// only this host answers on a link of its own, and an address still
    /// "tentative" cannot be bound for the second or so DAD takes.
    pub async fn add_addr(&self, ip: IpAddr) -> Result<(), ProxyError> {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        let mut req = self.handle.address().add(self.index, ip, len);
        if ip.is_ipv6() {
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(self.err(format!("add address {ip}/{len}"), e)),
        }
    }

    /// Removes `ip` from the link; absent already is fine.
    pub async fn del_addr(&self, ip: IpAddr) -> Result<(), ProxyError> {
        let found = self.addrs().await?.into_iter().find(|(a, _)| *a == ip);
        let Some((_, msg)) = found else { return Ok(()) };
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL) | Some(ENOENT)) => Ok(()),
            Err(e) => Err(self.err(format!("remove address {ip}"), e)),
        }
    }

    /// The addresses on the link.
    pub async fn addrs(&self) -> Result<Vec<(IpAddr, AddressMessage)>, ProxyError> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(|e| self.err("list addresses", e))?
        {
            if m.header.index != self.index {
                continue;
            }
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip {
                out.push((ip, m));
            }
        }
        Ok(out)
    }

    fn unreachable_route(
        &self,
        cidr: Cidr,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, ProxyError> {
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(cidr.addr(), cidr.prefix())
            .map_err(|e| ProxyError::Iface {
                iface: self.name.clone(),
                why: format!("route for {cidr}: {e}"),
            })?
            .kind(RouteType::Unreachable)
            .build())
    }
}

/// Creates the interface (or checks it) with `extra_addrs` (such as the DNS
/// VIP) on it, and an unreachable route for each of `service_cidrs` (the
/// IPv4 one, and the IPv6 one of a dual-stack cluster). Does nothing in
/// unprivileged mode. Call it before binding anything on a VIP.
pub async fn setup_iface(
    cfg: &ProxyConfig,
    service_cidrs: &[Cidr],
    extra_addrs: &[IpAddr],
) -> Result<(), ProxyError> {
    cfg.validate()?;
    if !cfg.manage_iface {
        return Ok(());
    }
    let ifc = Iface::open_or_create(&cfg.iface).await?;
    for ip in extra_addrs {
        ifc.add_addr(*ip).await?;
    }
    for service_cidr in service_cidrs {
        let route = ifc.unreachable_route(*service_cidr)?;
        match ifc.handle.route().add(route).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => return Err(ifc.err(format!("add unreachable route {service_cidr}"), e)),
        }
    }
    tracing::info!(iface = %cfg.iface, service_cidrs = ?service_cidrs, "interface ready");
    Ok(())
}

/// Removes the unreachable routes and, unless `keep_iface`, the interface
/// with all its addresses. Does nothing in unprivileged mode.
pub async fn teardown_iface(cfg: &ProxyConfig, service_cidrs: &[Cidr]) -> Result<(), ProxyError> {
    if !cfg.manage_iface {
        return Ok(());
    }
    let handle = Iface::connect(&cfg.iface)?;
    let ifc = Iface {
        handle,
        name: cfg.iface.clone(),
        index: 0,
    };
    if cfg.keep_iface {
        tracing::info!(iface = %cfg.iface, "keeping the interface and its route (keep_iface)");
        return Ok(());
    }
    for service_cidr in service_cidrs {
        let route = ifc.unreachable_route(*service_cidr)?;
        match ifc.handle.route().del(route).execute().await {
            Ok(()) => {}
            Err(e) if matches!(errno(&e), Some(ESRCH) | Some(ENOENT)) => {}
            Err(e) => return Err(ifc.err(format!("remove unreachable route {service_cidr}"), e)),
        }
    }
    if let Some(index) = Iface::find(&ifc.handle, &cfg.iface).await? {
        match ifc.handle.link().del(index).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(ENODEV) => {}
            Err(e) => return Err(ifc.err("delete the link", e)),
        }
    }
    tracing::info!(iface = %cfg.iface, "interface removed");
    Ok(())
}
