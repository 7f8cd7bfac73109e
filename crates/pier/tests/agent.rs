//! The built `pier agent` with a `[mesh]` section: a missing, expired or
//! foreign certificate is a config error — exit 64 before anything is
//! bound, one stderr line naming the file and what to do. A good
//! certificate, for contrast, gets the agent as far as serving the mesh.
//!
//! Every agent runs `--unprivileged` (no pier0), with an embedded store and
//! its data dir in a temp dir, no DNS VIP, loopback API and mesh ports, and
//! `DOCKER_HOST` pointing at a socket that does not exist, so it never
//! touches the host's network or its containers.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use pier_model::Name;

const PIER: &str = env!("CARGO_BIN_EXE_pier");
const DAY: Duration = Duration::from_secs(86_400);

/// Two distinct loopback ports that were free a moment ago. Both are held
/// until both are picked: picked one after the other, the second could be
/// the first again, and the agent could not bind both.
fn free_addrs() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    (
        a.local_addr().expect("local addr"),
        b.local_addr().expect("local addr"),
    )
}

/// A node name no other test (or agent) on this host uses.
fn unique_node(tag: &str) -> Name {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Name::new(&format!("{tag}-{}-{nanos}", std::process::id())).unwrap()
}

/// A temp dir with a mesh CA, and the agent's config and data dir in it.
struct Setup {
    dir: tempfile::TempDir,
    node: Name,
    api: SocketAddr,
    mesh: SocketAddr,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        pier_ca::ca_init(&dir.path().join("ca")).unwrap();
        let (api, mesh) = free_addrs();
        Setup {
            dir,
            node: unique_node(tag),
            api,
            mesh,
        }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Issues `node`'s files into `certs/`, valid over `[from, to]`.
    fn issue(&self, node: &Name, from: SystemTime, to: SystemTime) -> PathBuf {
        let out = self.dir.path().join("certs");
        pier_ca::ca_issue_with_validity(node, &self.ca_dir(), &out, from, to).unwrap();
        out
    }

    /// The config file, with `[mesh]` naming `ca`, `cert` and `key`.
    fn config(&self, ca: &Path, cert: &Path, key: &Path) -> PathBuf {
        let text = format!(
            r#"[node]
name = "{node}"

[store]
url = "embedded"

[network]
serve_dns_vip = false
data_dir = "{data}"

[api]
listen = "{api}"

[mesh]
listen = "{mesh}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
            node = self.node,
            data = self.data_dir().display(),
            api = self.api,
            mesh = self.mesh,
            ca = ca.display(),
            cert = cert.display(),
            key = key.display(),
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

    /// Runs the agent, expects exit 64 with exactly one stderr line, and
    /// checks that it never got as far as opening the store.
    async fn refused(&self, config: &Path) -> String {
        let o = tokio::time::timeout(Duration::from_secs(30), self.command(config).output())
            .await
            .expect("pier agent exits within 30 s")
            .expect("pier agent ran");
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(64), "stderr: {stderr}");
        assert!(
            o.stdout.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&o.stdout)
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {stderr:?}");
        assert!(lines[0].starts_with("pier agent: "), "{stderr}");
        // Refused before the start: the store (opened right after the API
        // is bound) was never created under the data dir.
        assert!(
            !self.data_dir().join("store").exists(),
            "the store was opened before the config was refused"
        );
        lines[0].to_owned()
    }
}

#[tokio::test]
async fn missing_certificate_exits_64_naming_the_file() {
    let s = Setup::new("mesh-missing");
    let now = SystemTime::now();
    let certs = s.issue(&s.node, now - DAY, now + DAY);
    let cert = certs.join("node.pem");
    std::fs::remove_file(&cert).unwrap();
    let cfg = s.config(&certs.join("ca.pem"), &cert, &certs.join("node-key.pem"));
    let l = s.refused(&cfg).await;
    assert!(
        l.contains(&format!("mesh.cert {} does not exist", cert.display())),
        "{l}"
    );
    assert!(l.contains(&format!("pier ca issue {}", s.node)), "{l}");

    // The key and the CA are named the same way.
    std::fs::remove_file(certs.join("node-key.pem")).unwrap();
    let cfg = s.config(&s.dir.path().join("nope/ca.pem"), &cert, &cert);
    let l = s.refused(&cfg).await;
    assert!(
        l.contains("mesh.ca ") && l.contains("nope/ca.pem does not exist"),
        "{l}"
    );
}

/// IPv6 VIPs need pier0: `--unprivileged` with `service_cidr6` is a
/// config error naming the key and both ways out, before anything is bound.
#[tokio::test]
async fn service_cidr6_without_pier0_exits_64() {
    let s = Setup::new("v6-unpriv");
    let p = s.dir.path().join("pier.toml");
    std::fs::write(
        &p,
        format!(
            "[node]\nname = \"{}\"\n[network]\ndata_dir = \"{}\"\nservice_cidr6 = \"fd5e:7e57:1::/112\"\n[api]\nlisten = \"{}\"\n",
            s.node,
            s.data_dir().display(),
            s.api
        ),
    )
    .unwrap();
    let l = s.refused(&p).await;
    assert!(
        l.contains("network.service_cidr6 fd5e:7e57:1::/112 needs pier0")
            && l.contains("--unprivileged")
            && l.contains("CAP_NET_ADMIN"),
        "{l}"
    );
}

#[tokio::test]
async fn expired_certificate_exits_64_saying_how_to_renew() {
    let s = Setup::new("mesh-expired");
    let now = SystemTime::now();
    let certs = s.issue(&s.node, now - 10 * DAY, now - DAY);
    let cert = certs.join("node.pem");
    let cfg = s.config(&certs.join("ca.pem"), &cert, &certs.join("node-key.pem"));
    let l = s.refused(&cfg).await;
    assert!(l.contains(&cert.display().to_string()), "{l}");
    assert!(l.contains("expired"), "{l}");
    assert!(
        l.contains(&format!("renew it with `pier ca issue {}", s.node)),
        "{l}"
    );
}

#[tokio::test]
async fn certificate_for_another_node_exits_64() {
    let s = Setup::new("mesh-other");
    let other = unique_node("someone-else");
    let now = SystemTime::now();
    let certs = s.issue(&other, now - DAY, now + DAY);
    let cert = certs.join("node.pem");
    let cfg = s.config(&certs.join("ca.pem"), &cert, &certs.join("node-key.pem"));
    let l = s.refused(&cfg).await;
    assert!(l.contains(&cert.display().to_string()), "{l}");
    assert!(l.contains(&format!("{:?}", other.as_str())), "{l}");
    assert!(l.contains(&format!("pier ca issue {}", s.node)), "{l}");
}

#[tokio::test]
async fn certificate_from_another_ca_exits_64() {
    let s = Setup::new("mesh-foreign");
    let other_ca = s.dir.path().join("other-ca");
    pier_ca::ca_init(&other_ca).unwrap();
    let foreign = s.dir.path().join("foreign");
    let now = SystemTime::now();
    pier_ca::ca_issue_with_validity(&s.node, &other_ca, &foreign, now - DAY, now + DAY).unwrap();
    // The node's own CA, the other CA's certificate for this very node.
    let ca = s.ca_dir().join("ca.pem");
    let cert = foreign.join("node.pem");
    let cfg = s.config(&ca, &cert, &foreign.join("node-key.pem"));
    let l = s.refused(&cfg).await;
    assert!(l.contains(&cert.display().to_string()), "{l}");
    assert!(l.contains("not issued by the mesh CA"), "{l}");
    assert!(l.contains(&ca.display().to_string()), "{l}");
    assert!(l.contains(&format!("pier ca issue {}", s.node)), "{l}");
}

/// The contrast: the same setup with a good certificate passes the check
/// and serves the mesh port; SIGTERM stops it.
#[tokio::test]
async fn good_certificate_starts_the_mesh() {
    let s = Setup::new("mesh-good");
    let now = SystemTime::now();
    let certs = s.issue(&s.node, now - DAY, now + DAY);
    let cfg = s.config(
        &certs.join("ca.pem"),
        &certs.join("node.pem"),
        &certs.join("node-key.pem"),
    );
    let log = std::fs::File::create(s.dir.path().join("agent.log")).unwrap();
    let mut child = s
        .command(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn pier agent");
    let read_log = || std::fs::read_to_string(s.dir.path().join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("pier agent exited with {st}: {}", read_log());
        }
        if tokio::net::TcpStream::connect(s.mesh).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mesh port {} is not served within 20 s: {}",
            s.mesh,
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
