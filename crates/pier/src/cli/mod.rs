//! The CLI: kubectl's verbs over the agent's HTTP API (DESIGN.md, "CLI
//! contract"). Errors are one line on stderr and a non-zero exit: 2 for a
//! bad argument, 1 for anything else.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use pier_api::Client;
use pier_model::api::{ExposeRequest, Resource, ScaleRequest};
use pier_model::{
    ContainerPort, Labels, Name, Namespace, PodTemplate, PortNum, ReplicaSet, Replicas, Service,
    ServicePort, ServiceType, StaticEndpoint,
};

mod conn;
mod output;
mod wait;

pub use conn::Conn;

/// A bad argument: exit code 2, like clap's own usage errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(Usage(msg.into()).into())
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a replica set that runs IMAGE (as `kubectl run` did in 2015).
    Run(RunArgs),
    /// Make a service: for a replica set, or for fixed external endpoints.
    Expose {
        #[command(subcommand)]
        what: ExposeCmd,
    },
    /// Change a replica set's replica count.
    Scale(ScaleArgs),
    /// List objects: nodes, rs, pods, svc, endpoints.
    Get(GetArgs),
    /// Show one object in detail, with its pods, endpoints and problems.
    Describe(DescribeArgs),
    /// Delete a pod (the supervisor replaces it), a replica set or a service.
    Delete(DeleteArgs),
    /// Print the client's and the agent's versions.
    Version,
    /// Make the mesh CA and node certificates.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
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
    namespace: String,
}

impl NamespaceArg {
    /// The namespace, validated (a bad one is a usage error).
    fn get(&self) -> Result<Namespace> {
        Namespace::new(&self.namespace).or_else(|e| usage(format!("--namespace: {e}")))
    }
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Block until the pods are ready.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits: 60s, 2m, 500ms or plain seconds.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The replica set's name (RFC 1123: lower-case letters, digits, '-').
    name: String,
    /// The image to run (it must exist on the hosts: pier never pulls).
    #[arg(long, value_name = "IMG")]
    image: String,
    /// A container port, `P` or `NAME:P`; repeat for more.
    #[arg(long = "port", value_name = "P")]
    ports: Vec<String>,
    /// How many pods, 0 to 1000.
    #[arg(long, default_value = "1", value_name = "N")]
    replicas: String,
    /// An environment variable, K=V; repeat for more.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A container label, K=V; repeat for more.
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    #[command(flatten)]
    namespace: NamespaceArg,
    #[command(flatten)]
    wait: WaitArgs,
    /// The command and its arguments, after `--`; the image's own by default.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ExposeCmd {
    /// A service whose endpoints are a replica set's pods.
    Rs(ExposeRsArgs),
    /// A service in front of fixed HOST:PORT endpoints that pier does not run.
    External(ExposeExternalArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExposeRsArgs {
    /// The replica set.
    name: String,
    /// The service port (on the VIP).
    #[arg(long, value_name = "P")]
    port: String,
    /// The container port; the service port by default.
    #[arg(long, value_name = "P")]
    target_port: Option<String>,
    /// ClusterIP (a VIP) or NodePort (a VIP and a port on every node).
    #[arg(long = "type", default_value = "ClusterIP", value_name = "TYPE")]
    service_type: String,
    /// The node port for a NodePort service; one is allocated by default.
    #[arg(long, value_name = "N")]
    node_port: Option<String>,
    /// The service's name; the replica set's by default.
    #[arg(long = "name", value_name = "SVC")]
    service_name: Option<String>,
    /// Each host sends its clients to its own ready pods when it has any,
    /// to other hosts' pods only when it has none.
    #[arg(long)]
    prefer_local: bool,
    #[command(flatten)]
    namespace: NamespaceArg,
}

#[derive(Debug, clap::Args)]
pub struct ExposeExternalArgs {
    /// The service's name.
    name: String,
    /// The service port (on the VIP).
    #[arg(long, value_name = "P")]
    port: String,
    /// An endpoint, HOST:PORT; repeat for more.
    #[arg(long = "endpoint", value_name = "HOST:PORT", required = true)]
    endpoints: Vec<String>,
    #[command(flatten)]
    namespace: NamespaceArg,
}

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// The kind: rs.
    kind: String,
    /// The replica set.
    name: String,
    /// The new replica count, 0 to 1000.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    replicas: String,
    #[command(flatten)]
    namespace: NamespaceArg,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// nodes, rs, pods, svc or endpoints.
    resource: String,
    /// One object (for endpoints: one service's).
    name: Option<String>,
    #[command(flatten)]
    namespace: NamespaceArg,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// table, wide, json or yaml.
    #[arg(short = 'o', long, default_value = "table", value_name = "FORMAT")]
    output: String,
    /// After listing, print every change until interrupted.
    #[arg(short = 'w', long)]
    watch: bool,
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// node, rs, pod or svc.
    kind: String,
    name: String,
    #[command(flatten)]
    namespace: NamespaceArg,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// pod, rs or svc.
    kind: String,
    name: String,
    #[command(flatten)]
    namespace: NamespaceArg,
}

#[derive(Debug, clap::Subcommand)]
pub enum CaCmd {
    /// Create a new mesh CA (ca.pem, ca-key.pem) in DIR.
    Init { dir: PathBuf },
    /// Issue NODE's mesh certificate (node.pem, node-key.pem, ca.pem) into --out.
    Issue {
        node: String,
        /// The CA's directory (from `pier ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Where to write the node's files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days. Renew by issuing again into the same --out
        /// before it ends: agents pick the new files up without a restart.
        #[arg(long, default_value_t = pier_proxy::tls::DEFAULT_CERT_DAYS, value_name = "N")]
        days: u32,
    },
    /// Revoke NODE's mesh certificates: writes the CA's crl.pem. Copy it
    /// beside each node's ca.pem; agents reload it within 2 s, refuse the
    /// node's new tunnels and cut its open ones.
    Revoke {
        node: String,
        /// The CA's directory (from `pier ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Revoke this certificate file only (e.g. one issued before the
        /// CA recorded serials in issued.txt). Default: every certificate
        /// issued.txt records for NODE.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn name_arg(what: &str, s: &str) -> Result<Name> {
    Name::new(s).or_else(|e| usage(format!("{what}: {e}")))
}

fn port_arg(flag: &str, s: &str) -> Result<PortNum> {
    s.parse::<PortNum>()
        .or_else(|e| usage(format!("{flag}: {e}")))
}

fn replicas_arg(s: &str) -> Result<Replicas> {
    s.parse::<Replicas>()
        .or_else(|e| usage(format!("--replicas: {e}")))
}

fn kv_arg(flag: &str, s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => usage(format!("{flag}: {s:?} is not K=V")),
    }
}

/// `pier get rs` and friends: the resource, or a one-line error that lists
/// the valid ones.
fn resource_arg(s: &str) -> Result<Resource> {
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

/// The token found by [`run`] (see `conn`).
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

fn client(server: &str) -> Result<Client> {
    let token = TOKEN.get().cloned().flatten();
    Client::new(server, token).map_err(|e| Usage(format!("--server: {e}")).into())
}

/// Runs one CLI command and returns the exit code.
pub async fn run(conn: &Conn, cmd: Command) -> i32 {
    if let Some(e) = &conn.config_error {
        eprintln!("error: {e}");
        return 2;
    }
    let _ = TOKEN.set(conn.token.clone());
    match dispatch(&conn.server, cmd).await {
        Ok(()) => 0,
        Err(e) => {
            // One line: the chain joined with ": ".
            let mut msg = format!("{e:#}").replace('\n', " ");
            // A 401 with no token found: say why none was found.
            if let Some(p) = &conn.token_problem
                && e.chain()
                    .filter_map(|c| c.downcast_ref::<pier_api::ApiError>())
                    .any(|a| a.status() == Some(401))
            {
                msg = format!("the agent needs its API token: {p}");
            }
            let _ = std::io::stdout().flush();
            eprintln!("error: {msg}");
            if e.downcast_ref::<Usage>().is_some() {
                2
            } else {
                1
            }
        }
    }
}

async fn dispatch(server: &str, cmd: Command) -> Result<()> {
    match cmd {
        Command::Run(a) => run_cmd(server, a).await,
        Command::Expose {
            what: ExposeCmd::Rs(a),
        } => expose_rs(server, a).await,
        Command::Expose {
            what: ExposeCmd::External(a),
        } => expose_external(server, a).await,
        Command::Scale(a) => scale(server, a).await,
        Command::Get(a) => output::get(server, a).await,
        Command::Describe(a) => output::describe(server, a).await,
        Command::Delete(a) => delete(server, a).await,
        Command::Version => version(server).await,
        Command::Ca { cmd } => ca(cmd),
    }
}

async fn run_cmd(server: &str, a: RunArgs) -> Result<()> {
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
        created_at: 0,
    };
    let c = client(server)?;
    c.create_replicaset(&rs).await?;
    println!("replicaset/{name} created");
    if a.wait.wait {
        wait::until_ready(&c, &namespace, &name, a.wait.timeout).await?;
    }
    Ok(())
}

/// `VIP 10.213.0.5, port 80 -> 8080`, as `expose` and `create` print it.
fn describe_vip_and_ports(svc: &Service) -> String {
    let vip = svc
        .vip
        .map(|v| v.to_string())
        .unwrap_or_else(|| "none".into());
    format!("VIP {vip}, {}", describe_service_ports(svc))
}

fn describe_service_ports(svc: &Service) -> String {
    svc.ports
        .iter()
        .map(|p| match p.node_port {
            Some(np) => format!("port {} -> {} (node port {np})", p.port, p.target_port),
            None => format!("port {} -> {}", p.port, p.target_port),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn expose_rs(server: &str, a: ExposeRsArgs) -> Result<()> {
    let rs = name_arg("replica set name", &a.name)?;
    let namespace = a.namespace.get()?;
    let port = port_arg("--port", &a.port)?;
    let target_port = a
        .target_port
        .as_deref()
        .map(|p| port_arg("--target-port", p))
        .transpose()?;
    let node_port = a
        .node_port
        .as_deref()
        .map(|p| port_arg("--node-port", p))
        .transpose()?;
    let service_type: ServiceType = a
        .service_type
        .parse()
        .or_else(|e| usage(format!("--type: {e}")))?;
    if node_port.is_some() && service_type != ServiceType::NodePort {
        return usage("--node-port: needs --type NodePort");
    }
    let name = a
        .service_name
        .as_deref()
        .map(|n| name_arg("--name", n))
        .transpose()?;
    let c = client(server)?;
    let svc = c
        .expose_replicaset(
            &namespace,
            &rs,
            &ExposeRequest {
                name,
                port,
                target_port,
                service_type,
                node_port,
                prefer_local: a.prefer_local,
            },
        )
        .await?;
    println!(
        "service/{} exposed: {}",
        svc.name,
        describe_vip_and_ports(&svc)
    );
    Ok(())
}

async fn resolve_endpoint(s: &str) -> Result<StaticEndpoint> {
    if let Ok(e) = s.parse::<StaticEndpoint>() {
        return Ok(e);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return usage(format!("--endpoint: {s:?} is not HOST:PORT"));
    };
    let port = port_arg("--endpoint", port)?;
    let mut addrs = tokio::net::lookup_host((host, port.get()))
        .await
        .map_err(|e| Usage(format!("--endpoint: cannot resolve {host:?}: {e}")))?;
    match addrs.next() {
        Some(a) => Ok(StaticEndpoint { ip: a.ip(), port }),
        None => usage(format!("--endpoint: {host:?} has no address")),
    }
}

async fn expose_external(server: &str, a: ExposeExternalArgs) -> Result<()> {
    let name = name_arg("service name", &a.name)?;
    let namespace = a.namespace.get()?;
    let port = port_arg("--port", &a.port)?;
    let mut eps = Vec::new();
    for e in &a.endpoints {
        eps.push(resolve_endpoint(e).await?);
    }
    // The endpoints' own ports are used; target_port records the common one.
    let target_port = match eps.first() {
        Some(first) if eps.iter().all(|e| e.port == first.port) => first.port,
        _ => port,
    };
    let svc = Service {
        name: name.clone(),
        namespace,
        vip: None,
        service_type: ServiceType::ClusterIP,
        ports: vec![ServicePort {
            name: Name::new(&format!("p{port}")).expect("p<digits> is a valid name"),
            port,
            target_port,
            node_port: None,
        }],
        selector: Labels::new(),
        static_endpoints: eps,
        lb: Default::default(),
        proxy_protocol: false,
        prefer_local: false,
        drain_timeout_ms: None,
        health: None,
        sla: None,
        created_at: 0,
        accept_labelled: false,
    };
    let c = client(server)?;
    let svc = c.create_service(&svc).await?;
    println!(
        "service/{} created: {}, endpoints {}",
        svc.name,
        describe_vip_and_ports(&svc),
        svc.static_endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn scale(server: &str, a: ScaleArgs) -> Result<()> {
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
    println!("replicaset/{name} scaled to {replicas}");
    if a.wait.wait {
        wait::until_ready(&c, &namespace, &name, a.wait.timeout).await?;
    }
    Ok(())
}

async fn delete(server: &str, a: DeleteArgs) -> Result<()> {
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

async fn version(server: &str) -> Result<()> {
    println!("client: pier {}", crate::VERSION);
    let c = client(server)?;
    let v = c.version().await?;
    println!(
        "agent:  pier {} on node {} (store revision {})",
        v.version, v.node, v.revision
    );
    Ok(())
}

fn ca(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            pier_proxy::tls::ca_init(&dir)
                .with_context(|| format!("creating the mesh CA in {}", dir.display()))?;
            println!(
                "mesh CA written to {} (ca.pem, ca-key.pem); keep ca-key.pem private",
                dir.display()
            );
        }
        CaCmd::Issue {
            node,
            ca,
            out,
            days,
        } => {
            let node = name_arg("node name", &node)?;
            if days == 0 {
                return usage("--days: must be at least 1");
            }
            pier_proxy::tls::ca_issue(&node, &ca, &out, days).map_err(|e| {
                anyhow!(e).context(format!(
                    "issuing {node}'s certificate from {}",
                    ca.display()
                ))
            })?;
            println!(
                "certificate for node {node} written to {} (node.pem, node-key.pem, ca.pem), valid {days} days",
                out.display()
            );
        }
        CaCmd::Revoke { node, ca, cert } => {
            let node = name_arg("node name", &node)?;
            let r = pier_proxy::tls::ca_revoke(&ca, &node, cert.as_deref()).map_err(|e| {
                anyhow!(e).context(format!(
                    "revoking {node}'s certificates in {}",
                    ca.display()
                ))
            })?;
            if r.added.is_empty() {
                println!(
                    "{node}'s certificates were already revoked; {} lists {} in all",
                    r.crl.display(),
                    r.total
                );
            } else {
                println!(
                    "revoked {} certificate(s) of node {node} (serial {}); {} lists {} in all. Copy it beside every node's ca.pem (as crl.pem); agents reload it within 2 s",
                    r.added.len(),
                    r.added.join(", "),
                    r.crl.display(),
                    r.total
                );
            }
        }
    }
    Ok(())
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

    /// `-n NS`, `--namespace NS`, `--namespace=NS` and the default, on
    /// every command that takes a namespace.
    #[test]
    fn namespace_flag_on_every_namespaced_command() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: Command,
        }
        fn ns_of(args: &[&str]) -> String {
            let cli = Cli::try_parse_from(std::iter::once("pier").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let ns = match cli.cmd {
                Command::Run(a) => a.namespace,
                Command::Expose {
                    what: ExposeCmd::Rs(a),
                } => a.namespace,
                Command::Expose {
                    what: ExposeCmd::External(a),
                } => a.namespace,
                Command::Scale(a) => a.namespace,
                Command::Get(a) => a.namespace,
                Command::Describe(a) => a.namespace,
                Command::Delete(a) => a.namespace,
                other => panic!("{other:?} takes no namespace"),
            };
            ns.get().expect("a valid namespace").to_string()
        }
        let commands: [&[&str]; 7] = [
            &["run", "web", "--image", "httpd"],
            &["expose", "rs", "web", "--port", "80"],
            &[
                "expose",
                "external",
                "db",
                "--port",
                "5432",
                "--endpoint",
                "10.0.0.1:5432",
            ],
            &["scale", "rs", "web", "--replicas", "2"],
            &["get", "pods"],
            &["describe", "rs", "web"],
            &["delete", "svc", "web"],
        ];
        for c in commands {
            assert_eq!(ns_of(c), "default", "{c:?}");
            for flag in [
                &["-n", "prod"][..],
                &["--namespace", "prod"],
                &["--namespace=prod"],
            ] {
                let args: Vec<&str> = c.iter().chain(flag).copied().collect();
                assert_eq!(ns_of(&args), "prod", "{args:?}");
            }
        }
        // `-A` stays get's own.
        let cli = Cli::try_parse_from(["pier", "get", "pods", "-A", "-n", "x"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Command::Get(GetArgs {
                all_namespaces: true,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["pier", "describe", "rs", "web", "-A"]).is_err());
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
