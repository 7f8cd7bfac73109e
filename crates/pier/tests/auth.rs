//! The built `pier agent` and its API token: made on first start in a
//! private data dir, refused when planted or left open, and the explicit
//! development opt-out (`--insecure-no-auth`) logged and shown.
//!
//! Every agent runs `--unprivileged` (no pier0), with an embedded store and
//! its data dir in a temp dir, no DNS VIP, a loopback API port, and
//! `DOCKER_HOST` pointing at a socket that does not exist, so it never
//! touches the host's network or its containers.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PIER: &str = env!("CARGO_BIN_EXE_pier");

struct Setup {
    dir: tempfile::TempDir,
    api: SocketAddr,
    node: String,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let api = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Setup {
            dir: tempfile::tempdir().unwrap(),
            api,
            node: format!("{tag}-{}-{nanos}", std::process::id()),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn config(&self) -> PathBuf {
        let p = self.dir.path().join("pier.toml");
        std::fs::write(
            &p,
            format!(
                "[node]\nname = \"{}\"\n[network]\nserve_dns_vip = false\ndata_dir = {:?}\n[api]\nlisten = \"{}\"\n",
                self.node,
                self.data_dir(),
                self.api
            ),
        )
        .unwrap();
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn command(&self, extra: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(PIER);
        cmd.arg("agent")
            .arg("--config")
            .arg(self.config())
            .arg("--unprivileged")
            .args(extra)
            .env(
                "DOCKER_HOST",
                format!(
                    "unix://{}",
                    self.dir.path().join("no-docker.sock").display()
                ),
            )
            .env_remove("PIER_TOKEN")
            .env_remove("PIER_CONFIG")
            .env("PIER_LOG", "info")
            .env_remove("PIER_LOG_FORMAT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Starts the agent and waits (20 s at most) for `/healthz`.
    async fn start(&self, extra: &[&str]) -> tokio::process::Child {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let mut child = self
            .command(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn pier agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("pier agent exited with {st}: {}", self.log());
            }
            if get(self.api, "/healthz", None).await.0 == 200 {
                return child;
            }
            assert!(
                Instant::now() < deadline,
                "the API is not served within 20 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// SIGTERM, and the exit status within 30 s.
async fn stop(mut child: tokio::process::Child) -> Option<i32> {
    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("pier agent stops within 30 s of SIGTERM")
        .unwrap()
        .code()
}

/// One GET with `Connection: close`; 0 when nothing answers.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A1 and S1 end to end: a new install makes a random token in a private
/// data dir; the API refuses requests without it; the store is private;
/// a restart reuses the token.
#[tokio::test]
async fn a_new_install_has_a_token_and_a_private_data_dir() {
    let s = Setup::new("auth-new");
    let child = s.start(&[]).await;
    let data = s.data_dir();
    let token_file = data.join("api-token");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(mode(&data.join("store")), 0o700);
    assert_eq!(mode(&data.join("store").join("store.redb")), 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64, "{token}");
    let (status, body) = get(s.api, "/api/v1/nodes", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(s.api, "/api/v1/nodes", Some("0".repeat(64).as_str())).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(s.api, "/api/v1/version", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stop(child).await, Some(0), "{}", s.log());
    // The same token after a restart.
    let child = s.start(&[]).await;
    let again = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(again.trim(), token);
    assert_eq!(get(s.api, "/api/v1/version", Some(token)).await.0, 200);
    assert_eq!(stop(child).await, Some(0), "{}", s.log());
}

/// A1: a token file another user could read (or wrote) is refused at
/// start, before anything is bound: exit 1, saying to delete it.
#[tokio::test]
async fn attack_a_world_readable_token_file_is_refused_at_start() {
    let s = Setup::new("auth-planted");
    let data = s.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let token_file = data.join("api-token");
    std::fs::write(&token_file, "attacker-knows-this\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = tokio::time::timeout(Duration::from_secs(30), s.command(&[]).output())
        .await
        .expect("pier agent exits within 30 s")
        .expect("pier agent ran");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("api-token is mode 0644") && stderr.contains("delete it"),
        "{stderr}"
    );
    // Never served: nothing listens on the API port.
    assert_eq!(get(s.api, "/healthz", None).await.0, 0);
    assert!(!data.join("store").exists(), "the store was opened");
}

/// The opt-out is explicit, loud and visible: a warning at start, and
/// `insecure_no_auth: true` in /readyz; no token is made.
#[tokio::test]
async fn insecure_no_auth_is_logged_and_shown() {
    let s = Setup::new("auth-insecure");
    let child = s.start(&["--insecure-no-auth"]).await;
    let (status, body) = get(s.api, "/api/v1/version", None).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = get(s.api, "/readyz", None).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["insecure_no_auth"], true, "{body}");
    assert!(!s.data_dir().join("api-token").exists());
    assert_eq!(mode(&s.data_dir()), 0o700);
    let log = s.log();
    assert!(
        log.contains("WARN") && log.contains("THE API HAS NO AUTHENTICATION"),
        "{log}"
    );
    assert_eq!(stop(child).await, Some(0), "{}", s.log());
}
