//! `pier delete`: a pod, a replica set, a service, or an application
//! (`-f FILE` or `app NAME`) with everything it owns.

use anyhow::Result;
use pier_model::api::Resource;

use pier_model::{Name, Namespace};

use super::args::{NamespaceArg, client, name_arg, resource_arg, usage};
use super::compose::{FileArgs, load};
use super::output::print_app_plan;

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// pod, rs, svc or app.
    #[arg(required_unless_present = "files")]
    pub(super) kind: Option<String>,
    #[arg(required_unless_present = "files")]
    pub(super) name: Option<String>,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
    /// Delete the application these Compose files describe (repeat -f as
    /// for apply; `-` reads stdin).
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with_all = ["kind", "name"])]
    pub(super) files: Vec<String>,
    /// With -f: the project name, as for apply.
    #[arg(
        short = 'p',
        long = "project-name",
        value_name = "NAME",
        requires = "files"
    )]
    pub(super) project: Option<String>,
}

pub(super) async fn run(server: &str, a: DeleteArgs) -> Result<()> {
    if !a.files.is_empty() {
        let spec = load(&FileArgs {
            files: a.files,
            project: a.project,
        })?;
        return delete_app(server, &spec.namespace, &spec.name).await;
    }
    let (Some(kind), Some(name)) = (a.kind.as_deref(), a.name.as_deref()) else {
        return usage("delete takes KIND NAME, or -f FILE");
    };
    let namespace = a.namespace.get()?;
    if matches!(kind, "app" | "apps") {
        let name = name_arg("application name", name)?;
        return delete_app(server, &namespace, &name).await;
    }
    let kind = resource_arg(kind)?;
    let name = name_arg(&format!("{} name", kind.singular()), name)?;
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
    outln!("{}/{name} deleted", kind.singular());
    Ok(())
}

async fn delete_app(server: &str, ns: &Namespace, name: &Name) -> Result<()> {
    let c = client(server)?;
    let p = c.delete_app(ns, name).await?;
    print_app_plan(&p, false);
    outln!("app/{name} deleted from namespace {ns}");
    Ok(())
}
