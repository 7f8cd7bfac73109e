//! `pier expose rs` and `pier expose external`: make a service.

use anyhow::Result;
use pier_model::api::{ExposePort, ExposeRequest};
use pier_model::{
    AffinityKind, Service, ServicePort, ServiceType, SessionAffinity, StaticEndpoint,
};

use super::args::{
    NamespaceArg, Usage, client, name_arg, parse_duration, port_arg, port_spec_arg, usage,
};
use super::output::describe_vip_and_ports;

#[derive(Debug, clap::Subcommand)]
pub enum ExposeCmd {
    /// A service whose endpoints are a replica set's pods.
    Rs(ExposeRsArgs),
    /// A service in front of fixed HOST:PORT endpoints that pier does not
    /// run (--port, --endpoint), or a DNS alias of a name (--cname).
    External(ExposeExternalArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExposeRsArgs {
    /// The replica set.
    pub(super) name: String,
    /// A service port (on the VIP): `P`, `NAME:P`, `P/udp` or `NAME:P/udp`;
    /// repeat for more (TCP and UDP may share a number).
    #[arg(long = "port", value_name = "P", required = true)]
    pub(super) ports: Vec<String>,
    /// The container port (of a single --port); the service port by default.
    #[arg(long, value_name = "P")]
    pub(super) target_port: Option<String>,
    /// ClusterIP (a VIP) or NodePort (a VIP and a port on every node).
    #[arg(long = "type", default_value = "ClusterIP", value_name = "TYPE")]
    pub(super) service_type: String,
    /// The node port for a NodePort service (of a single --port); one is
    /// allocated by default.
    #[arg(long, value_name = "N")]
    pub(super) node_port: Option<String>,
    /// `ClientIP`: each client (by address) stays on one pod while that pod
    /// is ready, on every host.
    #[arg(long, value_name = "KIND")]
    pub(super) session_affinity: Option<String>,
    /// How long an idle client keeps its pod with --session-affinity (3h).
    #[arg(long, value_name = "DURATION", requires = "session_affinity")]
    pub(super) affinity_timeout: Option<String>,
    /// The service's name; the replica set's by default.
    #[arg(long = "name", value_name = "SVC")]
    pub(super) service_name: Option<String>,
    /// Each host sends its clients to its own ready pods when it has any,
    /// to other hosts' pods only when it has none.
    #[arg(long)]
    pub(super) prefer_local: bool,
    /// No VIP and no proxy: the service's name resolves to one address per
    /// ready pod (each reachable from every host), with SRV per pod.
    #[arg(long, conflicts_with_all = ["node_port", "prefer_local"])]
    pub(super) headless: bool,
    /// Send a PROXY protocol v2 header with the client's address to the
    /// pod before the client's bytes (the pod must expect it).
    #[arg(long)]
    pub(super) proxy_protocol: bool,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

#[derive(Debug, clap::Args)]
pub struct ExposeExternalArgs {
    /// The service's name.
    pub(super) name: String,
    /// The service port (on the VIP), `[NAME:]P[/udp]`; with --endpoint.
    /// A UDP service's endpoints are not health-checked (there is no
    /// generic UDP probe).
    #[arg(long, value_name = "P", required_unless_present = "cname")]
    pub(super) port: Option<String>,
    /// An endpoint, HOST:PORT; repeat for more.
    #[arg(
        long = "endpoint",
        value_name = "HOST:PORT",
        required_unless_present = "cname"
    )]
    pub(super) endpoints: Vec<String>,
    /// No VIP and no proxy: DNS answers the service's name with a CNAME to
    /// HOST (an ExternalName service), followed by HOST's own records.
    #[arg(long, value_name = "HOST", conflicts_with_all = ["port", "endpoints"])]
    pub(super) cname: Option<String>,
    #[command(flatten)]
    pub(super) namespace: NamespaceArg,
}

pub(super) async fn run(server: &str, what: ExposeCmd) -> Result<()> {
    match what {
        ExposeCmd::Rs(a) => expose_rs(server, a).await,
        ExposeCmd::External(a) => expose_external(server, a).await,
    }
}

async fn expose_rs(server: &str, a: ExposeRsArgs) -> Result<()> {
    let rs = name_arg("replica set name", &a.name)?;
    let namespace = a.namespace.get()?;
    let mut specs = Vec::new();
    for p in &a.ports {
        specs.push(port_spec_arg("--port", p)?);
    }
    if specs.len() > 1 && (a.target_port.is_some() || a.node_port.is_some()) {
        return usage(
            "--target-port and --node-port need a single --port; with several, each targets its own number and gets its own node port",
        );
    }
    let first = specs.remove(0);
    let port = first.port;
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
    let session_affinity = match a.session_affinity.as_deref() {
        None | Some("None") => None,
        Some(k) => {
            let kind: AffinityKind = k
                .parse()
                .or_else(|e| usage(format!("--session-affinity: {e}")))?;
            let timeout_s = match a.affinity_timeout.as_deref() {
                None => SessionAffinity::default_timeout_s(),
                Some(t) => {
                    let d =
                        parse_duration(t).or_else(|e| usage(format!("--affinity-timeout: {e}")))?;
                    let s = d.as_secs();
                    if s == 0 || s > u64::from(SessionAffinity::MAX_TIMEOUT_S) {
                        return usage(format!(
                            "--affinity-timeout: {t} is out of range; give 1s to 24h"
                        ));
                    }
                    s as u32
                }
            };
            Some(SessionAffinity { kind, timeout_s })
        }
    };
    let service_type: ServiceType = a
        .service_type
        .parse()
        .or_else(|e| usage(format!("--type: {e}")))?;
    if node_port.is_some() && service_type != ServiceType::NodePort {
        return usage("--node-port: needs --type NodePort");
    }
    if a.headless && service_type != ServiceType::ClusterIP {
        return usage(
            "--headless: a headless service has no proxy, so no node ports; leave out --type NodePort",
        );
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
                headless: a.headless,
                proxy_protocol: a.proxy_protocol,
                protocol: first.protocol,
                port_name: first.name,
                more_ports: specs
                    .into_iter()
                    .map(|p| ExposePort {
                        name: p.name,
                        port: p.port,
                        protocol: p.protocol,
                    })
                    .collect(),
                session_affinity,
            },
        )
        .await?;
    outln!(
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
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if !name.contains('.') {
        return usage(format!(
            "--endpoint: {host:?} is a bare name; every agent looks the name up again through its [dns] upstreams, with no search domains, so give the full name (e.g. db.example.com:{port}) or an address"
        ));
    }
    if let Err(why) = pier_model::check_external_name(&name) {
        return usage(format!("--endpoint: {host:?} {why}"));
    }
    let addrs: Vec<_> = tokio::net::lookup_host((host, port.get()))
        .await
        .map_err(|e| Usage(format!("--endpoint: cannot resolve {host:?}: {e}")))?
        .collect();
    let Some(first) = addrs.first() else {
        return usage(format!("--endpoint: {host:?} has no address"));
    };
    // The service keeps the name, and every agent looks it up again at its
    // TTL (ARCHITECTURE.md, "External endpoints by name"); the address
    // resolved here is checked by the API now and used until an agent's
    // own lookup answers. Say so, for a name (an address is what it says).
    let of = match addrs.len() {
        1 => String::new(),
        n => format!(" (the first of {n} addresses)"),
    };
    eprintln!(
        "note: --endpoint {s} is {first}{of} now; every agent looks {name} up again through its [dns] upstreams at the record's TTL (5 s to 5 min) and follows its addresses"
    );
    Ok(StaticEndpoint {
        ip: first.ip(),
        port,
        name: Some(name),
    })
}

async fn expose_external(server: &str, a: ExposeExternalArgs) -> Result<()> {
    let name = name_arg("service name", &a.name)?;
    let namespace = a.namespace.get()?;
    if let Some(host) = &a.cname {
        let host = host.trim_end_matches('.');
        if let Err(why) = pier_model::check_external_name(host) {
            return usage(format!("--cname: {host:?} {why}"));
        }
        let mut svc = Service::new(namespace, name.clone(), Vec::new());
        svc.external_name = Some(host.to_owned());
        let c = client(server)?;
        let svc = c.create_service(&svc).await?;
        outln!("service/{} created: a CNAME to {host} (no VIP)", svc.name);
        return Ok(());
    }
    let spec = port_spec_arg("--port", a.port.as_deref().unwrap_or_default())?;
    let port = spec.port;
    let mut eps = Vec::new();
    for e in &a.endpoints {
        eps.push(resolve_endpoint(e).await?);
    }
    // The endpoints' own ports are used; target_port records the common one.
    let target_port = match eps.first() {
        Some(first) if eps.iter().all(|e| e.port == first.port) => first.port,
        _ => port,
    };
    let mut svc = Service::new(
        namespace,
        name.clone(),
        vec![ServicePort {
            name: spec.name_or_default(),
            port,
            target_port,
            node_port: None,
            protocol: spec.protocol,
        }],
    );
    svc.static_endpoints = eps;
    let c = client(server)?;
    let svc = c.create_service(&svc).await?;
    outln!(
        "service/{} created: {}, endpoints {}",
        svc.name,
        describe_vip_and_ports(&svc),
        svc.static_endpoints
            .iter()
            .map(|e| match &e.name {
                Some(_) => format!("{e} (now {})", e.ip),
                None => e.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
