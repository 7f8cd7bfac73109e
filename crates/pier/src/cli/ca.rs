//! `pier ca`: make the mesh CA, issue and revoke node certificates.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};

use super::args::{name_arg, usage};

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
        #[arg(long, default_value_t = pier_ca::DEFAULT_CERT_DAYS, value_name = "N")]
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

pub(super) fn run(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            pier_ca::ca_init(&dir)
                .with_context(|| format!("creating the mesh CA in {}", dir.display()))?;
            outln!(
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
            pier_ca::ca_issue(&node, &ca, &out, days).map_err(|e| {
                anyhow!(e).context(format!(
                    "issuing {node}'s certificate from {}",
                    ca.display()
                ))
            })?;
            outln!(
                "certificate for node {node} written to {} (node.pem, node-key.pem, ca.pem), valid {days} days",
                out.display()
            );
        }
        CaCmd::Revoke { node, ca, cert } => {
            let node = name_arg("node name", &node)?;
            let r = pier_ca::ca_revoke(&ca, &node, cert.as_deref()).map_err(|e| {
                anyhow!(e).context(format!(
                    "revoking {node}'s certificates in {}",
                    ca.display()
                ))
            })?;
            if r.added.is_empty() {
                outln!(
                    "{node}'s certificates were already revoked; {} lists {} in all",
                    r.crl.display(),
                    r.total
                );
            } else {
                outln!(
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
