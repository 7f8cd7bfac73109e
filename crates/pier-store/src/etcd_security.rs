//! How [`EtcdStore`](crate::EtcdStore) proves who it is to etcd and checks
//! who etcd is: TLS (the CA that issued etcd's server certificates, and a
//! client certificate for `--client-cert-auth`) and an etcd user with its
//! password.
//!
//! Every file is read and checked here, once, before anything connects:
//! a missing file, a file that holds no PEM of the right kind, a key that
//! does not belong to the certificate, a certificate out of its validity
//! period, or a password file others can read is an error naming the file
//! and the problem. (tonic, underneath, skips a CA it cannot parse without
//! a word and would then fail every handshake as "unknown issuer".)

use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// TLS and authentication for etcd. The default is neither (plain
/// `http://`, no user): what `EtcdStore::connect` uses.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// Speak TLS (`https://` endpoints).
    pub tls: Option<EtcdTls>,
    /// Authenticate as this etcd user (etcd's `auth enable`).
    pub user: Option<EtcdUser>,
}

/// TLS settings: the CA to trust for etcd's server certificates, and
/// optionally the client certificate and key to present.
#[derive(Clone)]
pub struct EtcdTls {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    ca_path: PathBuf,
    cert_path: Option<PathBuf>,
    /// The same settings as a rustls config, for [`EtcdTls::diagnose`].
    probe: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_path)
            .field("cert", &self.cert_path)
            .finish()
    }
}

/// What is wrong with one of the files, naming it. The caller adds which
/// setting named the file and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for FileProblem {}

fn problem(path: &Path, problem: impl Into<String>) -> FileProblem {
    FileProblem {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, FileProblem> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_file() => {}
        Ok(_) => return Err(problem(path, "is not a file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(problem(path, "does not exist"));
        }
        Err(e) => return Err(problem(path, format!("cannot be read ({e})"))),
    }
    std::fs::read(path).map_err(|e| problem(path, format!("cannot be read ({e})")))
}

/// Every `CERTIFICATE` block of a PEM file; at least one, each a valid
/// X.509 certificate valid now.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, FileProblem> {
    let mut certs = Vec::new();
    for (i, c) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let c = c.map_err(|e| problem(path, format!("holds a bad PEM block ({e})")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&c).map_err(|e| {
            problem(
                path,
                format!(
                    "holds a CERTIFICATE block (number {}) that is not X.509 ({e})",
                    i + 1
                ),
            )
        })?;
        let validity = x509.validity();
        let now = x509_parser::time::ASN1Time::now();
        if now < validity.not_before {
            return Err(problem(
                path,
                format!(
                    "holds a certificate ({}) not valid before {} (check the clock)",
                    x509.subject(),
                    validity.not_before
                ),
            ));
        }
        if now > validity.not_after {
            return Err(problem(
                path,
                format!(
                    "holds a certificate ({}) that expired at {}",
                    x509.subject(),
                    validity.not_after
                ),
            ));
        }
        certs.push(c);
    }
    if certs.is_empty() {
        return Err(problem(
            path,
            "holds no certificate (no -----BEGIN CERTIFICATE----- block)",
        ));
    }
    Ok(certs)
}

impl EtcdTls {
    /// Reads and checks the CA bundle `ca`, and the client certificate and
    /// key if given: each PEM, each certificate valid now, the CA usable
    /// as a trust anchor, the key the certificate's.
    pub fn from_files(ca: &Path, client: Option<(&Path, &Path)>) -> Result<EtcdTls, FileProblem> {
        let ca_pem = read(ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certificates(ca, &ca_pem)? {
            roots
                .add(c)
                .map_err(|e| problem(ca, format!("holds a certificate that is no CA ({e})")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| problem(ca, format!("cannot be used: {e}")))?
        .with_root_certificates(roots);
        let mut probe = None;
        let identity = match client {
            None => None,
            Some((cert, key)) => {
                let cert_pem = read(cert)?;
                let key_pem = read(key)?;
                let chain = certificates(cert, &cert_pem)?;
                let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    problem(
                        key,
                        format!(
                            "holds no private key (no -----BEGIN PRIVATE KEY----- or EC/RSA PRIVATE KEY block: {e})"
                        ),
                    )
                })?;
                let signer = rustls::crypto::ring::sign::any_supported_type(&der)
                    .map_err(|e| problem(key, format!("holds a key rustls cannot use ({e})")))?;
                rustls::sign::CertifiedKey::new(chain.clone(), signer)
                    .keys_match()
                    .map_err(|e| {
                        problem(
                            key,
                            format!(
                                "is not the key of the certificate in {} ({e})",
                                cert.display()
                            ),
                        )
                    })?;
                probe = Some(
                    builder
                        .clone()
                        .with_client_auth_cert(chain, der.clone_key())
                        .map_err(|e| problem(key, format!("cannot be used: {e}")))?,
                );
                Some((cert_pem, key_pem))
            }
        };
        let mut probe = probe.unwrap_or_else(|| builder.with_no_client_auth());
        probe.alpn_protocols = vec![b"h2".to_vec()];
        Ok(EtcdTls {
            ca_pem,
            identity,
            ca_path: ca.to_owned(),
            cert_path: client.map(|(c, _)| c.to_owned()),
            probe: Arc::new(probe),
        })
    }

    /// Why a TLS connection to `url` (`https://HOST:PORT`) fails, found by
    /// a handshake of its own: gRPC reports a server refusing our
    /// certificate only as "connection closed", because under TLS 1.3 the
    /// server's alert comes after the client's handshake is done. Sends the
    /// HTTP/2 preface and reads the answer, where the alert shows. `None`
    /// when the handshake and the first read succeed (or it cannot tell).
    /// Blocking, at most about 4 s.
    pub fn diagnose(&self, url: &str) -> Option<String> {
        let authority = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = authority.split('/').next().unwrap_or(authority);
        let host = match authority.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => authority,
        };
        let addr = authority.to_socket_addrs().ok()?.next()?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
        let conn = rustls::ClientConnection::new(self.probe.clone(), name).ok()?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        tcp.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // The client preface and an empty SETTINGS frame.
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        if let Err(e) = tls.write_all(&hello).and_then(|()| tls.flush()) {
            return Some(e.to_string());
        }
        let mut buf = [0u8; 64];
        match tls.read(&mut buf) {
            Ok(0) => Some("the server closed the connection after the TLS handshake".into()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Whether a client certificate is presented.
    pub fn has_client_cert(&self) -> bool {
        self.identity.is_some()
    }

    pub(crate) fn options(&self) -> etcd_client::TlsOptions {
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            o = o.identity(etcd_client::Identity::from_pem(cert, key));
        }
        o
    }
}

/// An etcd user and its password. `Debug` does not show the password.
#[derive(Clone)]
pub struct EtcdUser {
    pub(crate) name: String,
    pub(crate) password: String,
}

impl fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl EtcdUser {
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> EtcdUser {
        EtcdUser {
            name: name.into(),
            password: password.into(),
        }
    }

    /// The user `name` with the password in `path`: the file's whole
    /// content less one trailing newline. The file must not be readable
    /// or writable by group or others (0600 or 0400), like ssh's keys.
    pub fn from_password_file(name: &str, path: &Path) -> Result<EtcdUser, FileProblem> {
        use std::os::unix::fs::PermissionsExt;
        if name.is_empty() {
            return Err(problem(path, "is given without a user name"));
        }
        let bytes = read(path)?;
        let mode = std::fs::metadata(path)
            .map_err(|e| problem(path, format!("cannot be read ({e})")))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(problem(
                path,
                format!(
                    "can be read or written by group or others (mode {:04o}); `chmod 600 {}`",
                    mode & 0o7777,
                    path.display()
                ),
            ));
        }
        let text = String::from_utf8(bytes).map_err(|_| problem(path, "is not UTF-8 text"))?;
        let password = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        if password.is_empty() {
            return Err(problem(path, "is empty"));
        }
        if password.contains('\n') {
            return Err(problem(
                path,
                "holds more than one line; put only the password in it",
            ));
        }
        Ok(EtcdUser::new(name, password))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}
