//! The mTLS mesh over loopback with real TLS: identity files, tunnels,
//! refusals (each logged), certificate expiry and renewal, resumption and
//! the warm pool.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pier_ca::CaError;
use pier_model::{Endpoint, EndpointMap, EndpointPort, Name, Namespace, Node, PortNum, Snapshot};
use pier_proxy::mesh::{LocalTargets, MeshConnector, MeshError, MeshServer, RefusalCode};
use pier_proxy::tls::{self, MeshConfig, TlsError};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// A CA and the node directories issued from it.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        pier_ca::ca_init(&dir.path().join("ca")).unwrap();
        Pki { dir }
    }
    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }
    fn issue(&self, node: &str) -> PathBuf {
        let out = self.dir.path().join(node);
        pier_ca::ca_issue(&name(node), &self.ca_dir(), &out, 30).unwrap();
        out
    }
    fn cfg(&self, node: &str) -> MeshConfig {
        MeshConfig::from_dir("127.0.0.1:0".parse().unwrap(), &self.dir.path().join(node))
    }
}

fn endpoint(node: &str, id: &str, addr: SocketAddr, ready: bool) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        service: name("web"),
        namespace: Namespace::default(),
        node: name(node),
        id: name(id),
        pod: None,
        hostname: None,
        ip: addr.ip(),
        ports: vec![EndpointPort {
            name: name("http"),
            port: PortNum::new(addr.port()).unwrap(),
            protocol: Default::default(),
        }],
        ready,
        is_static: false,
        addr: None,
    })
}

/// A node of the cluster whose mesh is at `addr` (built from JSON, so that
/// fields added to the record later take their defaults).
fn node_at(n: &str, addr: SocketAddr) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "name": n, "addr": addr.ip(), "mesh_port": addr.port(),
        }))
        .unwrap(),
    )
}

fn node(n: &str) -> Arc<Node> {
    node_at(n, "127.0.0.1:0".parse().unwrap())
}

/// The store's view: `eps`, and the nodes n1, n2 and n3 (a peer's
/// certificate must name a node of the cluster).
fn snapshot(eps: &[Arc<Endpoint>]) -> Arc<Snapshot> {
    let mut m = EndpointMap::new();
    for e in eps {
        m.insert((e.node.clone(), e.id.clone()), e.clone());
    }
    let mut all = BTreeMap::new();
    all.insert((Namespace::default(), name("web")), Arc::new(m));
    let nodes = ["n1", "n2", "n3"].map(|n| (name(n), node(n)));
    Arc::new(Snapshot {
        endpoints: pier_model::Map::from(all),
        nodes: pier_model::Map::from(BTreeMap::from(nodes)),
        ..Snapshot::default()
    })
}

/// What an honest agent of `node` publishes for the mesh listener: its
/// own ready endpoints in `snap`.
fn local_of(node: &str, snap: &Snapshot) -> Arc<LocalTargets> {
    Arc::new(
        snap.endpoints
            .values()
            .flat_map(|m| m.values())
            .filter(|e| e.node.as_str() == node && e.ready && !e.is_static)
            .flat_map(|e| e.ports.iter().map(|p| SocketAddr::new(e.ip, p.port.get())))
            .collect(),
    )
}

/// Log lines captured from the current thread (tests run on a
/// current-thread runtime, so spawned tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || me.clone())
            .finish();
        tracing::subscriber::set_default(sub)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// The WARN lines that contain every one of `parts`.
    fn warned(&self, parts: &[&str]) -> bool {
        self.text()
            .lines()
            .any(|l| l.contains("WARN") && parts.iter().all(|p| l.contains(p)))
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A metric's value from the registry's text exposition; 0 when absent.
fn metric(reg: &Registry, series: &str) -> f64 {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, reg).unwrap();
    out.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// A running mesh server for node `n1`, its snapshot sender and its
/// agent's view.
struct Running {
    addr: SocketAddr,
    registry: Registry,
    tx: watch::Sender<Arc<Snapshot>>,
    local: watch::Sender<Arc<LocalTargets>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), MeshError>>,
}

impl Running {
    /// The store and the agent agree: n1's ready endpoints in `snap`.
    async fn start(cfg: &MeshConfig, snap: Arc<Snapshot>) -> Running {
        let local = local_of("n1", &snap);
        Self::start_with(cfg, snap, local).await
    }
    /// The store says `snap`, n1's agent says `local`.
    async fn start_with(
        cfg: &MeshConfig,
        snap: Arc<Snapshot>,
        local: Arc<LocalTargets>,
    ) -> Running {
        let (tx, rx) = watch::channel(snap);
        let (local, local_rx) = watch::channel(local);
        let mut registry = Registry::default();
        let server = MeshServer::new(cfg, name("n1"), rx, local_rx, &mut registry).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.serve(listener, cancel.clone()));
        Running {
            addr,
            registry,
            tx,
            local,
            cancel,
            task,
        }
    }
    /// A new snapshot, and n1's agent agrees with it.
    fn set(&self, snap: Arc<Snapshot>) {
        self.local.send_replace(local_of("n1", &snap));
        self.tx.send_replace(snap);
    }
    async fn stop(mut self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("serve returns after cancel")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Echoes every byte back until EOF, then half-closes.
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, h)
}

#[test]
fn ca_init_and_issue_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    pier_ca::ca_init(&ca).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "CA key must be 0600");
    // Refuses to overwrite.
    let e = pier_ca::ca_init(&ca).unwrap_err();
    assert!(matches!(e, CaError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("refusing to overwrite"), "{e}");

    let out = dir.path().join("node-a");
    pier_ca::ca_issue(&name("node-a"), &ca, &out, 90).unwrap();
    for f in ["node.pem", "node-key.pem", "ca.pem"] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let mode = std::fs::metadata(out.join("node-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "node key must be 0600");

    let id = tls::load_identity(
        &out.join("ca.pem"),
        &out.join("node.pem"),
        &out.join("node-key.pem"),
    )
    .unwrap();
    assert_eq!(tls::peer_node_name(&id.chain[0]).as_deref(), Some("node-a"));
    // Valid for about 90 days.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = (id.not_after_unix - now) / 86_400;
    assert!((89..=90).contains(&days), "validity {days} days");
    // The node certificate chains to the CA, with the node name as SAN.
    let (_, x) = x509_parser::parse_x509_certificate(&id.chain[0]).unwrap();
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);

    // Re-issuing (renewal) replaces the files.
    let before = std::fs::read(out.join("node.pem")).unwrap();
    pier_ca::ca_issue(&name("node-a"), &ca, &out, 90).unwrap();
    assert_ne!(before, std::fs::read(out.join("node.pem")).unwrap());
    // A node name that TLS cannot use as a server name is refused up front.
    let e = pier_ca::ca_issue(&name("123"), &ca, &dir.path().join("n123"), 1).unwrap_err();
    assert!(matches!(e, CaError::Tls(TlsError::NodeName(_))), "{e}");
    // Missing CA → clear error naming the file.
    let e = pier_ca::ca_issue(&name("x"), &dir.path().join("nope"), &out, 1).unwrap_err();
    assert!(e.to_string().contains("nope/ca.pem"), "{e}");
}

#[tokio::test]
async fn tunnel_carries_bytes_both_ways_with_half_close() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");

    // Target A: reads to EOF, then answers with the byte count (client
    // half-close travels through the tunnel).
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = a.local_addr().unwrap();
    let a_task = tokio::spawn(async move {
        let (mut s, _) = a.accept().await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let reply = format!(
            "got {} bytes, sum {}",
            buf.len(),
            buf.iter().map(|b| *b as u64).sum::<u64>()
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    // Target B: greets, half-closes, then still reads what the client sends.
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = b.local_addr().unwrap();
    let (b_tx, b_rx) = oneshot::channel();
    let b_task = tokio::spawn(async move {
        let (mut s, _) = b.accept().await.unwrap();
        s.write_all(b"hello from target").await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        b_tx.send(buf).unwrap();
    });

    let srv = Running::start(
        &pki.cfg("n1"),
        snapshot(&[
            endpoint("n1", "a", a_addr, true),
            endpoint("n1", "b", b_addr, true),
        ]),
    )
    .await;
    let mut creg = Registry::default();
    let conn = MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut creg, 0).unwrap();

    // A: 1 MiB up, half-close, answer down.
    let mut s = conn.connect(srv.addr, &name("n1"), a_addr).await.unwrap();
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = payload.iter().map(|b| *b as u64).sum();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, format!("got 1048576 bytes, sum {sum}"));
    a_task.await.unwrap();

    // B: greeting down then EOF, while the up direction stays open.
    let mut s = conn.connect(srv.addr, &name("n1"), b_addr).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"hello from target");
    s.write_all(b"still talking after your EOF").await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), b_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"still talking after your EOF");
    b_task.await.unwrap();

    // Counted once the copy loops end.
    tokio::time::timeout(Duration::from_secs(5), async {
        while metric(&srv.registry, "mesh_server_tunnels_active") != 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(metric(&srv.registry, "mesh_server_tunnels_total"), 2.0);
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_bytes_total{direction=\"to_target\"}"
        ),
        (1_048_576 + 28) as f64
    );
    assert_eq!(
        metric(&creg, "mesh_client_connects_total{result=\"ok\"}"),
        2.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn refused_client_cert_from_another_ca() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;

    // Another CA issues "n2"; the client trusts the right CA for the server
    // but presents the foreign certificate.
    let other = Pki::new();
    let n2 = other.issue("n2");
    let cfg = MeshConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ca: pki.ca_dir().join("ca.pem"),
        cert: n2.join("node.pem"),
        key: n2.join("node-key.pem"),
        crl: None,
    };
    let conn =
        MeshConnector::with_pool_size(&cfg, name("n2"), &mut Registry::default(), 0).unwrap();
    let e = conn.connect(srv.addr, &name("n1"), echo).await.unwrap_err();
    assert!(
        e.refusal().is_none(),
        "refused at the TLS layer, not by code: {e}"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while metric(
            &srv.registry,
            "mesh_server_refusals_total{reason=\"client_cert\"}",
        ) != 1.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("refusal counted as client_cert");
    assert!(
        logs.warned(&["refused", "peer.addr=127.0.0.1:", "client_cert"]),
        "logged at warn with the peer address:\n{}",
        logs.text()
    );
    assert_eq!(metric(&srv.registry, "mesh_server_tunnels_total"), 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn refused_plaintext_connection() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;

    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let me = s.local_addr().unwrap();
    // A plaintext header naming a ready endpoint must not get through.
    let mut hdr = pier_proxy::mesh::encode_header(echo);
    hdr.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    s.write_all(&hdr).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("server closes a plaintext connection");
    assert!(
        !buf.contains(&b'H'),
        "nothing of the target came back: {buf:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !logs.warned(&["refused", &format!("peer.addr={me}")]) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("plaintext refusal logged with {me}:\n{}", logs.text()));
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_refusals_total{reason=\"tls_handshake\"}"
        ),
        1.0
    );
    assert_eq!(metric(&srv.registry, "mesh_server_tunnels_total"), 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn refused_targets_that_are_not_ready_endpoints_of_this_node() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    // Real listeners behind every refused target, so a refusal is the
    // check's doing, not a failed connect.
    let (ready, _a) = echo_server().await;
    let (remote, _b) = echo_server().await;
    let (unready, _c) = echo_server().await;
    let (arbitrary, _d) = echo_server().await;
    let srv = Running::start(
        &pki.cfg("n1"),
        snapshot(&[
            endpoint("n1", "a", ready, true),
            endpoint("n2", "b", remote, true),
            endpoint("n1", "c", unready, false),
        ]),
    )
    .await;
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();

    let cases: [(SocketAddr, RefusalCode, &str); 5] = [
        (remote, RefusalCode::NotLocalEndpoint, "other_node"),
        (
            "127.0.0.1:22".parse().unwrap(),
            RefusalCode::NotLocalEndpoint,
            "not_an_endpoint",
        ),
        (
            "127.0.0.1:2379".parse().unwrap(),
            RefusalCode::NotLocalEndpoint,
            "not_an_endpoint",
        ),
        (arbitrary, RefusalCode::NotLocalEndpoint, "not_an_endpoint"),
        (unready, RefusalCode::NotReady, "not_ready"),
    ];
    for (target, code, reason) in cases {
        let e = conn
            .connect(srv.addr, &name("n1"), target)
            .await
            .unwrap_err();
        assert_eq!(e.refusal(), Some(code), "{target}: {e}");
        assert!(
            logs.warned(&[
                "refused",
                "peer.addr=127.0.0.1:",
                "peer.node=n2",
                &format!("target={target}"),
                reason
            ]),
            "{target} logged:\n{}",
            logs.text()
        );
    }
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_refusals_total{reason=\"not_an_endpoint\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_refusals_total{reason=\"other_node\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_refusals_total{reason=\"not_ready\"}"
        ),
        1.0
    );

    // The unready endpoint becomes ready: accepted with the next snapshot.
    srv.set(snapshot(&[
        endpoint("n1", "a", ready, true),
        endpoint("n1", "c", unready, true),
    ]));
    let mut s = conn.connect(srv.addr, &name("n1"), unready).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    // And the ready one goes away: refused again.
    srv.set(snapshot(&[endpoint("n1", "c", unready, true)]));
    let e = conn
        .connect(srv.addr, &name("n1"), ready)
        .await
        .unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalCode::NotLocalEndpoint));
    drop(s);
    srv.stop().await;
}

/// Attack (M1): someone with write access to the store forges an endpoint
/// `node=n1, ip=127.0.0.1` for a host-only service, ready, and asks n1's
/// mesh for it. n1's agent never found it in its Docker, so the listener
/// refuses, though the store (the snapshot) says it is a ready endpoint
/// of n1.
#[tokio::test]
async fn forged_store_endpoint_on_this_node_is_not_relayed() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    // The host-only service the attacker wants: a real listener, so a
    // relay would succeed if it were attempted.
    let (host_only, _h) = echo_server().await;
    let (pod, _p) = echo_server().await;
    let store = snapshot(&[
        endpoint("n1", "pod", pod, true),
        endpoint("n1", "forged", host_only, true),
    ]);
    // n1's agent knows only its pod.
    let agent = Arc::new(LocalTargets::from([pod]));
    let srv = Running::start_with(&pki.cfg("n1"), store, agent).await;
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    let e = conn
        .connect(srv.addr, &name("n1"), host_only)
        .await
        .expect_err("a forged store endpoint must not be relayed");
    assert_eq!(e.refusal(), Some(RefusalCode::NotLocalEndpoint), "{e}");
    assert!(
        logs.warned(&[
            "refused",
            &format!("target={host_only}"),
            "not_in_local_view"
        ]),
        "logged with the reason:\n{}",
        logs.text()
    );
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_refusals_total{reason=\"not_in_local_view\"}"
        ),
        1.0
    );
    // Control: the pod the agent found is relayed.
    let mut s = conn.connect(srv.addr, &name("n1"), pod).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    drop(s);
    srv.stop().await;
}

/// Attack (M1): a certificate the mesh CA really signed, for a node name
/// that is not in the cluster (a removed node, or one issued by mistake).
/// The handshake succeeds, then the listener refuses before any header.
#[tokio::test]
async fn valid_cert_for_a_node_not_in_the_cluster_is_refused() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("ghost");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let conn = MeshConnector::with_pool_size(
        &pki.cfg("ghost"),
        name("ghost"),
        &mut Registry::default(),
        0,
    )
    .unwrap();
    let e = conn
        .connect(srv.addr, &name("n1"), echo)
        .await
        .expect_err("a node not in the cluster must be refused");
    assert_eq!(e.refusal(), Some(RefusalCode::PeerNotAllowed), "{e}");
    assert!(
        logs.warned(&["refused", "peer.node=ghost", "unknown_node"]),
        "logged with the peer's name:\n{}",
        logs.text()
    );
    assert_eq!(metric(&srv.registry, "mesh_server_tunnels_total"), 0.0);
    // Control: once the node joins the cluster, the same certificate works.
    let mut snap = (*snapshot(&[endpoint("n1", "a", echo, true)])).clone();
    snap.nodes.insert(name("ghost"), node("ghost"));
    srv.set(Arc::new(snap));
    let s = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    drop(s);
    srv.stop().await;
}

#[tokio::test]
async fn expired_or_missing_cert_is_a_clear_startup_error() {
    let pki = Pki::new();
    let out = pki.dir.path().join("old");
    let now = SystemTime::now();
    pier_ca::ca_issue_with_validity(
        &name("old"),
        &pki.ca_dir(),
        &out,
        now - Duration::from_secs(10 * 86_400),
        now - Duration::from_secs(86_400),
    )
    .unwrap();
    let cfg = pki.cfg("old");
    let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let (_ltx, lrx) = watch::channel(Arc::new(LocalTargets::new()));
    let e = MeshServer::new(
        &cfg,
        name("old"),
        rx.clone(),
        lrx.clone(),
        &mut Registry::default(),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("expired") && msg.contains("old/node.pem"),
        "{msg}"
    );
    let e = MeshConnector::new(&cfg, name("old"), &mut Registry::default()).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");

    // Not yet valid.
    pier_ca::ca_issue_with_validity(
        &name("old"),
        &pki.ca_dir(),
        &out,
        now + Duration::from_secs(86_400),
        now + Duration::from_secs(2 * 86_400),
    )
    .unwrap();
    let e = MeshServer::new(
        &cfg,
        name("old"),
        rx.clone(),
        lrx.clone(),
        &mut Registry::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("not valid before"), "{e}");

    // Missing key.
    pki.issue("n1");
    let mut cfg = pki.cfg("n1");
    cfg.key = pki.dir.path().join("n1/missing-key.pem");
    let e = MeshServer::new(
        &cfg,
        name("n1"),
        rx.clone(),
        lrx.clone(),
        &mut Registry::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("missing-key.pem"), "{e}");
    // n1's files under another node name.
    let e = MeshServer::new(
        &pki.cfg("n1"),
        name("n9"),
        rx.clone(),
        lrx.clone(),
        &mut Registry::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("not for this node \"n9\""), "{e}");
    // A key that belongs to another certificate.
    pki.issue("n2");
    cfg.key = pki.dir.path().join("n2/node-key.pem");
    let e = MeshServer::new(&cfg, name("n1"), rx, lrx, &mut Registry::default()).unwrap_err();
    assert!(e.to_string().contains("does not belong"), "{e}");
}

fn write_file(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
}

#[tokio::test]
async fn renewed_cert_is_picked_up_while_an_existing_tunnel_keeps_working() {
    let pki = Pki::new();
    let n1 = pki.issue("n1");
    pki.issue("n2");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    let mut t1 = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    let old_cert = t1.peer_certificate().unwrap().clone();

    // Renew on disk. A garbage write first: the reload fails, the server
    // keeps its certificate and keeps serving.
    write_file(&n1.join("node.pem"), b"not a pem");
    tokio::time::timeout(Duration::from_secs(10), async {
        while metric(
            &srv.registry,
            "mesh_server_cert_reloads_total{result=\"error\"}",
        ) < 1.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("broken renewal noticed");
    pier_ca::ca_issue(&name("n1"), &pki.ca_dir(), &n1, 30).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while metric(
            &srv.registry,
            "mesh_server_cert_reloads_total{result=\"ok\"}",
        ) < 1.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("renewal picked up within a few polls");

    // The tunnel opened before the reload still carries bytes.
    for i in 0..3u8 {
        t1.write_all(&[i; 1000]).await.unwrap();
        let mut b = [0u8; 1000];
        t1.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [i; 1000]);
    }
    // A new full handshake (fresh connector, no session to resume) sees the
    // renewed certificate.
    let fresh =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    let t2 = fresh.connect(srv.addr, &name("n1"), echo).await.unwrap();
    let new_cert = t2.peer_certificate().unwrap().clone();
    let on_disk = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(n1.join("node.pem")).unwrap()
    };
    assert_ne!(old_cert, new_cert);
    assert_eq!(new_cert, on_disk);
    drop((t1, t2));
    srv.stop().await;
}

#[tokio::test]
async fn second_connect_resumes_the_tls_session() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let mut creg = Registry::default();
    let conn = MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut creg, 0).unwrap();

    let s1 = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(s1.handshake_kind(), Some(rustls::HandshakeKind::Full));
    let s2 = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(s2.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(
        metric(&creg, "mesh_client_handshakes_total{kind=\"full\"}"),
        1.0
    );
    assert_eq!(
        metric(&creg, "mesh_client_handshakes_total{kind=\"resumed\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_handshakes_total{kind=\"resumed\"}"
        ),
        1.0
    );
    drop((s1, s2));
    srv.stop().await;
}

#[tokio::test]
async fn warm_pool_serves_the_next_connect_without_a_handshake() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let mut creg = Registry::default();
    let conn = MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut creg, 2).unwrap();

    let mut s1 = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    // The pool fills in the background: 1 + 2 handshakes.
    tokio::time::timeout(Duration::from_secs(5), async {
        while metric(&creg, "mesh_client_handshakes_total{kind=\"full\"}")
            + metric(&creg, "mesh_client_handshakes_total{kind=\"resumed\"}")
            < 3.0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("pool warmed");
    let mut s2 = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(metric(&creg, "mesh_client_pool_hits_total"), 1.0);
    for s in [&mut s1, &mut s2] {
        s.write_all(b"abc").await.unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"abc");
    }
    // A refusal through a warm connection is still a refusal.
    let e = conn
        .connect(srv.addr, &name("n1"), "127.0.0.1:22".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalCode::NotLocalEndpoint));
    conn.close().await;
    drop((s1, s2));
    srv.stop().await;
}

/// A target that writes `id` and closes each connection.
async fn id_target(id: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(id.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, h)
}

/// Node n1's real [`pier_proxy::Proxy`] (unprivileged mode, its VIP on
/// loopback) in front of one service whose endpoints are on other nodes,
/// each node with its own real mesh server: every connection to the VIP
/// takes the mesh hop.
struct MeshCluster {
    vip: SocketAddr,
    registry: Registry,
    mesh: MeshConnector,
    cancel: CancellationToken,
    proxy: Option<tokio::task::JoinHandle<Result<(), pier_proxy::ProxyError>>>,
    servers: Vec<(
        CancellationToken,
        tokio::task::JoinHandle<Result<(), MeshError>>,
    )>,
    _snapshots: (watch::Sender<Arc<Snapshot>>, watch::Sender<Arc<Snapshot>>),
    _locals: Vec<watch::Sender<Arc<LocalTargets>>>,
}

impl MeshCluster {
    async fn start(pki: &Pki, eps: &[Arc<Endpoint>]) -> MeshCluster {
        use pier_model::Service;
        use pier_proxy::{Proxy, ProxyConfig};

        // A VIP in 127.78/16 that no other test uses, on a free port.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let vip = SocketAddr::from((
            [
                127,
                78,
                (std::process::id() % 250) as u8,
                1 + (port % 250) as u8,
            ],
            port,
        ));
        let svc: Service = serde_json::from_value(serde_json::json!({
            "name": "web",
            "vip": vip.ip(),
            "ports": [{"name": "http", "port": vip.port(), "target_port": 8080}],
            "lb": "p2c",
        }))
        .unwrap();

        // One mesh server per node that has an endpoint.
        let mut servers = Vec::new();
        let mut locals = Vec::new();
        // n1 (the proxy's node) is a node of the cluster too.
        let mut nodes = BTreeMap::from([(name("n1"), node("n1"))]);
        let (snap_tx, snap_rx) = watch::channel(snapshot(eps));
        for ep in eps {
            if nodes.contains_key(&ep.node) {
                continue;
            }
            let n = ep.node.clone();
            let (ltx, lrx) = watch::channel(local_of(n.as_str(), &snapshot(eps)));
            locals.push(ltx);
            let server = MeshServer::new(
                &pki.cfg(n.as_str()),
                n.clone(),
                snap_rx.clone(),
                lrx,
                &mut Registry::default(),
            )
            .unwrap();
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let cancel = CancellationToken::new();
            servers.push((cancel.clone(), tokio::spawn(server.serve(l, cancel))));
            nodes.insert(n.clone(), node_at(n.as_str(), addr));
        }
        let mut full = (*snapshot(eps)).clone();
        full.nodes = pier_model::Map::from(nodes);
        full.services = pier_model::Map::from(BTreeMap::from([(
            (Namespace::default(), name("web")),
            Arc::new(svc),
        )]));
        let full = Arc::new(full);
        snap_tx.send_replace(full.clone());

        // As the daemon: one registry with the `pier` prefix.
        let mut registry = Registry::with_prefix("pier");
        let mesh = MeshConnector::new(&pki.cfg("n1"), name("n1"), &mut registry).unwrap();
        let (ptx, prx) = watch::channel(full);
        let cfg = ProxyConfig {
            node_port_addr: "127.0.0.1".parse().unwrap(),
            direct_allow: vec!["127.0.0.0/8".parse().unwrap()],
            ..ProxyConfig::unprivileged()
        };
        let proxy = Proxy::new(
            cfg,
            name("n1"),
            "127.0.0.0/8".parse().unwrap(),
            prx,
            Some(mesh.clone()),
            &mut registry,
        )
        .unwrap();
        let cancel = CancellationToken::new();
        let proxy = tokio::spawn(proxy.run(cancel.clone()));
        // The listener comes up with the first reconcile.
        tokio::time::timeout(Duration::from_secs(5), async {
            while TcpStream::connect(vip).await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("proxy listening");
        MeshCluster {
            vip,
            registry,
            mesh,
            cancel,
            proxy: Some(proxy),
            servers,
            _snapshots: (snap_tx, ptx),
            _locals: locals,
        }
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(p) = self.proxy.take() {
            p.await.unwrap().unwrap();
        }
        self.mesh.close().await;
        for (c, t) in std::mem::take(&mut self.servers) {
            c.cancel();
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for MeshCluster {
    fn drop(&mut self) {
        self.cancel.cancel();
        for (c, _) in &self.servers {
            c.cancel();
        }
    }
}

/// The bug this guards against: P2C weighted by connect latency, where a
/// mesh connect on a peer with a warm pool took ~100 µs and one that had to
/// handshake took milliseconds, sent 199 of 200 sequential connections to
/// whichever peer warmed up first. The real Proxy on node n1 balances one
/// service whose two endpoints are on n2 and n3, each reached through that
/// node's own mesh server.
#[tokio::test]
async fn proxy_splits_sequential_connections_evenly_over_two_mesh_peers() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    for n in ["n1", "n2", "n3"] {
        pki.issue(n);
    }
    let (t2, _h2) = id_target("n2").await;
    let (t3, _h3) = id_target("n3").await;
    let c = MeshCluster::start(
        &pki,
        &[endpoint("n2", "a", t2, true), endpoint("n3", "b", t3, true)],
    )
    .await;

    let mut counts = std::collections::HashMap::<String, u32>::new();
    for _ in 0..200 {
        let id = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = TcpStream::connect(c.vip).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<String, std::io::Error>(out)
        })
        .await
        .expect("reply in time")
        .expect("reply");
        *counts.entry(id).or_default() += 1;
    }
    let total: u32 = counts.values().sum();
    assert_eq!(total, 200, "{counts:?}");
    for n in ["n2", "n3"] {
        let got = counts.get(n).copied().unwrap_or(0);
        assert!(
            got >= 60,
            "{n} got {got} of 200 sequential connections: {counts:?}\n{}",
            logs.text()
        );
    }
    // Both went through the mesh, and the metrics say so: per endpoint
    // with route="mesh", and the mesh client's own counters.
    let text = c.metrics_text();
    let via_mesh: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("pier_proxy_endpoint_connections_total{") && l.contains("route=\"mesh\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(via_mesh >= 200.0, "{text}");
    assert!(
        metric(
            &c.registry,
            "pier_mesh_client_connects_total{result=\"ok\"}"
        ) >= 200.0,
        "{text}"
    );
    assert!(
        metric(&c.registry, "pier_mesh_client_pool_hits_total") > 0.0,
        "{text}"
    );
    c.stop().await;
}

/// Sequential connections through the proxy to one mesh peer: once a
/// connection has ended cleanly both ways, its tunnel carries the next
/// one, so nearly every connect skips the TCP and TLS handshakes; every
/// reply is still the target's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_connections_reuse_the_tunnels_of_finished_ones() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (t2, _h2) = id_target("n2").await;
    let c = MeshCluster::start(&pki, &[endpoint("n2", "a", t2, true)]).await;
    const N: usize = 100;
    for i in 0..N {
        let id = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = TcpStream::connect(c.vip).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<String, std::io::Error>(out)
        })
        .await
        .expect("reply in time")
        .expect("reply");
        assert_eq!(id, "n2", "connection {i}");
    }
    let text = c.metrics_text();
    let reuses = metric(&c.registry, "pier_mesh_client_tunnel_reuses_total");
    let handshakes = metric(
        &c.registry,
        "pier_mesh_client_handshakes_total{kind=\"full\"}",
    ) + metric(
        &c.registry,
        "pier_mesh_client_handshakes_total{kind=\"resumed\"}",
    );
    eprintln!("{N} sequential connects: {reuses} reused a tunnel, {handshakes} handshakes");
    // Measured on a loaded 2-core machine (load average 13 to 16, 25
    // runs): 96 to 99 of 100 connects reused a tunnel, with 3 to 5
    // handshakes (the first connect, and the few whose predecessor's tunnel
    // was not back in the pool yet). BENCHMARKS.md: 1999 of 2000. At most
    // 10 misses and 10 handshakes: a tunnel that is not returned after a
    // clean close, even one time in ten, fails here.
    const MISSES: usize = 10;
    assert!(
        reuses >= (N - MISSES) as f64,
        "only {reuses} of {N} connects reused a tunnel (at least {} expected):\n{text}",
        N - MISSES
    );
    assert!(
        handshakes <= MISSES as f64,
        "{handshakes} handshakes for {N} sequential connects (at most {MISSES} expected):\n{text}"
    );
    c.stop().await;
}

fn checksum(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// 32 MiB each way at once through proxy → mesh → echo target: the copy
/// loops on both ends of the mesh hop under back-pressure (buffers grow
/// and shrink), then a client half-close that must reach the target and
/// come back as EOF after the last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_through_proxy_and_mesh_arrives_intact() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (echo, _e) = echo_server().await;
    let c = MeshCluster::start(&pki, &[endpoint("n2", "a", echo, true)]).await;

    const TOTAL: usize = 32 << 20;
    let s = TcpStream::connect(c.vip).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut sent = 0usize;
        let mut i = 0u32;
        while sent < TOTAL {
            // Varied sizes: small writes between bulk ones.
            let n = [1usize, 100, 70_000, 300_000, 16_384][i as usize % 5].min(TOTAL - sent);
            let chunk: Vec<u8> = (0..n).map(|k| (k as u32 ^ i) as u8).collect();
            h = checksum(h, &chunk);
            w.write_all(&chunk).await.unwrap();
            sent += n;
            i += 1;
        }
        w.shutdown().await.unwrap();
        h
    });
    let reader = tokio::spawn(async move {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h = checksum(h, &buf[..n]);
            got += n;
        }
        (got, h)
    });
    let sent = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("all written in time")
        .unwrap();
    let (got, h) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("echo and EOF in time")
        .unwrap();
    assert_eq!(got, TOTAL);
    assert_eq!(h, sent, "the echoed bytes differ from the sent ones");
    let text = c.metrics_text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("pier_proxy_endpoint_bytes_total{")
                && l.contains("route=\"mesh\"")
                && l.contains("direction=\"out\"")
                && l.ends_with(&format!(" {TOTAL}"))),
        "{text}"
    );
    c.stop().await;
}

/// Waits (bounded) until `f` holds; panics naming `what` otherwise.
async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Pki {
    /// `pier ca revoke NODE`, then the CA's crl.pem copied beside the
    /// ca.pem of each of `to` (as an operator distributes it).
    fn revoke(&self, node: &str, to: &[&str]) {
        let r = pier_ca::ca_revoke(&self.ca_dir(), &name(node), None).unwrap();
        assert_eq!(r.added.len(), 1, "{r:?}");
        // As the README says to: copy beside, then rename over (a reload
        // never reads a half-written list).
        for n in to {
            let dir = self.dir.path().join(n);
            std::fs::copy(&r.crl, dir.join(".crl.pem.new")).unwrap();
            std::fs::rename(dir.join(".crl.pem.new"), dir.join("crl.pem")).unwrap();
        }
    }
}

/// Attack (M2): node n2's certificate is revoked while n2 holds an open
/// tunnel into n1 and has a session ticket from n1. The open tunnel is cut
/// (a reset, not a clean end) within RELOAD_POLL of the list landing on
/// n1; n2's next connect, full or resumed, is refused.
#[tokio::test]
async fn revoked_node_is_cut_off_within_the_reload_poll() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    pki.issue("n3");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    // A session ticket for later, and an open tunnel.
    drop(conn.connect(srv.addr, &name("n1"), echo).await.unwrap());
    let mut t = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(t.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    t.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    t.read_exact(&mut b).await.unwrap();
    // Control: n3 is not revoked and keeps working throughout.
    let n3 = MeshConnector::with_pool_size(&pki.cfg("n3"), name("n3"), &mut Registry::default(), 0)
        .unwrap();
    let mut t3 = n3.connect(srv.addr, &name("n1"), echo).await.unwrap();

    pki.revoke("n2", &["n1"]);
    let landed = std::time::Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut rest))
        .await
        .expect("the revoked node's tunnel is cut");
    let took = landed.elapsed();
    let e = r.expect_err("a cut tunnel must not end like a clean stream");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "{e}"
    );
    // The stated bound: the list is polled every RELOAD_POLL (2 s); 1 s
    // more for the poll's own scheduling on a busy 2-core box.
    assert!(
        took <= pier_proxy::mesh::RELOAD_POLL + Duration::from_secs(1),
        "cut after {took:?}"
    );
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_tunnel_cuts_total{reason=\"revoked\"}"
        ),
        1.0
    );
    assert!(
        logs.warned(&["tunnel cut", "peer.node=n2", "revoked"]),
        "{}",
        logs.text()
    );
    // New tunnels: the resumption n2 tries and the full handshake after
    // it are both refused.
    for _ in 0..2 {
        let e = conn
            .connect(srv.addr, &name("n1"), echo)
            .await
            .expect_err("a revoked node gets no new tunnel");
        assert!(
            e.refusal().is_none() || e.refusal() == Some(RefusalCode::PeerNotAllowed),
            "{e}"
        );
    }
    let rejected = metric(
        &srv.registry,
        "mesh_server_refusals_total{reason=\"client_cert\"}",
    ) + metric(
        &srv.registry,
        "mesh_server_refusals_total{reason=\"revoked\"}",
    );
    assert_eq!(rejected, 2.0, "{}", logs.text());
    // n3's open tunnel and new ones still work.
    t3.write_all(b"pong").await.unwrap();
    t3.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"pong");
    drop(n3.connect(srv.addr, &name("n1"), echo).await.unwrap());
    srv.stop().await;
}

/// Attack (M2): the listener n2 is revoked; n1 (the proxy's node) gets the
/// list. n1 cuts its own open stream through n2 (the revoked side would
/// not), drops its pooled tunnels to n2, and opens no new one.
#[tokio::test]
async fn client_side_cuts_streams_to_a_revoked_listener() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (echo, _e) = echo_server().await;
    let c = MeshCluster::start(&pki, &[endpoint("n2", "a", echo, true)]).await;
    // A finished connection leaves a pooled tunnel; a second stays open.
    {
        let mut s = TcpStream::connect(c.vip).await.unwrap();
        s.write_all(b"x").await.unwrap();
        s.shutdown().await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
    }
    let mut s = TcpStream::connect(c.vip).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();

    let oks = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("pier_mesh_client_connects_total{result=\"ok\"} "))
            .map(|v| v.parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    let before = oks(&c.metrics_text());
    pki.revoke("n2", &["n1"]);
    let landed = std::time::Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the stream to the revoked listener is cut");
    let took = landed.elapsed();
    let e = r.expect_err("the client must see a reset, not a clean end");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        took <= pier_proxy::mesh::RELOAD_POLL + Duration::from_secs(1),
        "cut after {took:?}"
    );
    // No new tunnel to n2: the connection through the VIP fails.
    let mut s = TcpStream::connect(c.vip).await.unwrap();
    let _ = s.write_all(b"x").await;
    let mut v = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut v))
        .await
        .expect("answered in time");
    assert!(
        r.is_err() || v.is_empty(),
        "a revoked listener carried a new connection: {v:?}"
    );
    let text = c.metrics_text();
    assert_eq!(
        oks(&text),
        before,
        "a mesh connect to n2 succeeded:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("pier_mesh_client_connects_total{result=\"error\"}")),
        "{text}"
    );
    c.stop().await;
}

/// A new revocation list means no session resumes across it: the
/// listener starts a new ticketer and the client a new session store.
#[tokio::test]
async fn no_resumption_across_a_new_revocation_list() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    pki.issue("n3");
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    let s = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Full));
    let s = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    drop(s);
    // n3 (neither of these two) is revoked; the list lands on n1 only.
    pki.revoke("n3", &["n1"]);
    until(Duration::from_secs(10), "n1 reloads the list", || {
        metric(
            &srv.registry,
            "mesh_server_cert_reloads_total{result=\"ok\"}",
        ) >= 1.0
    })
    .await;
    let s = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    assert_eq!(
        s.handshake_kind(),
        Some(rustls::HandshakeKind::Full),
        "a ticket from before the new list must not resume"
    );
    drop(s);
    srv.stop().await;
}

#[test]
fn ca_revoke_keeps_the_list_and_names_what_is_wrong() {
    let pki = Pki::new();
    let n1 = pki.issue("n1");
    pki.issue("n2");
    let r = pier_ca::ca_revoke(&pki.ca_dir(), &name("n1"), None).unwrap();
    assert_eq!((r.added.len(), r.total), (1, 1));
    // Renewed (a second serial for n1), then revoked again: only the new
    // serial is added, the old one stays.
    pier_ca::ca_issue(&name("n1"), &pki.ca_dir(), &n1, 30).unwrap();
    let r = pier_ca::ca_revoke(&pki.ca_dir(), &name("n1"), None).unwrap();
    assert_eq!((r.added.len(), r.total), (1, 2));
    let r = pier_ca::ca_revoke(&pki.ca_dir(), &name("n1"), None).unwrap();
    assert_eq!((r.added.len(), r.total), (0, 2));
    let r = pier_ca::ca_revoke(&pki.ca_dir(), &name("n2"), None).unwrap();
    assert_eq!((r.added.len(), r.total), (1, 3));
    // The list is the CA's: n1's current certificate loads as revoked.
    std::fs::copy(&r.crl, n1.join("crl.pem")).unwrap();
    let cfg = pki.cfg("n1");
    let (crl, _) = cfg.crl_path();
    let e = tls::load_identity_with_crl(&cfg.ca, &cfg.cert, &cfg.key, &crl, false).unwrap_err();
    assert!(matches!(e, TlsError::Revoked { .. }), "{e}");
    // A node the CA never issued for.
    let e = pier_ca::ca_revoke(&pki.ca_dir(), &name("nobody"), None).unwrap_err();
    assert!(e.to_string().contains("--cert FILE"), "{e}");
    // --cert naming another node's file.
    let e = pier_ca::ca_revoke(&pki.ca_dir(), &name("n2"), Some(&n1.join("node.pem"))).unwrap_err();
    assert!(matches!(e, CaError::Tls(TlsError::WrongNode { .. })), "{e}");
}

/// Attack (M2): a revocation list signed by another CA (or garbage) is
/// not taken: at start a clear error, on reload the previous list stays.
#[test]
fn a_revocation_list_from_another_ca_is_refused() {
    let pki = Pki::new();
    let n1 = pki.issue("n1");
    let other = Pki::new();
    other.issue("n1");
    let r = pier_ca::ca_revoke(&other.ca_dir(), &name("n1"), None).unwrap();
    std::fs::copy(&r.crl, n1.join("crl.pem")).unwrap();
    let cfg = pki.cfg("n1");
    let (crl, _) = cfg.crl_path();
    let e = tls::load_identity_with_crl(&cfg.ca, &cfg.cert, &cfg.key, &crl, false).unwrap_err();
    assert!(matches!(e, TlsError::BadCrl { .. }), "{e}");
    assert!(e.to_string().contains("pier ca revoke"), "{e}");
    write_file(
        &n1.join("crl.pem"),
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    );
    let e = tls::load_identity_with_crl(&cfg.ca, &cfg.cert, &cfg.key, &crl, false).unwrap_err();
    assert!(matches!(e, TlsError::BadCrl { .. }), "{e}");
    // An explicit crl path that does not exist is an error; the default
    // one missing revokes nothing.
    std::fs::remove_file(n1.join("crl.pem")).unwrap();
    tls::load_identity_with_crl(&cfg.ca, &cfg.cert, &cfg.key, &crl, false).unwrap();
    let e = tls::load_identity_with_crl(&cfg.ca, &cfg.cert, &cfg.key, &crl, true).unwrap_err();
    assert!(e.to_string().contains("crl.pem"), "{e}");
}

/// Attack (R3): the target resets in the middle of a stream. The client
/// at the other end of proxy and mesh must see a reset too, not a clean
/// end of stream it could take for a complete response.
#[tokio::test]
async fn a_stream_cut_at_the_target_resets_the_client() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    // The cluster's start-up probe connects too: only the connection
    // that says "ping" gets the partial answer and the reset.
    let t = tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).await.is_err() || &b != b"ping" {
                continue;
            }
            s.write_all(b"partial").await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s); // RST
            return;
        }
    });
    let c = MeshCluster::start(&pki, &[endpoint("n2", "a", target, true)]).await;
    let mut s = TcpStream::connect(c.vip).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the cut reaches the client");
    let e = r.expect_err("a cut stream must not end like a clean one");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert_eq!(got, b"partial");
    t.await.unwrap();
    c.stop().await;
}

/// Attack (P1): a flood of TCP connections that never send a ClientHello.
/// Beyond the handshake queue (here 1 in flight, 2 queued or running) the
/// listener resets new connections at once instead of holding them for
/// the handshake timeout; once the flood ends, real peers get in.
#[tokio::test]
async fn handshake_queue_is_capped() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (echo, _e) = echo_server().await;
    let snap = snapshot(&[endpoint("n1", "a", echo, true)]);
    let (_tx, rx) = watch::channel(snap.clone());
    let (_ltx, lrx) = watch::channel(local_of("n1", &snap));
    let mut registry = Registry::default();
    let server = MeshServer::new(&pki.cfg("n1"), name("n1"), rx, lrx, &mut registry)
        .unwrap()
        .with_handshake_limits(1, 2);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, cancel.clone()));

    // Two silent connections fill the queue (one in the handshake, one
    // waiting for it).
    let held = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(pier_proxy::mesh::HANDSHAKE_TIMEOUT, third.read(&mut b))
        .await
        .expect("the third connection is closed before the handshake timeout");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "nothing but a close for the third: {r:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refused at once, not after a timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        metric(
            &registry,
            "mesh_server_refusals_total{reason=\"handshake_queue_full\"}"
        ),
        1.0
    );
    // The flood ends: a real peer gets a tunnel.
    drop(held);
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    let mut ok = None;
    for _ in 0..50 {
        match conn.connect(addr, &name("n1"), echo).await {
            Ok(s) => {
                ok = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(ok.is_some(), "no tunnel after the flood ended");
    drop(ok);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Attack (M2): a tunnel that outlives its peer's certificate. n2's
/// certificate expires 3 s after the handshake; the open tunnel is cut
/// then (a reset), not kept for as long as it is used.
#[tokio::test]
async fn a_tunnel_is_cut_when_its_peer_certificate_expires() {
    let logs = Logs::default();
    let _g = logs.install();
    let pki = Pki::new();
    pki.issue("n1");
    let n2 = pki.dir.path().join("n2");
    let now = SystemTime::now();
    pier_ca::ca_issue_with_validity(
        &name("n2"),
        &pki.ca_dir(),
        &n2,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3),
    )
    .unwrap();
    let (echo, _e) = echo_server().await;
    let srv = Running::start(&pki.cfg("n1"), snapshot(&[endpoint("n1", "a", echo, true)])).await;
    let conn =
        MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .unwrap();
    let mut t = conn.connect(srv.addr, &name("n1"), echo).await.unwrap();
    t.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    t.read_exact(&mut b).await.unwrap();
    let mut rest = Vec::new();
    // Expiry at +3 s (1 s granularity), the cut at most 1 s later.
    let r = tokio::time::timeout(Duration::from_secs(8), t.read_to_end(&mut rest))
        .await
        .expect("the tunnel is cut once the peer's certificate expires");
    assert!(r.is_err(), "a cut, not a clean end: {r:?}");
    assert!(
        now.elapsed().unwrap() >= Duration::from_secs(3),
        "cut before the expiry"
    );
    assert_eq!(
        metric(
            &srv.registry,
            "mesh_server_tunnel_cuts_total{reason=\"peer_cert_expired\"}"
        ),
        1.0,
        "{}",
        logs.text()
    );
    srv.stop().await;
}

/// A UDP target through the mesh: datagrams framed `len(2) | payload`
/// both ways keep their bounds (an empty one, a 1,500-byte one), and a
/// UDP target that is not a ready local endpoint is refused as for TCP.
#[tokio::test]
async fn udp_datagrams_cross_the_tunnel_framed() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let target = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let t_addr = target.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = target.recv_from(&mut buf).await else {
                return;
            };
            let mut out = b"re:".to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = target.send_to(&out, from).await;
        }
    });
    let srv = Running::start(
        &pki.cfg("n1"),
        snapshot(&[endpoint("n1", "u", t_addr, true)]),
    )
    .await;
    let mut creg = Registry::default();
    let conn = MeshConnector::with_pool_size(&pki.cfg("n2"), name("n2"), &mut creg, 0).unwrap();
    let mut s = conn
        .connect_proto(srv.addr, &name("n1"), t_addr, pier_model::Protocol::Udp)
        .await
        .unwrap();
    for d in [b"one".to_vec(), Vec::new(), vec![7u8; 1500]] {
        let mut frame = (d.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&d);
        s.write_all(&frame).await.unwrap();
        s.flush().await.unwrap();
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let mut got = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut got).await.unwrap();
        let mut want = b"re:".to_vec();
        want.extend_from_slice(&d);
        assert_eq!(got, want);
    }
    drop(s);
    // Not an endpoint of n1: refused, whatever the protocol.
    let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let e = conn
        .connect_proto(srv.addr, &name("n1"), other, pier_model::Protocol::Udp)
        .await
        .unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalCode::NotLocalEndpoint), "{e}");
    echo.abort();
}
