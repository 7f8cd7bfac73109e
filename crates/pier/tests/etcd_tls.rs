//! The built `pier agent` on a real etcd that serves TLS only, requires
//! client certificates (`--client-cert-auth`) and has etcd's users on: with
//! the right `[store]` settings (etcds://, ca, cert, key, user,
//! password_file) it registers its node, which the real `etcdctl` reads
//! back; with a wrong password, or a password file others can read, it
//! exits 64 with one stderr line saying what is wrong and what to do.
//!
//! Every agent runs `--unprivileged` (no pier0), with its data dir in a
//! temp dir, no DNS VIP, a loopback API port, and `DOCKER_HOST` pointing at
//! a socket that does not exist, so it never touches the host's network or
//! its containers. etcd listens on random loopback ports.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pier_model::{Name, keys};
use pier_store::testing::{EtcdServer, TestPki, TlsEtcdOptions};

const PIER: &str = env!("CARGO_BIN_EXE_pier");
const ROOT_PW: &str = "root-pw-41c9";
const PIER_PW: &str = "pier-pw-0b7e";

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

fn unique_node(tag: &str) -> Name {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Name::new(&format!("{tag}-{}-{nanos}", std::process::id())).unwrap()
}

/// A TLS etcd with auth on (root, and `pier` with readwrite on /pier/),
/// its certificates, and a temp dir for the agent.
struct Setup {
    dir: tempfile::TempDir,
    node: Name,
    api: SocketAddr,
    // Dropped in this order: etcd first, then its certificates.
    etcd: EtcdServer,
    pki: Arc<TestPki>,
}

impl Setup {
    async fn new(tag: &str) -> Setup {
        let pki = Arc::new(TestPki::new("pier-agent-client").expect("certificates"));
        let p = pki.clone();
        let etcd = tokio::task::spawn_blocking(move || {
            let e = EtcdServer::start_tls(&p, &TlsEtcdOptions::default())?;
            e.enable_auth(ROOT_PW)?;
            e.add_user(ROOT_PW, "pier", PIER_PW, "/pier/")?;
            std::io::Result::Ok(e)
        })
        .await
        .unwrap()
        .expect("start etcd with TLS and auth");
        Setup {
            dir: tempfile::tempdir().unwrap(),
            node: unique_node(tag),
            api: free_addr(),
            etcd,
            pki,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes the password file with `mode`.
    fn password_file(&self, password: &str, mode: u32) -> PathBuf {
        let p = self.dir.path().join("etcd-password");
        std::fs::write(&p, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// The agent's config: etcds:// to the test etcd with its CA, the
    /// client certificate, and user `pier` with `password_file`.
    fn config(&self, password_file: &Path) -> PathBuf {
        let text = format!(
            r#"[node]
name = "{node}"

[store]
url = "etcds://{endpoint}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
user = "pier"
password_file = "{pw}"

[network]
serve_dns_vip = false
data_dir = "{data}"

[api]
listen = "{api}"
"#,
            node = self.node,
            endpoint = self.etcd.endpoint,
            ca = self.pki.ca.display(),
            cert = self.pki.client_cert.display(),
            key = self.pki.client_key.display(),
            pw = password_file.display(),
            data = self.data_dir().display(),
            api = self.api,
        );
        let p = self.dir.path().join("pier.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn command(&self, config: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(PIER);
        cmd.arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--unprivileged")
            .env(
                "DOCKER_HOST",
                format!(
                    "unix://{}",
                    self.dir.path().join("no-docker.sock").display()
                ),
            )
            .env_remove("PIER_TOKEN")
            .env_remove("PIER_LOG")
            .env_remove("RUST_LOG")
            .env_remove("PIER_LOG_FORMAT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs the agent and expects exit 64 with one stderr line; returns it.
    async fn refused(&self, config: &Path) -> String {
        let o = tokio::time::timeout(Duration::from_secs(30), self.command(config).output())
            .await
            .expect("pier agent exits within 30 s")
            .expect("pier agent ran");
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(64), "stderr: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("pier agent: "))
            .collect();
        assert_eq!(lines.len(), 1, "not one `pier agent:` line: {stderr:?}");
        eprintln!("refused: {}", lines[0]);
        lines[0].to_owned()
    }

    /// The node's key, read with etcdctl as root.
    fn node_key(&self) -> String {
        self.etcd
            .etcdctl(
                Some(&format!("root:{ROOT_PW}")),
                &["get", &keys::node(&self.node), "--print-value-only"],
            )
            .expect("etcdctl get")
    }
}

/// The positive path: the agent registers its node in etcd over TLS, with
/// its client certificate and etcd user; etcdctl reads it back. SIGTERM
/// stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_its_node_over_etcd_tls_with_a_user() {
    let s = Setup::new("etcd-tls-good").await;
    let pw = s.password_file(PIER_PW, 0o600);
    let cfg = s.config(&pw);
    let log_path = s.dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = s
        .command(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn pier agent");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("pier agent exited with {st}: {}", read_log());
        }
        let v = s.node_key();
        if !v.trim().is_empty() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "node {} not in etcd within 30 s: {}",
            s.node,
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        value.contains(&format!("\"{}\"", s.node)),
        "node record {value:?}"
    );
    assert!(
        read_log().contains("connected to etcd"),
        "no connect line: {}",
        read_log()
    );
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let st = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("pier agent stops within 30 s of SIGTERM")
        .unwrap();
    assert_eq!(st.code(), Some(0), "{}", read_log());
}

/// Attack: the right user with a wrong password. etcd refuses the login;
/// the agent exits 64 naming the user and what to check, and never
/// registers its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_wrong_etcd_password_exits_64() {
    let s = Setup::new("etcd-tls-wrongpw").await;
    let pw = s.password_file("not-the-password", 0o600);
    let l = s.refused(&s.config(&pw)).await;
    assert!(
        l.contains("etcd refused the user \"pier\" or its password"),
        "{l}"
    );
    assert!(l.contains("store.user/password_file"), "{l}");
    assert!(s.node_key().trim().is_empty(), "the node was registered");
}

/// A password file that group or others can read is refused before
/// anything is bound, naming the file and the chmod that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_readable_password_file_exits_64() {
    let s = Setup::new("etcd-tls-openpw").await;
    let pw = s.password_file(PIER_PW, 0o644);
    let l = s.refused(&s.config(&pw)).await;
    assert!(
        l.contains(&format!("store.password_file {}", pw.display())),
        "{l}"
    );
    assert!(l.contains("chmod 600"), "{l}");
    assert!(
        !s.data_dir().join("store").exists(),
        "something was made before the config was refused"
    );
    assert!(s.node_key().trim().is_empty(), "the node was registered");
}
