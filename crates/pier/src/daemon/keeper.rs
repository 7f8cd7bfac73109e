//! The keeper: `pier agent`'s parent process, which holds every listening
//! socket and runs the agent proper as a worker child, so that neither an
//! upgrade nor a crash of the worker closes a port.
//!
//! - The worker gets its sockets from the keeper (a `SOCK_SEQPACKET` pair
//!   on its stdin, [`super::fdpass`]): a socket the keeper holds, else one
//!   the worker binds and hands over. A listener the worker closes for good
//!   (a deleted service) is released, and the keeper closes its copy; once
//!   a new worker is ready, every socket it did not ask for is closed too.
//! - A worker that dies is started again at once (then with backoff): its
//!   listening sockets stayed open, so new connections and DNS queries wait
//!   in the kernel's queues instead of being refused.
//! - SIGHUP (`systemctl reload pier`) upgrades: the serving worker hands
//!   off (stops writing to the store and closes it, keeps serving from its
//!   last snapshot), a new worker from the binary now on disk starts, takes
//!   the sockets, syncs and serves; only then the old one stops accepting
//!   and drains. The keeper itself is not replaced by a reload.
//! - SIGTERM/SIGINT stop every worker (the serving one deregisters) and the
//!   keeper exits with its code.
//! - A keeper that dies (`kill -9`) leaves its worker serving as an orphan
//!   ([`super::orphan`]); a keeper starting on the same data dir adopts it
//!   over `<data_dir>/adopt.sock` (its sockets, then an upgrade's hand-off)
//!   before it starts a worker of its own.
//!
//! Decisions are in [`plan`]; this module only carries them out.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
use rustix::process::{Pid, Signal, WaitOptions, kill_process, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::fdpass::{self, Reply, Request};

pub mod plan;

use self::plan::{Action, Connect, Event, Holdings, Plan, Probe, Worker};

/// Set in a worker's environment: its stdin is the keeper's socket.
pub const WORKER_ENV: &str = "PIER_KEEPER_WORKER";
/// Set when the keeper asks a new binary to check the config and exit
/// (0, or 64 with the reason on stderr) before an upgrade.
pub const CHECK_ENV: &str = "PIER_CHECK_CONFIG";

/// Shared by the connection tasks; a std mutex: tiny sections, no await.
pub(super) type Shared = Arc<Mutex<Holdings<OwnedFd>>>;

struct Keeper {
    exe: PathBuf,
    args: Vec<OsString>,
    holdings: Shared,
    events: mpsc::UnboundedSender<Event>,
    born: HashMap<Worker, Instant>,
}

/// Runs the keeper until its last worker is gone. Returns the exit code.
pub async fn run(data_dir: PathBuf) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "cannot find the pier binary to start the worker");
            return 1;
        }
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let sigs = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::child()),
    );
    let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut chld)) = sigs else {
        error!("cannot install the keeper's signal handlers");
        return 1;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut k = Keeper {
        exe,
        args,
        holdings: Arc::default(),
        events: tx,
        born: HashMap::new(),
    };
    let mut plan = match find_orphan(&data_dir) {
        Some((orphan, conn)) => {
            if let Err(e) = k.adopt(orphan, conn) {
                error!(error = %e, "cannot read the orphaned worker's socket");
                return 1;
            }
            info!(
                keeper = std::process::id(),
                orphan,
                "keeper started; adopting the orphaned worker (its sockets, then a hand-off to a new worker)"
            );
            Plan::adopting(orphan)
        }
        None => {
            let first = match k.spawn() {
                Ok(w) => w,
                Err(e) => {
                    error!(error = %e, "cannot start the worker");
                    return 1;
                }
            };
            info!(
                keeper = std::process::id(),
                worker = first,
                "keeper started; SIGHUP upgrades the worker"
            );
            Plan::started(first)
        }
    };
    let mut restart_at: Option<tokio::time::Instant> = None;
    loop {
        let ev = tokio::select! {
            _ = hup.recv() => {
                match k.check_config() {
                    Ok(()) => Event::Upgrade,
                    Err(e) => {
                        error!("upgrade refused, the worker keeps running: {e}");
                        continue;
                    }
                }
            }
            _ = term.recv() => Event::Stop,
            _ = int.recv() => Event::Stop,
            _ = chld.recv() => {
                for ev in k.reap() {
                    if let Some(code) = k.apply(&mut plan, ev, &mut restart_at) {
                        return code;
                    }
                }
                continue;
            }
            Some(ev) = rx.recv() => ev,
            _ = sleep_until(restart_at) => {
                restart_at = None;
                Event::RestartDue
            }
        };
        if let Some(code) = k.apply(&mut plan, ev, &mut restart_at) {
            return code;
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Keeper {
    /// Feeds `ev` to the plan and carries out its actions; `Some(code)`
    /// when the keeper is to exit.
    fn apply(
        &mut self,
        plan: &mut Plan,
        ev: Event,
        restart_at: &mut Option<tokio::time::Instant>,
    ) -> Option<i32> {
        for a in plan.on(ev) {
            match a {
                Action::Spawn => match self.spawn() {
                    Ok(w) => plan.spawned(w),
                    Err(e) => {
                        error!(error = %e, "cannot start a worker; retrying in 1 s");
                        *restart_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                },
                Action::SpawnAfter(d) => {
                    *restart_at = Some(tokio::time::Instant::now() + d);
                }
                Action::HandOff(w) => signal_worker(w, Signal::USR2),
                Action::Terminate(w) => signal_worker(w, Signal::TERM),
                Action::Sweep(w) => {
                    let gone = lock(&self.holdings).sweep(w);
                    for (key, _fd) in gone {
                        info!(proto = ?key.0, addr = %key.1, "socket no longer wanted; closed");
                    }
                }
                Action::Log(m) => info!("{m}"),
                Action::Exit(code) => return Some(code),
            }
        }
        None
    }

    /// Starts a worker from the binary on disk with the keeper's own
    /// arguments; its stdin is its end of a new socket pair.
    fn spawn(&mut self) -> std::io::Result<Worker> {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let child = Command::new(&self.exe)
            .args(&self.args)
            .env(WORKER_ENV, "1")
            .env_remove(CHECK_ENV)
            .stdin(Stdio::from(theirs))
            .spawn()?;
        let w = child.id() as Worker;
        // The child is reaped through waitpid on SIGCHLD, not this handle.
        drop(child);
        self.born.insert(w, Instant::now());
        info!(worker = w, exe = %self.exe.display(), "worker started");
        // One thread per worker, blocked in recvmsg until it speaks or its
        // end closes (it exits).
        let (h, ev) = (self.holdings.clone(), self.events.clone());
        std::thread::Builder::new()
            .name(format!("keeper-{w}"))
            .spawn(move || serve_worker(w, ours, h, ev))?;
        Ok(w)
    }

    /// Serves the orphan `w` on its adoption connection as one of the
    /// keeper's workers. It is no child of this keeper: its exit is its
    /// end of the connection closing.
    fn adopt(&mut self, w: Worker, conn: OwnedFd) -> std::io::Result<()> {
        self.born.insert(w, Instant::now());
        let (h, ev) = (self.holdings.clone(), self.events.clone());
        std::thread::Builder::new()
            .name(format!("keeper-{w}"))
            .spawn(move || {
                let t0 = Instant::now();
                serve_worker(w, conn, h, ev.clone());
                info!(worker = w, "worker exited (adopted; its socket closed)");
                let _ = ev.send(Event::Exited {
                    worker: w,
                    code: 0,
                    lived: t0.elapsed(),
                });
            })?;
        Ok(())
    }

    /// Every exited child, as events.
    fn reap(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            match waitpid(None, WaitOptions::NOHANG) {
                Ok(Some((pid, st))) => {
                    let w = pid.as_raw_nonzero().get();
                    let code = st
                        .exit_status()
                        .or_else(|| st.terminating_signal().map(|s| 128 + s))
                        .unwrap_or(1);
                    let lived = self
                        .born
                        .remove(&w)
                        .map(|t| t.elapsed())
                        .unwrap_or_default();
                    if code != 0 {
                        warn!(worker = w, code, "worker exited");
                    } else {
                        info!(worker = w, "worker exited");
                    }
                    out.push(Event::Exited {
                        worker: w,
                        code,
                        lived,
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    if e != rustix::io::Errno::CHILD {
                        warn!(error = %e, "waitpid failed");
                    }
                    break;
                }
            }
        }
        out
    }

    /// Before an upgrade: the binary on disk must accept the config, or
    /// the running worker is left alone.
    fn check_config(&self) -> Result<(), String> {
        let out = Command::new(&self.exe)
            .args(&self.args)
            .env(CHECK_ENV, "1")
            .env_remove(WORKER_ENV)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} does not accept the config ({}): {}",
                self.exe.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// An orphaned worker answering on `data_dir`'s adoption socket, with the
/// connection; a socket file nobody answers on is removed.
fn find_orphan(data_dir: &Path) -> Option<(Worker, OwnedFd)> {
    let path = super::orphan::socket_path(data_dir);
    let (c, conn) = match super::orphan::connect_to(&path) {
        Ok(conn) => match rustix::net::sockopt::socket_peercred(&conn) {
            Ok(p) => (
                Connect::Peer {
                    pid: p.pid.as_raw_nonzero().get(),
                    uid: p.uid.as_raw(),
                },
                Some(conn),
            ),
            Err(e) => {
                warn!(adopt = %path.display(), error = %e, "cannot read the adoption socket's owner; starting a worker");
                return None;
            }
        },
        Err(rustix::io::Errno::NOENT) => (Connect::NoFile, None),
        Err(rustix::io::Errno::CONNREFUSED) => (Connect::Refused, None),
        Err(e) => {
            warn!(adopt = %path.display(), error = %e, "cannot probe the adoption socket; starting a worker");
            return None;
        }
    };
    match plan::probe(c, rustix::process::getuid().as_raw()) {
        Probe::Absent => None,
        Probe::Stale => {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    info!(adopt = %path.display(), "removed a stale adoption socket (no orphan answers on it)")
                }
                Err(e) => {
                    warn!(adopt = %path.display(), error = %e, "cannot remove a stale adoption socket")
                }
            }
            None
        }
        Probe::Foreign { uid } => {
            warn!(adopt = %path.display(), uid, "the adoption socket answers as another user; not adopting");
            None
        }
        Probe::Adopt(pid) => conn.map(|c| (pid, c)),
    }
}

fn lock(h: &Shared) -> std::sync::MutexGuard<'_, Holdings<OwnedFd>> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

fn signal_worker(w: Worker, sig: Signal) {
    if let Some(pid) = Pid::from_raw(w)
        && let Err(e) = kill_process(pid, sig)
    {
        warn!(worker = w, signal = ?sig, error = %e, "cannot signal the worker");
    }
}

/// Answers one worker's requests until it closes its end.
pub(super) fn serve_worker(
    w: Worker,
    conn: OwnedFd,
    holdings: Shared,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let got = match fdpass::recv(conn.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(worker = w, error = %e, "keeper socket failed");
                return;
            }
        };
        let (text, fd) = got;
        let req = match Request::parse(&text) {
            Ok(r) => r,
            Err(e) => {
                warn!(worker = w, "bad request from the worker: {e}");
                reply(&conn, w, Reply::Err(e), None);
                continue;
            }
        };
        match req {
            Request::Get(key) => {
                let h = lock(&holdings);
                match h_get(h, w, &key) {
                    Some(dup) => reply(&conn, w, Reply::Fd, Some(dup)),
                    None => reply(&conn, w, Reply::None, None),
                }
            }
            Request::Hold(key) => match fd {
                Some(fd) => {
                    drop(lock(&holdings).hold(w, key, fd));
                    reply(&conn, w, Reply::Ok, None);
                }
                None => reply(&conn, w, Reply::Err("HOLD without a socket".into()), None),
            },
            Request::Release(key) => {
                if lock(&holdings).release(&key).is_some() {
                    info!(proto = ?key.0, addr = %key.1, "socket released; closed");
                }
                reply(&conn, w, Reply::Ok, None);
            }
            Request::Ready => {
                let _ = events.send(Event::Ready(w));
                reply(&conn, w, Reply::Ok, None);
            }
            Request::Released => {
                let _ = events.send(Event::Released(w));
                reply(&conn, w, Reply::Ok, None);
            }
        }
    }
}

/// A duplicate of the held socket, so the lock is not held while sending.
fn h_get(
    mut h: std::sync::MutexGuard<'_, Holdings<OwnedFd>>,
    w: Worker,
    key: &fdpass::SockKey,
) -> Option<OwnedFd> {
    h.get(w, key).and_then(|fd| fd.try_clone().ok())
}

fn reply(conn: &OwnedFd, w: Worker, r: Reply, fd: Option<OwnedFd>) {
    let sent = fdpass::send(conn.as_fd(), &r.encode(), fd.as_ref().map(|f| f.as_fd()));
    if let Err(e) = sent {
        warn!(worker = w, error = %e, "cannot answer the worker");
    }
}
