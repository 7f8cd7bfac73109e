//! `pier agent`: load and validate the config (exit 64 before anything is
//! bound), then run as the keeper ([`keeper`]: holds the listening
//! sockets, runs the agent as a worker child, restarts it, upgrades it on
//! SIGHUP) or as that worker ([`worker`]: every subsystem), or, with
//! `--no-keeper`, as both in one process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use pier_model::Cidr;
use tracing::{error, warn};

pub mod config;
mod fdpass;
mod keeper;
mod orphan;
mod relay;
mod sockets;
mod worker;

use self::config::Config;

/// `pier agent` flags. Each overrides the same setting in the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Config file (TOML); see config/pier.toml for every option.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name (RFC 1123 label). Required, here or in the config.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// `embedded` (the default: one host) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// API listen address (default 127.0.0.1:7370).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<SocketAddr>,
    /// Extra DNS listen address (the DNS VIP on pier0 is served too).
    #[arg(long, value_name = "ADDR")]
    pub dns: Option<SocketAddr>,
    /// mTLS mesh listen address (needs [mesh] certificates in the config).
    #[arg(long, value_name = "ADDR")]
    pub mesh: Option<SocketAddr>,
    /// The CIDR VIPs come from (default 10.213.0.0/16).
    #[arg(long, value_name = "CIDR")]
    pub service_cidr: Option<String>,
    /// The IPv6 CIDR IPv6 VIPs come from (dual stack; off by default),
    /// e.g. fd8e:7a1c:53b2:1::/112.
    #[arg(long, value_name = "CIDR")]
    pub service_cidr6: Option<String>,
    /// Where the embedded store and other state live (default /var/lib/pier).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's address for other hosts.
    #[arg(long, value_name = "IP")]
    pub addr: Option<IpAddr>,
    /// No privileges: no pier0, VIPs from 127.0.0.0/8 (sets the service CIDR
    /// to 127.213.0.0/16 unless --service-cidr or the config file gives one).
    #[arg(long)]
    pub unprivileged: bool,
    /// Leave pier0 and its addresses in place on shutdown.
    #[arg(long)]
    pub keep_iface: bool,
    /// Run the agent in this one process, without the keeper: a restart or
    /// a crash then closes every port until it is back (no hitless
    /// upgrades). For debugging.
    #[arg(long)]
    pub no_keeper: bool,
    /// Serve the API without a token (development only; loopback only;
    /// logged as a warning). By default the agent makes a token in its data
    /// dir (api-token) and the CLI on this host reads it.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// Where an orphaned worker of an agent on `data_dir` waits for a keeper.
pub(crate) fn adoption_socket(data_dir: &std::path::Path) -> PathBuf {
    orphan::socket_path(data_dir)
}

/// Exit code for bad config (EX_USAGE), before anything is bound.
const EXIT_CONFIG: i32 = 64;

fn build_config(args: &AgentArgs) -> Result<Config, String> {
    finish_config(apply_args(args)?)
}

/// The config `pier doctor` checks: the agent's, except that a node name
/// is not needed to check a host.
pub(crate) fn doctor_config(args: &AgentArgs) -> Result<Config, String> {
    let mut cfg = apply_args(args)?;
    if cfg.node.name.is_none() {
        cfg.node.name = Some("doctor".into());
    }
    finish_config(cfg)
}

/// The config file (or the defaults) with the flags applied.
fn apply_args(args: &AgentArgs) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.0)?,
        None => Config::default(),
    };
    if let Some(n) = &args.node {
        cfg.node.name = Some(n.clone());
    }
    if let Some(s) = &args.store {
        cfg.store.url = s.clone();
    }
    if let Some(a) = args.api {
        cfg.api.listen = a;
    }
    if let Some(d) = args.dns {
        cfg.network.dns_listen.push(d);
    }
    if let Some(a) = args.addr {
        cfg.node.addr = Some(a);
    }
    if args.unprivileged {
        cfg.proxy.manage_iface = false;
        // The loopback default replaces the built-in one only: a CIDR the
        // config file names is kept (and must lie in 127.0.0.0/8, below).
        if args.service_cidr.is_none()
            && cfg.network.service_cidr == config::NetworkConfig::default().service_cidr
        {
            cfg.network.service_cidr = "127.213.0.0/16".parse().expect("valid CIDR");
        }
    }
    if let Some(c) = &args.service_cidr {
        cfg.network.service_cidr = c
            .parse::<Cidr>()
            .map_err(|e| format!("--service-cidr: {e}"))?;
    }
    if let Some(c) = &args.service_cidr6 {
        cfg.network.service_cidr6 = Some(
            c.parse::<Cidr>()
                .map_err(|e| format!("--service-cidr6: {e}"))?,
        );
    }
    if let Some(d) = &args.data_dir {
        cfg.network.data_dir = d.clone();
    }
    if args.keep_iface {
        cfg.proxy.keep_iface = true;
    }
    if let Some(m) = args.mesh {
        match &mut cfg.mesh {
            Some(mc) => mc.listen = m,
            None => {
                return Err(
                    "--mesh needs a [mesh] section with ca, cert and key in the config (make them with `pier ca init` and `pier ca issue`)"
                        .into(),
                );
            }
        }
    }
    if args.insecure_no_auth {
        cfg.api.insecure_no_auth = true;
    }
    if let Ok(t) = std::env::var("PIER_TOKEN")
        && !t.is_empty()
        && cfg.api.token.is_none()
        && !cfg.api.insecure_no_auth
    {
        cfg.api.token = Some(t);
    }
    Ok(cfg)
}

/// Validates the whole config, then the mesh files.
fn finish_config(cfg: Config) -> Result<Config, String> {
    cfg.validate().map_err(|e| e.0)?;
    if !cfg.proxy.manage_iface
        && !cfg
            .network
            .service_cidr
            .contains(IpAddr::from([127, 0, 0, 1]))
        && !matches!(cfg.network.service_cidr.addr(), IpAddr::V4(a) if a.octets()[0] == 127)
    {
        return Err(format!(
            "network.service_cidr {} must lie in 127.0.0.0/8 when pier0 is not managed (--unprivileged)",
            cfg.network.service_cidr
        ));
    }
    if !cfg.proxy.manage_iface
        && let Some(c6) = &cfg.network.service_cidr6
    {
        return Err(format!(
            "network.service_cidr6 {c6} needs pier0 (IPv6 has one loopback address, ::1, so VIPs cannot live on lo): leave service_cidr6 out with --unprivileged, or run the agent with CAP_NET_ADMIN"
        ));
    }
    // The files last: a missing, expired or foreign certificate, or an
    // open password file, stops the agent here, before anything is bound.
    cfg.etcd_security().map_err(|e| e.0)?;
    cfg.check_mesh().map_err(|e| e.0)?;
    Ok(cfg)
}

/// etcd refused the agent (a wrong password, a refused or untrusted
/// certificate): the config is wrong, and retrying will not help.
#[derive(Debug)]
pub(crate) struct StoreRefused(String);

impl std::fmt::Display for StoreRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreRefused {}

/// The source address of the default route, found without sending anything:
/// connecting a UDP socket only selects a route.
pub(crate) fn default_addr() -> IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Runs the agent until SIGINT/SIGTERM. Returns the process exit code.
pub async fn run(args: AgentArgs) -> i32 {
    init_tracing();
    let cfg = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pier agent: {e}");
            return EXIT_CONFIG;
        }
    };
    // The keeper's check before an upgrade: this binary takes the config.
    if std::env::var_os(keeper::CHECK_ENV).is_some() {
        return 0;
    }
    let sockets = if std::env::var_os(keeper::WORKER_ENV).is_some() {
        // The worker does not die with its keeper: orphaned, it serves on
        // until a new keeper adopts it (see `orphan`).
        match sockets::Sockets::from_keeper() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pier agent: {e}");
                return 1;
            }
        }
    } else if args.no_keeper {
        sockets::Sockets::local()
    } else {
        return keeper::run(cfg.network.data_dir.clone()).await;
    };
    match worker::run(cfg, sockets).await {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<StoreRefused>().is_some() => {
            error!(error = %format!("{e:#}"), "pier agent: etcd refused it");
            eprintln!("pier agent: {e:#}");
            EXIT_CONFIG
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "pier agent failed");
            eprintln!("pier agent: {e:#}");
            1
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs to stderr; `PIER_LOG` (or `RUST_LOG`) sets the filter, default
/// `info`; `PIER_LOG_FORMAT=json` switches to JSON lines.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PIER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("pier agent: PIER_LOG={filter:?} does not parse ({e}); using info");
        EnvFilter::new("info")
    });
    // Colours only on a terminal: a log file or journald gets plain text.
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let r = if std::env::var("PIER_LOG_FORMAT").as_deref() == Ok("json") {
        b.json().try_init()
    } else {
        b.try_init()
    };
    if let Err(e) = r {
        eprintln!("pier agent: tracing already initialised: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn config_with(args: &[&str], toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pier.toml");
        std::fs::write(&f, toml).expect("write config");
        let mut argv = vec![
            "agent",
            "--node",
            "n1",
            "--config",
            f.to_str().expect("utf-8"),
        ];
        argv.extend_from_slice(args);
        build_config(&Cli::try_parse_from(argv).expect("flags").agent)
    }

    /// --unprivileged picks 127.213.0.0/16 only where nothing else was
    /// asked for: a second agent on the same host can have its own range.
    #[test]
    fn unprivileged_keeps_the_service_cidr_the_config_file_names() {
        let cidr = |c: Result<Config, String>| c.expect("config").network.service_cidr.to_string();
        assert_eq!(cidr(config_with(&["--unprivileged"], "")), "127.213.0.0/16");
        let file = "[network]\nservice_cidr = \"127.50.0.0/16\"\n";
        assert_eq!(
            cidr(config_with(&["--unprivileged"], file)),
            "127.50.0.0/16"
        );
        assert_eq!(
            cidr(config_with(
                &["--unprivileged", "--service-cidr", "127.60.0.0/16"],
                file
            )),
            "127.60.0.0/16"
        );
        // A range off loopback in the file is refused, not replaced.
        let off = config_with(
            &["--unprivileged"],
            "[network]\nservice_cidr = \"10.50.0.0/16\"\n",
        )
        .expect_err("10.50.0.0/16 with --unprivileged");
        assert!(off.contains("must lie in 127.0.0.0/8"), "{off}");
    }
}
