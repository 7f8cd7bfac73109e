//! `pier set image rs NAME IMAGE`: a new image, rolled out under the
//! set's update config.

use anyhow::Result;
use pier_model::api::Resource;

use super::args::{NamespaceArg, client, name_arg, resource_arg, usage};

#[derive(Debug, clap::Subcommand)]
pub enum SetCmd {
    /// Change a replica set's image: a new revision, rolled out step by
    /// step (`pier rollout status rs NAME` follows it).
    Image(SetImageArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetImageArgs {
    /// The kind: rs.
    pub(super) kind: String,
    /// The replica set.
    pub(super) name: String,
    /// The new image (it must exist on the hosts, unless the agents have an [agent] registry to pull from).
    pub(super) image: String,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

pub(super) async fn run(server: &str, cmd: SetCmd) -> Result<()> {
    let SetCmd::Image(a) = cmd;
    match resource_arg(&a.kind)? {
        Resource::ReplicaSets => {}
        other => return usage(format!("cannot set the image of {other}; only rs")),
    }
    let name = name_arg("replica set name", &a.name)?;
    let namespace = a.namespace.get()?;
    if a.image.trim().is_empty() {
        return usage("IMAGE: must not be empty");
    }
    let c = client(server)?;
    let before = c.get_replicaset(&namespace, &name).await?;
    let rs = c.set_image(&namespace, &name, &a.image).await?;
    if rs.spec.revision == before.spec.revision {
        outln!(
            "replicaset/{name} already runs {} (revision {}); nothing to roll out",
            a.image,
            rs.spec.revision
        );
    } else {
        outln!(
            "replicaset/{name} image set to {} (revision {}); follow it with `pier rollout status rs {name}{}`",
            a.image,
            rs.spec.revision,
            super::output::ns_flag(&namespace)
        );
    }
    Ok(())
}
