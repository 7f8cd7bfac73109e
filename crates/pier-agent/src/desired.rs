//! The agent's desired state, as pure functions of what it sees, shaped
//! like the supervisor's `plan.rs`: [`endpoints`] turns the containers, the
//! snapshot and the config into this node's endpoints (each with where its
//! readiness comes from), the health checks to run, the services to create
//! and the containers refused; [`pods`] turns the snapshot's pods for this
//! node and the containers into pod statuses and the containers to start
//! and remove. `agent.rs` only carries them out: it runs the checks, writes
//! the keys, starts and removes containers and logs the [`Note`]s once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pier_model::keys;
use pier_model::{
    Cidr, DiffItem, Endpoint, EndpointPort, HealthCheck, HealthKind, Name, ObjectKey, Pod,
    PodPhase, PodStatus, Refusal, Service, ServicePort, Snapshot,
};

use crate::docker::Container;
use crate::health::Target;
use crate::spec::{self, LabelPolicy, Spec};

/// Where an endpoint's readiness comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ready {
    Fixed(bool),
    /// The health check of this key in [`Endpoints::targets`].
    Check(String),
}

/// What [`endpoints`] looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub me: &'a Name,
    pub snap: &'a Snapshot,
    /// The snapshot reflects the store (not the empty one before the first
    /// sync).
    pub synced: bool,
    /// `containers` is Docker's full list (a resync has completed).
    pub docker_synced: bool,
    pub containers: &'a HashMap<String, Container>,
    pub policy: LabelPolicy<'a>,
    /// The default health check interval and timeout, in ms.
    pub health: (u64, u64),
    /// The service CIDRs: the IPv4 one and, dual stack, the IPv6 one.
    pub service_cidrs: &'a [Cidr],
    pub host_addrs: &'a [IpAddr],
    pub static_allow: &'a [Cidr],
    /// The addresses this agent holds for each static endpoint name
    /// (`names::normal`); a name not in it has its stored address.
    pub names: &'a HashMap<String, Vec<IpAddr>>,
    /// Unix milliseconds, for the services it creates.
    pub now_ms: u64,
}

/// Something the caller logs, once per container or static endpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Note {
    BadLabel {
        container: String,
        name: String,
        error: spec::LabelError,
    },
    CheckNeedsPort {
        container: String,
        name: String,
    },
    /// `pier.headless=true` on a container that joins an existing service
    /// with a VIP: the label shapes only a service the agent creates, so
    /// the service keeps its VIP (the container still joins it).
    HeadlessIgnored {
        container: String,
        name: String,
        service: ObjectKey,
    },
    StaticRefused {
        key: String,
        service: ObjectKey,
        addr: SocketAddr,
        why: pier_model::addr::Refusal,
    },
}

/// What [`endpoints`] decides.
#[derive(Debug, Default)]
pub(crate) struct Endpoints {
    /// The health checks to run, by key (a container id, or
    /// `static/<ns>/<svc>/<n>`).
    pub targets: HashMap<String, Target>,
    /// (key, endpoint without its readiness, where the readiness comes from)
    pub endpoints: Vec<(String, Endpoint, Ready)>,
    /// The readiness source of each container that is an endpoint.
    pub container_ready: HashMap<String, Ready>,
    /// Services a `pier.service` container asks for that do not exist.
    pub missing_services: BTreeMap<ObjectKey, Service>,
    pub refused: Vec<Refusal>,
    pub notes: Vec<Note>,
}

/// This node's endpoints: its containers that belong to services (by
/// `pier.service` or a selector, within the label policy), and its view of
/// every static endpoint.
pub(crate) fn endpoints(v: &View<'_>) -> Endpoints {
    let (me, snap, synced) = (v.me, v.snap, v.synced);
    let (def_interval, def_timeout) = v.health;
    let mut targets: HashMap<String, Target> = HashMap::new();
    // (key, endpoint without readiness, readiness source)
    let mut endpoints: Vec<(String, Endpoint, Ready)> = Vec::new();
    let mut container_ready: HashMap<String, Ready> = HashMap::new();
    let mut missing_services: BTreeMap<ObjectKey, Service> = BTreeMap::new();
    let mut refused: Vec<pier_model::Refusal> = Vec::new();
    let mut notes: Vec<Note> = Vec::new();
    let policy = v.policy;

    if v.docker_synced {
        for c in v.containers.values() {
            let spec = match spec::parse(&c.labels) {
                Ok(s) => s,
                Err(e) => {
                    if spec::has_pier_labels(&c.labels) {
                        notes.push(Note::BadLabel {
                            container: c.id.clone(),
                            name: c.name.clone(),
                            error: e,
                        });
                    }
                    continue;
                }
            };
            // Pier's own pod containers are trusted; every other
            // container that asks for a service by its labels is held
            // to the label policy (issue 12, M3).
            let own_pod = spec::is_own_pod(&c.name, &spec, me);
            if own_pod && synced && !pod_still_here(snap, &spec, me) {
                // Being removed (see `spawn_remove`): no endpoint.
                continue;
            }
            let asked: Vec<&Arc<Service>> = snap
                .services
                .values()
                .filter(|s| spec::matches(s, &spec, &c.labels))
                .collect();
            if asked.is_empty() && !own_pod && spec.service.is_none() {
                continue;
            }
            let (Some(ip), true, false) = (c.ip, c.running, c.held) else {
                continue;
            };
            if !own_pod {
                if let Some(why) = spec::refuse_labelled(&spec, &policy) {
                    refused.push(refusal(c, &spec, spec.service.clone(), why));
                    continue;
                }
                for s in asked.iter().filter(|s| !spec::takes(s, false)) {
                    refused.push(refusal(
                            c,
                            &spec,
                            Some(s.name.clone()),
                            format!(
                                "service {}/{} takes only pier's own pods; set accept_labelled on it to let labelled containers join",
                                s.namespace, s.name
                            ),
                        ));
                }
            }
            let services: Vec<&Arc<Service>> = asked
                .into_iter()
                .filter(|s| spec::takes(s, own_pod))
                .collect();
            let missing = spec
                .service
                .as_ref()
                .filter(|svc| synced && snap.service(&spec.namespace, svc).is_none());
            if services.is_empty()
                && missing.is_none()
                && !own_pod
                && (synced || spec.service.is_none())
            {
                continue;
            }
            // The default check is a TCP connect: to the first TCP port
            // (a UDP-only container has none, and is checked by Docker's
            // status or not at all).
            let port = spec
                .ports
                .iter()
                .find(|p| p.protocol.is_tcp())
                .map(|p| p.port)
                .or_else(|| {
                    if !spec.ports.is_empty() {
                        return None;
                    }
                    services.iter().find_map(|s| {
                        s.ports
                            .iter()
                            .find(|p| p.protocol.is_tcp())
                            .map(|p| p.target_port)
                    })
                });
            let check = spec::health_check(
                &spec,
                c.image_has_healthcheck,
                port.is_some(),
                def_interval,
                def_timeout,
            );
            let ready = match (&check.kind, port) {
                (HealthKind::None, _) => Ready::Fixed(true),
                (HealthKind::Docker, _) => Ready::Fixed(c.docker_healthy == Some(true)),
                (_, Some(port)) => {
                    targets.insert(
                        c.id.clone(),
                        Target {
                            addr: SocketAddr::new(ip, port.get()),
                            check,
                        },
                    );
                    Ready::Check(c.id.clone())
                }
                (_, None) => {
                    notes.push(Note::CheckNeedsPort {
                        container: c.id.clone(),
                        name: c.name.clone(),
                    });
                    continue;
                }
            };
            container_ready.insert(c.id.clone(), ready.clone());
            let Ok(id) = Name::new(c.short_id()) else {
                continue;
            };
            let hostname = c.hostname.clone().or_else(|| Some(c.name.clone()));
            let mk = |svc: &Name, svc_obj: Option<&Service>| Endpoint {
                service: svc.clone(),
                namespace: spec.namespace.clone(),
                node: me.clone(),
                id: id.clone(),
                pod: spec.pod.clone(),
                hostname: hostname.clone(),
                ip,
                ports: spec::endpoint_ports(&spec, svc_obj),
                ready: false,
                is_static: false,
                addr: None,
            };
            for s in &services {
                if spec.headless && spec.service.as_ref() == Some(&s.name) && !s.is_headless() {
                    notes.push(Note::HeadlessIgnored {
                        container: c.id.clone(),
                        name: c.name.clone(),
                        service: (s.namespace.clone(), s.name.clone()),
                    });
                }
                endpoints.push((
                    keys::endpoint(&s.namespace, &s.name, me, &id),
                    mk(&s.name, Some(s)),
                    ready.clone(),
                ));
            }
            if let Some(svc) = missing {
                endpoints.push((
                    keys::endpoint(&spec.namespace, svc, me, &id),
                    mk(svc, None),
                    ready.clone(),
                ));
                missing_services
                    .entry((spec.namespace.clone(), svc.clone()))
                    .or_insert_with(|| auto_service(svc, &spec, v.now_ms));
            } else if !synced && let Some(svc) = &spec.service {
                // Before the first snapshot, register by label alone.
                endpoints.push((
                    keys::endpoint(&spec.namespace, svc, me, &id),
                    mk(svc, None),
                    ready.clone(),
                ));
            }
        }
    }

    // Static endpoints: every node checks them and registers its view.
    for svc in snap.services.values() {
        for (n, se) in svc.static_endpoints.iter().enumerate() {
            // A name gives one endpoint per address held: `static-<n>`,
            // then `static-<n>-<m>`.
            let held = se
                .name
                .as_deref()
                .and_then(|name| v.names.get(&crate::names::normal(name)));
            let addrs = held.map_or(std::slice::from_ref(&se.ip), |a| a.as_slice());
            for (m, &ip) in addrs.iter().enumerate() {
                let at = match m {
                    0 => n.to_string(),
                    m => format!("{n}-{m}"),
                };
                static_endpoint(
                    v,
                    svc,
                    se.port,
                    ip,
                    &at,
                    &mut targets,
                    &mut endpoints,
                    &mut notes,
                );
            }
        }
    }

    Endpoints {
        targets,
        endpoints,
        container_ready,
        missing_services,
        refused,
        notes,
    }
}

/// This node's view of one address of a static endpoint (`at`: `<n>` or
/// `<n>-<m>`): checked, health-checked and registered as `static-<at>`.
#[allow(clippy::too_many_arguments)]
fn static_endpoint(
    v: &View<'_>,
    svc: &Service,
    port: pier_model::PortNum,
    ip: IpAddr,
    at: &str,
    targets: &mut HashMap<String, Target>,
    endpoints: &mut Vec<(String, Endpoint, Ready)>,
    notes: &mut Vec<Note>,
) {
    let (def_interval, def_timeout) = v.health;
    let Ok(id) = Name::new(&format!("static-{at}")) else {
        return;
    };
    let key = format!("static/{}/{}/{at}", svc.namespace, svc.name);
    let addr = SocketAddr::new(ip, port.get());
    // Defence in depth behind the API's check (a record written straight
    // into the store, or by an older version), and the only check of the
    // addresses a name gives: never health-check, register or so proxy to
    // an address that reaches this host itself.
    if let Err(why) =
        pier_model::addr::check_static_ip(ip, v.service_cidrs, v.host_addrs, v.static_allow)
    {
        notes.push(Note::StaticRefused {
            key,
            service: (svc.namespace.clone(), svc.name.clone()),
            addr,
            why,
        });
        return;
    }
    let first = svc.ports.first();
    let protocol = first.map(|p| p.protocol).unwrap_or_default();
    // A UDP service's endpoint has no default check (a TCP connect would
    // fail; there is no generic UDP probe), as a UDP-only container.
    let default_kind = if protocol.is_tcp() {
        HealthKind::Tcp
    } else {
        HealthKind::None
    };
    let mut check = svc.health.clone().unwrap_or_else(|| HealthCheck {
        interval_ms: def_interval,
        timeout_ms: def_timeout,
        ..HealthCheck::new(default_kind)
    });
    if check.kind == HealthKind::Docker {
        check.kind = HealthKind::Tcp;
    }
    let ready = if check.kind == HealthKind::None {
        Ready::Fixed(true)
    } else {
        targets.insert(key.clone(), Target { addr, check });
        Ready::Check(key)
    };
    let port_name = first
        .map(|p| p.name.clone())
        .unwrap_or_else(|| protocol.default_port_name(port));
    endpoints.push((
        keys::endpoint(&svc.namespace, &svc.name, v.me, &id),
        Endpoint {
            service: svc.name.clone(),
            namespace: svc.namespace.clone(),
            node: v.me.clone(),
            id,
            pod: None,
            hostname: None,
            ip,
            ports: vec![EndpointPort {
                name: port_name,
                port,
                protocol,
            }],
            ready: false,
            is_static: true,
            addr: None,
        },
        ready,
    ));
}

/// Whether the pod of a pod container on this node is still assigned
/// here in `snap` (else the runtime removes the container).
fn pod_still_here(snap: &Snapshot, spec: &Spec, me: &Name) -> bool {
    spec.pod.as_ref().is_some_and(|pod| {
        snap.pods
            .get(&(spec.namespace.clone(), pod.clone()))
            .is_some_and(|p| &p.node == me)
    })
}

/// The record of a refused container.
fn refusal(c: &Container, spec: &Spec, service: Option<Name>, reason: String) -> Refusal {
    Refusal {
        container: c.name.clone(),
        id: c.short_id().to_owned(),
        namespace: spec.namespace.clone(),
        service,
        reason,
    }
}

/// The service an agent creates for a `pier.service` container whose
/// service does not exist: its ports named like the endpoint's, with
/// `port == target_port`.
fn auto_service(name: &Name, spec: &Spec, now_ms: u64) -> Service {
    let ports = spec::endpoint_ports(spec, None)
        .into_iter()
        .map(|p| ServicePort {
            name: p.name,
            port: p.port,
            target_port: p.port,
            node_port: None,
            protocol: p.protocol,
        })
        .collect();
    let mut svc = Service::new(spec.namespace.clone(), name.clone(), ports);
    svc.prefer_local = spec.prefer_local;
    svc.headless = spec.headless;
    svc.created_at = now_ms;
    svc
}

/// The pods assigned to one node, kept in step with each new snapshot
/// from the difference of its pods with the last one's (`Map::diff`, which
/// skips what two snapshots share): the pod runtime's input, without a
/// scan of every pod in the cluster per reconcile (100,000 pods at 1,000
/// hosts in issue 17's simulator). Pure: the agent calls [`NodePods::update`]
/// with each snapshot it reconciles on.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodePods {
    /// The snapshot's pods these are taken from.
    of: pier_model::Map<ObjectKey, Arc<Pod>>,
    pods: BTreeMap<ObjectKey, Arc<Pod>>,
}

impl NodePods {
    /// The pods of `snap` assigned to `me`.
    #[cfg(test)]
    pub(crate) fn of(snap: &Snapshot, me: &Name) -> NodePods {
        let mut p = NodePods::default();
        p.update(snap, me);
        p
    }

    /// Brings these up to `snap` (for the same `me` every time): the cost
    /// is in the pods that changed since the last update, not in all pods.
    pub(crate) fn update(&mut self, snap: &Snapshot, me: &Name) {
        if self.of.ptr_eq(&snap.pods) {
            return;
        }
        for d in self.of.diff(&snap.pods) {
            match d {
                DiffItem::Add(k, p) | DiffItem::Update { new: (k, p), .. } => {
                    if p.node == *me {
                        self.pods.insert(k.clone(), p.clone());
                    } else {
                        self.pods.remove(k);
                    }
                }
                DiffItem::Remove(k, _) => {
                    self.pods.remove(k);
                }
            }
        }
        self.of = snap.pods.clone();
    }
}

/// What [`pods`] looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PodView<'a> {
    pub me: &'a Name,
    /// The pods assigned to this node ([`NodePods`], of the snapshot).
    pub pods: &'a NodePods,
    pub containers: &'a HashMap<String, Container>,
    /// Pods whose container could not be started, with the error.
    pub pod_errors: &'a HashMap<ObjectKey, String>,
    /// Pods whose container is being started.
    pub starting: &'a HashSet<ObjectKey>,
    /// Containers being removed.
    pub removing: &'a HashSet<String>,
    /// The readiness source of each container that is an endpoint
    /// ([`Endpoints::container_ready`]).
    pub container_ready: &'a HashMap<String, Ready>,
}

/// What [`pods`] decides.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PodPlan {
    /// The status of every pod assigned to this node.
    pub statuses: Vec<PodStatus>,
    /// Pods with no container yet: start one.
    pub start: Vec<Arc<Pod>>,
    /// Pier's pod containers whose pod is no longer assigned here.
    pub remove: Vec<String>,
}

/// The pod runtime: the status of each pod assigned to this node, which pods
/// need a container, and which of pier's pod containers are no longer
/// wanted. `ready` says whether a readiness source passes now.
pub(crate) fn pods(v: &PodView<'_>, ready: impl Fn(&Ready) -> bool) -> PodPlan {
    let me = v.me;
    let my_pods: BTreeMap<&ObjectKey, &Arc<Pod>> = v.pods.pods.iter().collect();
    // The containers pier started here, by pod; a running one wins.
    let mut by_pod: HashMap<ObjectKey, &Container> = HashMap::new();
    let mut plan = PodPlan::default();
    for c in v.containers.values() {
        let (Some(pod), Some(node)) = (
            c.labels.get(pier_model::labels::POD),
            c.labels.get(pier_model::labels::NODE),
        ) else {
            continue;
        };
        if node != me.as_str() {
            continue;
        }
        let ns = c
            .labels
            .get(pier_model::labels::NAMESPACE)
            .and_then(|n| pier_model::Namespace::new(n).ok())
            .unwrap_or_default();
        let Ok(pod) = Name::new(pod) else { continue };
        // A container that copies a pod's labels under another name is not
        // that pod's: never adopted, never removed.
        if c.name != spec::pod_container_name(&ns, &pod) {
            continue;
        }
        let k = (ns, pod);
        if !my_pods.contains_key(&k) {
            if !v.removing.contains(&c.id) {
                plan.remove.push(c.id.clone());
            }
            continue;
        }
        match by_pod.get(&k) {
            Some(o) if o.running => {}
            _ => {
                by_pod.insert(k, c);
            }
        }
    }
    for (k, pod) in &my_pods {
        let c = by_pod.get(*k);
        let mut st = PodStatus {
            name: Some(pod.name.clone()),
            namespace: pod.namespace.clone(),
            node: Some(me.clone()),
            ..Default::default()
        };
        if let Some(c) = c {
            st.container_id = Some(c.id.clone());
            st.ip = c.ip;
            st.started_at = c.started_at_ms;
            st.restarts = c.restarts;
        }
        if let Some(msg) = v.pod_errors.get(*k) {
            st.phase = PodPhase::Failed;
            st.message = msg.clone();
        } else if let Some(c) = c {
            if c.running {
                st.phase = PodPhase::Running;
                st.ready = v.container_ready.get(&c.id).is_some_and(&ready);
            } else if c.started_at_ms.is_none() || v.starting.contains(*k) {
                st.phase = PodPhase::Pending;
                st.message = "container created, not started yet".into();
                // Created but never started, and no start under way: the
                // process that created it died between `create` and
                // `start` (a killed worker). Start it again; the start
                // adopts the existing container.
                if c.started_at_ms.is_none() && !v.starting.contains(*k) {
                    plan.start.push((*pod).clone());
                }
            } else {
                st.phase = PodPhase::Failed;
                st.message = if c.error.is_empty() {
                    PodStatus::exited_message(c.exit_code.unwrap_or(-1))
                } else {
                    format!("container failed: {}", c.error)
                };
            }
        } else {
            st.phase = PodPhase::Pending;
            st.message = "creating the container".into();
            if !v.starting.contains(*k) {
                plan.start.push((*pod).clone());
            }
        }
        plan.statuses.push(st);
    }
    plan.remove.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "n1";

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn container(id: &str, cname: &str, labels: &[(&str, &str)], ip: &str) -> Container {
        Container {
            id: id.repeat(64)[..64].to_owned(),
            name: cname.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            running: true,
            held: false,
            ip: Some(ip.parse().unwrap()),
            hostname: None,
            image_has_healthcheck: false,
            docker_healthy: None,
            started_at_ms: Some(1),
            exit_code: None,
            error: String::new(),
            restarts: 0,
        }
    }

    fn service(json: serde_json::Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    fn pod(pod: &str, node: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "name": pod, "replicaset": "api", "node": node, "template_hash": "h",
                "template": {"image": "img", "ports": [{"name": "http", "port": 8080}]},
            }))
            .unwrap(),
        )
    }

    fn snapshot(services: &[Arc<Service>], pods: &[Arc<Pod>]) -> Snapshot {
        Snapshot {
            revision: 7,
            services: services
                .iter()
                .map(|s| ((s.namespace.clone(), s.name.clone()), s.clone()))
                .collect(),
            pods: pods
                .iter()
                .map(|p| ((p.namespace.clone(), p.name.clone()), p.clone()))
                .collect(),
            ..Default::default()
        }
    }

    fn run(snap: &Snapshot, cs: &[Container], host_addrs: &[IpAddr]) -> Endpoints {
        run_names(snap, cs, host_addrs, &HashMap::new())
    }

    fn run_names(
        snap: &Snapshot,
        cs: &[Container],
        host_addrs: &[IpAddr],
        names: &HashMap<String, Vec<IpAddr>>,
    ) -> Endpoints {
        let me = name(ME);
        let containers: HashMap<String, Container> =
            cs.iter().map(|c| (c.id.clone(), c.clone())).collect();
        let ns = ["default".to_owned()];
        endpoints(&View {
            me: &me,
            snap,
            synced: true,
            docker_synced: true,
            containers: &containers,
            policy: LabelPolicy {
                namespaces: &ns,
                allow_health_none: false,
            },
            health: (500, 1000),
            service_cidrs: &["10.213.0.0/16".parse().unwrap()],
            host_addrs,
            static_allow: &[],
            names,
            now_ms: 42,
        })
    }

    /// A static endpoint given by name: one endpoint per address this
    /// agent holds for the name, each checked like any static address;
    /// without a lookup yet (or from an older version), the stored address.
    #[test]
    fn named_static_endpoints_take_the_addresses_held() {
        let ext = service(serde_json::json!({
            "name": "ext", "ports": [{"name": "db", "port": 5432, "target_port": 5432}],
            "static_endpoints": [
                {"ip": "192.0.2.9", "port": 5432, "name": "DB.example.com."},
                {"ip": "192.0.2.50", "port": 5433},
            ],
        }));
        let snap = snapshot(&[ext], &[]);
        let keys_and_ips = |d: &Endpoints| {
            let mut v: Vec<(String, String)> = d
                .endpoints
                .iter()
                .map(|(k, e, _)| (k.rsplit('/').next().unwrap().to_owned(), e.ip.to_string()))
                .collect();
            v.sort();
            v
        };
        let pair = |k: &str, ip: &str| (k.to_owned(), ip.to_owned());
        let d = run(&snap, &[], &[]);
        assert_eq!(
            keys_and_ips(&d),
            [
                pair("static-0", "192.0.2.9"),
                pair("static-1", "192.0.2.50")
            ]
        );
        let names = HashMap::from([(
            "db.example.com".to_owned(),
            vec![
                "198.51.100.7".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
                "198.51.100.8".parse().unwrap(),
            ],
        )]);
        let d = run_names(&snap, &[], &[], &names);
        assert_eq!(
            keys_and_ips(&d),
            [
                pair("static-0", "198.51.100.7"),
                pair("static-0-2", "198.51.100.8"),
                pair("static-1", "192.0.2.50")
            ]
        );
        assert_eq!(
            d.targets["static/default/ext/0-2"].addr,
            "198.51.100.8:5432".parse::<SocketAddr>().unwrap()
        );
        assert!(
            matches!(&d.notes[..], [Note::StaticRefused { key, addr, .. }]
                if key == "static/default/ext/0-1" && addr.to_string() == "127.0.0.1:5432"),
            "{:?}",
            d.notes
        );
        // A UDP service's static endpoint is not health-checked (a TCP
        // connect would fail), so it is ready as it is.
        let dns = service(serde_json::json!({
            "name": "dns", "ports": [{"name": "p53-udp", "port": 53, "target_port": 53, "protocol": "udp"}],
            "static_endpoints": [{"ip": "192.0.2.53", "port": 53}],
        }));
        let d = run(&snapshot(&[dns], &[]), &[], &[]);
        assert_eq!(d.endpoints[0].2, Ready::Fixed(true));
        assert!(d.targets.is_empty(), "{:?}", d.targets);
        // Dropped (a failed name past the stale bound): no endpoint from it.
        let names = HashMap::from([("db.example.com".to_owned(), vec![])]);
        let d = run_names(&snap, &[], &[], &names);
        assert_eq!(keys_and_ips(&d), [pair("static-1", "192.0.2.50")]);
    }

    /// One table: each container or static endpoint, and what becomes of it.
    #[test]
    fn endpoints_table() {
        let api = service(serde_json::json!({
            "name": "api", "vip": "10.213.0.20",
            "ports": [{"name": "http", "port": 80, "target_port": 8080}],
            "selector": {"pier.replicaset": "api"},
        }));
        let ext = service(serde_json::json!({
            "name": "ext", "ports": [{"name": "db", "port": 5432, "target_port": 5432}],
            "static_endpoints": [
                {"ip": "192.0.2.9", "port": 5432},
                {"ip": "127.0.0.1", "port": 5432},
                {"ip": "198.51.100.1", "port": 5432},
            ],
        }));
        let snap = snapshot(&[api, ext], &[pod("api-a1", ME)]);
        let pod_labels = [
            ("pier.replicaset", "api"),
            ("pier.pod", "api-a1"),
            ("pier.node", ME),
            ("pier.ports", "8080"),
        ];
        let own = container("a", "pier-default-api-a1", &pod_labels, "172.17.0.2");
        let forged = container("b", "evil", &pod_labels, "172.17.0.3");
        let labelled = container(
            "c",
            "web1",
            &[("pier.service", "web"), ("pier.port", "8080")],
            "172.17.0.4",
        );
        let bad = container("d", "bad", &[("pier.service", "Web_1")], "172.17.0.5");
        let unrelated = container("e", "db", &[("app", "x")], "172.17.0.6");
        let d = run(
            &snap,
            &[
                own.clone(),
                forged.clone(),
                labelled.clone(),
                bad,
                unrelated,
            ],
            &["198.51.100.1".parse().unwrap()],
        );

        let mut keys: Vec<&str> = d.endpoints.iter().map(|e| e.0.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "/pier/v1/endpoints/default/api/n1/aaaaaaaaaaaa",
                "/pier/v1/endpoints/default/ext/n1/static-0",
                "/pier/v1/endpoints/default/web/n1/cccccccccccc",
            ],
            "own pod, labelled container, the one static endpoint that may be reached"
        );
        // The pod's endpoint takes the service port's name and a TCP check.
        let (_, ep, ready) = d
            .endpoints
            .iter()
            .find(|e| e.1.service.as_str() == "api")
            .unwrap();
        assert_eq!(ep.ports[0].name.as_str(), "http");
        assert_eq!(ready, &Ready::Check(own.id.clone()));
        assert_eq!(
            d.targets[&own.id].addr,
            "172.17.0.2:8080".parse::<SocketAddr>().unwrap()
        );
        // The missing service is created, named like the endpoint's port.
        let web = &d.missing_services[&(Default::default(), name("web"))];
        assert_eq!(web.ports[0].name.as_str(), "p8080");
        assert_eq!(web.created_at, 42);
        // The forged pod container is refused, with the reason.
        assert_eq!(d.refused.len(), 1);
        assert_eq!(d.refused[0].id, forged.short_id());
        assert!(d.refused[0].reason.contains("takes only pier's own pods"));
        // A bad label, loopback and a host address are notes, not endpoints.
        let mut kinds: Vec<String> = d
            .notes
            .iter()
            .map(|n| match n {
                Note::BadLabel { error, .. } => format!("label {}", error.label),
                Note::CheckNeedsPort { .. } => "port".into(),
                Note::HeadlessIgnored { .. } => "headless".into(),
                Note::StaticRefused { why, .. } => format!("static {}", why.kind()),
            })
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "label pier.service",
                "static host-address",
                "static loopback"
            ]
        );
        assert!(
            !d.targets
                .keys()
                .any(|k| k.ends_with("/1") || k.ends_with("/2"))
        );
        assert!(d.container_ready.contains_key(&labelled.id));
    }

    /// `pier.headless=true`: a service the agent creates for it is headless;
    /// joining an existing service with a VIP leaves that service as it is,
    /// with a note.
    #[test]
    fn headless_label_shapes_only_a_created_service() {
        let db = service(serde_json::json!({
            "name": "db", "vip": "10.213.0.21",
            "ports": [{"name": "p5432", "port": 5432, "target_port": 5432}],
        }));
        let snap = snapshot(&[db], &[]);
        let peer = |id: &str, svc: &str, ip: &str| {
            container(
                id,
                &format!("{svc}-{id}"),
                &[
                    ("pier.service", svc),
                    ("pier.port", "5432"),
                    ("pier.headless", "true"),
                ],
                ip,
            )
        };
        let d = run(
            &snap,
            &[
                peer("a", "peers", "172.17.0.2"),
                peer("b", "peers", "172.17.0.3"),
                peer("c", "db", "172.17.0.4"),
            ],
            &[],
        );
        let peers = &d.missing_services[&(Default::default(), name("peers"))];
        assert!(peers.headless && peers.vip.is_none(), "{peers:?}");
        assert_eq!(d.missing_services.len(), 1);
        assert_eq!(d.endpoints.len(), 3, "all three join");
        let c_id = "c".repeat(64);
        assert_eq!(
            d.notes,
            [Note::HeadlessIgnored {
                container: c_id,
                name: "db-c".into(),
                service: (Default::default(), name("db")),
            }]
        );
    }

    #[test]
    fn before_docker_is_listed_only_static_endpoints() {
        let me = name(ME);
        let snap = snapshot(&[], &[]);
        let containers = HashMap::from([(
            "x".repeat(64),
            container("x", "web1", &[("pier.service", "web")], "172.17.0.4"),
        )]);
        let d = endpoints(&View {
            me: &me,
            snap: &snap,
            synced: true,
            docker_synced: false,
            containers: &containers,
            policy: LabelPolicy {
                namespaces: &[],
                allow_health_none: false,
            },
            health: (500, 1000),
            service_cidrs: &["10.213.0.0/16".parse().unwrap()],
            host_addrs: &[],
            static_allow: &[],
            names: &HashMap::new(),
            now_ms: 0,
        });
        assert!(d.endpoints.is_empty() && d.missing_services.is_empty());
    }

    /// One table for the pod runtime.
    #[test]
    fn pods_table() {
        let me = name(ME);
        let snap = snapshot(
            &[],
            &[
                pod("run1", ME),
                pod("new1", ME),
                pod("err1", ME),
                pod("other", "n2"),
            ],
        );
        let labels = |p: &'static str| [("pier.pod", p), ("pier.node", ME)];
        let running = container("a", "pier-default-run1", &labels("run1"), "172.17.0.2");
        let mut failed = container("b", "pier-default-err1", &labels("err1"), "172.17.0.3");
        failed.running = false;
        failed.exit_code = Some(3);
        let orphan = container("c", "pier-default-gone", &labels("gone"), "172.17.0.4");
        let forged = container("d", "not-pier", &labels("gone"), "172.17.0.5");
        let containers: HashMap<String, Container> =
            [running.clone(), failed, orphan.clone(), forged]
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect();
        let ready = HashMap::from([(running.id.clone(), Ready::Fixed(true))]);
        let plan = pods(
            &PodView {
                me: &me,
                pods: &NodePods::of(&snap, &me),
                containers: &containers,
                pod_errors: &HashMap::new(),
                starting: &HashSet::new(),
                removing: &HashSet::new(),
                container_ready: &ready,
            },
            |r| matches!(r, Ready::Fixed(true)),
        );
        let by: HashMap<&str, &PodStatus> = plan
            .statuses
            .iter()
            .map(|s| (s.name.as_ref().unwrap().as_str(), s))
            .collect();
        assert_eq!(by.len(), 3, "only this node's pods: {by:?}");
        assert_eq!(by["run1"].phase, PodPhase::Running);
        assert!(by["run1"].ready);
        assert_eq!(
            by["run1"].container_id.as_deref(),
            Some(running.id.as_str())
        );
        assert_eq!(by["new1"].phase, PodPhase::Pending);
        assert_eq!(by["err1"].phase, PodPhase::Failed);
        assert!(
            by["err1"].message.contains("code 3"),
            "{}",
            by["err1"].message
        );
        let started: Vec<&str> = plan.start.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(started, ["new1"]);
        // Only pier's own container of a pod that is gone is removed.
        assert_eq!(plan.remove, std::slice::from_ref(&orphan.id));
    }

    /// A worker killed between `docker create` and `docker start` left a
    /// created container; its successor must start it, not report the pod
    /// Pending forever (a rollout waiting on it paused after its deadline).
    #[test]
    fn created_container_is_started_when_worker_died_between_create_and_start() {
        let me = name(ME);
        let snap = snapshot(&[], &[pod("half1", ME)]);
        let mut created = container(
            "e",
            "pier-default-half1",
            &[("pier.pod", "half1"), ("pier.node", ME)],
            "172.17.0.6",
        );
        created.running = false;
        created.started_at_ms = None;
        let containers = HashMap::from([(created.id.clone(), created)]);
        let plan_with = |starting: &HashSet<ObjectKey>| {
            pods(
                &PodView {
                    me: &me,
                    pods: &NodePods::of(&snap, &me),
                    containers: &containers,
                    pod_errors: &HashMap::new(),
                    starting,
                    removing: &HashSet::new(),
                    container_ready: &HashMap::new(),
                },
                |_| false,
            )
        };
        let plan = plan_with(&HashSet::new());
        assert_eq!(plan.statuses[0].phase, PodPhase::Pending);
        let started: Vec<&str> = plan.start.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(started, ["half1"]);
        // While this process's own start is under way: not twice.
        let starting = HashSet::from([(pier_model::Namespace::default(), name("half1"))]);
        assert!(plan_with(&starting).start.is_empty());
    }

    /// The node's pods kept from snapshot to snapshot are the ones a scan
    /// of every pod finds: pods added here and elsewhere, moved to and
    /// from this node, replaced, deleted; and a snapshot built anew.
    #[test]
    fn node_pods_follow_the_snapshots() {
        let me = name(ME);
        let scan = |s: &Snapshot| -> BTreeMap<ObjectKey, Arc<Pod>> {
            s.pods
                .iter()
                .filter(|(_, p)| p.node == me)
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect()
        };
        let mut snap = snapshot(&[], &[]);
        let mut kept = NodePods::default();
        // A fixed pseudo-random walk: 400 changes over 40 pod names.
        let mut x: u64 = 17;
        for step in 0..400 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pod_name = format!("p{}", (x >> 33) % 40);
            let node = if (x >> 20) % 3 == 0 { ME } else { "n2" };
            let k = (pier_model::Namespace::default(), name(&pod_name));
            if (x >> 40) % 4 == 0 {
                snap.pods.remove(&k);
            } else {
                snap.pods.insert(k, pod(&pod_name, node));
            }
            if step % 3 == 0 {
                kept.update(&snap, &me);
                assert_eq!(kept.pods, scan(&snap), "step {step}");
            }
        }
        // A snapshot that shares nothing with the last (a relist).
        let fresh = snapshot(&[], &[pod("q1", ME), pod("q2", "n2")]);
        kept.update(&fresh, &me);
        assert_eq!(kept.pods, scan(&fresh));
        assert_eq!(kept.pods.len(), 1);
    }
}
