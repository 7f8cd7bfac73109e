//! The rustls configs of the mesh listener and client, built from a
//! loaded [`Identity`].

use std::path::Path;
use std::sync::Arc;

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::server::{ProducesTickets, StoresServerSessions, WebPkiClientVerifier};
use rustls::{ClientConfig, ServerConfig};

use super::{Identity, MESH_ALPN, TlsError, provider};

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
    let mut cfg = mtls_server(id, ca_path, false)?;
    cfg.ticketer = sessions.ticketer.clone();
    cfg.session_storage = sessions.storage.clone();
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // The tunnel's records are handled by `mesh::record` once set up.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// What the mesh's and the relay's listeners share: TLS 1.3, our
/// certificate, and a client certificate of the CA required, its
/// revocation list honoured. `relay` names the relay's in errors.
fn mtls_server(id: &Identity, ca_path: &Path, relay: bool) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .with_crls(id.crls.iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|source| TlsError::Verifier {
            path: ca_path.to_owned(),
            source,
        })?;
    let (what_cfg, what_cert) = if relay {
        ("TLS 1.3 relay server config", "relay server certificate")
    } else {
        ("TLS 1.3 server config", "server certificate")
    };
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: what_cfg,
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            what: what_cert,
            source,
        })
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

/// The watch relay's listener (`pier_store::relay` behind
/// [`crate::relay_tls`]): TLS 1.3, a client certificate of the mesh CA
/// required (the revocation list honoured), ALPN [`super::RELAY_ALPN`] so
/// that a mesh client dialing it (or a relay client dialing a mesh port)
/// fails the handshake instead of misreading the stream. No session
/// resumption: every connection is long-lived and makes a full handshake,
/// so every one is checked against the current CA and revocation list.
pub fn relay_server_config(id: &Identity, ca_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = mtls_server(id, ca_path, true)?;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.alpn_protocols = vec![super::RELAY_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The watch relay's dialer: TLS 1.3, this node's certificate as the
/// client certificate, and the relay's certificate verified against the
/// mesh CA and its revocation list as that of *some* node of the mesh
/// ([`AnyNode`]): a relay is named by its address in `store.relays`, not by
/// its node name. No resumption (see [`relay_server_config`]).
pub fn relay_client_config(id: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(id.crls.iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| TlsError::Rustls {
            what: "the relay server verifier",
            source: rustls::Error::General(e.to_string()),
        })?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 relay client config",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyNode { inner }))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            what: "relay client certificate",
            source,
        })?;
    cfg.resumption = Resumption::disabled();
    cfg.enable_sni = false;
    cfg.alpn_protocols = vec![super::RELAY_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts a server certificate that the mesh CA issued to a node (chain,
/// validity, revocation list and signatures all checked by webpki, as for
/// the mesh), whatever the name the client dialed: the certificate is
/// checked against the node name it carries itself.
#[derive(Debug)]
struct AnyNode {
    inner: Arc<WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for AnyNode {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = super::peer_node_name(end_entity)
            .and_then(|n| rustls::pki_types::ServerName::try_from(n).ok())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
