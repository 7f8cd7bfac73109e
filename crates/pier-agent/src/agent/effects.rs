//! The effects of one reconcile: the pure `desired` step's output carried
//! out (health checks, pod starts and removals, the store writes).

use super::*;

impl Agent {
    /// Recompute the keys this node should have, start and stop health
    /// checks and pod containers, and write the difference.
    pub(super) async fn reconcile(&mut self) {
        let me = self.node.name.clone();
        let snap = self.snap.clone();
        let synced = self.snapshot_synced();
        self.sync_names();
        let names = self.names_view();
        let cidrs: Vec<pier_model::Cidr> = std::iter::once(self.alloc.service_cidr)
            .chain(self.alloc.service_cidr6)
            .collect();
        let d = desired::endpoints(&desired::View {
            me: &me,
            snap: &snap,
            synced,
            docker_synced: self.docker_synced,
            containers: &self.containers,
            policy: spec::LabelPolicy {
                namespaces: &self.cfg.label_namespaces,
                allow_health_none: self.cfg.allow_health_none,
            },
            health: self.health_defaults(),
            service_cidrs: &cidrs,
            host_addrs: &self.host_addrs,
            static_allow: &self.static_allow,
            names: &names,
            now_ms: now_ms(),
        });
        let desired::Endpoints {
            targets,
            endpoints,
            container_ready,
            missing_services,
            mut refused,
            notes,
        } = d;
        for n in notes {
            self.note(n);
        }
        self.sync_checks(targets);

        // Whether the store has this node's endpoint as ready at this
        // address: looked up per endpoint written (not a walk of every
        // endpoint in the cluster, 100,000 at 1,000 hosts).
        let was_ready = |ep: &pier_model::Endpoint| {
            snap.endpoints
                .get(&(ep.namespace.clone(), ep.service.clone()))
                .and_then(|m| m.get(&(ep.node.clone(), ep.id.clone())))
                .is_some_and(|e| e.ready && e.ip == ep.ip)
        };
        let is_ready =
            |ep: &pier_model::Endpoint, r: &Ready, checks: &HashMap<String, Check>| match r {
                Ready::Fixed(b) => *b,
                Ready::Check(k) => checks
                    .get(k)
                    .is_some_and(|c| c.ready || (!c.settled && was_ready(ep))),
            };

        self.note_refusals(&mut refused);
        let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        want.insert(keys::node(&me), encode(&self.node));
        // The mesh listener relays only to these: what this agent found
        // in its own Docker and saw ready, never what the store says.
        let mut local = HashSet::new();
        for (key, mut ep, r) in endpoints {
            ep.ready = is_ready(&ep, &r, &self.checks);
            if !ep.is_static {
                ep.addr = self.endpoint_addr(&key, &ep).await;
                if let Some(ip) = ep.addr {
                    want.insert(
                        keys::vip_alloc(ip),
                        encode(&pier_model::Allocation {
                            namespace: ep.namespace.clone(),
                            service: ep.service.clone(),
                            endpoint: Some((ep.node.clone(), ep.id.clone())),
                        }),
                    );
                }
            }
            if ep.ready && !ep.is_static {
                let svc = snap.service(&ep.namespace, &ep.service);
                let svc = svc
                    .map(|s| &**s)
                    .or_else(|| missing_services.get(&(ep.namespace.clone(), ep.service.clone())));
                local_targets_of(&ep, svc, &mut local);
            }
            want.insert(key, encode(&ep));
        }
        // The first complete view is announced even when it is empty: a
        // successor's mesh listener waits for it before it accepts.
        let first_view = synced && self.docker_synced && !self.local_view_sent;
        self.local_view_sent |= first_view;
        self.local_targets.send_if_modified(|cur| {
            let changed = **cur != local;
            if changed {
                *cur = Arc::new(local);
            }
            changed || first_view
        });

        // The pod runtime.
        if synced && self.docker_synced {
            self.pod_errors
                .retain(|k, _| snap.pods.get(k).is_some_and(|p| p.node == me));
            self.pod_waiting
                .retain(|k, at| at.elapsed() < DOCKERD_WAIT && snap.pods.contains_key(k));
            // A pod waiting for dockerd counts as starting: pending, and
            // not started again yet.
            let starting: HashSet<ObjectKey> = self
                .starting
                .iter()
                .chain(self.pod_waiting.keys())
                .cloned()
                .collect();
            self.node_pods.update(&snap, &me);
            let plan = desired::pods(
                &desired::PodView {
                    me: &me,
                    pods: &self.node_pods,
                    containers: &self.containers,
                    pod_errors: &self.pod_errors,
                    starting: &starting,
                    removing: &self.removing,
                    container_ready: &container_ready,
                },
                |r| match r {
                    Ready::Fixed(b) => *b,
                    Ready::Check(k) => self.checks.get(k).is_some_and(|c| c.ready),
                },
            );
            for st in plan.statuses {
                let (Some(name), ns) = (&st.name, &st.namespace) else {
                    continue;
                };
                want.insert(keys::pod_status(ns, name), encode(&st));
            }
            for pod in plan.start {
                self.spawn_start(pod);
            }
            for id in plan.remove {
                self.spawn_remove(id);
            }
        }

        if synced {
            for (k, svc) in missing_services {
                if self.services_created.contains(&k) {
                    continue;
                }
                let r = tokio::time::timeout(
                    STORE_TIMEOUT,
                    pier_store::writes::create_service(&*self.store, &self.alloc, svc, true),
                )
                .await;
                match r {
                    Ok(Ok(s)) => {
                        info!(service = %s.name, namespace = %s.namespace, vip = ?s.vip, "created service for a labelled container");
                        self.services_created.insert(k);
                    }
                    Ok(Err(pier_store::writes::WriteError::AlreadyExists(_))) => {
                        self.services_created.insert(k);
                    }
                    Ok(Err(e)) => {
                        warn!(service = %k.1, namespace = %k.0, error = %e, "creating a service failed; will retry");
                        self.dirty = true;
                    }
                    Err(_) => {
                        warn!(service = %k.1, namespace = %k.0, "creating a service timed out; will retry");
                        self.dirty = true;
                    }
                }
            }
        }

        // Nothing is written from a stale snapshot. After a cut or a store
        // stall it may still hold pods the store has deleted since (the
        // leader replaced them elsewhere): writing their endpoints under a
        // new lease put those orphans back into every host's proxy until
        // the snapshot caught up (found by the chaos run). The snapshot
        // turning fresh again sets `need_reset`, and that rewrite follows.
        if snap.stale_since_ms.is_some() {
            self.dirty = true;
            return;
        }
        self.write(want, synced && self.docker_synced).await;
    }

    /// The endpoint VIP of the endpoint at `key`: the one it holds, or a
    /// new claim (`writes::claim_endpoint_addr`, under the node lease).
    /// `None` while there is no lease or the claim fails (retried at the
    /// next reconcile); the endpoint is written without one meanwhile, and
    /// DNS leaves it out of pod names and SRV records.
    pub(super) async fn endpoint_addr(
        &mut self,
        key: &str,
        ep: &Endpoint,
    ) -> Option<std::net::IpAddr> {
        if let Some(ip) = self.ep_addrs.get(key) {
            return Some(*ip);
        }
        let lease = self.lease?;
        if self.need_reset {
            return None;
        }
        let r = tokio::time::timeout(
            STORE_TIMEOUT,
            pier_store::writes::claim_endpoint_addr(
                &*self.store,
                &self.alloc,
                &ep.namespace,
                &ep.service,
                &ep.node,
                &ep.id,
                lease,
            ),
        )
        .await;
        match r {
            Ok(Ok(ip)) => {
                debug!(endpoint = %key, addr = %ip, "claimed an endpoint address");
                self.ep_addrs.insert(key.to_owned(), ip);
                let value = encode(&pier_model::Allocation {
                    namespace: ep.namespace.clone(),
                    service: ep.service.clone(),
                    endpoint: Some((ep.node.clone(), ep.id.clone())),
                });
                self.written
                    .insert(keys::vip_alloc(ip), (value, Some(lease)));
                Some(ip)
            }
            Ok(Err(e)) => {
                warn!(endpoint = %key, error = %e, "claiming an endpoint address failed; will retry");
                self.dirty = true;
                None
            }
            Err(_) => {
                warn!(endpoint = %key, "claiming an endpoint address timed out; will retry");
                self.dirty = true;
                None
            }
        }
    }

    /// Log a note of [`desired::endpoints`] once per container or static
    /// endpoint.
    pub(super) fn note(&mut self, n: desired::Note) {
        match n {
            desired::Note::BadLabel {
                container,
                name,
                error: e,
            } => {
                if self.warned.insert(container.clone()) {
                    warn!(container.name = %name, container.id = %short(&container),
                        label = %e.label, value = %e.value, error = %e.why,
                        "skipping container with a bad label");
                }
            }
            desired::Note::CheckNeedsPort { container, name } => {
                if self.warned.insert(container.clone()) {
                    warn!(container.name = %name, container.id = %short(&container),
                        label = pier_model::labels::HEALTH, error = "the check needs a port; add pier.port",
                        "skipping container with a bad label");
                }
            }
            desired::Note::HeadlessIgnored {
                container,
                name,
                service,
            } => {
                if self.warned.insert(container.clone()) {
                    warn!(container.name = %name, container.id = %short(&container),
                        service = %service.1, namespace = %service.0,
                        label = pier_model::labels::HEADLESS,
                        "pier.headless=true ignored: the service exists with a VIP and the container joins it as it is; the label shapes only a service the agent creates (delete the service to have it created again, headless)");
                }
            }
            desired::Note::StaticRefused {
                key,
                service,
                addr,
                why,
            } => {
                if self.static_warned.insert((key, addr)) {
                    warn!(service = %service.1, namespace = %service.0, address = %addr,
                        reason = %why, "ignoring a static endpoint; list it in [network] static_endpoint_allow to allow it");
                }
            }
        }
    }

    /// Put this reconcile's refusals on the node record (sorted, at most
    /// [`pier_model::Node::MAX_REFUSED`]) and log each new one once.
    pub(super) fn note_refusals(&mut self, refused: &mut Vec<pier_model::Refusal>) {
        refused.sort();
        refused.dedup();
        let now: HashSet<(String, String)> = refused
            .iter()
            .map(|r| (r.id.clone(), r.reason.clone()))
            .collect();
        for r in refused.iter() {
            if !self
                .refused_logged
                .contains(&(r.id.clone(), r.reason.clone()))
            {
                warn!(container.name = %r.container, container.id = %r.id, namespace = %r.namespace,
                    service = ?r.service.as_ref().map(|s| s.as_str()), reason = %r.reason,
                    "refused a labelled container");
            }
        }
        self.refused_logged = now;
        refused.truncate(pier_model::Node::MAX_REFUSED);
        self.node.refused = std::mem::take(refused);
    }

    pub(super) fn sync_checks(&mut self, targets: HashMap<String, Target>) {
        self.checks.retain(|k, c| {
            let keep = targets.get(k) == Some(&c.target);
            if !keep {
                c.cancel.cancel();
            }
            keep
        });
        for (k, t) in targets {
            if self.checks.contains_key(&k) {
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            let cancel = self.tasks_cancel.child_token();
            self.spawn(health::run(
                k.clone(),
                generation,
                t.clone(),
                self.health_tx.clone(),
                cancel.clone(),
            ));
            self.checks.insert(
                k,
                Check {
                    target: t,
                    generation,
                    ready: false,
                    settled: false,
                    cancel,
                },
            );
        }
    }

    pub(super) fn pod_settings(&self) -> PodSettings {
        let mut extra = self.cfg.filter_labels.clone();
        extra.extend(self.cfg.pod_labels.clone());
        PodSettings {
            node: self.node.name.to_string(),
            extra_labels: extra,
            network: self.cfg.pod_network.clone(),
            registry: self.cfg.registry.clone(),
            dns: self.node.dns_addr,
            dns_search: self.dns_search.clone(),
        }
    }

    pub(super) fn spawn_start(&mut self, pod: Arc<Pod>) {
        let Some(d) = self.docker.clone() else { return };
        let key = (pod.namespace.clone(), pod.name.clone());
        self.starting.insert(key.clone());
        let settings = self.pod_settings();
        let tx = self.op_tx.clone();
        let cancel = self.tasks_cancel.clone();
        info!(pod = %pod.name, namespace = %pod.namespace, image = %pod.template.image, "starting pod");
        self.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = docker::start_pod(&d, &pod, &settings) => {
                    let _ = tx.send(OpMsg::PodStarted { pod: key, result: r });
                }
            }
        });
    }

    /// Stop and remove a pod container that is no longer wanted, after
    /// [`DEREGISTER_DELAY`]: its endpoint was left out of this reconcile's
    /// write, so proxies stop choosing it before it goes.
    pub(super) fn spawn_remove(&mut self, id: String) {
        let Some(d) = self.docker.clone() else { return };
        self.removing.insert(id.clone());
        let tx = self.op_tx.clone();
        let cancel = self.tasks_cancel.clone();
        self.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = async {
                    tokio::time::sleep(DEREGISTER_DELAY).await;
                    docker::remove_pod_container(&d, &id).await
                } => {
                    let _ = tx.send(OpMsg::Removed { id, result: r });
                }
            }
        });
    }

    /// Write what differs from `written`. Deletes only once both Docker and
    /// the store have been seen in full, so a restart does not flap
    /// endpoints of containers that are still running.
    pub(super) async fn write(&mut self, desired: BTreeMap<String, Vec<u8>>, may_delete: bool) {
        let Some(lease) = self.lease else { return };
        self.dirty = false;
        if may_delete {
            let mut stale: Vec<String> = self
                .written
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .cloned()
                .collect();
            // Endpoints before their addresses, so an address is free only
            // once no endpoint record names it.
            stale.sort_by_key(|k| k.starts_with(keys::prefix::VIP_ALLOCS));
            let mut failed = false;
            for k in stale {
                let is_alloc = k.starts_with(keys::prefix::VIP_ALLOCS);
                if is_alloc && failed {
                    continue;
                }
                match timed(self.store.delete(&k)).await {
                    Ok(_) => {
                        debug!(key = %k, "deleted");
                        self.written.remove(&k);
                        if is_alloc && let Ok(Key::VipAlloc(ip)) = Key::parse(&k) {
                            self.ep_addrs.retain(|_, a| *a != ip);
                        }
                    }
                    Err(e) => {
                        warn!(key = %k, error = %e, "store delete failed; will retry");
                        self.dirty = true;
                        failed = true;
                    }
                }
            }
        }
        // The node's record goes last, and only once everything else is
        // written: other hosts' reflectors take its return as the end of a
        // re-registration and then drop the endpoints they held for it
        // (`pier_store::reflector` hold), so it must not come before them.
        let node_key = keys::node(&self.node.name);
        let mut desired = desired;
        let node_rec = desired.remove_entry(&node_key);
        for (k, v) in desired.into_iter().chain(node_rec) {
            if self
                .written
                .get(&k)
                .is_some_and(|(wv, wl)| *wv == v && *wl == Some(lease))
            {
                continue;
            }
            if k == node_key && self.dirty {
                break;
            }
            match timed(self.store.put(&k, v.clone(), Some(lease))).await {
                Ok(_) => {
                    debug!(key = %k, "written");
                    self.written.insert(k, (v, Some(lease)));
                }
                Err(e) => {
                    warn!(key = %k, error = %e, "store put failed; will retry");
                    self.dirty = true;
                }
            }
        }
    }
}

/// The `ip:port`s of a ready endpoint: its ports, or the service's target
/// ports when it names none (as `Endpoint::port_for` falls back).
pub(super) fn local_targets_of(
    ep: &Endpoint,
    svc: Option<&Service>,
    out: &mut HashSet<SocketAddr>,
) {
    if ep.ports.is_empty() {
        for sp in svc.iter().flat_map(|s| s.ports.iter()) {
            out.insert(SocketAddr::new(ep.ip, sp.target_port.get()));
        }
    } else {
        for p in &ep.ports {
            out.insert(SocketAddr::new(ep.ip, p.port.get()));
        }
    }
}
