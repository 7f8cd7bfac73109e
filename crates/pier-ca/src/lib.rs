//! The mesh CA tools behind `pier ca`: make the CA, issue node
//! certificates, revoke them. Only the binary's CLI (and tests, to make
//! certificates) use this crate; the data path (`pier-proxy`) reads the
//! files it writes and never signs anything, so rcgen and the CA key code
//! are not part of it. The file layout and the node-name rules are the
//! mesh's (`pier_proxy::tls`), so that what this crate writes is what an
//! agent loads.
//!
//! Everything uses rustls's ring provider (rcgen signs with ring too), so
//! aws-lc-rs is never compiled. Files:
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
//! existing file or a symlink planted there), then renamed over the target
//! (`files`).

mod files;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pier_proxy::tls::{
    CA_CERT_FILE, CRL_FILE, NODE_CERT_FILE, NODE_KEY_FILE, TlsError, node_server_name,
    peer_node_name, read_certs,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};

use files::{random_serial, read, read_crls, write_new, write_replace};

/// The CA key's file name (0600). Only `pier ca issue` and `pier ca
/// revoke` read it.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The serials the CA issued, one `SERIAL NODE NOT_AFTER` line each (in
/// the CA dir); `pier ca revoke NODE` revokes the ones of NODE.
pub const ISSUED_FILE: &str = "issued.txt";
/// The default lifetime of a node certificate: 90 days, renewed (re-issued
/// into the same directory, picked up without a restart) well before.
pub const DEFAULT_CERT_DAYS: u32 = 90;

/// 10 years: the CA outlives many rounds of node certificates.
const CA_VALIDITY_DAYS: u64 = 3650;
/// Backdate `not_before` by 5 minutes to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(300);

/// What went wrong in a CA tool. Errors about a file or a certificate are
/// the mesh's own ([`TlsError`]: the same words an agent uses for the same
/// file); the rest are the CA's.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{} already exists; refusing to overwrite an existing CA", path.display())]
    Exists { path: PathBuf },
    #[error("{what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid validity: {0}")]
    Validity(String),
    #[error("{what}")]
    NothingToRevoke { what: String },
}

/// Create a new mesh CA in `dir` (created if missing): `ca.pem` and
/// `ca-key.pem` (0600). Refuses to overwrite either file.
pub fn ca_init(dir: &Path) -> Result<(), CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CaError::Exists { path: p.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate().map_err(|source| CaError::Generate {
        what: "CA key",
        source,
    })?;
    let params = ca_params()?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CaError::Generate {
            what: "CA certificate",
            source,
        })?;
    // Key first: a CA cert without its key is useless, the reverse is retried.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams, CaError> {
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
) -> Result<(), CaError> {
    if days == 0 {
        return Err(CaError::Validity("days must be at least 1".into()));
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
) -> Result<(), CaError> {
    if not_after <= not_before {
        return Err(CaError::Validity(
            "not_after must be later than not_before".into(),
        ));
    }
    node_server_name(node)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let (ca_pem, issuer) = load_ca(ca_dir)?;

    let key = KeyPair::generate().map_err(|source| CaError::Generate {
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
        .map_err(|source| CaError::Generate {
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
        .map_err(|source| CaError::Generate {
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

/// The CA in `ca_dir`: its certificate (PEM), and the issuer that signs
/// with its key.
fn load_ca(ca_dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), CaError> {
    let text = |path: PathBuf| -> Result<String, CaError> {
        String::from_utf8(read(&path)?).map_err(|e| {
            TlsError::BadCert {
                path,
                reason: e.to_string(),
            }
            .into()
        })
    };
    let ca_pem = text(ca_dir.join(CA_CERT_FILE))?;
    let ca_key_pem = text(ca_dir.join(CA_KEY_FILE))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| CaError::Generate {
        what: "reading the CA key",
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| CaError::Generate {
        what: "reading the CA certificate",
        source,
    })?;
    Ok((ca_pem, issuer))
}

/// Appends `SERIAL NODE NOT_AFTER` to the CA's `issued.txt`.
fn record_issued(
    ca_dir: &Path,
    serial: &[u8],
    node: &pier_model::Name,
    not_after_unix: u64,
) -> Result<(), CaError> {
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
    Ok(f.sync_all().map_err(io)?)
}

pub(crate) fn hex(b: &[u8]) -> String {
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
) -> Result<RevokeReport, CaError> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let (_, issuer) = load_ca(ca_dir)?;
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
                return Err(CaError::from(TlsError::WrongNode {
                    path: path.to_owned(),
                    node: node.to_string(),
                    found,
                }));
            }
            let ca_der = read_certs(&ca_cert_path)?.swap_remove(0);
            let (_, ca_x) =
                x509_parser::parse_x509_certificate(&ca_der).map_err(|e| TlsError::BadCert {
                    path: ca_cert_path.clone(),
                    reason: e.to_string(),
                })?;
            if x.issuer() != ca_x.subject() {
                return Err(CaError::from(TlsError::NotFromCa {
                    cert: path.to_owned(),
                    ca: ca_cert_path.clone(),
                    reason: "its issuer is not the CA".into(),
                }));
            }
            vec![x.raw_serial().to_vec()]
        }
        None => {
            let path = ca_dir.join(ISSUED_FILE);
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(source) => return Err(TlsError::Io { path, source }.into()),
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
                return Err(CaError::NothingToRevoke {
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
        .map_err(|source| CaError::Generate {
            what: "signing the revocation list",
            source,
        })?;
    let pem = crl.pem().map_err(|source| CaError::Generate {
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
