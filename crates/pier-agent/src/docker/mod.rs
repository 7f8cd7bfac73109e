//! Everything that talks to dockerd: the connection with reconnect and
//! backoff, the event stream, inspects, networks, and pod containers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, EventMessage,
    HealthConfig, HealthStatusEnum, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, ListContainersOptions,
    ListNetworksOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures::StreamExt;
use pier_model::{Cidr, Labels, Pod, labels};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::AgentError;

/// What the connection task tells the agent.
#[derive(Debug)]
pub(crate) enum DockerMsg {
    /// Connected (again): resync with this client.
    Up(Docker),
    /// The connection or the event stream broke; reconnecting.
    Down(String),
    Event(Box<EventMessage>),
}

/// The first reconnect delay, doubled up to [`BACKOFF_MAX`]: dockerd starts
/// in under a second here, so the first retries come quickly.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The network events the agent follows: a network enters the DNS ACL at
/// its `create` (or, should that be missed, the first `connect`), before
/// any container on it runs, and leaves it at `destroy`.
pub(crate) const NETWORK_EVENTS: &[&str] = &["create", "connect", "destroy"];

pub(crate) fn label_filters(filter: &Labels) -> HashMap<String, Vec<String>> {
    let mut f = HashMap::new();
    if !filter.is_empty() {
        f.insert(
            "label".to_owned(),
            filter.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
    }
    f
}

/// Connect through `DOCKER_HOST` (or the default socket) and negotiate the
/// API version (Debian's dockerd serves 1.41 at most).
pub(crate) async fn connect() -> Result<Docker, AgentError> {
    let d = Docker::connect_with_defaults().map_err(|source| AgentError::Docker {
        what: "connect".into(),
        source,
    })?;
    d.negotiate_version()
        .await
        .map_err(|source| AgentError::Docker {
            what: "negotiate the API version".into(),
            source,
        })
}

/// Keep a connection and an event stream (filtered by label on the server)
/// open until cancelled, reconnecting with backoff.
pub(crate) async fn connection_loop(
    filter: Labels,
    tx: mpsc::Sender<DockerMsg>,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let res = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect() => r,
        };
        match res {
            Ok(d) => {
                backoff = BACKOFF_MIN;
                // Containers, filtered by label on the server; networks,
                // all of them (the DNS ACL follows every network, and a
                // network's labels are not the containers'). Two streams
                // because Docker ANDs its filter keys.
                let mut filters = label_filters(&filter);
                filters.insert("type".into(), vec!["container".into()]);
                // Replay from a second before the resync's list, so an event
                // between the list and the stream's start is not lost.
                let since = (pier_model::now_ms() / 1000 - 1).to_string();
                let containers = d.events(Some(EventsOptions {
                    since: Some(since.clone()),
                    until: None,
                    filters: Some(filters),
                }));
                let networks = d.events(Some(EventsOptions {
                    since: Some(since),
                    until: None,
                    filters: Some(HashMap::from([
                        ("type".to_owned(), vec!["network".to_owned()]),
                        (
                            "event".to_owned(),
                            NETWORK_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
                        ),
                    ])),
                }));
                let mut events = Box::pin(futures::stream::select(containers, networks));
                if tx.send(DockerMsg::Up(d.clone())).await.is_err() {
                    return;
                }
                let why = loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        ev = events.next() => match ev {
                            Some(Ok(ev)) => {
                                if tx.send(DockerMsg::Event(Box::new(ev))).await.is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => break format!("event stream failed: {e}"),
                            None => break "event stream ended".to_owned(),
                        },
                    }
                };
                tracing::warn!(error = %why, "lost dockerd; reconnecting");
                if tx.send(DockerMsg::Down(why)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach dockerd");
            }
        }
        let jitter = Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 4));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// What the agent keeps of one container.
#[derive(Debug, Clone)]
pub(crate) struct Container {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub running: bool,
    /// Excluded from endpoints until the next inspect: paused, or a `kill`
    /// event was seen.
    pub held: bool,
    pub ip: Option<IpAddr>,
    pub hostname: Option<String>,
    pub image_has_healthcheck: bool,
    /// Docker's health status: `Some(true)` healthy.
    pub docker_healthy: Option<bool>,
    pub started_at_ms: Option<u64>,
    pub exit_code: Option<i64>,
    pub error: String,
    pub restarts: u32,
}

impl Container {
    /// The 12 hex digits Docker itself shows.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

/// Build a [`Container`] from an inspect. `pod_network` is preferred when
/// the container is on several networks; otherwise the first network by
/// name that gave it an address. A host-network container gets `host_ip`.
pub(crate) fn from_inspect(
    i: ContainerInspectResponse,
    pod_network: Option<&str>,
    host_ip: IpAddr,
) -> Option<Container> {
    let id = i.id?;
    let config = i.config.unwrap_or_default();
    let state = i.state.unwrap_or_default();
    let running = state.running.unwrap_or(false)
        || matches!(state.status, Some(ContainerStateStatusEnum::RUNNING));
    let paused = state.paused.unwrap_or(false);
    let nets = i
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    let mut names: Vec<&String> = nets.keys().collect();
    names.sort();
    if let Some(p) = pod_network
        && let Some(pos) = names.iter().position(|n| n.as_str() == p)
    {
        let n = names.remove(pos);
        names.insert(0, n);
    }
    let mut ip = names.iter().find_map(|n| {
        nets.get(*n)
            .and_then(|e| e.ip_address.as_deref())
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse::<IpAddr>().ok())
    });
    let host_mode = i
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("host");
    if ip.is_none() && host_mode {
        ip = Some(host_ip);
    }
    let image_has_healthcheck = config
        .healthcheck
        .as_ref()
        .and_then(|h| h.test.as_ref())
        .is_some_and(|t| !t.is_empty() && t[0] != "NONE");
    let docker_healthy = state.health.as_ref().and_then(|h| match h.status {
        Some(HealthStatusEnum::HEALTHY) => Some(true),
        Some(HealthStatusEnum::UNHEALTHY) | Some(HealthStatusEnum::STARTING) => Some(false),
        _ => None,
    });
    Some(Container {
        name: i
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| id[..id.len().min(12)].to_owned()),
        id,
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        running: running && !paused,
        held: false,
        ip,
        hostname: config.hostname.filter(|h| !h.is_empty()),
        image_has_healthcheck,
        docker_healthy,
        started_at_ms: state.started_at.as_deref().and_then(parse_rfc3339_ms),
        exit_code: state.exit_code,
        error: state.error.unwrap_or_default(),
        restarts: i.restart_count.unwrap_or(0).max(0) as u32,
    })
}

/// Inspect one container; `Ok(None)` when it is gone.
pub(crate) async fn inspect(
    d: &Docker,
    id: &str,
    pod_network: Option<&str>,
    host_ip: IpAddr,
) -> Result<Option<Container>, AgentError> {
    match d.inspect_container(id, None).await {
        Ok(i) => Ok(from_inspect(i, pod_network, host_ip)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(source) => Err(AgentError::Docker {
            what: format!("inspect container {id}"),
            source,
        }),
    }
}

/// Every container carrying the filter labels that matters: running ones,
/// and any (even exited) that pier started on `node`.
pub(crate) async fn list(
    d: &Docker,
    filter: &Labels,
    node: &str,
    pod_network: Option<&str>,
    host_ip: IpAddr,
) -> Result<HashMap<String, Container>, AgentError> {
    let summaries = d
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(label_filters(filter)),
            ..Default::default()
        }))
        .await
        .map_err(|source| AgentError::Docker {
            what: "list containers".into(),
            source,
        })?;
    let ids: Vec<String> = summaries
        .into_iter()
        .filter(|s| {
            let live = matches!(
                s.state.as_ref().map(|x| x.to_string()).as_deref(),
                Some("running" | "paused" | "restarting")
            );
            let mine = s
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::NODE))
                .is_some_and(|n| n == node);
            live || mine
        })
        .filter_map(|s| s.id)
        .collect();
    let results: Vec<_> = futures::stream::iter(ids)
        .map(|id| async move { inspect(d, &id, pod_network, host_ip).await })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut out = HashMap::new();
    for r in results {
        if let Some(c) = r? {
            out.insert(c.id.clone(), c);
        }
    }
    Ok(out)
}

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
const LAN_DRIVERS: &[&str] = &["macvlan", "ipvlan"];

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

fn subnets(ipam: Option<&bollard::models::Ipam>) -> Vec<Cidr> {
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

/// How a pod container is made.
#[derive(Debug, Clone)]
pub(crate) struct PodSettings {
    pub node: String,
    pub extra_labels: Labels,
    pub network: Option<String>,
    pub registry: Option<String>,
    pub dns: Option<IpAddr>,
    pub dns_search: Vec<String>,
}

/// The container name of a pod.
pub(crate) fn pod_container_name(pod: &Pod) -> String {
    crate::spec::pod_container_name(&pod.namespace, &pod.name)
}

/// The DNS search list of a pod: every entry that starts with the default
/// namespace's label gets the pod's namespace instead, so
/// `default.svc.pier.internal` becomes `<ns>.svc.pier.internal`.
pub(crate) fn dns_search_for(ns: &str, base: &[String]) -> Vec<String> {
    let prefix = format!("{}.", pier_model::DEFAULT_NAMESPACE);
    base.iter()
        .map(|d| match d.strip_prefix(&prefix) {
            Some(rest) => format!("{ns}.{rest}"),
            None => d.clone(),
        })
        .collect()
}

/// The labels of a pod container: the template's, then the configured
/// extra ones, then pier's own (which win).
pub(crate) fn pod_labels(pod: &Pod, s: &PodSettings) -> Labels {
    let mut l = pod.template.labels.clone();
    l.extend(s.extra_labels.clone());
    l.remove(labels::SERVICE);
    l.insert(labels::POD.into(), pod.name.to_string());
    l.insert(labels::REPLICASET.into(), pod.replicaset.to_string());
    l.insert(labels::NAMESPACE.into(), pod.namespace.to_string());
    l.insert(labels::NODE.into(), s.node.clone());
    l.insert(labels::TEMPLATE_HASH.into(), pod.template_hash.clone());
    if !pod.template.ports.is_empty() {
        let ports: Vec<String> = pod
            .template
            .ports
            .iter()
            .map(|p| pier_model::PortSpec::from(p).to_string())
            .collect();
        l.insert(labels::PORTS.into(), ports.join(","));
    }
    if let Some(h) = &pod.template.health {
        l.insert(labels::HEALTH.into(), h.kind.to_string());
        l.insert(labels::HEALTH_INTERVAL.into(), h.interval_ms.to_string());
        l.insert(labels::HEALTH_TIMEOUT.into(), h.timeout_ms.to_string());
        l.insert(
            labels::HEALTH_HEALTHY.into(),
            h.healthy_threshold.to_string(),
        );
        l.insert(
            labels::HEALTH_UNHEALTHY.into(),
            h.unhealthy_threshold.to_string(),
        );
    }
    l
}

/// Compose's `healthcheck` as Docker's: durations in nanoseconds, 0 (or an
/// empty test) for the image's own.
fn health_config(h: &pier_model::ContainerHealth) -> HealthConfig {
    let ns = |ms: u64| (ms > 0).then(|| (ms.min(i64::MAX as u64 / 1_000_000) * 1_000_000) as i64);
    HealthConfig {
        test: (!h.test.is_empty()).then(|| h.test.clone()),
        interval: ns(h.interval_ms),
        timeout: ns(h.timeout_ms),
        retries: (h.retries > 0).then_some(i64::from(h.retries)),
        start_period: ns(h.start_period_ms),
        start_interval: None,
    }
}

fn image_in_registry(image: &str, registry: &str) -> String {
    let first = image.split('/').next().unwrap_or("");
    if image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        image.to_owned()
    } else {
        format!("{}/{image}", registry.trim_end_matches('/'))
    }
}

/// Why a pod could not be started; its text is the pod's status message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PodError {
    #[error(
        "image {image} not found locally; load it with `docker load` or `docker import`, or configure a registry in the agent config"
    )]
    NoImage { image: String },
    #[error("pulling image {image} failed: {source}")]
    Pull {
        image: String,
        source: bollard::errors::Error,
    },
    #[error("inspecting image {image} failed: {source}")]
    InspectImage {
        image: String,
        source: bollard::errors::Error,
    },
    #[error("container {name} exists but cannot be inspected: {source}")]
    InspectExisting {
        name: String,
        source: bollard::errors::Error,
    },
    #[error("a container named {name} already exists and is not this pod's; remove it")]
    NameTaken { name: String },
    #[error("container {name} has no id")]
    NoId { name: String },
    #[error("creating container {name} failed: {source}")]
    Create {
        name: String,
        source: bollard::errors::Error,
    },
    #[error("starting container {name} failed: {source}")]
    Start {
        name: String,
        source: bollard::errors::Error,
    },
}

/// Make a pod's container exist and start it. Returns the container id.
pub(crate) async fn start_pod(d: &Docker, pod: &Pod, s: &PodSettings) -> Result<String, PodError> {
    let mut image = pod.template.image.clone();
    match d.inspect_image(&image).await {
        Ok(_) => {}
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => match &s.registry {
            None => {
                return Err(PodError::NoImage { image });
            }
            Some(reg) => {
                image = image_in_registry(&image, reg);
                let mut pull = d.create_image(
                    Some(CreateImageOptions {
                        from_image: Some(image.clone()),
                        ..Default::default()
                    }),
                    None,
                    None,
                );
                while let Some(r) = pull.next().await {
                    if let Err(source) = r {
                        return Err(PodError::Pull { image, source });
                    }
                }
            }
        },
        Err(source) => return Err(PodError::InspectImage { image, source }),
    }
    let name = pod_container_name(pod);
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        hostname: Some(pod.name.to_string()),
        env: Some(
            pod.template
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        cmd: (!pod.template.cmd.is_empty()).then(|| pod.template.cmd.clone()),
        entrypoint: (!pod.template.entrypoint.is_empty()).then(|| pod.template.entrypoint.clone()),
        healthcheck: pod.template.container_health.as_ref().map(health_config),
        exposed_ports: (!pod.template.ports.is_empty()).then(|| {
            pod.template
                .ports
                .iter()
                .map(|p| format!("{}/tcp", p.port.get()))
                .collect()
        }),
        labels: Some(pod_labels(pod, s).into_iter().collect()),
        host_config: Some(HostConfig {
            // httpd as PID 1 ignores SIGTERM: with an init a stop takes
            // 0.1 s instead of the whole stop timeout.
            init: Some(true),
            network_mode: s.network.clone(),
            dns: s.dns.map(|ip| vec![ip.to_string()]),
            dns_search: (!s.dns_search.is_empty())
                .then(|| dns_search_for(pod.namespace.as_str(), &s.dns_search)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = match d
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
    {
        Ok(r) => r.id,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => {
            // A container of that name exists: adopt it only if it is this
            // pod's on this node.
            let i = d.inspect_container(&name, None).await.map_err(|source| {
                PodError::InspectExisting {
                    name: name.clone(),
                    source,
                }
            })?;
            let l = i
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .cloned()
                .unwrap_or_default();
            let ours = l.get(labels::POD).map(String::as_str) == Some(pod.name.as_str())
                && l.get(labels::NODE) == Some(&s.node);
            if !ours {
                return Err(PodError::NameTaken { name });
            }
            i.id.ok_or_else(|| PodError::NoId { name: name.clone() })?
        }
        Err(source) => return Err(PodError::Create { name, source }),
    };
    match d.start_container(&id, None).await {
        Ok(()) => Ok(id),
        // 304: already started.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(id),
        Err(source) => Err(PodError::Start { name, source }),
    }
}

/// Stop (gracefully, 10 s) and remove a pod container.
pub(crate) async fn remove_pod_container(d: &Docker, id: &str) -> Result<(), AgentError> {
    match d
        .stop_container(
            id,
            Some(StopContainerOptions {
                t: Some(10),
                signal: None,
            }),
        )
        .await
    {
        Ok(()) => {}
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304 | 404,
            ..
        }) => {}
        Err(source) => {
            return Err(AgentError::Docker {
                what: format!("stop container {id}"),
                source,
            });
        }
    }
    match d
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
    {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(source) => Err(AgentError::Docker {
            what: format!("remove container {id}"),
            source,
        }),
    }
}

/// Parse Docker's RFC 3339 timestamps (`2026-11-25T22:40:44.123456789Z`)
/// to Unix milliseconds. Docker's zero time (year 1) gives `None`.
pub(crate) fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if y < 1971 {
        return None;
    }
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
        rest = &r[digits.len()..];
        let mut d3: String = digits.chars().take(3).collect();
        while d3.len() < 3 {
            d3.push('0');
        }
        ms = d3.parse().ok()?;
    }
    let offset_s = match rest {
        "Z" | "" => 0,
        _ => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-02T00:00:00Z"), None);
        assert_eq!(
            parse_rfc3339_ms("2026-11-25T22:40:44.123456789Z"),
            Some(1_795_646_444_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-25T23:40:44+01:00"),
            Some(1_795_646_444_000)
        );
        assert_eq!(parse_rfc3339_ms("0001-01-01T00:00:00Z"), None);
    }

    #[test]
    fn dns_search_gets_the_namespace() {
        let base = vec![
            "default.svc.pier.internal".to_owned(),
            "svc.pier.internal".to_owned(),
        ];
        assert_eq!(
            dns_search_for("prod", &base),
            vec!["prod.svc.pier.internal", "svc.pier.internal"]
        );
    }

    #[test]
    fn registry_prefix() {
        assert_eq!(
            image_in_registry("web:1", "reg.local:5000"),
            "reg.local:5000/web:1"
        );
        assert_eq!(
            image_in_registry("reg.x/web:1", "reg.local:5000"),
            "reg.x/web:1"
        );
    }

    /// Issue 12 (D1): a macvlan or ipvlan network's subnet is usually the
    /// LAN, so the DNS ACL does not take it in; a bridge's subnet it does.
    /// (This kernel cannot create such networks, so the driver is judged
    /// as dockerd reports it.)
    #[test]
    fn lan_driver_networks_are_not_trusted() {
        let ipam = bollard::models::Ipam {
            config: Some(vec![bollard::models::IpamConfig {
                subnet: Some("192.168.1.0/24".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        for driver in ["macvlan", "ipvlan"] {
            let n = net(Some(driver), Some(&ipam));
            assert!(n.subnets.is_empty(), "{driver}: {n:?}");
            assert_eq!(n.lan_driver.as_deref(), Some(driver));
        }
        for driver in [Some("bridge"), Some("overlay"), None] {
            let n = net(driver, Some(&ipam));
            assert_eq!(n.subnets, vec!["192.168.1.0/24".parse::<Cidr>().unwrap()]);
            assert_eq!(n.lan_driver, None);
        }
        let all: HashMap<String, Net> = [
            ("a".to_owned(), net(Some("bridge"), Some(&ipam))),
            ("b".to_owned(), net(Some("macvlan"), Some(&ipam))),
        ]
        .into();
        assert_eq!(all_subnets(&all).len(), 1);
    }
}
