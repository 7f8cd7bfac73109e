//! A real etcd for tests: starts Debian's `/usr/bin/etcd` on random free
//! loopback ports with a fresh data dir, and removes both when dropped.
//!
//! Always compiled so that tests in every crate can use it; it is not used
//! by the product itself.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The etcd binary; `PIER_ETCD_BIN` overrides it.
const DEFAULT_ETCD: &str = "/usr/bin/etcd";
/// How long `start`/`restart` wait for etcd to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One single-member etcd. Drop kills it (by PID) and removes its data dir.
#[derive(Debug)]
pub struct EtcdServer {
    /// `http://127.0.0.1:PORT`.
    pub client_url: String,
    /// `127.0.0.1:PORT`.
    pub endpoint: String,
    peer_url: String,
    name: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on random loopback ports with a fresh temp data dir, and
    /// waits until it serves requests.
    pub fn start() -> io::Result<EtcdServer> {
        // A port picked free can be taken by another test before etcd binds
        // it: try again with fresh ports.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start() {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!("etcd start failed, retrying with new ports: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn try_start() -> io::Result<EtcdServer> {
        let dir = fresh_dir()?;
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pier-etcd".into());
        let mut server = EtcdServer {
            client_url: format!("http://127.0.0.1:{client_port}"),
            endpoint: format!("127.0.0.1:{client_port}"),
            peer_url: format!("http://127.0.0.1:{peer_port}"),
            name,
            dir,
            child: None,
        };
        // On failure `server` drops here and removes its dir.
        server.spawn_and_wait()?;
        Ok(server)
    }

    /// The data directory (kept across `kill`/`restart`).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, keeping the data dir. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again with the same ports and data dir, and waits until it
    /// serves requests.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        // The client port may linger in TIME_WAIT only for connections, not
        // the listener; etcd sets SO_REUSEADDR. Retry briefly anyway.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("etcd restart failed, retrying: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn_and_wait(&mut self) -> io::Result<()> {
        let bin = std::env::var("PIER_ETCD_BIN").unwrap_or_else(|_| DEFAULT_ETCD.into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let log2 = log.try_clone()?;
        let mut child = Command::new(&bin)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&self.client_url)
            .arg("--advertise-client-urls")
            .arg(&self.client_url)
            .arg("--listen-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={}", self.name, self.peer_url))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.name)
            // No metrics/pprof listeners on other ports.
            .arg("--log-level")
            .arg("warn")
            .arg("--logger")
            .arg("zap")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {bin}: {e}")))?;
        let addr: SocketAddr = self
            .endpoint
            .parse()
            .map_err(|e| io::Error::other(format!("bad endpoint {}: {e}", self.endpoint)))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = self.log_tail();
                return Err(io::Error::other(format!(
                    "etcd exited with {status} before becoming healthy; log tail:\n{tail}"
                )));
            }
            if health(addr) {
                // Someone else's etcd may answer on a port we lost the race
                // for; ours then exits at once on the failed bind.
                std::thread::sleep(Duration::from_millis(100));
                if let Some(status) = child.try_wait()? {
                    return Err(io::Error::other(format!(
                        "etcd exited with {status} (port {} taken?)",
                        self.endpoint
                    )));
                }
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd on {} not healthy after {START_TIMEOUT:?}",
                        self.endpoint
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /health` over plain HTTP/1.0; true when etcd says `"health":"true"`.
fn health(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.contains("\"health\":\"true\"") || buf.contains("\"health\": \"true\"")
}

fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn fresh_dir() -> io::Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "pier-etcd-{}-{}-{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}
