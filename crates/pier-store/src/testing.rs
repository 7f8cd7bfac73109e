//! A real etcd for tests: starts Debian's `/usr/bin/etcd` on random free
//! loopback ports with a fresh data dir, and removes both when dropped.
//! [`EtcdServer::start_tls`] starts one that serves clients over TLS only,
//! optionally requiring client certificates (`--client-cert-auth`), with
//! certificates from a [`TestPki`] (made with rcgen); [`EtcdServer::etcdctl`]
//! runs the real `etcdctl` against it (to add users and enable auth).
//!
//! Behind the `testing` feature, which only the crates' dev-dependencies
//! (and the test harness) turn on: it is not compiled into the product.

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
    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub client_url: String,
    /// `127.0.0.1:PORT`.
    pub endpoint: String,
    peer_url: String,
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    tls: Option<ServerTls>,
}

/// How a TLS etcd was started: its files, and the plain-HTTP metrics
/// listener its health is polled on (the client port wants TLS).
#[derive(Debug, Clone)]
struct ServerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// etcdctl's client certificate and key.
    client: (PathBuf, PathBuf),
    client_cert_auth: bool,
    metrics_url: String,
    extra: Vec<String>,
}

/// How [`EtcdServer::start_tls`] starts etcd.
#[derive(Debug, Clone)]
pub struct TlsEtcdOptions {
    /// `--client-cert-auth`: refuse clients without a certificate from the
    /// PKI's CA.
    pub client_cert_auth: bool,
    /// `--auth-token-ttl`: how long an idle simple auth token lives.
    pub auth_token_ttl_secs: Option<u32>,
}

impl Default for TlsEtcdOptions {
    fn default() -> Self {
        TlsEtcdOptions {
            client_cert_auth: true,
            auth_token_ttl_secs: None,
        }
    }
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

    /// Starts etcd serving clients over TLS only, with `pki`'s server
    /// certificate (for 127.0.0.1 and localhost); with
    /// `client_cert_auth`, clients must present a certificate from `pki`'s
    /// CA.
    pub fn start_tls(pki: &TestPki, opts: &TlsEtcdOptions) -> io::Result<EtcdServer> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start_with(Some((pki, opts))) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!("etcd (TLS) start failed, retrying with new ports: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn try_start() -> io::Result<EtcdServer> {
        Self::try_start_with(None)
    }

    fn try_start_with(tls: Option<(&TestPki, &TlsEtcdOptions)>) -> io::Result<EtcdServer> {
        let dir = fresh_dir()?;
        // All three held at once, so that they differ.
        let (client_port, peer_port, metrics_port) = free_ports()?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pier-etcd".into());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut server = EtcdServer {
            client_url: format!("{scheme}://127.0.0.1:{client_port}"),
            endpoint: format!("127.0.0.1:{client_port}"),
            peer_url: format!("http://127.0.0.1:{peer_port}"),
            name,
            dir,
            child: None,
            tls: tls.map(|(pki, opts)| {
                let mut extra = Vec::new();
                if let Some(t) = opts.auth_token_ttl_secs {
                    extra.push("--auth-token-ttl".to_owned());
                    extra.push(t.to_string());
                }
                ServerTls {
                    ca: pki.ca.clone(),
                    cert: pki.server_cert.clone(),
                    key: pki.server_key.clone(),
                    client: (pki.client_cert.clone(), pki.client_key.clone()),
                    client_cert_auth: opts.client_cert_auth,
                    metrics_url: format!("http://127.0.0.1:{metrics_port}"),
                    extra,
                }
            }),
        };
        // On failure `server` drops here and removes its dir.
        server.spawn_and_wait()?;
        Ok(server)
    }

    /// Runs the real `etcdctl` (API v3) against this etcd, with TLS and the
    /// PKI's client certificate when it serves TLS, and `--user` when
    /// given. Fails unless it exits 0; returns its stdout.
    pub fn etcdctl(&self, user: Option<&str>, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.client_url)
            .arg("--command-timeout=10s");
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client.0)
                .arg("--key")
                .arg(&t.client.1);
        }
        if let Some(u) = user {
            cmd.arg("--user").arg(u);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "etcdctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Turns on etcd's authentication: a `root` user with `root_password`,
    /// then `auth enable`. From then on every request needs a user.
    pub fn enable_auth(&self, root_password: &str) -> io::Result<()> {
        self.etcdctl(None, &["user", "add", &format!("root:{root_password}")])?;
        self.etcdctl(None, &["auth", "enable"])?;
        Ok(())
    }

    /// Adds `user` with `password` and a role of the same name that may
    /// read and write every key under `prefix` (auth must be on: runs as
    /// root).
    pub fn add_user(
        &self,
        root_password: &str,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> io::Result<()> {
        let root = format!("root:{root_password}");
        let root = Some(root.as_str());
        self.etcdctl(root, &["user", "add", &format!("{user}:{password}")])?;
        self.etcdctl(root, &["role", "add", user])?;
        self.etcdctl(
            root,
            &[
                "role",
                "grant-permission",
                user,
                "--prefix=true",
                "readwrite",
                prefix,
            ],
        )?;
        self.etcdctl(root, &["user", "grant-role", user, user])?;
        Ok(())
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
            .args(self.tls_args())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {bin}: {e}")))?;
        // A TLS etcd's health is read on its plain metrics listener.
        let health_at = match &self.tls {
            Some(t) => t.metrics_url.trim_start_matches("http://").to_owned(),
            None => self.endpoint.clone(),
        };
        let addr: SocketAddr = health_at
            .parse()
            .map_err(|e| io::Error::other(format!("bad endpoint {health_at}: {e}")))?;
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

    /// The flags a TLS etcd adds: TLS on the client port, the metrics
    /// listener, and any extra flags.
    fn tls_args(&self) -> Vec<std::ffi::OsString> {
        let Some(t) = &self.tls else {
            return Vec::new();
        };
        let mut a: Vec<std::ffi::OsString> = vec![
            "--cert-file".into(),
            t.cert.clone().into(),
            "--key-file".into(),
            t.key.clone().into(),
            "--listen-metrics-urls".into(),
            t.metrics_url.clone().into(),
        ];
        if t.client_cert_auth {
            a.push("--client-cert-auth".into());
            a.push("--trusted-ca-file".into());
            a.push(t.ca.clone().into());
        }
        a.extend(t.extra.iter().map(Into::into));
        a
    }

    /// The last lines of etcd's log (for a failing test's message).
    pub fn log_tail(&self) -> String {
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

/// Three distinct loopback ports that were free a moment ago.
fn free_ports() -> io::Result<(u16, u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpListener::bind("127.0.0.1:0")?;
    Ok((
        a.local_addr()?.port(),
        b.local_addr()?.port(),
        c.local_addr()?.port(),
    ))
}

/// Test certificates, made with rcgen into a fresh temp dir (removed on
/// drop): a CA, etcd's server certificate for 127.0.0.1 and localhost, and
/// a client certificate whose CN is `client_cn` (etcd takes the CN as the
/// user when auth is on and no password is sent).
#[derive(Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    ca_cert_pem: String,
    ca_key_pem: String,
}

impl TestPki {
    pub fn new(client_cn: &str) -> io::Result<TestPki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = fresh_dir()?;
        let gen_err = |e: rcgen::Error| io::Error::other(format!("rcgen: {e}"));
        let ca_key = KeyPair::generate().map_err(gen_err)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("pier test etcd CA {}", dir.display()),
        );
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            dir,
        };
        std::fs::write(&pki.ca, &pki.ca_cert_pem)?;
        pki.issue(
            "127.0.0.1",
            &["127.0.0.1", "localhost"],
            true,
            &pki.server_cert,
            &pki.server_key,
        )?;
        pki.issue(client_cn, &[], false, &pki.client_cert, &pki.client_key)?;
        Ok(pki)
    }

    /// Issues a certificate from this CA: CN `cn`, the SANs (IP addresses
    /// or DNS names), for server and client use or client only. Writes the
    /// certificate and its key (0600).
    pub fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        server: bool,
        cert_path: &Path,
        key_path: &Path,
    ) -> io::Result<()> {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        self.issue_valid(
            cn,
            sans,
            server,
            (now - day, now + day),
            cert_path,
            key_path,
        )
    }

    /// [`TestPki::issue`], valid over `validity` (not before, not after).
    pub fn issue_valid(
        &self,
        cn: &str,
        sans: &[&str],
        server: bool,
        validity: (SystemTime, SystemTime),
        cert_path: &Path,
        key_path: &Path,
    ) -> io::Result<()> {
        use rcgen::{
            CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
        };
        use std::os::unix::fs::OpenOptionsExt;
        let gen_err = |e: rcgen::Error| io::Error::other(format!("rcgen: {e}"));
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).map_err(gen_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, ca_key).map_err(gen_err)?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = validity.0.into();
        params.not_after = validity.1.into();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        std::fs::write(cert_path, cert.pem())?;
        let _ = std::fs::remove_file(key_path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key_path)?;
        std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes())?;
        Ok(())
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
