//! What a container's labels ask of pier, parsed and validated.
//!
//! A label that does not parse makes the whole container invalid: the caller
//! logs one warning naming the container and the label and skips it.

pub(crate) use pier_model::PortSpec;
use pier_model::{EndpointPort, HealthCheck, HealthKind, Labels, Name, Namespace, Service, labels};

/// The pier labels of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    /// From `pier.service`.
    pub service: Option<Name>,
    /// From `pier.namespace`, default `default`.
    pub namespace: Namespace,
    pub ports: Vec<PortSpec>,
    /// From `pier.health`; `None` picks the default.
    pub health: Option<HealthKind>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub healthy: Option<u32>,
    pub unhealthy: Option<u32>,
    /// From `pier.pod` (containers pier started).
    pub pod: Option<Name>,
    /// From `pier.node`.
    pub node: Option<Name>,
    /// From `pier.prefer-local` (`true`/`false`, default false): used when
    /// the agent creates the service.
    pub prefer_local: bool,
    /// From `pier.headless` (`true`/`false`, default false): used when the
    /// agent creates the service.
    pub headless: bool,
}

/// A label that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label}={value:?}: {why}")]
pub(crate) struct LabelError {
    pub label: String,
    pub value: String,
    pub why: String,
}

fn bad(label: &str, value: &str, why: impl ToString) -> LabelError {
    LabelError {
        label: label.to_owned(),
        value: value.chars().take(80).collect(),
        why: why.to_string(),
    }
}

/// One `[NAME:]P[/udp]` item of `pier.port` or `pier.ports`.
fn port(label: &str, value: &str, s: &str) -> Result<PortSpec, LabelError> {
    s.parse::<PortSpec>().map_err(|e| {
        bad(
            label,
            value,
            format!("{s:?}: {e}; write [NAME:]PORT[/udp], PORT from 1 to 65535"),
        )
    })
}

fn number<T: std::str::FromStr>(l: &Labels, label: &str) -> Result<Option<T>, LabelError> {
    match l.get(label) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bad(label, v, "not a whole number")),
    }
}

/// Whether a container carries any `pier.` label (and so deserves a warning
/// when they do not parse).
pub(crate) fn has_pier_labels(l: &Labels) -> bool {
    l.keys()
        .any(|k| k.starts_with("pier.") && k != "pier.test-run")
}

/// Parse a container's pier labels.
pub(crate) fn parse(l: &Labels) -> Result<Spec, LabelError> {
    let name = |label: &str| -> Result<Option<Name>, LabelError> {
        l.get(label)
            .map(|v| Name::new(v).map_err(|e| bad(label, v, e)))
            .transpose()
    };
    let service = name(labels::SERVICE)?;
    let pod = name(labels::POD)?;
    let node = name(labels::NODE)?;
    let namespace = match l.get(labels::NAMESPACE) {
        None => Namespace::default(),
        Some(v) => Namespace::new(v).map_err(|e| bad(labels::NAMESPACE, v, e))?,
    };
    let mut ports = Vec::new();
    if let Some(v) = l.get(labels::PORTS) {
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            ports.push(port(labels::PORTS, v, item)?);
        }
        if ports.is_empty() {
            return Err(bad(
                labels::PORTS,
                v,
                "no ports; write name:port,name:port/udp",
            ));
        }
    }
    if let Some(v) = l.get(labels::PORT) {
        let p = port(labels::PORT, v, v)?;
        if p.name.is_some() {
            return Err(bad(
                labels::PORT,
                v,
                "pier.port takes PORT[/udp]; name ports in pier.ports=NAME:PORT",
            ));
        }
        if !ports
            .iter()
            .any(|x| x.port == p.port && x.protocol == p.protocol)
        {
            ports.push(p);
        }
    }
    for (i, a) in ports.iter().enumerate() {
        if ports[..i]
            .iter()
            .any(|b| b.name_or_default() == a.name_or_default())
        {
            return Err(bad(
                labels::PORTS,
                l.get(labels::PORTS).map_or("", |s| s.as_str()),
                format!("port name {} is used twice", a.name_or_default()),
            ));
        }
    }
    let health = l
        .get(labels::HEALTH)
        .map(|v| {
            v.trim()
                .parse::<HealthKind>()
                .map_err(|e| bad(labels::HEALTH, v, e))
        })
        .transpose()?;
    let flag = |label: &str| match l.get(label).map(|v| v.trim()) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(bad(label, v, "write true or false")),
    };
    let prefer_local = flag(labels::PREFER_LOCAL)?;
    let headless = flag(labels::HEADLESS)?;
    let spec = Spec {
        service,
        namespace,
        ports,
        health,
        interval_ms: number(l, labels::HEALTH_INTERVAL)?,
        timeout_ms: number(l, labels::HEALTH_TIMEOUT)?,
        healthy: number(l, labels::HEALTH_HEALTHY)?,
        unhealthy: number(l, labels::HEALTH_UNHEALTHY)?,
        pod,
        node,
        prefer_local,
        headless,
    };
    for (label, v) in [
        (labels::HEALTH_INTERVAL, spec.interval_ms),
        (labels::HEALTH_TIMEOUT, spec.timeout_ms),
    ] {
        if v == Some(0) {
            return Err(bad(label, "0", "must be at least 1"));
        }
    }
    for (label, v) in [
        (labels::HEALTH_HEALTHY, spec.healthy),
        (labels::HEALTH_UNHEALTHY, spec.unhealthy),
    ] {
        if v == Some(0) {
            return Err(bad(label, "0", "must be at least 1"));
        }
    }
    Ok(spec)
}

/// What the agent's config lets *labelled* containers do: containers that
/// ask to join a service by their labels but are not pods pier started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LabelPolicy<'a> {
    /// The namespaces they may join; `*` is every namespace.
    pub namespaces: &'a [String],
    /// Whether `pier.health=none` (ready at once, never checked) is allowed.
    pub allow_health_none: bool,
}

impl LabelPolicy<'_> {
    fn namespace_open(&self, ns: &Namespace) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == ns.as_str())
    }
}

/// Whether a container is one of pier's own pods on `node`: its pod labels
/// name this node and its name is the one pier gives the pod's container
/// (Docker's names are unique, so no second container can carry it).
pub(crate) fn is_own_pod(container_name: &str, spec: &Spec, node: &Name) -> bool {
    match (&spec.pod, &spec.node) {
        (Some(pod), Some(n)) if n == node => {
            container_name == pod_container_name(&spec.namespace, pod)
        }
        _ => false,
    }
}

/// The container name of a pod.
pub(crate) fn pod_container_name(ns: &Namespace, pod: &Name) -> String {
    format!("pier-{ns}-{pod}")
}

/// Why a labelled container may join no service at all, for a person, or
/// `None` when the policy lets it ask.
pub(crate) fn refuse_labelled(spec: &Spec, policy: &LabelPolicy<'_>) -> Option<String> {
    if !policy.namespace_open(&spec.namespace) {
        return Some(format!(
            "namespace {} is closed to labelled containers; list it in [agent] label_namespaces",
            spec.namespace
        ));
    }
    if spec.health == Some(HealthKind::None) && !policy.allow_health_none {
        return Some(
            "pier.health=none would make it ready unchecked; give it a tcp or http check, or set [agent] allow_health_none = true"
                .into(),
        );
    }
    None
}

/// Whether `svc` asks for this container: it names the service in
/// `pier.service`, or the service's non-empty selector is a subset of its
/// labels (in the same namespace).
pub(crate) fn matches(svc: &Service, spec: &Spec, l: &Labels) -> bool {
    svc.namespace == spec.namespace
        && (spec.service.as_ref() == Some(&svc.name)
            || (!svc.selector.is_empty() && svc.selector.iter().all(|(k, v)| l.get(k) == Some(v))))
}

/// Whether `svc` takes a container it [`matches`]: pier's own pods always;
/// a labelled container only when the service has no selector (it is made
/// of labelled containers) or opts in with `accept_labelled`.
pub(crate) fn takes(svc: &Service, own_pod: bool) -> bool {
    own_pod || svc.selector.is_empty() || svc.accept_labelled
}

/// Whether a container is an endpoint of `svc` (the agent asks
/// [`matches`] and [`takes`] apart, to say why it refuses).
#[cfg(test)]
pub(crate) fn is_member(svc: &Service, spec: &Spec, l: &Labels, own_pod: bool) -> bool {
    matches(svc, spec, l) && takes(svc, own_pod)
}

/// The endpoint ports of a container for a service.
///
/// A named port (`pier.ports=http:8080`) keeps its name. An unnamed one
/// (`pier.port=8080`) takes the name of the service port that targets it,
/// else `p<port>` (`p8080`; `p53-udp` for UDP), which is also the name an
/// auto-created service gives it.
pub(crate) fn endpoint_ports(spec: &Spec, svc: Option<&Service>) -> Vec<EndpointPort> {
    spec.ports
        .iter()
        .map(|p| {
            let name = match &p.name {
                Some(n) => n.clone(),
                None => svc
                    .and_then(|s| {
                        s.ports
                            .iter()
                            .find(|sp| sp.target_port == p.port && sp.protocol == p.protocol)
                    })
                    .map(|sp| sp.name.clone())
                    .unwrap_or_else(|| p.protocol.default_port_name(p.port)),
            };
            EndpointPort {
                name,
                port: p.port,
                protocol: p.protocol,
            }
        })
        .collect()
}

/// The health check for a container: its labels, then the defaults
/// (Docker's own status where the image has a HEALTHCHECK, else TCP on the
/// first port, else none). `fallback_port` is the first target port of a
/// service the container belongs to, for containers without port labels.
pub(crate) fn health_check(
    spec: &Spec,
    image_has_healthcheck: bool,
    has_port: bool,
    interval_ms: u64,
    timeout_ms: u64,
) -> HealthCheck {
    let kind = spec.health.clone().unwrap_or(if image_has_healthcheck {
        HealthKind::Docker
    } else if has_port {
        HealthKind::Tcp
    } else {
        HealthKind::None
    });
    HealthCheck {
        kind,
        interval_ms: spec.interval_ms.unwrap_or(interval_ms),
        timeout_ms: spec.timeout_ms.unwrap_or(timeout_ms),
        healthy_threshold: spec.healthy.unwrap_or(HealthCheck::default_healthy()),
        unhealthy_threshold: spec.unhealthy.unwrap_or(HealthCheck::default_unhealthy()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lbl(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn prefer_local_label() {
        let base = [("pier.service", "web"), ("pier.port", "80")];
        assert!(!parse(&lbl(&base)).unwrap().prefer_local);
        let mut on = base.to_vec();
        on.push(("pier.prefer-local", "true"));
        assert!(parse(&lbl(&on)).unwrap().prefer_local);
        let mut bad_value = base.to_vec();
        bad_value.push(("pier.prefer-local", "yes"));
        let e = parse(&lbl(&bad_value)).unwrap_err();
        assert_eq!(e.label, "pier.prefer-local");
        assert!(e.to_string().contains("true or false"), "{e}");
    }

    #[test]
    fn headless_label() {
        let base = [("pier.service", "peers"), ("pier.port", "8080")];
        assert!(!parse(&lbl(&base)).unwrap().headless);
        let mut on = base.to_vec();
        on.push(("pier.headless", " true"));
        assert!(parse(&lbl(&on)).unwrap().headless);
        let mut off = base.to_vec();
        off.push(("pier.headless", "false"));
        assert!(!parse(&lbl(&off)).unwrap().headless);
        let mut bad_value = base.to_vec();
        bad_value.push(("pier.headless", "1"));
        let e = parse(&lbl(&bad_value)).unwrap_err();
        assert_eq!(e.label, "pier.headless");
        assert!(e.to_string().contains("true or false"), "{e}");
    }

    #[test]
    fn parses_service_and_ports() {
        let s = parse(&lbl(&[
            ("pier.service", "web"),
            ("pier.ports", "http:8080, admin:9000"),
            ("pier.health", "http:/healthz"),
        ]))
        .unwrap();
        assert_eq!(s.service.unwrap().as_str(), "web");
        assert_eq!(s.namespace.as_str(), "default");
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[1].name.as_ref().unwrap().as_str(), "admin");
        assert_eq!(
            s.health,
            Some(HealthKind::Http {
                path: "/healthz".into()
            })
        );
    }

    #[test]
    fn udp_ports_from_labels() {
        let s = parse(&lbl(&[
            ("pier.service", "dns"),
            ("pier.ports", "dns:53/udp, dns-tcp:53"),
        ]))
        .unwrap();
        let p = endpoint_ports(&s, None);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].name.as_str(), p[0].protocol),
            ("dns", pier_model::Protocol::Udp)
        );
        assert_eq!(
            (p[1].name.as_str(), p[1].protocol),
            ("dns-tcp", pier_model::Protocol::Tcp)
        );
        // Unnamed: TCP and UDP share the number under two names.
        let s = parse(&lbl(&[
            ("pier.service", "dns"),
            ("pier.ports", "53"),
            ("pier.port", "53/udp"),
        ]))
        .unwrap();
        let names: Vec<_> = endpoint_ports(&s, None)
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        assert_eq!(names, ["p53", "p53-udp"]);
        // A UDP-only container has no TCP port to check: no default check.
        let s = parse(&lbl(&[("pier.service", "dns"), ("pier.port", "53/udp")])).unwrap();
        assert_eq!(
            health_check(&s, false, false, 1000, 1000).kind,
            HealthKind::None
        );
        for (k, v) in [
            ("pier.port", "53/sctp"),
            ("pier.port", "dns:53/udp"),
            ("pier.ports", "dns:53/udp,dns:54"),
        ] {
            let e = parse(&lbl(&[("pier.service", "dns"), (k, v)])).unwrap_err();
            assert_eq!(e.label, k, "{e}");
        }
    }

    #[test]
    fn bad_labels_name_the_label() {
        for (k, v) in [
            ("pier.port", "http"),
            ("pier.port", "70000"),
            ("pier.health", "grpc"),
            ("pier.service", "Web_1"),
            ("pier.ports", "http:x"),
            ("pier.health.interval-ms", "soon"),
        ] {
            let e = parse(&lbl(&[("pier.service", "web"), (k, v)])).unwrap_err();
            assert_eq!(e.label, k, "{e}");
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    #[test]
    fn unnamed_port_takes_service_port_name() {
        let s = parse(&lbl(&[("pier.service", "web"), ("pier.port", "8080")])).unwrap();
        let p = endpoint_ports(&s, None);
        assert_eq!(p[0].name.as_str(), "p8080");
        let svc: Service = serde_json::from_str(
            r#"{"name":"web","ports":[{"name":"http","port":80,"target_port":8080}]}"#,
        )
        .unwrap();
        let p = endpoint_ports(&s, Some(&svc));
        assert_eq!(p[0].name.as_str(), "http");
        assert!(is_member(&svc, &s, &lbl(&[]), false));
    }

    #[test]
    fn selector_membership_needs_all_labels_and_namespace() {
        let svc: Service = serde_json::from_str(
            r#"{"name":"api","ports":[],"selector":{"pier.replicaset":"api","tier":"a"}}"#,
        )
        .unwrap();
        let l = lbl(&[("pier.replicaset", "api"), ("tier", "a")]);
        let s = parse(&l).unwrap();
        assert!(is_member(&svc, &s, &l, true));
        let l2 = lbl(&[("pier.replicaset", "api")]);
        assert!(!is_member(&svc, &parse(&l2).unwrap(), &l2, true));
        let l3 = lbl(&[
            ("pier.replicaset", "api"),
            ("tier", "a"),
            ("pier.namespace", "x"),
        ]);
        assert!(!is_member(&svc, &parse(&l3).unwrap(), &l3, true));
    }

    /// The label attacks of issue 12 (M3), as the pure rules see them.
    #[test]
    fn labelled_containers_are_held_to_the_policy() {
        let me = Name::new("n1").unwrap();
        let policy = LabelPolicy {
            namespaces: &["default".to_owned()],
            allow_health_none: false,
        };
        // A selector service made by `pier expose rs api`.
        let api: Service = serde_json::from_str(
            r#"{"name":"api","ports":[],"selector":{"pier.replicaset":"api"}}"#,
        )
        .unwrap();
        // 1. A container that copies a pod's labels but is not pier's pod
        //    container (its name differs) is not taken by the selector...
        let forged = lbl(&[
            ("pier.replicaset", "api"),
            ("pier.pod", "api-x1"),
            ("pier.node", "n1"),
        ]);
        let fs = parse(&forged).unwrap();
        assert!(!is_own_pod("evil", &fs, &me));
        assert!(matches(&api, &fs, &forged) && !is_member(&api, &fs, &forged, false));
        // ...while pier's own pod container is.
        assert!(is_own_pod("pier-default-api-x1", &fs, &me));
        assert!(is_member(&api, &fs, &forged, true));
        // A pod container of another node is not this node's own pod.
        assert!(!is_own_pod(
            "pier-default-api-x1",
            &fs,
            &Name::new("n2").unwrap()
        ));
        // 2. Naming a pod-backed service in pier.service does not get in either.
        let named = lbl(&[("pier.service", "api"), ("pier.port", "80")]);
        let ns = parse(&named).unwrap();
        assert!(matches(&api, &ns, &named) && !is_member(&api, &ns, &named, false));
        // The service can opt in.
        let open = Service {
            accept_labelled: true,
            ..api.clone()
        };
        assert!(is_member(&open, &ns, &named, false));
        // A service without a selector is made of labelled containers.
        let plain: Service = serde_json::from_str(r#"{"name":"api","ports":[]}"#).unwrap();
        assert!(is_member(&plain, &ns, &named, false));
        // 3. Another namespace is closed by default.
        let other = lbl(&[("pier.service", "db"), ("pier.namespace", "prod")]);
        let why = refuse_labelled(&parse(&other).unwrap(), &policy).unwrap();
        assert!(
            why.contains("namespace prod") && why.contains("label_namespaces"),
            "{why}"
        );
        let all = LabelPolicy {
            namespaces: &["*".to_owned()],
            ..policy
        };
        assert_eq!(refuse_labelled(&parse(&other).unwrap(), &all), None);
        // 4. pier.health=none is refused unless allowed.
        let unchecked = lbl(&[("pier.service", "web"), ("pier.health", "none")]);
        let why = refuse_labelled(&parse(&unchecked).unwrap(), &policy).unwrap();
        assert!(
            why.contains("pier.health=none") && why.contains("allow_health_none"),
            "{why}"
        );
        let lax = LabelPolicy {
            allow_health_none: true,
            ..policy
        };
        assert_eq!(refuse_labelled(&parse(&unchecked).unwrap(), &lax), None);
        // A checked container in the default namespace may ask.
        assert_eq!(refuse_labelled(&ns, &policy), None);
    }

    #[test]
    fn default_health() {
        let s = parse(&lbl(&[("pier.service", "web")])).unwrap();
        assert_eq!(
            health_check(&s, true, true, 500, 1000).kind,
            HealthKind::Docker
        );
        assert_eq!(
            health_check(&s, false, true, 500, 1000).kind,
            HealthKind::Tcp
        );
        assert_eq!(
            health_check(&s, false, false, 500, 1000).kind,
            HealthKind::None
        );
    }
}
