//! The CLI: kubectl's verbs over the agent's HTTP API (DESIGN.md, "CLI
//! contract"). Errors are one line on stderr and a non-zero exit: 2 for a
//! bad argument, 1 for anything else.

//!
//! One file per command (`run`, `expose`, `scale`, `autoscale`, `get`,
//! `describe`, `delete`, `apply` with `diff`, `label`, `set`, `rollout`,
//! `dashboard`, `version`, `ca`): its flags and what it does. They share `args` (flags,
//! parsers, the client), `compose` (reading Compose files) and `output`
//! (tables and text); none of these calls a command. A new command is a
//! new file, a variant of
//! [`Command`] and an arm in `dispatch`.

use std::io::Write;

use anyhow::Result;

/// `println!` for the CLI's output. A reader that stops early (`pier get
/// pods | head`) ends the process quietly with status 0, as it would a Unix
/// tool; `println!` would panic.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            $crate::cli::stdout_failed(&e);
        }
    }};
}

/// `print!` for the CLI's output; see [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            $crate::cli::stdout_failed(&e);
        }
    }};
}

/// Standard output failed: a closed pipe ends the process quietly; any
/// other error is reported and ends it with status 1.
pub(crate) fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

/// Whether an error is standard output's reader having gone away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

mod apply;
mod args;
mod autoscale;
mod ca;
mod compose;
mod conn;
mod dashboard;
mod delete;
mod describe;
mod expose;
mod get;
mod label;
mod output;
mod rollout;
mod run;
mod scale;
mod set;
mod version;
mod wait;

pub use args::Usage;
pub use conn::Conn;

use apply::{ApplyArgs, DiffArgs};
use args::TOKEN;
use autoscale::AutoscaleArgs;
use ca::CaCmd;
use dashboard::DashboardArgs;
use delete::DeleteArgs;
use describe::DescribeArgs;
use expose::ExposeCmd;
use get::GetArgs;
use label::LabelArgs;
use rollout::RolloutCmd;
use run::RunArgs;
use scale::ScaleArgs;
use set::SetCmd;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a replica set that runs IMAGE (as `kubectl run` did in 2015).
    Run(Box<RunArgs>),
    /// Make a service: for a replica set, or for fixed external endpoints.
    Expose {
        #[command(subcommand)]
        what: ExposeCmd,
    },
    /// Change a replica set's replica count.
    Scale(ScaleArgs),
    /// Scale a replica set on its traffic, measured by pier's proxies:
    /// open connections, new connections/s, p99 time to first byte.
    Autoscale(AutoscaleArgs),
    /// List objects: nodes, rs, pods, svc, endpoints.
    Get(GetArgs),
    /// Show one object in detail, with its pods, endpoints and problems.
    Describe(DescribeArgs),
    /// Delete a pod (the supervisor replaces it), a replica set, a service,
    /// or with -f an application and all it owns.
    Delete(DeleteArgs),
    /// Create or update an application from Compose files.
    Apply(ApplyArgs),
    /// Show what `pier apply -f` would change.
    Diff(DiffArgs),
    /// Set or remove node labels: `pier label node NODE zone=a disk-`.
    Label(LabelArgs),
    /// Change a replica set's template: `pier set image rs NAME IMAGE`.
    Set {
        #[command(subcommand)]
        what: SetCmd,
    },
    /// Follow, list or undo a replica set's rollouts.
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Open the web dashboard: print a one-time login link to the agent's
    /// /ui/ (and open it in a browser when one is available).
    Dashboard(DashboardArgs),
    /// Print the client's and the agent's versions.
    Version,
    /// Make the mesh CA and node certificates.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
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
            // `pier get pods -w | head`: the reader left; not an error.
            if is_broken_pipe(&e) {
                return 0;
            }
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
        Command::Run(a) => run::run(server, *a).await,
        Command::Expose { what } => expose::run(server, what).await,
        Command::Scale(a) => scale::run(server, a).await,
        Command::Autoscale(a) => autoscale::run(server, a).await,
        Command::Get(a) => get::run(server, a).await,
        Command::Describe(a) => describe::run(server, a).await,
        Command::Delete(a) => delete::run(server, a).await,
        Command::Apply(a) => apply::apply(server, a).await,
        Command::Diff(a) => apply::diff(server, a).await,
        Command::Label(a) => label::run(server, a).await,
        Command::Set { what } => set::run(server, what).await,
        Command::Rollout { cmd } => rollout::run(server, cmd).await,
        Command::Dashboard(a) => dashboard::run(server, a).await,
        Command::Version => version::run(server).await,
        Command::Ca { cmd } => ca::run(cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
