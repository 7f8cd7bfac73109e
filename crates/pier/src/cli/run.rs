//! `pier run`: create a replica set.

use std::collections::BTreeMap;

use anyhow::Result;
use pier_model::{ContainerPort, Labels, Name, PodTemplate, ReplicaSet};

use super::args::{
    NamespaceArg, WaitArgs, client, kv_arg, name_arg, port_arg, replicas_arg, usage,
};
use super::wait;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The replica set's name (RFC 1123: lower-case letters, digits, '-').
    pub(super) name: String,
    /// The image to run (it must exist on the hosts: pier never pulls).
    #[arg(long, value_name = "IMG")]
    pub(super) image: String,
    /// A container port, `P` or `NAME:P`; repeat for more.
    #[arg(long = "port", value_name = "P")]
    pub(super) ports: Vec<String>,
    /// How many pods, 0 to 1000.
    #[arg(long, default_value = "1", value_name = "N")]
    pub(super) replicas: String,
    /// An environment variable, K=V; repeat for more.
    #[arg(long = "env", value_name = "K=V")]
    pub(super) env: Vec<String>,
    /// A container label, K=V; repeat for more.
    #[arg(long = "label", value_name = "K=V")]
    pub(super) labels: Vec<String>,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
    #[command(flatten)]
    pub(super) wait: WaitArgs,
    /// The command and its arguments, after `--`; the image's own by default.
    #[arg(last = true, value_name = "CMD")]
    pub(super) cmd: Vec<String>,
}

pub(super) async fn run(server: &str, a: RunArgs) -> Result<()> {
    let name = name_arg("replica set name", &a.name)?;
    let namespace = a.namespace.get()?;
    let replicas = replicas_arg(&a.replicas)?;
    if a.image.trim().is_empty() {
        return usage("--image: must not be empty");
    }
    let mut ports = Vec::new();
    for p in &a.ports {
        let (pname, num) = match p.split_once(':') {
            Some((n, num)) => (Some(n), num),
            None => (None, p.as_str()),
        };
        let port = port_arg("--port", num)?;
        let pname = match pname {
            Some(n) => name_arg("--port name", n)?,
            None => Name::new(&format!("p{port}")).expect("p<digits> is a valid name"),
        };
        ports.push(ContainerPort { name: pname, port });
    }
    let mut env = BTreeMap::new();
    for e in &a.env {
        let (k, v) = kv_arg("--env", e)?;
        env.insert(k, v);
    }
    let mut labels = Labels::new();
    for l in &a.labels {
        let (k, v) = kv_arg("--label", l)?;
        if k.starts_with("pier.") {
            return usage(format!(
                "--label: {k:?}: labels starting with pier. are set by pier itself"
            ));
        }
        labels.insert(k, v);
    }
    let rs = ReplicaSet {
        name: name.clone(),
        namespace: namespace.clone(),
        template: PodTemplate {
            image: a.image.clone(),
            cmd: a.cmd.clone(),
            env,
            ports,
            labels,
            ..Default::default()
        },
        replicas,
        placement: Default::default(),
        min_replicas: None,
        max_replicas: None,
        sla: None,
        created_at: 0,
        update_config: Default::default(),
        rollback_config: Default::default(),
        revision: 0,
        history: Vec::new(),
    };
    let c = client(server)?;
    c.create_replicaset(&rs).await?;
    println!("replicaset/{name} created");
    if a.wait.wait {
        wait::until_ready(&c, &namespace, &name, a.wait.timeout).await?;
    }
    Ok(())
}
