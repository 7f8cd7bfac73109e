//! Mesh identity: the mesh CA, node certificates, and the rustls configs the
//! mesh builds from them.
//!
//! Everything here uses rustls with the ring provider only (rcgen signs with
//! ring too), so aws-lc-rs is never compiled. PEM goes through
//! `rustls::pki_types`. Files:
//!
//! - `pier ca init DIR` → `DIR/ca.pem`, `DIR/ca-key.pem` (0600);
//! - `pier ca issue NODE --ca DIR --out OUT` → `OUT/node.pem`,
//!   `OUT/node-key.pem` (0600) and a copy of `OUT/ca.pem`, so that `OUT` is
//!   all a node needs. Re-issuing replaces the files atomically (renewal).

use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, StoresServerSessions, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// The CA certificate's file name, in the CA dir and in a node's dir.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name (0600). Only `pier ca issue` reads it.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// A node's certificate.
pub const NODE_CERT_FILE: &str = "node.pem";
/// A node's private key (0600).
pub const NODE_KEY_FILE: &str = "node-key.pem";
/// ALPN of the mesh protocol; a peer speaking another version fails the
/// handshake instead of misreading the header.
pub const MESH_ALPN: &[u8] = b"pier-mesh/1";

/// 10 years: the CA outlives many rounds of node certificates.
const CA_VALIDITY_DAYS: u64 = 3650;
/// Backdate `not_before` by 5 minutes to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} already exists; refusing to overwrite an existing CA", path.display())]
    Exists { path: PathBuf },
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
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid validity: {0}")]
    Validity(String),
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
}

impl MeshConfig {
    /// The three files of a directory written by `pier ca issue`.
    pub fn from_dir(listen: SocketAddr, dir: &Path) -> MeshConfig {
        MeshConfig {
            listen,
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(NODE_CERT_FILE),
            key: dir.join(NODE_KEY_FILE),
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

/// Create a new mesh CA in `dir` (created if missing): `ca.pem` and
/// `ca-key.pem` (0600). Refuses to overwrite either file.
pub fn ca_init(dir: &Path) -> Result<(), TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Exists { path: p.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "CA key",
        source,
    })?;
    let params = ca_params()?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| TlsError::Generate {
            what: "CA certificate",
            source,
        })?;
    // Key first: a CA cert without its key is useless, the reverse is retried.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "pier mesh CA");
    dn.push(DnType::OrganizationName, "pier");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(CA_VALIDITY_DAYS * 86_400)).into();
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Issue a certificate for `node`, valid for `days` days from now, signed by
/// the CA in `ca_dir`. Writes `node.pem`, `node-key.pem` (0600) and a copy of
/// `ca.pem` into `out_dir` (created if missing), each replaced atomically.
pub fn ca_issue(
    node: &pier_model::Name,
    ca_dir: &Path,
    out_dir: &Path,
    days: u32,
) -> Result<(), TlsError> {
    if days == 0 {
        return Err(TlsError::Validity("days must be at least 1".into()));
    }
    let now = SystemTime::now();
    ca_issue_with_validity(
        node,
        ca_dir,
        out_dir,
        now - BACKDATE,
        now + Duration::from_secs(u64::from(days) * 86_400),
    )
}

/// [`ca_issue`] with an explicit validity window (tests use one in the past).
pub fn ca_issue_with_validity(
    node: &pier_model::Name,
    ca_dir: &Path,
    out_dir: &Path,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), TlsError> {
    if not_after <= not_before {
        return Err(TlsError::Validity(
            "not_after must be later than not_before".into(),
        ));
    }
    node_server_name(node)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read(&ca_cert_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    let ca_pem = String::from_utf8(ca_pem).map_err(|e| TlsError::BadCert {
        path: ca_cert_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_key_pem = String::from_utf8(ca_key_pem).map_err(|e| TlsError::BadCert {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::Generate {
        what: "reading the CA key",
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| TlsError::Generate {
            what: "reading the CA certificate",
            source,
        })?;

    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "node key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node.as_str());
    params.distinguished_name = dn;
    let dns = node
        .as_str()
        .to_owned()
        .try_into()
        .map_err(|source| TlsError::Generate {
            what: "node name as a DNS SAN",
            source,
        })?;
    params.subject_alt_names = vec![SanType::DnsName(dns)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial()?);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| TlsError::Generate {
            what: "signing the node certificate",
            source,
        })?;

    fs::create_dir_all(out_dir).map_err(|source| TlsError::Io {
        path: out_dir.to_owned(),
        source,
    })?;
    // Key first, then cert: a reloader that sees the new key with the old
    // cert finds a mismatch and retries on its next poll.
    write_replace(
        &out_dir.join(NODE_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_replace(&out_dir.join(NODE_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    if out_dir.join(CA_CERT_FILE) != ca_cert_path {
        write_replace(&out_dir.join(CA_CERT_FILE), ca_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut b = [0u8; 16];
    provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| TlsError::Validity("no randomness for a serial number".into()))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    Ok(SerialNumber::from_slice(&b))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                TlsError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Write `path` atomically: a temp file in the same directory, then rename.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io)?;
        // `mode` applies only on creation; a leftover temp file keeps its own.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)
}

/// A node's loaded and checked identity: its chain and key, and the CA roots.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// The end of the node certificate's validity, in Unix seconds.
    pub not_after_unix: i64,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_after_unix: self.not_after_unix,
        }
    }
}

/// Read the CA, the certificate and the key, and check that the certificates
/// are valid now and that the key belongs to the certificate.
pub fn load_identity(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let ca_certs = read_certs(ca)?;
    for c in &ca_certs {
        check_validity(ca, c)?;
    }
    let chain = read_certs(cert)?;
    let not_after_unix = check_validity(cert, &chain[0])?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| pem_err(key, source))?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider()).map_err(
        |source| TlsError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        },
    )?;
    let mut roots = RootCertStore::empty();
    for c in ca_certs {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: "adding the mesh CA to the trust roots",
            source,
        })?;
    }
    Ok(Identity {
        chain,
        key: key_der,
        roots: Arc::new(roots),
        not_after_unix,
    })
}

fn pem_err(path: &Path, source: rustls::pki_types::pem::Error) -> TlsError {
    match source {
        rustls::pki_types::pem::Error::Io(e) => TlsError::Io {
            path: path.to_owned(),
            source: e,
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Check `not_before <= now <= not_after`; returns `not_after` (Unix s).
fn check_validity(path: &Path, der: &CertificateDer<'_>) -> Result<i64, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCert {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let v = x509.validity();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let now_s = || {
        x509_parser::time::ASN1Time::from_timestamp(now)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| now.to_string())
    };
    if now < v.not_before.timestamp() {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: v.not_before.to_string(),
            now: now_s(),
        });
    }
    if now > v.not_after.timestamp() {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: v.not_after.to_string(),
            now: now_s(),
        });
    }
    Ok(v.not_after.timestamp())
}

/// The node name a peer's certificate was issued for: its first DNS SAN,
/// else its common name.
pub fn peer_node_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                return Some((*d).to_owned());
            }
        }
    }
    x509.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// Check that the identity's certificate names `node` (its DNS SAN), so
/// that peers dialing `node` accept it.
pub fn check_node(
    id: &Identity,
    cert_path: &Path,
    node: &pier_model::Name,
) -> Result<(), TlsError> {
    node_server_name(node)?;
    let found = peer_node_name(&id.chain[0]).unwrap_or_default();
    if found != node.as_str() {
        return Err(TlsError::WrongNode {
            path: cert_path.to_owned(),
            node: node.to_string(),
            found,
        });
    }
    Ok(())
}

/// Check that the identity's certificate chains to its mesh CA (the roots
/// loaded from `ca_path`) and may act as a mesh client, exactly as a peer's
/// mesh listener will check it: a certificate from another CA is a clear
/// start-up error rather than refused handshakes later.
pub fn check_issued_by_ca(id: &Identity, ca_path: &Path, cert_path: &Path) -> Result<(), TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .build()
        .map_err(|source| TlsError::Verifier {
            path: ca_path.to_owned(),
            source,
        })?;
    verifier
        .verify_client_cert(
            &id.chain[0],
            &id.chain[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| TlsError::NotFromCa {
            cert: cert_path.to_owned(),
            ca: ca_path.to_owned(),
            reason: e.to_string(),
        })
}

/// Session state shared by every config built over a server's lifetime, so
/// that tickets issued before a certificate reload still resume after it.
#[derive(Clone, Debug)]
pub struct ServerSessionState {
    pub ticketer: Arc<dyn ProducesTickets>,
    pub storage: Arc<dyn StoresServerSessions + Send + Sync>,
}

impl ServerSessionState {
    pub fn new() -> Result<ServerSessionState, TlsError> {
        Ok(ServerSessionState {
            ticketer: rustls::crypto::ring::Ticketer::new().map_err(|source| TlsError::Rustls {
                what: "creating the session ticketer",
                source,
            })?,
            // 1024 sessions: only used by clients that do not take tickets.
            storage: rustls::server::ServerSessionMemoryCache::new(1024),
        })
    }
}

/// TLS 1.3 only, client certificate required and verified against the CA,
/// stateless session tickets for resumption.
pub fn server_config(
    id: &Identity,
    ca_path: &Path,
    sessions: &ServerSessionState,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier {
            path: ca_path.to_owned(),
            source,
        })?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 server config",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            what: "server certificate",
            source,
        })?;
    cfg.ticketer = sessions.ticketer.clone();
    cfg.session_storage = sessions.storage.clone();
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // The tunnel's records are handled by `mesh::record` once set up.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// TLS 1.3 only, server verified against the CA, our certificate as the
/// client certificate, and the shared `resumption` store.
pub fn client_config(
    id: &Identity,
    resumption: &Resumption,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 client config",
            source,
        })?
        .with_root_certificates(id.roots.clone())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            what: "client certificate",
            source,
        })?;
    cfg.resumption = resumption.clone();
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // The tunnel's records are handled by `mesh::record` once set up.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The modification stamps of the three files, to notice a renewal on disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileStamps(Vec<Option<(SystemTime, u64, u64)>>);

impl FileStamps {
    pub fn of(paths: &[&Path]) -> FileStamps {
        use std::os::unix::fs::MetadataExt;
        FileStamps(
            paths
                .iter()
                .map(|p| {
                    fs::metadata(p)
                        .ok()
                        .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), m.ino()))
                })
                .collect(),
        )
    }
}

type BuildConfig<C> = Box<dyn Fn(&Identity) -> Result<Arc<C>, TlsError> + Send + Sync>;

/// A rustls config built from a node's mesh files, rebuilt when they change
/// on disk: the one reload mechanism of the mesh client and listener. A
/// rebuild that fails (often a renewal caught half-way: new key, old cert)
/// keeps the previous config and is tried again when the files change again.
/// Only new handshakes see a new config; open connections are untouched.
pub(crate) struct CertReloader<C> {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    node: pier_model::Name,
    /// "client" or "listener", for the logs.
    side: &'static str,
    build: BuildConfig<C>,
    config: arc_swap::ArcSwap<C>,
    /// (loaded, last failed) stamps. A std Mutex, only `try_lock`ed, never
    /// held across an `.await`.
    stamps: std::sync::Mutex<(FileStamps, Option<FileStamps>)>,
    reloads: Family<[(&'static str, &'static str); 1], Counter>,
}

impl<C> CertReloader<C> {
    /// Loads the files (checking that the certificate names `node`) and
    /// builds the first config with `build`.
    pub(crate) fn new(
        cfg: &MeshConfig,
        node: pier_model::Name,
        side: &'static str,
        reloads: Family<[(&'static str, &'static str); 1], Counter>,
        build: impl Fn(&Identity) -> Result<Arc<C>, TlsError> + Send + Sync + 'static,
    ) -> Result<CertReloader<C>, TlsError> {
        let stamps = FileStamps::of(&[&cfg.ca, &cfg.cert, &cfg.key]);
        let build: BuildConfig<C> = Box::new(build);
        let first = Self::load_with(&cfg.ca, &cfg.cert, &cfg.key, &node, &build)?;
        Ok(CertReloader {
            ca: cfg.ca.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            node,
            side,
            build,
            config: arc_swap::ArcSwap::new(first),
            stamps: std::sync::Mutex::new((stamps, None)),
            reloads,
        })
    }

    fn load_with(
        ca: &Path,
        cert: &Path,
        key: &Path,
        node: &pier_model::Name,
        build: &BuildConfig<C>,
    ) -> Result<Arc<C>, TlsError> {
        let id = load_identity(ca, cert, key)?;
        check_node(&id, cert, node)?;
        build(&id)
    }

    fn load(&self) -> Result<Arc<C>, TlsError> {
        Self::load_with(&self.ca, &self.cert, &self.key, &self.node, &self.build)
    }

    /// The config for the next handshake.
    pub(crate) fn current(&self) -> Arc<C> {
        self.config.load_full()
    }

    /// Rebuild the config if the files changed since the last attempt. A
    /// concurrent caller already doing it makes this one return at once.
    pub(crate) fn reload_if_changed(&self) {
        let Ok(mut st) = self.stamps.try_lock() else {
            return;
        };
        let now = FileStamps::of(&[&self.ca, &self.cert, &self.key]);
        if now == st.0 || st.1.as_ref() == Some(&now) {
            return;
        }
        match self.load() {
            Ok(cfg) => {
                self.config.store(cfg);
                *st = (now, None);
                self.reloads.get_or_create(&[("result", "ok")]).inc();
                tracing::info!(side = self.side, cert = %self.cert.display(), "mesh: reloaded certificates for new handshakes");
            }
            Err(e) => {
                st.1 = Some(now);
                self.reloads.get_or_create(&[("result", "error")]).inc();
                tracing::warn!(side = self.side, error = %e, "mesh: certificate reload failed; keeping the previous certificates");
            }
        }
    }
}
