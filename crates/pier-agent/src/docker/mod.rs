//! Everything that talks to dockerd: the connection with reconnect and
//! backoff, the event stream, inspects, networks, and pod containers.
//! Networks are in `network`, pod containers in `pod`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, EventMessage, HealthStatusEnum,
};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures::StreamExt;
use pier_model::{Labels, labels};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::AgentError;

mod network;
mod pod;

pub(crate) use network::{Net, all_subnets, inspect_network, networks};
pub(crate) use pod::{PodError, PodSettings, remove_pod_container, start_pod};

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
/// 1 s: a retry is one connect to a local socket, and every second of
/// backoff after dockerd is back is a second more before the host's pods
/// are started again. With 5 s (as before), a dockerd restart of 3 to 6 s
/// cost up to 3.2 s more in the chaos run (RELIABILITY.md).
const BACKOFF_MAX: Duration = Duration::from_secs(1);
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
    // Per network, its IPv4 address, else its IPv6 one (a network without
    // IPv4, as Docker 26's `--ipv4=false` makes): a pod on an IPv6-only
    // network is an endpoint at its IPv6 address.
    let addr = |s: Option<&str>| {
        s.filter(|s| !s.is_empty())
            .and_then(|s| s.parse::<IpAddr>().ok())
    };
    let mut ip = names.iter().find_map(|n| {
        let e = nets.get(*n)?;
        addr(e.ip_address.as_deref()).or_else(|| addr(e.global_ipv6_address.as_deref()))
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
mod tests;
