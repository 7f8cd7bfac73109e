//! The one reload mechanism of the mesh client and listener: a rustls
//! config rebuilt when a node's files change on disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::{Identity, MeshConfig, Revoked, TlsError, check_node, load_identity_with_crl};

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
