//! `pier scale rs`: change a replica set's replica count.

use anyhow::Result;
use pier_model::api::{Resource, ScaleRequest};

use super::args::{NamespaceArg, WaitArgs, client, name_arg, replicas_arg, resource_arg, usage};
use super::wait;

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// The kind: rs.
    pub(super) kind: String,
    /// The replica set.
    pub(super) name: String,
    /// The new replica count, 0 to 1000.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub(super) replicas: String,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
    #[command(flatten)]
    pub(super) wait: WaitArgs,
}

pub(super) async fn run(server: &str, a: ScaleArgs) -> Result<()> {
    match resource_arg(&a.kind)? {
        Resource::ReplicaSets => {}
        other => {
            return usage(format!("cannot scale {other}; only rs (replicasets) scale"));
        }
    }
    let name = name_arg("replica set name", &a.name)?;
    let namespace = a.namespace.get()?;
    let replicas = replicas_arg(&a.replicas)?;
    let c = client(server)?;
    c.scale_replicaset(
        &namespace,
        &name,
        &ScaleRequest {
            replicas: Some(replicas),
            delta: None,
        },
    )
    .await?;
    outln!("replicaset/{name} scaled to {replicas}");
    if a.wait.wait {
        wait::until_ready(
            &c,
            &namespace,
            &name,
            a.wait.timeout,
            wait::OnStoppedRollout::Wait,
        )
        .await?;
    }
    Ok(())
}
