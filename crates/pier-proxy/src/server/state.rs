//! What the proxy holds and how it follows the snapshot: one entry per
//! service port (its balancer, its listeners, its node port), listeners
//! bound and released as services come and go, endpoints drained before
//! they are dropped, and the problems and traffic stats it publishes.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use pier_model::{Cidr, EndpointKey, Name, ObjectKey, Protocol, Service, ServiceType, Snapshot};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::listen::{Limit, accept_loop, bind, bind_udp};
use super::{ListenKey, ListenerSource, Problems, StatsMap};
use crate::ProxyConfig;
use crate::affinity::Affinity;
use crate::balance::{Balancer, EpState, Route};
use crate::conn::{Ctx, PortTarget};
use crate::iface::Iface;
use crate::limit::ConnLimiter;
use crate::metrics::{Metrics, SvcMetrics};

/// A service port (`.2` `None`: the service's VIP and node ports), or one
/// endpoint's share of it (`.2` the endpoint: its endpoint VIP, which
/// forwards to that endpoint only).
pub(crate) type PortKey = (ObjectKey, Name, Option<EndpointKey>);

/// The metrics label of a port key: the port's name, and `@<pod or id>`
/// for an endpoint VIP.
pub(crate) fn port_label(pk: &PortKey, snap: &Snapshot) -> String {
    match &pk.2 {
        None => pk.1.to_string(),
        Some(ek) => {
            let ep = snap.endpoints.get(&pk.0).and_then(|m| m.get(ek));
            let who = ep.and_then(|e| e.pod.as_ref()).unwrap_or(&ek.1);
            format!("{}@{who}", pk.1)
        }
    }
}

/// One service port's live state across snapshots.
#[derive(Debug)]
pub(crate) struct PortEntry {
    pub(crate) target: Arc<ArcSwap<PortTarget>>,
    /// The port's session-affinity table, kept across rebuilds while the
    /// service keeps the same affinity settings.
    pub(crate) affinity: Option<Arc<Affinity>>,
    pub(crate) m: SvcMetrics,
    pub(crate) service: Arc<str>,
    pub(crate) port_name: String,
    /// The service's drain timeout, for when the service itself is gone.
    pub(crate) drain: Duration,
    /// Every endpoint in the snapshot (ready or not), by key.
    pub(crate) eps: HashMap<EndpointKey, Arc<EpState>>,
}

#[derive(Debug)]
pub(crate) struct ListenerEntry {
    pub(crate) key: PortKey,
    pub(crate) cancel: CancellationToken,
    /// Ends once the listening socket is closed.
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// The reconciler's state; only the run loop touches it.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) cfg: ProxyConfig,
    pub(crate) source: Option<Arc<dyn ListenerSource>>,
    /// The caps on node-port connections, shared by every node port.
    pub(crate) limiter: ConnLimiter,
    pub(crate) node: Name,
    pub(crate) service_cidr: Cidr,
    /// The IPv6 service CIDR of a dual-stack cluster.
    pub(crate) service_cidr6: Option<Cidr>,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) metrics: Metrics,
    pub(crate) iface: Option<Iface>,
    pub(crate) ports: HashMap<PortKey, PortEntry>,
    pub(crate) listeners: HashMap<ListenKey, ListenerEntry>,
    /// Binds that failed: the service and the message shown for it.
    pub(crate) failed: HashMap<ListenKey, (ObjectKey, String)>,
    /// Removed endpoints whose connections may live until the deadline.
    pub(crate) draining: Vec<(Arc<EpState>, Instant)>,
    /// VIPs this proxy keeps on the interface.
    pub(crate) vips: HashSet<IpAddr>,
    /// VIPs no longer wanted, removed once their connections had the drain
    /// timeout to finish.
    pub(crate) vips_gone: HashMap<IpAddr, Instant>,
    pub(crate) listen_tasks: TaskTracker,
    pub(crate) conns: TaskTracker,
    pub(crate) problems: watch::Sender<Arc<Problems>>,
    pub(crate) stats: watch::Sender<Arc<StatsMap>>,
    /// Endpoint addresses refused by [`direct_allowed`], logged once.
    pub(crate) refused_direct: HashSet<SocketAddr>,
}

/// Whether the proxy may connect straight to `ip`: not a loopback,
/// link-local, unspecified, multicast or broadcast address (which reach the
/// host itself), unless `allow` lists it. A pod's address is none of these.
pub(crate) fn direct_allowed(ip: IpAddr, allow: &[Cidr]) -> bool {
    // Not the host's own addresses: a host-network pod's endpoint is one.
    pier_model::addr::address_kind_refusal(ip).is_none()
        || allow
            .iter()
            .any(|c| c.contains(ip) || c.contains(ip.to_canonical()))
}

pub(crate) fn service_label(k: &ObjectKey) -> String {
    format!("{}/{}", k.0, k.1)
}

impl State {
    pub(super) fn drain_for(&self, svc: Option<&Service>) -> Duration {
        Duration::from_millis(
            svc.and_then(|s| s.drain_timeout_ms)
                .unwrap_or(self.cfg.drain_timeout_ms),
        )
    }

    /// Addresses left on the interface by an earlier run are adopted, so a
    /// restart removes the ones no longer wanted.
    pub(super) async fn adopt_existing_vips(&mut self) {
        let Some(ifc) = &self.iface else { return };
        match ifc.addrs().await {
            Ok(a) => {
                let dns = self.service_cidr.nth(10);
                for (ip, _) in a {
                    let v6 = self.service_cidr6.is_some_and(|c| c.contains(ip));
                    if (self.service_cidr.contains(ip) || v6) && Some(ip) != dns {
                        self.vips.insert(ip);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list interface addresses"),
        }
    }

    pub(super) async fn reconcile(&mut self, snap: &Snapshot) {
        let now = Instant::now();
        let mut wanted_ports: HashSet<PortKey> = HashSet::new();
        let mut wanted_listeners: HashMap<ListenKey, PortKey> = HashMap::new();
        let mut wanted_vips: HashSet<IpAddr> = HashSet::new();
        let mut node_ports: HashSet<ListenKey> = HashSet::new();

        for (key, svc) in snap.services.iter() {
            // Endpoint VIPs: each forwards, on the endpoint's own ports, to
            // that endpoint only, so a pod name or SRV target that DNS
            // answers works from every host (over the mesh when remote).
            for (ek, ep) in snap.endpoints.get(key).into_iter().flat_map(|m| m.iter()) {
                let Some(addr) = ep.addr else { continue };
                if ep.is_static {
                    continue;
                }
                if self.cfg.manage_iface && !self.service_cidr.contains(addr) {
                    tracing::warn!(service = %service_label(key), endpoint = %ek.1, %addr, cidr = %self.service_cidr, "endpoint address outside the service CIDR; not served");
                    continue;
                }
                wanted_vips.insert(addr);
                for sp in &svc.ports {
                    let Some(port) = ep.port_for(sp) else {
                        continue;
                    };
                    let pk = (key.clone(), sp.name.clone(), Some(ek.clone()));
                    wanted_ports.insert(pk.clone());
                    self.update_port(snap, svc, &pk, now);
                    // Two service ports on one endpoint port: the first.
                    wanted_listeners
                        .entry((sp.protocol, SocketAddr::new(addr, port.get())))
                        .or_insert(pk);
                }
            }
            let Some(vip) = svc.vip else { continue };
            if self.cfg.manage_iface && !self.service_cidr.contains(vip) {
                tracing::warn!(service = %service_label(key), %vip, cidr = %self.service_cidr, "VIP outside the service CIDR; not served");
                continue;
            }
            wanted_vips.insert(vip);
            // Dual stack: the IPv6 VIP is one more listener of the same
            // service port (one balancer, one set of metrics).
            let vip6 = svc.vip6.filter(|v6| {
                let ok = self.service_cidr6.is_some_and(|c| c.contains(*v6));
                if !ok {
                    tracing::debug!(service = %service_label(key), vip6 = %v6, cidr6 = ?self.service_cidr6, "IPv6 VIP outside this node's IPv6 service CIDR; not served");
                }
                ok
            });
            wanted_vips.extend(vip6);
            for sp in &svc.ports {
                let pk = (key.clone(), sp.name.clone(), None);
                wanted_ports.insert(pk.clone());
                self.update_port(snap, svc, &pk, now);
                for v in std::iter::once(vip).chain(vip6) {
                    wanted_listeners
                        .insert((sp.protocol, SocketAddr::new(v, sp.port.get())), pk.clone());
                }
                if svc.service_type == ServiceType::NodePort
                    && let Some(np) = sp.node_port
                {
                    let a = (
                        sp.protocol,
                        SocketAddr::new(self.cfg.node_port_addr, np.get()),
                    );
                    node_ports.insert(a);
                    if let Some(other) = wanted_listeners.insert(a, pk.clone())
                        && other != pk
                    {
                        tracing::warn!(addr = %a.1, a = %service_label(&other.0), b = %service_label(&pk.0), "two services claim one node port");
                    }
                }
            }
        }

        // Service ports gone: every endpoint drains.
        let gone: Vec<_> = self
            .ports
            .keys()
            .filter(|k| !wanted_ports.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(pe) = self.ports.remove(&k) {
                for (_, ep) in pe.eps {
                    self.start_drain(ep, now + pe.drain);
                }
                self.metrics.remove_service(&pe.service, &pe.port_name);
            }
        }

        // Listeners gone or moved to another service port.
        let stale: Vec<ListenKey> = self
            .listeners
            .iter()
            .filter(|(a, l)| wanted_listeners.get(a) != Some(&l.key))
            .map(|(a, _)| *a)
            .collect();
        for a in stale {
            if let Some(l) = self.listeners.remove(&a) {
                l.cancel.cancel();
                // Wait for the socket to close, so that the same address
                // can be bound again below (a VIP given to another service).
                if tokio::time::timeout(Duration::from_secs(1), l.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(addr = %a.1, proto = %a.0, "listener task did not end within 1 s");
                }
                if let Some(src) = &self.source {
                    src.release(a.0, a.1);
                }
                tracing::info!(addr = %a.1, proto = %a.0, service = %service_label(&l.key.0), port = %l.key.1, "listener removed");
            }
        }
        self.failed.retain(|a, _| wanted_listeners.contains_key(a));

        // VIPs on the interface, before binding.
        if self.iface.is_some() {
            for ip in &wanted_vips {
                self.vips_gone.remove(ip);
                if !self.vips.contains(ip) {
                    let r = match &self.iface {
                        Some(ifc) => ifc.add_addr(*ip).await,
                        None => Ok(()),
                    };
                    match r {
                        Ok(()) => {
                            self.vips.insert(*ip);
                        }
                        Err(e) => tracing::warn!(vip = %ip, error = %e, "cannot add VIP"),
                    }
                }
            }
            let drain = self.drain_for(None);
            for ip in self.vips.iter() {
                if !wanted_vips.contains(ip) {
                    self.vips_gone.entry(*ip).or_insert(now + drain);
                }
            }
        }

        // New listeners.
        let mut adds: Vec<(ListenKey, PortKey)> = wanted_listeners
            .into_iter()
            .filter(|(a, _)| !self.listeners.contains_key(a))
            .collect();
        adds.sort_by_key(|a| a.0);
        for (key, pk) in adds {
            let Some(pe) = self.ports.get(&pk) else {
                continue;
            };
            let (proto, a) = key;
            let cancel = CancellationToken::new();
            let limit = node_ports.contains(&key).then(|| Limit {
                limiter: self.limiter.clone(),
                refusals: self.metrics.node_port_refusals.clone(),
            });
            let started = match proto {
                Protocol::Tcp => {
                    let bound = match &self.source {
                        Some(src) => src.listen(a, bind),
                        None => bind(a),
                    };
                    bound.and_then(TcpListener::from_std).map(|l| {
                        self.listen_tasks.spawn(accept_loop(
                            l,
                            pe.target.clone(),
                            self.ctx.clone(),
                            self.conns.clone(),
                            cancel.clone(),
                            limit,
                        ))
                    })
                }
                Protocol::Udp => {
                    let bound = match &self.source {
                        Some(src) => src.listen_udp(a, bind_udp),
                        None => bind_udp(a),
                    };
                    bound.and_then(tokio::net::UdpSocket::from_std).map(|sock| {
                        self.listen_tasks.spawn(crate::udp::serve(
                            sock,
                            crate::udp::UdpListen {
                                target: pe.target.clone(),
                                ctx: self.ctx.clone(),
                                flows: self.conns.clone(),
                                cancel: cancel.clone(),
                                idle: Duration::from_millis(self.cfg.udp_idle_timeout_ms),
                                max_flows: self.cfg.udp_max_flows as usize,
                                limit: limit.map(|l| (l.limiter, l.refusals)),
                            },
                        ))
                    })
                }
            };
            match started {
                Ok(task) => {
                    if self.failed.remove(&key).is_some() {
                        tracing::info!(addr = %a, %proto, service = %service_label(&pk.0), "bind succeeded after earlier failure");
                    }
                    tracing::info!(addr = %a, %proto, service = %service_label(&pk.0), port = %pk.1, "listening");
                    self.listeners.insert(
                        key,
                        ListenerEntry {
                            key: pk,
                            cancel,
                            task,
                        },
                    );
                }
                Err(e) => {
                    let is_node_port = a.ip() == self.cfg.node_port_addr;
                    let msg = match (e.kind(), is_node_port) {
                        (std::io::ErrorKind::AddrInUse, true) => format!(
                            "node port {}/{proto} on {} is in use by another process; retried when the snapshot changes and every {} s",
                            a.port(),
                            a.ip(),
                            self.cfg.bind_retry_ms / 1000
                        ),
                        (std::io::ErrorKind::AddrInUse, false) => format!(
                            "{a}/{proto} is in use by another process; retried when the snapshot changes and every {} s",
                            self.cfg.bind_retry_ms / 1000
                        ),
                        (std::io::ErrorKind::PermissionDenied, _) if a.port() < 1024 => format!(
                            "cannot listen on {a}/{proto}: {e}; a port below 1024 needs root or CAP_NET_BIND_SERVICE (an agent run without them, as --unprivileged allows, serves only ports from 1024 up)"
                        ),
                        _ => format!("cannot listen on {a}/{proto}: {e}"),
                    };
                    let prev = self.failed.insert(key, (pk.0.clone(), msg.clone()));
                    if prev.as_ref().map(|p| &p.1) != Some(&msg) {
                        tracing::error!(service = %service_label(&pk.0), port = %pk.1, addr = %a, error = %e, "{msg}");
                    }
                }
            }
        }
        self.publish_problems();
    }

    /// Rebuilds one service port's balancer from the snapshot.
    pub(super) fn update_port(
        &mut self,
        snap: &Snapshot,
        svc: &Service,
        pk: &PortKey,
        now: Instant,
    ) {
        let sp = match svc.ports.iter().find(|p| p.name == pk.1) {
            Some(p) => p,
            None => return,
        };
        let drain = self.drain_for(Some(svc));
        let metrics = &self.metrics;
        let pe = self.ports.entry(pk.clone()).or_insert_with(|| {
            let service: Arc<str> = service_label(&pk.0).into();
            let port_name = port_label(pk, snap);
            let m = metrics.service(&service, &port_name);
            let t = PortTarget {
                service: service.clone(),
                m: m.clone(),
                bal: Balancer::new(svc.lb, svc.prefer_local, Vec::new()),
                proxy_protocol: svc.proxy_protocol,
                affinity: None,
            };
            PortEntry {
                target: Arc::new(ArcSwap::from_pointee(t)),
                affinity: None,
                m,
                service,
                port_name,
                drain,
                eps: HashMap::new(),
            }
        });
        let mut new_eps: HashMap<EndpointKey, Arc<EpState>> = HashMap::new();
        let mut ready = Vec::new();
        let mut removed = Vec::new();
        for ((node, id), ep) in snap.endpoints.get(&pk.0).into_iter().flat_map(|m| m.iter()) {
            if let Some((n, i)) = &pk.2
                && (n != node || i != id)
            {
                continue; // an endpoint VIP forwards to its endpoint only
            }
            if ep.is_static && *node != self.node {
                continue; // a static endpoint is used only by the node that checks it
            }
            let Some(port) = ep.port_for(sp) else {
                continue;
            };
            let addr = SocketAddr::new(ep.ip, port.get());
            let local = ep.is_static || *node == self.node;
            // Defence in depth behind the API and the agent: an endpoint
            // record (forged in the store, say) never sends this proxy
            // straight into the host's loopback or link-local services.
            if local && !direct_allowed(ep.ip, &self.cfg.direct_allow) {
                if self.refused_direct.insert(addr) {
                    tracing::warn!(service = %service_label(&pk.0), endpoint.node = %node, endpoint.addr = %addr,
                        "not proxying to an endpoint that reaches this host itself; list it in [network] static_endpoint_allow to allow it");
                }
                continue;
            }
            let route = if local || self.ctx.mesh.is_none() {
                Route::Direct
            } else {
                match snap.nodes.get(node) {
                    Some(n) if n.mesh_port != 0 => Route::Mesh {
                        peer: SocketAddr::new(n.addr, n.mesh_port),
                        node: node.clone(),
                    },
                    _ => Route::Direct,
                }
            };
            let key = (node.clone(), id.clone());
            let state = match pe.eps.remove(&key) {
                Some(old)
                    if old.addr == addr && old.route == route && !old.drain.is_cancelled() =>
                {
                    old.removed.store(false, Relaxed);
                    old
                }
                other => {
                    if let Some(old) = other {
                        removed.push(old);
                    }
                    let label = addr.to_string();
                    // A new endpoint behind a peer: warm that peer's pool
                    // now, so its first connection does not handshake.
                    if ep.ready
                        && let (Route::Mesh { peer, node }, Some(mesh)) = (&route, &self.ctx.mesh)
                    {
                        mesh.warm(*peer, node);
                    }
                    let m =
                        metrics.endpoint(&pe.service, &pe.port_name, &label, route.metric_label());
                    Arc::new(EpState::new(addr, route, local, m))
                }
            };
            if ep.ready {
                ready.push(state.clone());
            }
            new_eps.insert(key, state);
        }
        removed.extend(pe.eps.drain().map(|(_, v)| v));
        pe.eps = new_eps;
        pe.drain = drain;
        // The affinity table lives as long as the settings do.
        let timeout_ms = svc.session_affinity.map(|a| u64::from(a.timeout_s) * 1000);
        if pe.affinity.as_ref().map(|a| a.timeout_ms()) != timeout_ms {
            pe.affinity = svc
                .session_affinity
                .map(|a| Arc::new(Affinity::new(a.timeout_s)));
        }
        // Stable order: round-robin walks endpoints in key order.
        let t = PortTarget {
            service: pe.service.clone(),
            m: pe.m.clone(),
            bal: Balancer::new(svc.lb, svc.prefer_local, ready),
            proxy_protocol: svc.proxy_protocol,
            affinity: pe.affinity.clone(),
        };
        pe.target.store(Arc::new(t));
        for ep in removed {
            self.start_drain(ep, now + drain);
        }
    }

    pub(super) fn start_drain(&mut self, ep: Arc<EpState>, deadline: Instant) {
        if ep.removed.swap(true, Relaxed) {
            return;
        }
        tracing::debug!(endpoint = %ep.addr, active = ep.outstanding(), "endpoint removed; draining");
        self.draining.push((ep, deadline));
    }

    pub(super) fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let d = self.draining.iter().map(|(_, d)| *d).min().unwrap_or(far);
        let v = self.vips_gone.values().min().copied().unwrap_or(far);
        // Idle drained endpoints are dropped within a second.
        let idle = if self.draining.is_empty() {
            far
        } else {
            Instant::now() + Duration::from_secs(1)
        };
        d.min(v).min(idle)
    }

    /// Ends drains whose time is up, drops drained endpoints with no
    /// connections left, and removes VIPs no longer wanted.
    pub(super) async fn expire(&mut self) {
        let now = Instant::now();
        let metrics = &self.metrics;
        self.draining.retain(|(ep, deadline)| {
            if !ep.removed.load(Relaxed) {
                return false; // back in the snapshot
            }
            let idle = ep.outstanding() == 0;
            if idle || *deadline <= now {
                if !idle {
                    tracing::info!(endpoint = %ep.addr, active = ep.outstanding(), "drain timeout: closing remaining connections");
                }
                ep.drain.cancel();
                metrics.remove_endpoint(&ep.m);
                return false;
            }
            true
        });
        let due: Vec<IpAddr> = self
            .vips_gone
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            self.vips_gone.remove(&ip);
            if let Some(ifc) = &self.iface {
                match ifc.del_addr(ip).await {
                    Ok(()) => {
                        self.vips.remove(&ip);
                        tracing::info!(vip = %ip, "VIP removed");
                    }
                    Err(e) => tracing::warn!(vip = %ip, error = %e, "cannot remove VIP"),
                }
            }
        }
    }

    pub(super) fn publish_problems(&self) {
        let mut p = Problems::new();
        for (k, msg) in self.failed.values() {
            p.entry(k.clone())
                .and_modify(|m: &mut String| {
                    m.push_str("; ");
                    m.push_str(msg);
                })
                .or_insert_with(|| msg.clone());
        }
        self.problems.send_if_modified(|cur| {
            if **cur == p {
                false
            } else {
                *cur = Arc::new(p);
                true
            }
        });
    }

    /// Closes every service port's and endpoint's window (their /metrics
    /// gauges) and publishes the per-service sums for the `stats/` keys.
    /// The sketches of a service's ports merge, so its p99 is over all its
    /// ports' traffic.
    pub(super) fn sample_stats(&mut self) {
        let at = pier_model::now_ms();
        let now = std::time::Instant::now();
        let mut out = StatsMap::new();
        for (pk, pe) in &self.ports {
            if let Some(a) = &pe.affinity {
                a.sweep();
            }
            let s = out.entry(pk.0.clone()).or_default();
            let total = pe.m.total.get();
            let w = pe.m.sig.window(total, now);
            for ep in pe.eps.values() {
                ep.m.sig.window(ep.m.total.get(), now);
            }
            s.active += pe.m.active.get().max(0) as u64;
            s.total += total;
            s.connect_errors += pe.m.error_total();
            s.bytes_in += pe.m.bytes_in.get();
            s.bytes_out += pe.m.bytes_out.get();
            s.new_conns += w.new_conns;
            s.window_ms = s.window_ms.max(w.ms);
            s.connect.merge(&w.connect);
            s.first_byte.merge(&w.first_byte);
            s.at = at;
        }
        for s in out.values_mut() {
            s.connect_p99_us = s.connect.quantile(0.99).unwrap_or(0);
        }
        self.stats.send_replace(Arc::new(out));
    }

    pub(super) async fn shutdown(mut self) {
        for (_, l) in self.listeners.drain() {
            l.cancel.cancel();
        }
        self.listen_tasks.close();
        self.listen_tasks.wait().await;
        self.conns.close();
        let grace = Duration::from_millis(self.cfg.drain_timeout_ms);
        if tokio::time::timeout(grace, self.conns.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.conns.len(),
                "shutdown grace period over; closing connections"
            );
            self.ctx.hard_stop.cancel();
            self.conns.wait().await;
        }
        self.sample_stats();
    }
}
