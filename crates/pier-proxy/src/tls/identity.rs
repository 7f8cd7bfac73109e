//! A node's identity as the mesh loads it: the CA, the certificate and
//! key, the revocation list, each checked once when (re)loaded, and what a
//! tunnel knows of its peer's certificate.

use std::collections::HashSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use super::{TlsError, node_server_name, provider};

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
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| pem_error(key, source))?;
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
    fs::read(ca)
        .map_err(|source| TlsError::Io {
            path: ca.to_owned(),
            source,
        })?
        .hash(&mut h);
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

/// A PEM read error as a [`TlsError`] naming the file.
pub fn pem_error(path: &Path, source: rustls::pki_types::pem::Error) -> TlsError {
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

/// The certificates of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
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
