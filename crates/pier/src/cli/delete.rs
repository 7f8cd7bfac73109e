//! `pier delete`: a pod, a replica set or a service.

use anyhow::Result;
use pier_model::api::Resource;

use super::args::{NamespaceArg, client, name_arg, resource_arg, usage};

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// pod, rs or svc.
    pub(super) kind: String,
    pub(super) name: String,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

pub(super) async fn run(server: &str, a: DeleteArgs) -> Result<()> {
    let kind = resource_arg(&a.kind)?;
    let name = name_arg(&format!("{} name", kind.singular()), &a.name)?;
    let namespace = a.namespace.get()?;
    let c = client(server)?;
    match kind {
        Resource::Pods => c.delete_pod(&namespace, &name).await?,
        Resource::ReplicaSets => c.delete_replicaset(&namespace, &name).await?,
        Resource::Services => c.delete_service(&namespace, &name).await?,
        other => {
            return usage(format!(
                "cannot delete {other}; delete takes pod, rs or svc"
            ));
        }
    }
    println!("{}/{name} deleted", kind.singular());
    Ok(())
}
