//! `pier autoscale rs`: scale a replica set on the measurements of pier's
//! own proxies, between `--min` and `--max` replicas.

use std::time::Duration;

use anyhow::Result;
use pier_model::Sla;
use pier_model::api::{AutoscaleRequest, Resource};

use super::args::{NamespaceArg, client, name_arg, parse_duration, resource_arg, usage};

#[derive(Debug, clap::Args)]
pub struct AutoscaleArgs {
    /// The kind: rs.
    pub(super) kind: String,
    /// The replica set.
    pub(super) name: String,
    /// The fewest replicas.
    #[arg(long, value_name = "N")]
    pub(super) min: Option<String>,
    /// The most replicas.
    #[arg(long, value_name = "M")]
    pub(super) max: Option<String>,
    /// Target: at most K open connections per ready pod.
    #[arg(long, value_name = "K")]
    pub(super) max_active_per_pod: Option<u32>,
    /// Target: at most R new connections per second per ready pod.
    #[arg(long, value_name = "R")]
    pub(super) max_conn_rate_per_pod: Option<u32>,
    /// Target: p99 time to first response byte, over all nodes' traffic
    /// (50ms, 1s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(super) p99_first_byte: Option<Duration>,
    /// Scale down only to the highest recommendation of this window.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "30s")]
    pub(super) scale_down_delay: Duration,
    /// Scale up only when the whole window asked for more (0s: at once).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "0s")]
    pub(super) scale_up_delay: Duration,
    /// At most this many pods added or removed per decision (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(super) max_step: u32,
    /// Turn autoscaling off; the count stays where it is.
    #[arg(long, conflicts_with_all = ["min", "max", "max_active_per_pod", "max_conn_rate_per_pod", "p99_first_byte"])]
    pub(super) off: bool,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

pub(super) async fn run(server: &str, a: AutoscaleArgs) -> Result<()> {
    match resource_arg(&a.kind)? {
        Resource::ReplicaSets => {}
        other => return usage(format!("cannot autoscale {other}; only rs (replicasets)")),
    }
    let name = name_arg("replica set name", &a.name)?;
    let namespace = a.namespace.get()?;
    let c = client(server)?;
    if a.off {
        c.autoscale_replicaset(&namespace, &name, None).await?;
        outln!("replicaset/{name} autoscaling off");
        return Ok(());
    }
    let req = request(&a)?;
    c.autoscale_replicaset(&namespace, &name, Some(&req))
        .await?;
    outln!(
        "replicaset/{name} autoscaled between {} and {} replicas",
        req.min,
        req.max
    );
    Ok(())
}

fn request(a: &AutoscaleArgs) -> Result<AutoscaleRequest> {
    let (Some(min), Some(max)) = (&a.min, &a.max) else {
        return usage("--min and --max are needed (or --off)");
    };
    let min = min.parse().or_else(|e| usage(format!("--min: {e}")))?;
    let max = max.parse().or_else(|e| usage(format!("--max: {e}")))?;
    if min > max {
        return usage(format!("--min {min} is above --max {max}"));
    }
    let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
    let p99 = match a.p99_first_byte {
        Some(d) if d.as_millis() == 0 => {
            return usage("--p99-first-byte: give at least 1ms");
        }
        Some(d) => Some(u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        None => None,
    };
    let sla = Sla {
        max_active_per_pod: a.max_active_per_pod,
        max_conn_rate_per_pod: a.max_conn_rate_per_pod,
        p99_first_byte_ms: p99,
        scale_up_window_ms: ms(a.scale_up_delay),
        scale_down_window_ms: ms(a.scale_down_delay),
        max_step: a.max_step,
        ..Default::default()
    };
    if !sla.has_target() {
        return usage(
            "give at least one target: --max-active-per-pod, --max-conn-rate-per-pod or --p99-first-byte",
        );
    }
    Ok(AutoscaleRequest { min, max, sla })
}
