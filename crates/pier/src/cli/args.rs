//! What every command shares: usage errors (exit code 2), the `-n` and
//! `--wait` flags, argument parsers, and the API client.

use std::time::Duration;

use anyhow::Result;
use pier_api::Client;
use pier_model::api::Resource;
use pier_model::{Name, Namespace, PortNum, Replicas};

/// A bad argument: exit code 2, like clap's own usage errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

pub(super) fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(Usage(msg.into()).into())
}

// `-n/--namespace NS`, shared by every command that takes a namespace.
#[derive(Debug, clap::Args)]
pub struct NamespaceArg {
    #[arg(
        short = 'n',
        long = "namespace",
        default_value = "default",
        value_name = "NS"
    )]
    pub(super) namespace: String,
}

impl NamespaceArg {
    /// The namespace, validated (a bad one is a usage error).
    pub(super) fn get(&self) -> Result<Namespace> {
        Namespace::new(&self.namespace).or_else(|e| usage(format!("--namespace: {e}")))
    }
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Block until the pods are ready.
    #[arg(long)]
    pub(super) wait: bool,
    /// How long --wait waits: 60s, 2m, 500ms or plain seconds.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub(super) timeout: Duration,
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write 60s, 2m or 500ms"))?;
    Ok(Duration::from_millis(n.saturating_mul(mult_ms)))
}

pub(super) fn name_arg(what: &str, s: &str) -> Result<Name> {
    Name::new(s).or_else(|e| usage(format!("{what}: {e}")))
}

pub(super) fn port_arg(flag: &str, s: &str) -> Result<PortNum> {
    s.parse::<PortNum>()
        .or_else(|e| usage(format!("{flag}: {e}")))
}

/// `[NAME:]P[/udp|/tcp]`.
pub(super) fn port_spec_arg(flag: &str, s: &str) -> Result<pier_model::PortSpec> {
    s.parse::<pier_model::PortSpec>()
        .or_else(|e| usage(format!("{flag} {s}: {e}; write [NAME:]PORT[/udp]")))
}

pub(super) fn replicas_arg(s: &str) -> Result<Replicas> {
    s.parse::<Replicas>()
        .or_else(|e| usage(format!("--replicas: {e}")))
}

pub(super) fn kv_arg(flag: &str, s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => usage(format!("{flag}: {s:?} is not K=V")),
    }
}

/// `pier get rs` and friends: the resource, or a one-line error that lists
/// the valid ones.
pub(super) fn resource_arg(s: &str) -> Result<Resource> {
    Resource::parse(s).map_or_else(
        || {
            usage(format!(
                "unknown resource {s:?}; use one of: {}",
                Resource::VALID
            ))
        },
        Ok,
    )
}

/// The token found by [`super::run`] (see `conn`).
pub(super) static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

pub(super) fn client(server: &str) -> Result<Client> {
    let token = TOKEN.get().cloned().flatten();
    Client::new(server, token).map_err(|e| Usage(format!("--server: {e}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn resources_and_names() {
        assert!(resource_arg("svc").is_ok());
        let e = resource_arg("deployments").unwrap_err().to_string();
        assert!(e.contains("deployments") && e.contains("pods"), "{e}");
        let e = name_arg("replica set name", "Web_1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Web_1") && e.contains("RFC 1123"), "{e}");
        assert!(replicas_arg("1001").is_err());
    }
}
