//! Mesh identity: the mesh CA, node certificates, and the rustls configs the
//! mesh builds from them.
//!
//! Everything here uses rustls with the ring provider only (rcgen signs with
//! ring too), so aws-lc-rs is never compiled. PEM goes through
//! `rustls::pki_types`. Files:
//!
//! - `pier ca init DIR` → `DIR/ca.pem`, `DIR/ca-key.pem` (0600);
//! - `pier ca issue NODE --ca DIR --out OUT` → `OUT/node.pem`,
//!   `OUT/node-key.pem` (0600) and a copy of `OUT/ca.pem` (and of
//!   `crl.pem` when the CA has one), so that `OUT` is all a node needs.
//!   Re-issuing replaces the files atomically (renewal). Each issued
//!   certificate's serial is recorded in `DIR/issued.txt`.
//! - `pier ca revoke NODE --ca DIR` → `DIR/crl.pem`, the CA's signed list
//!   of revoked certificates (every one recorded for NODE, or `--cert
//!   FILE`). Agents read `crl.pem` beside their `ca.pem` and reload it as
//!   they reload a renewed certificate.
//!
//! Files are replaced through a temporary file with a random name in the
//! same directory, created with `O_CREAT|O_EXCL|O_NOFOLLOW` (never an
//! existing file or a symlink planted there), then renamed over the target.

use std::collections::HashSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::client::Resumption;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
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
/// The CA's revocation list, in the CA dir and beside a node's `ca.pem`.
pub const CRL_FILE: &str = "crl.pem";
/// The serials the CA issued, one `SERIAL NODE NOT_AFTER` line each (in
/// the CA dir); `pier ca revoke NODE` revokes the ones of NODE.
pub const ISSUED_FILE: &str = "issued.txt";
/// The default lifetime of a node certificate: 90 days, renewed (re-issued
/// into the same directory, picked up without a restart) well before.
pub const DEFAULT_CERT_DAYS: u32 = 90;
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
    #[error("certificate {} is revoked by {}; issue a new one with `pier ca issue`", cert.display(), crl.display())]
    Revoked { cert: PathBuf, crl: PathBuf },
    #[error("revocation list {}: {reason}; make it again with `pier ca revoke` from the mesh CA", path.display())]
    BadCrl { path: PathBuf, reason: String },
    #[error("{what}")]
    NothingToRevoke { what: String },
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
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
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
    let serial = random_serial()?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
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
        let crl = ca_dir.join(CRL_FILE);
        if crl.exists() {
            write_replace(&out_dir.join(CRL_FILE), &read(&crl)?, 0o644)?;
        }
    }
    let not_after_unix = not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    record_issued(ca_dir, &serial, node, not_after_unix)
}

/// Appends `SERIAL NODE NOT_AFTER` to the CA's `issued.txt`.
fn record_issued(
    ca_dir: &Path,
    serial: &[u8],
    node: &pier_model::Name,
    not_after_unix: u64,
) -> Result<(), TlsError> {
    let path = ca_dir.join(ISSUED_FILE);
    let io = |source| TlsError::Io {
        path: path.clone(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(&path)
        .map_err(io)?;
    writeln!(f, "{} {node} {not_after_unix}", hex(serial)).map_err(io)?;
    f.sync_all().map_err(io)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What `pier ca revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeReport {
    /// The serials revoked by this call (hex).
    pub added: Vec<String>,
    /// Every serial the list now holds.
    pub total: usize,
    /// The list written.
    pub crl: PathBuf,
}

/// Revokes every certificate recorded in the CA's `issued.txt` for `node`
/// (or only `cert`, a certificate file the CA issued, e.g. one issued
/// before serials were recorded) and writes the CA's `crl.pem`, signed by
/// the CA, keeping what it already revoked.
pub fn ca_revoke(
    ca_dir: &Path,
    node: &pier_model::Name,
    cert: Option<&Path>,
) -> Result<RevokeReport, TlsError> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = String::from_utf8(read(&ca_cert_path)?).map_err(|e| TlsError::BadCert {
        path: ca_cert_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_key_pem = String::from_utf8(read(&ca_key_path)?).map_err(|e| TlsError::BadCert {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    // The serials to revoke.
    let wanted: Vec<Vec<u8>> = match cert {
        Some(path) => {
            let der = read_certs(path)?.swap_remove(0);
            let (_, x) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::BadCert {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            let found = peer_node_name(&der).unwrap_or_default();
            if found != node.as_str() {
                return Err(TlsError::WrongNode {
                    path: path.to_owned(),
                    node: node.to_string(),
                    found,
                });
            }
            let ca_der = read_certs(&ca_cert_path)?.swap_remove(0);
            let (_, ca_x) =
                x509_parser::parse_x509_certificate(&ca_der).map_err(|e| TlsError::BadCert {
                    path: ca_cert_path.clone(),
                    reason: e.to_string(),
                })?;
            if x.issuer() != ca_x.subject() {
                return Err(TlsError::NotFromCa {
                    cert: path.to_owned(),
                    ca: ca_cert_path.clone(),
                    reason: "its issuer is not the CA".into(),
                });
            }
            vec![x.raw_serial().to_vec()]
        }
        None => {
            let path = ca_dir.join(ISSUED_FILE);
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(source) => return Err(TlsError::Io { path, source }),
            };
            let v: Vec<Vec<u8>> = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (serial, n) = (f.next()?, f.next()?);
                    (n == node.as_str()).then(|| unhex(serial)).flatten()
                })
                .collect();
            if v.is_empty() {
                return Err(TlsError::NothingToRevoke {
                    what: format!(
                        "{} records no certificate for node {node}; revoke its certificate file with `pier ca revoke {node} --ca {} --cert FILE`",
                        path.display(),
                        ca_dir.display()
                    ),
                });
            }
            v
        }
    };
    // What the list already holds.
    let crl_path = ca_dir.join(CRL_FILE);
    let mut entries: Vec<(Vec<u8>, i64)> = Vec::new();
    let mut number: u64 = 0;
    if crl_path.exists() {
        for der in read_crls(&crl_path)? {
            let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| TlsError::BadCrl {
                path: crl_path.clone(),
                reason: e.to_string(),
            })?;
            for r in crl.iter_revoked_certificates() {
                entries.push((r.raw_serial().to_vec(), r.revocation_date.timestamp()));
            }
            if let Some(n) = crl.crl_number() {
                let d = n.to_u64_digits();
                number = number.max(d.first().copied().unwrap_or(0));
            }
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let mut added = Vec::new();
    for w in wanted {
        if !entries.iter().any(|(s, _)| *s == w) {
            added.push(hex(&w));
            entries.push((w, now.unix_timestamp()));
        }
    }
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::Generate {
        what: "reading the CA key",
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| TlsError::Generate {
            what: "reading the CA certificate",
            source,
        })?;
    let revoked_certs = entries
        .iter()
        .map(|(serial, at)| RevokedCertParams {
            serial_number: SerialNumber::from_slice(serial),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now - BACKDATE,
        // Agents do not enforce next_update (a stale list must not stop
        // the mesh); the CA's lifetime is as far as it can mean anything.
        next_update: now + Duration::from_secs(CA_VALIDITY_DAYS * 86_400),
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer)
        .map_err(|source| TlsError::Generate {
            what: "signing the revocation list",
            source,
        })?;
    let pem = crl.pem().map_err(|source| TlsError::Generate {
        what: "encoding the revocation list",
        source,
    })?;
    write_replace(&crl_path, pem.as_bytes(), 0o644)?;
    Ok(RevokeReport {
        added,
        total: entries.len(),
        crl: crl_path,
    })
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))
}

fn random_serial() -> Result<[u8; 16], TlsError> {
    let mut b = [0u8; 16];
    provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| TlsError::Validity("no randomness for a serial number".into()))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    Ok(b)
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
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
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

/// Creates `tmp` for writing, mode `mode`: `O_CREAT|O_EXCL|O_NOFOLLOW`,
/// so an existing file or a symlink planted at that name is an error,
/// never followed or reused.
pub(crate) fn create_temp(tmp: &Path, mode: u32) -> io::Result<fs::File> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(tmp)?;
    // The umask may have taken bits `mode` asked for; never adds any.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(f)
}

/// Write `path` atomically: a temp file with a random name in the same
/// directory ([`create_temp`]), then rename over `path` (rename replaces a
/// symlink at `path`, it does not follow it).
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let mut r = [0u8; 12];
        provider()
            .secure_random
            .fill(&mut r)
            .map_err(|_| io(io::Error::other("no randomness for a temporary file name")))?;
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", hex(&r)));
        match create_temp(&tmp, mode) {
            Ok(f) => break (tmp, f),
            // 96 random bits taken: someone is planting names. Retry a few
            // times, then give up.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(io(e)),
        }
    };
    let done = (|| {
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// The serials the mesh CA revoked (from its `crl.pem`), shared by the
/// listener, the client and every open tunnel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked {
    serials: HashSet<Vec<u8>>,
}

impl Revoked {
    /// Whether the certificate with this serial (DER content bytes) is
    /// revoked.
    pub fn contains(&self, serial: &[u8]) -> bool {
        self.serials.contains(serial)
    }
    pub fn len(&self) -> usize {
        self.serials.len()
    }
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// What a tunnel knows of its peer's certificate, read once per handshake
/// (full or resumed: a resumed session carries the certificate of the
/// full handshake it came from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The node name the certificate was issued for.
    pub node: String,
    /// Its serial (DER content bytes), as a CRL lists it.
    pub serial: Vec<u8>,
    /// The end of its validity, Unix seconds.
    pub not_after_unix: i64,
}

impl PeerCert {
    pub fn of(cert: &CertificateDer<'_>) -> Option<PeerCert> {
        let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
        Some(PeerCert {
            node: peer_node_name(cert)?,
            serial: x.raw_serial().to_vec(),
            not_after_unix: x.validity().not_after.timestamp(),
        })
    }

    /// Why this certificate may no longer carry a tunnel, if it may not:
    /// revoked, or past its validity.
    pub fn refusal(&self, revoked: &Revoked) -> Option<&'static str> {
        if revoked.contains(&self.serial) {
            Some("revoked")
        } else if unix_now() > self.not_after_unix {
            Some("peer_cert_expired")
        } else {
            None
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A node's loaded and checked identity: its chain and key, the CA roots,
/// and the CA's revocation list.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// The end of the node certificate's validity, in Unix seconds.
    pub not_after_unix: i64,
    /// The CA's revocation lists (empty: none).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    pub revoked: Arc<Revoked>,
    /// Changes when the CA or the revocation list changes: sessions
    /// resumed across such a change would skip the new checks, so the
    /// mesh starts a new ticketer and session cache then.
    pub trust_id: u64,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_after_unix: self.not_after_unix,
            crls: self.crls.clone(),
            revoked: self.revoked.clone(),
            trust_id: self.trust_id,
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
    let mut h = std::collections::hash_map::DefaultHasher::new();
    read(ca)?.hash(&mut h);
    Ok(Identity {
        chain,
        key: key_der,
        roots: Arc::new(roots),
        not_after_unix,
        crls: Vec::new(),
        revoked: Arc::new(Revoked::default()),
        trust_id: h.finish(),
    })
}

/// [`load_identity`], plus the CA's revocation list at `crl` (`required`:
/// a missing file is an error; otherwise it revokes nothing). The list must
/// be the CA's (its signature is checked by verifying this node's own
/// certificate against it), and must not revoke this node's certificate.
pub fn load_identity_with_crl(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crl: &Path,
    required: bool,
) -> Result<Identity, TlsError> {
    let mut id = load_identity(ca, cert, key)?;
    let bytes = match fs::read(crl) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => return Ok(id),
        Err(source) => {
            return Err(TlsError::Io {
                path: crl.to_owned(),
                source,
            });
        }
    };
    let bad = |reason: String| TlsError::BadCrl {
        path: crl.to_owned(),
        reason,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("no X509 CRL in the file".into()));
    }
    let mut serials = HashSet::new();
    for der in &crls {
        let (_, list) = x509_parser::parse_x509_crl(der).map_err(|e| bad(e.to_string()))?;
        for r in list.iter_revoked_certificates() {
            serials.insert(r.raw_serial().to_vec());
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| bad(e.to_string()))?;
    match verifier.verify_client_cert(
        &id.chain[0],
        &id.chain[1..],
        rustls::pki_types::UnixTime::now(),
    ) {
        Ok(_) => {}
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
            return Err(TlsError::Revoked {
                cert: cert.to_owned(),
                crl: crl.to_owned(),
            });
        }
        Err(e) => {
            return Err(bad(format!(
                "not usable with the mesh CA {}: {e}",
                ca.display()
            )));
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.trust_id.hash(&mut h);
    bytes.hash(&mut h);
    id.trust_id = h.finish();
    id.crls = crls;
    id.revoked = Arc::new(Revoked { serials });
    Ok(id)
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
        .with_crls(id.crls.iter().cloned())
        .only_check_end_entity_revocation()
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

/// TLS 1.3 only, server verified against the CA (and its revocation
/// list), our certificate as the client certificate, and the shared
/// `resumption` store.
pub fn client_config(
    id: &Identity,
    resumption: &Resumption,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(id.crls.iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| TlsError::Rustls {
            what: "the mesh server verifier",
            source: rustls::Error::General(e.to_string()),
        })?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 client config",
            source,
        })?
        .with_webpki_verifier(verifier)
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
/// Only new handshakes see a new config; the revocation list it loaded is
/// also published ([`CertReloader::revoked`]) so that open tunnels whose
/// peer it revokes are cut.
pub(crate) struct CertReloader<C> {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    crl: PathBuf,
    crl_required: bool,
    node: pier_model::Name,
    /// "client" or "listener", for the logs.
    side: &'static str,
    build: BuildConfig<C>,
    config: arc_swap::ArcSwap<C>,
    revoked: tokio::sync::watch::Sender<Arc<Revoked>>,
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
        let (crl, crl_required) = cfg.crl_path();
        let stamps = FileStamps::of(&[&cfg.ca, &cfg.cert, &cfg.key, &crl]);
        let build: BuildConfig<C> = Box::new(build);
        let id = Self::load_id(&cfg.ca, &cfg.cert, &cfg.key, &crl, crl_required, &node)?;
        let first = build(&id)?;
        Ok(CertReloader {
            ca: cfg.ca.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            crl,
            crl_required,
            node,
            side,
            build,
            config: arc_swap::ArcSwap::new(first),
            revoked: tokio::sync::watch::Sender::new(id.revoked.clone()),
            stamps: std::sync::Mutex::new((stamps, None)),
            reloads,
        })
    }

    fn load_id(
        ca: &Path,
        cert: &Path,
        key: &Path,
        crl: &Path,
        crl_required: bool,
        node: &pier_model::Name,
    ) -> Result<Identity, TlsError> {
        let id = load_identity_with_crl(ca, cert, key, crl, crl_required)?;
        check_node(&id, cert, node)?;
        Ok(id)
    }

    /// The config for the next handshake.
    pub(crate) fn current(&self) -> Arc<C> {
        self.config.load_full()
    }

    /// The revocation list last loaded; open tunnels watch it.
    pub(crate) fn revoked(&self) -> tokio::sync::watch::Receiver<Arc<Revoked>> {
        self.revoked.subscribe()
    }

    /// Rebuild the config if the files changed since the last attempt. A
    /// concurrent caller already doing it makes this one return at once.
    /// Returns true when a new config (and revocation list) took effect.
    pub(crate) fn reload_if_changed(&self) -> bool {
        let Ok(mut st) = self.stamps.try_lock() else {
            return false;
        };
        let now = FileStamps::of(&[&self.ca, &self.cert, &self.key, &self.crl]);
        if now == st.0 || st.1.as_ref() == Some(&now) {
            return false;
        }
        let r = Self::load_id(
            &self.ca,
            &self.cert,
            &self.key,
            &self.crl,
            self.crl_required,
            &self.node,
        )
        .and_then(|id| Ok(((self.build)(&id)?, id.revoked)));
        match r {
            Ok((cfg, revoked)) => {
                self.config.store(cfg);
                let n = revoked.len();
                self.revoked.send_if_modified(|cur| {
                    let changed = **cur != *revoked;
                    if changed {
                        *cur = revoked;
                    }
                    changed
                });
                *st = (now, None);
                self.reloads.get_or_create(&[("result", "ok")]).inc();
                tracing::info!(side = self.side, cert = %self.cert.display(), revoked = n, "mesh: reloaded certificates and revocation list for new handshakes");
                true
            }
            Err(e) => {
                st.1 = Some(now);
                self.reloads.get_or_create(&[("result", "error")]).inc();
                tracing::warn!(side = self.side, error = %e, "mesh: certificate reload failed; keeping the previous certificates");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attack (S1): a symlink or a file planted at the temporary name is
    /// never opened: creation fails, the target is untouched.
    #[test]
    fn temp_files_refuse_planted_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("victim");
        let link = dir.path().join(".node-key.pem.planted.tmp");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        let e = create_temp(&link, 0o600).expect_err("followed a planted symlink");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let dangling = dir.path().join(".dangling.tmp");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).expect("symlink");
        assert!(
            create_temp(&dangling, 0o600).is_err(),
            "created through a dangling symlink"
        );
        assert!(!dir.path().join("nowhere").exists());
        let e = create_temp(&victim, 0o600).expect_err("reused an existing file");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(fs::read(&victim).expect("read"), b"precious");
        // A fresh name works, with exactly the mode asked for.
        let ok = dir.path().join(".fresh.tmp");
        create_temp(&ok, 0o600).expect("fresh");
        let mode = fs::metadata(&ok).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Attack (S1): symlinks planted at the names the old code used
    /// (`.NAME.tmpPID`) to catch the node key. Issuing ignores them: the
    /// victim is untouched and the key is a new 0600 file.
    #[test]
    fn issuing_ignores_symlinks_at_predictable_temp_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        ca_init(&ca).expect("ca");
        let out = dir.path().join("n1");
        fs::create_dir_all(&out).expect("out");
        let victim = dir.path().join("stolen-key");
        fs::write(&victim, b"").expect("victim");
        for f in [NODE_KEY_FILE, NODE_CERT_FILE, CA_CERT_FILE] {
            let old = out.join(format!(".{f}.tmp{}", std::process::id()));
            std::os::unix::fs::symlink(&victim, old).expect("plant");
        }
        ca_issue(&pier_model::Name::new("n1").expect("name"), &ca, &out, 1).expect("issue");
        assert_eq!(
            fs::read(&victim).expect("victim"),
            b"",
            "the key went through a symlink"
        );
        let key = out.join(NODE_KEY_FILE);
        let md = fs::symlink_metadata(&key).expect("key");
        assert!(md.file_type().is_file(), "the key is a regular file");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind (only the planted links).
        let left: Vec<_> = fs::read_dir(&out)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
