//! The `pier` binary: `pier agent` runs the daemon, `pier doctor` checks a
//! host for it, `pier completions` prints shell completions; every other
//! subcommand is a CLI client of the agent's HTTP API (see `cli`).

mod cli;
mod daemon;
mod doctor;

/// The version with the git revision it was built from (build.rs), e.g.
/// `0.1.0 (git 1b27814c0a2e)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("PIER_GIT_REVISION"),
    ")"
);

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "pier",
    version = VERSION,
    about = "Service mesh and replica sets for plain Docker hosts"
)]
struct Top {
    /// The agent's API, http://HOST:PORT (default: the config's [api]
    /// listen, else http://127.0.0.1:7370). The token comes from
    /// PIER_TOKEN, else from the agent's data dir (api-token).
    #[arg(long, global = true, env = "PIER_SERVER", value_name = "URL")]
    server: Option<String>,
    /// The agent's config file, where the CLI finds the agent's data dir
    /// (and its token) and API address. Default: /etc/pier/pier.toml if it
    /// exists. `pier agent` takes it too.
    #[arg(long = "config", env = "PIER_CONFIG", value_name = "FILE")]
    cli_config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Run the pier agent on this host.
    Agent(daemon::AgentArgs),
    /// Check this host for `pier agent` (takes the agent's flags): dockerd,
    /// ip, iptables, splice, namespaces, ports, routes, the store.
    Doctor(daemon::AgentArgs),
    /// Print shell completions: bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    #[command(flatten)]
    Cli(cli::Command),
}

/// clap's usage errors, as one line like every other CLI error (exit 2).
fn parse_args() -> Top {
    use clap::error::ErrorKind;
    match Top::try_parse() {
        Ok(t) => t,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let text = e.render().to_string();
            let line = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("Usage:")
                        && !l.starts_with("For more information")
                })
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("{line} (see `pier --help`)");
            std::process::exit(2);
        }
    }
}

fn main() {
    let top = parse_args();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        match top.cmd {
            Cmd::Agent(mut a) => {
                if a.config.is_none() {
                    a.config = top.cli_config;
                }
                daemon::run(a).await
            }
            Cmd::Doctor(a) => doctor::run(a).await,
            Cmd::Completions { shell } => {
                use clap::CommandFactory;
                // Generate into memory, then write: a reader that stops early
                // (`pier completions bash | head`) is not an error.
                let mut buf = Vec::new();
                clap_complete::generate(shell, &mut Top::command(), "pier", &mut buf);
                match std::io::Write::write_all(&mut std::io::stdout(), &buf) {
                    Ok(()) => 0,
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                    Err(e) => {
                        eprintln!("error: cannot write the completions: {e}");
                        1
                    }
                }
            }
            Cmd::Cli(c) => {
                let conn = cli::Conn::find(top.server, top.cli_config);
                cli::run(&conn, c).await
            }
        }
    });
    // Do not wait for idle pooled connections or a watch body to wind down.
    rt.shutdown_background();
    std::process::exit(code);
}
