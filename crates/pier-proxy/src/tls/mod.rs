//! Mesh identity: a node's certificate, key, CA and revocation list as
//! the mesh loads and checks them (`identity`), the rustls configs built
//! from them (`configs`), and their reload when the files change on disk
//! (`reload`).
//!
//! Everything here uses rustls with the ring provider only, so aws-lc-rs is
//! never compiled. PEM goes through `rustls::pki_types`. The files come
//! from the CA tools (`pier ca`, the `pier-ca` crate, outside the data
//! path): a node's directory holds `ca.pem`, `node.pem`, `node-key.pem`
//! (0600) and, once the CA revoked something, `crl.pem`. Agents reload a
//! renewed certificate and a new `crl.pem` without a restart.

mod configs;
mod identity;
mod reload;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};

pub use configs::{
    ServerSessionState, client_config, relay_client_config, relay_server_config, server_config,
};
pub(crate) use identity::unix_now;
pub use identity::{
    Identity, PeerCert, Revoked, check_issued_by_ca, check_node, load_identity,
    load_identity_with_crl, peer_node_name, pem_error, read_certs,
};
pub(crate) use reload::CertReloader;
pub use reload::FileStamps;

/// The CA certificate's file name, in the CA dir and in a node's dir.
pub const CA_CERT_FILE: &str = "ca.pem";
/// A node's certificate.
pub const NODE_CERT_FILE: &str = "node.pem";
/// A node's private key (0600).
pub const NODE_KEY_FILE: &str = "node-key.pem";
/// The CA's revocation list, in the CA dir and beside a node's `ca.pem`.
pub const CRL_FILE: &str = "crl.pem";
/// ALPN of the mesh protocol; a peer speaking another version fails the
/// handshake instead of misreading the header.
pub const MESH_ALPN: &[u8] = b"pier-mesh/1";
/// ALPN of the watch relays (`pier_store::relay` over TLS): a relay client
/// dialing a mesh port, or a mesh client a relay port, fails the handshake.
pub const RELAY_ALPN: &[u8] = b"pier-relay/1";

/// What is wrong with a node's mesh files or its TLS set-up, naming the
/// file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no certificate in PEM file", path.display())]
    NoCert { path: PathBuf },
    #[error("{}: cannot read PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: not a valid X.509 certificate: {reason}", path.display())]
    BadCert { path: PathBuf, reason: String },
    #[error("certificate {} expired at {not_after} (now {now}); renew it with `pier ca issue`", path.display())]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("certificate {} is not valid before {not_before} (now {now}); check the clock", path.display())]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("key {} does not belong to certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "node name {0:?} cannot be a TLS server name (all digits or hex-like); rename the node to use the mesh"
    )]
    NodeName(String),
    #[error("certificate {} was not issued by the mesh CA {}: {reason}", cert.display(), ca.display())]
    NotFromCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("certificate {} is for {found:?}, not for this node {node:?}; issue one with `pier ca issue {node}`", path.display())]
    WrongNode {
        path: PathBuf,
        node: String,
        found: String,
    },
    #[error("certificate {} is revoked by {}; issue a new one with `pier ca issue`", cert.display(), crl.display())]
    Revoked { cert: PathBuf, crl: PathBuf },
    #[error("revocation list {}: {reason}; make it again with `pier ca revoke` from the mesh CA", path.display())]
    BadCrl { path: PathBuf, reason: String },
}

/// The TLS server name of a node: its name as a DNS name. RFC 1123 names
/// that look like numbers (`123`, `0x1f`) are not valid DNS names for TLS.
pub fn node_server_name(
    node: &pier_model::Name,
) -> Result<rustls::pki_types::ServerName<'static>, TlsError> {
    rustls::pki_types::ServerName::try_from(node.as_str().to_owned())
        .map_err(|_| TlsError::NodeName(node.to_string()))
}

/// The `mesh:` section of the agent's config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Where the mesh listener binds, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// The mesh CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// This node's certificate (`node.pem`).
    pub cert: PathBuf,
    /// This node's private key (`node-key.pem`).
    pub key: PathBuf,
    /// The mesh CA's revocation list (`crl.pem`, from `pier ca revoke`).
    /// Unset: `crl.pem` beside `ca`, where a missing file revokes nothing.
    /// Set: the file must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl MeshConfig {
    /// The files of a directory written by `pier ca issue`.
    pub fn from_dir(listen: SocketAddr, dir: &Path) -> MeshConfig {
        MeshConfig {
            listen,
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(NODE_CERT_FILE),
            key: dir.join(NODE_KEY_FILE),
            crl: None,
        }
    }

    /// Where the revocation list is read from, and whether it must exist.
    pub fn crl_path(&self) -> (PathBuf, bool) {
        match &self.crl {
            Some(p) => (p.clone(), true),
            None => (self.ca.with_file_name(CRL_FILE), false),
        }
    }
}

/// The ring provider: the only one compiled into pier.
///
/// TLS 1.3 suites only, AES-128-GCM first: with AES-NI it is the fastest
/// suite and the mesh hop's bulk throughput is bounded by it.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}
