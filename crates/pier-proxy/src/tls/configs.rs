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
