//! A worker whose keeper is gone (`kill -9` of `pier agent`, a keeper
//! crash) is an **orphan**: it serves on, everything it ran (registration,
//! lease, DNS, proxy, mesh, supervisor), and listens on the **adoption
//! socket**, `<data_dir>/adopt.sock` (`SOCK_SEQPACKET`, mode 0600 in the
//! 0700 data dir; a peer of another uid is refused, SO_PEERCRED). A
//! keeper starting on that data dir connects first: the orphan makes the
//! connection its keeper's socket, hands it every listening socket it
//! serves on (`HOLD`, [`super::fdpass`]) and says `READY`; the keeper then
//! treats it as the old worker of an upgrade (hand off, start a worker of
//! its own, then SIGTERM the orphan once that one is ready). No socket is
//! closed in between.
//!
//! The decision is [`super::keeper::plan::keeper_gone`]; this module
//! carries it out.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, SocketAddrUnix, SocketFlags, SocketType, accept_with, bind, connect, listen,
    socket_with,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::keeper::plan::{Orphaned, keeper_gone};
use super::sockets::{OnKeeperGone, Sockets};

/// The adoption socket's name in the data dir.
const ADOPT_SOCK: &str = "adopt.sock";
/// An orphan nobody adopts says so again this often.
const REMIND_EVERY: Duration = Duration::from_secs(300);

pub(super) fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADOPT_SOCK)
}

/// Connects to the adoption socket at `path`.
pub(super) fn connect_to(path: &Path) -> Result<OwnedFd, Errno> {
    let s = socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    connect(&s, &SocketAddrUnix::new(path)?)?;
    Ok(s)
}

/// What a worker under a keeper does when the keeper's socket closes.
pub(super) struct Orphan {
    pub path: PathBuf,
    /// Cancelled on SIGTERM/SIGINT: the worker stops.
    pub root: CancellationToken,
    /// Cancelled on SIGUSR2: the worker has handed off (or is handing off).
    pub handoff: CancellationToken,
    /// The adoption socket at `path` is this worker's.
    pub listening: std::sync::atomic::AtomicBool,
}

impl Orphan {
    /// The worker stops: its adoption socket, if it has one, goes.
    pub fn leave(&self) {
        if self
            .listening
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl OnKeeperGone for Orphan {
    fn keeper_gone(self: Arc<Self>, sockets: &Arc<Sockets>) {
        sockets.forget_keeper();
        match keeper_gone(self.root.is_cancelled(), self.handoff.is_cancelled()) {
            Orphaned::Stopping => return,
            Orphaned::Drain => {
                warn!(
                    "the keeper is gone after this worker handed off; its successor (if started) \
                     holds the sockets: stopping accepting and draining"
                );
                self.root.cancel();
                return;
            }
            Orphaned::Serve => {}
        }
        warn!(
            pid = std::process::id(),
            adopt = %self.path.display(),
            "the keeper is gone (killed?): this worker serves on as an orphan (DNS, proxy, mesh, \
             registration, lease, supervisor); start `pier agent` with the same config to adopt it \
             without closing a port, or send it SIGTERM to stop it"
        );
        let listener = match listen_at(&self.path) {
            Ok(l) => l,
            Err(e) => {
                error!(
                    adopt = %self.path.display(),
                    error = %e,
                    "cannot listen for adoption; serving on, but a new `pier agent` will not \
                     find this worker (SIGTERM stops it)"
                );
                return;
            }
        };
        self.listening
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let me = rustix::process::getuid();
        let mut reminded = Instant::now();
        loop {
            if self.root.is_cancelled() {
                self.leave();
                return;
            }
            let conn = match accept_with(&listener, SocketFlags::CLOEXEC) {
                Ok(c) => c,
                Err(Errno::AGAIN | Errno::INTR) => {
                    if reminded.elapsed() >= REMIND_EVERY {
                        reminded = Instant::now();
                        warn!(
                            pid = std::process::id(),
                            adopt = %self.path.display(),
                            "still orphaned: no keeper; start `pier agent` with the same config to adopt this worker"
                        );
                    }
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "accepting on the adoption socket failed");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let peer = match rustix::net::sockopt::socket_peercred(&conn) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "an adopter's credentials cannot be read; refused");
                    continue;
                }
            };
            if peer.uid != me {
                warn!(
                    uid = peer.uid.as_raw(),
                    pid = peer.pid.as_raw_nonzero().get(),
                    "refused an adoption by another user"
                );
                continue;
            }
            // One adopter: later ones find no socket and start as usual
            // (and find the ports taken).
            self.leave();
            drop(listener);
            info!(
                keeper = peer.pid.as_raw_nonzero().get(),
                "a keeper adopts this worker"
            );
            if let Err(e) = sockets.adopted(conn, self.clone()) {
                // Its reader sees the connection close and comes back here.
                warn!(error = %e, "the adoption failed");
            }
            return;
        }
    }
}

/// Listens at `path`, after removing a socket file nobody answers on.
fn listen_at(path: &Path) -> std::io::Result<OwnedFd> {
    if std::fs::symlink_metadata(path).is_ok() {
        match connect_to(path) {
            Err(Errno::CONNREFUSED) => std::fs::remove_file(path)?,
            Err(Errno::NOENT) => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "another process answers on {} (two agents on one data dir?)",
                    path.display()
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let s = socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    bind(&s, &SocketAddrUnix::new(path)?)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&s, 4)?;
    // accept() wakes this often to check for SIGTERM and to remind.
    rustix::net::sockopt::set_socket_timeout(
        &s,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(1)),
    )?;
    Ok(s)
}
