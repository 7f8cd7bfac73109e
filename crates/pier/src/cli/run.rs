//! `pier run`: create a replica set.

use std::collections::BTreeMap;

use anyhow::Result;
use pier_model::{
    Constraint, ContainerPort, FailureAction, Labels, Placement, PodTemplate, ReplicaSet,
    UpdateConfig, UpdateOrder,
};

use super::args::{
    NamespaceArg, WaitArgs, client, kv_arg, name_arg, parse_duration, port_spec_arg, replicas_arg,
    usage,
};
use super::wait;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The replica set's name (RFC 1123: lower-case letters, digits, '-').
    pub(super) name: String,
    /// The image to run (it must exist on the hosts, unless the agents have an [agent] registry to pull from).
    #[arg(long, value_name = "IMG")]
    pub(super) image: String,
    /// A container port, `P`, `NAME:P`, `P/udp` or `NAME:P/udp`; repeat
    /// for more (TCP and UDP may share a number).
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
    /// A placement rule, as Swarm writes it: node.hostname==H,
    /// node.labels.K==V, or with !=; repeat for more (all must hold).
    #[arg(long = "constraint", value_name = "RULE")]
    pub(super) constraints: Vec<String>,
    /// At most N of the set's pods on one node.
    #[arg(long, value_name = "N")]
    pub(super) max_per_node: Option<u32>,
    /// Never share a node with a pod of this replica set, and keep its pods
    /// off this set's nodes too; repeat for more.
    #[arg(long = "anti-affinity", value_name = "RS")]
    pub(super) anti_affinity: Vec<String>,
    /// Only nodes that run a pod of this replica set; repeat for more.
    #[arg(long = "affinity", value_name = "RS")]
    pub(super) affinity: Vec<String>,
    /// Pods replaced per rollout step (0: all at once).
    #[arg(long, default_value = "1", value_name = "N")]
    pub(super) update_parallelism: u32,
    /// start-first or stop-first.
    #[arg(long, default_value = "stop-first", value_name = "ORDER")]
    pub(super) update_order: String,
    /// What a failing rollout does: pause, rollback or continue.
    #[arg(long, default_value = "pause", value_name = "ACTION")]
    pub(super) update_failure_action: String,
    /// How long a new pod must stay ready before the next step.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub(super) update_monitor: std::time::Duration,
    /// A new pod not ready this long after it was created has failed.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub(super) update_ready_timeout: std::time::Duration,
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
        let spec = port_spec_arg("--port", p)?;
        let name = spec.name_or_default();
        if let Some(q) = ports.iter().find(|q: &&ContainerPort| {
            q.name == name || (q.port == spec.port && q.protocol == spec.protocol)
        }) {
            return usage(format!(
                "--port {p}: clashes with --port {}:{}/{}; each port needs its own name, and its own number per protocol",
                q.name, q.port, q.protocol
            ));
        }
        ports.push(ContainerPort {
            name,
            port: spec.port,
            protocol: spec.protocol,
        });
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
    let mut placement = Placement::default();
    for c in &a.constraints {
        let c: Constraint = c.parse().or_else(|e| usage(format!("--constraint: {e}")))?;
        placement.constraints.push(c);
    }
    placement.max_per_node = a.max_per_node;
    for n in &a.anti_affinity {
        placement
            .anti_affinity
            .push(name_arg("--anti-affinity", n)?);
    }
    for n in &a.affinity {
        placement.affinity.push(name_arg("--affinity", n)?);
    }
    if let Err(e) = placement.validate(&name) {
        return usage(e);
    }
    let order: UpdateOrder = a
        .update_order
        .parse()
        .or_else(|e| usage(format!("--update-order: {e}")))?;
    let failure_action: FailureAction = a
        .update_failure_action
        .parse()
        .or_else(|e| usage(format!("--update-failure-action: {e}")))?;
    let update_config = UpdateConfig {
        parallelism: a.update_parallelism,
        order,
        failure_action,
        monitor_ms: a.update_monitor.as_millis() as u64,
        ready_timeout_ms: a.update_ready_timeout.as_millis() as u64,
        ..Default::default()
    };
    if let Err(e) = update_config.validate("update") {
        return usage(e.replace("update.", "--update-").replace('_', "-"));
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
        placement,
        min_replicas: None,
        max_replicas: None,
        sla: None,
        created_at: 0,
        update_config,
        rollback_config: Default::default(),
        revision: 0,
        history: Vec::new(),
    };
    let c = client(server)?;
    c.create_replicaset(&rs).await?;
    outln!("replicaset/{name} created");
    if a.wait.wait {
        wait::until_ready(
            &c,
            &namespace,
            &name,
            a.wait.timeout,
            wait::OnStoppedRollout::Fail,
        )
        .await?;
    }
    Ok(())
}
