//! Pod containers: the name, labels, DNS search and health check a pod's
//! container gets, starting it (pulling the image when needed) and
//! removing it.

use std::net::IpAddr;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HealthConfig, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures::StreamExt;
use pier_model::{Labels, Pod, labels};

use crate::AgentError;

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
pub(crate) fn health_config(h: &pier_model::ContainerHealth) -> HealthConfig {
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

pub(crate) fn image_in_registry(image: &str, registry: &str) -> String {
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

impl PodError {
    /// dockerd did not answer at all (stopped, restarting, its socket
    /// gone): nothing is wrong with the pod, so it is not failed; it is
    /// started again once dockerd answers.
    pub(crate) fn dockerd_unreachable(&self) -> bool {
        match self {
            PodError::Pull { source, .. }
            | PodError::InspectImage { source, .. }
            | PodError::InspectExisting { source, .. }
            | PodError::Create { source, .. }
            | PodError::Start { source, .. } => unreachable(source),
            PodError::NoImage { .. } | PodError::NameTaken { .. } | PodError::NoId { .. } => false,
        }
    }
}

/// Whether `e` says dockerd could not be reached (no connection made),
/// rather than that it refused or failed a request.
pub(crate) fn unreachable(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    use std::io::ErrorKind;
    match e {
        E::HyperLegacyError { err } => err.is_connect(),
        E::SocketNotFoundError(_) => true,
        E::IOError { err } => matches!(
            err.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::NotFound
        ),
        _ => false,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect(source: bollard::errors::Error) -> PodError {
        PodError::InspectImage {
            image: "x".into(),
            source,
        }
    }

    /// dockerd gone (its socket missing, the connection refused) is not the
    /// pod's failure; dockerd answering with an error is.
    #[test]
    fn dockerd_unreachable_only_when_no_connection_was_made() {
        use bollard::errors::Error as E;
        use std::io::{Error as IoError, ErrorKind};
        assert!(inspect(E::SocketNotFoundError("/run/docker.sock".into())).dockerd_unreachable());
        for kind in [ErrorKind::ConnectionRefused, ErrorKind::NotFound] {
            let err = IoError::new(kind, "x");
            assert!(
                inspect(E::IOError { err }).dockerd_unreachable(),
                "{kind:?}"
            );
        }
        let err = IoError::new(ErrorKind::PermissionDenied, "x");
        assert!(!inspect(E::IOError { err }).dockerd_unreachable());
        let answered = E::DockerResponseServerError {
            status_code: 500,
            message: "boom".into(),
        };
        assert!(!inspect(answered).dockerd_unreachable());
        assert!(!PodError::NoImage { image: "x".into() }.dockerd_unreachable());
    }
}
