//! The watch relays' TLS over loopback with real certificates: a node of
//! the mesh CA is served and learns the relay's node name; a certificate
//! of another CA and plaintext are refused before `serve` sees anything
//! (each counted); a client whose certificate is revoked while connected
//! is cut within the reload poll; a relay client cannot talk to a mesh
//! listener's ALPN and the other way round.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pier_model::Name;
use pier_proxy::mesh::RELOAD_POLL;
use pier_proxy::relay_tls::{RelayAcceptor, RelayDialer};
use pier_proxy::tls::MeshConfig;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
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
    fn issue(&self, node: &str) -> PathBuf {
        let out = self.dir.path().join(node);
        pier_ca::ca_issue(&name(node), &self.dir.path().join("ca"), &out, 30).unwrap();
        out
    }
    fn cfg(&self, node: &str) -> MeshConfig {
        MeshConfig::from_dir("127.0.0.1:0".parse().unwrap(), &self.dir.path().join(node))
    }
}

/// A relay listener on loopback whose `serve` answers each line with
/// `<peer description> <line>`, and records who it served.
struct Served {
    addr: String,
    peers: Arc<Mutex<Vec<String>>>,
    registry: Arc<Mutex<Registry>>,
    cancel: CancellationToken,
}

impl Served {
    async fn start(cfg: &MeshConfig, node: &str) -> Served {
        let mut registry = Registry::default();
        let acceptor = RelayAcceptor::new(cfg, name(node), &mut registry).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let p = peers.clone();
        tokio::spawn(acceptor.run(listener, cancel.clone(), move |s, who| {
            let p = p.clone();
            async move {
                p.lock().unwrap().push(who.clone());
                let (r, mut w) = tokio::io::split(s);
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if w.write_all(format!("{who} {l}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }));
        Served {
            addr,
            peers,
            registry: Arc::new(Mutex::new(registry)),
            cancel,
        }
    }

    fn metrics(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().unwrap()).unwrap();
        s
    }
}

#[tokio::test]
async fn mesh_node_is_served_and_learns_the_relay_name() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let relay = Served::start(&pki.cfg("n1"), "n1").await;
    let dialer = RelayDialer::new(&pki.cfg("n2"), name("n2"), &mut Registry::default()).unwrap();
    let (mut s, relay_node) = dialer.dial(&relay.addr).await.unwrap();
    assert_eq!(relay_node, "n1");
    s.write_all(b"hello\n").await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let got = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        got.starts_with("n2@127.0.0.1:") && got.ends_with(" hello\n"),
        "{got:?}"
    );
    assert_eq!(relay.peers.lock().unwrap().len(), 1);
    assert!(
        relay.metrics().contains("relay_clients 1"),
        "{}",
        relay.metrics()
    );
    relay.cancel.cancel();
}

#[tokio::test]
async fn foreign_certificate_and_plaintext_are_refused() {
    let pki = Pki::new();
    pki.issue("n1");
    let relay = Served::start(&pki.cfg("n1"), "n1").await;

    // n2 issued by another CA, trusting the real one (so that only the
    // relay's check can refuse it).
    let other = Pki::new();
    other.issue("n2");
    let foreign = MeshConfig {
        ca: pki.dir.path().join("n1").join("ca.pem"),
        ..other.cfg("n2")
    };
    let dialer = RelayDialer::new(&foreign, name("n2"), &mut Registry::default()).unwrap();
    // TLS 1.3: the client may finish its side before the relay checks its
    // certificate; then the relay's alert ends the first read.
    if let Ok((mut s, _)) = dialer.dial(&relay.addr).await {
        let _ = s.write_all(b"hello\n").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("the relay answers or closes");
        assert!(r.is_err() || buf.is_empty(), "served: {buf:?}");
    }

    // Plaintext: a line straight at the port.
    let mut tcp = tokio::net::TcpStream::connect(&relay.addr).await.unwrap();
    tcp.write_all(b"hello\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), tcp.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("hello"),
        "plaintext served: {buf:?}"
    );
    // Nothing reached `serve`; both refusals counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(relay.peers.lock().unwrap().is_empty());
    let m = relay.metrics();
    assert!(
        m.contains("relay_refusals_total{reason=\"client_cert\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("relay_refusals_total{reason=\"tls_handshake\"} 1"),
        "{m}"
    );
    relay.cancel.cancel();
}

/// A client whose certificate the CA revokes while it is connected is cut
/// once the relay reloads the revocation list; a control client is not.
#[tokio::test]
async fn revoked_client_is_cut() {
    let pki = Pki::new();
    for n in ["n1", "n2", "n3"] {
        pki.issue(n);
    }
    let relay = Served::start(&pki.cfg("n1"), "n1").await;
    let mut conns = Vec::new();
    for n in ["n2", "n3"] {
        let d = RelayDialer::new(&pki.cfg(n), name(n), &mut Registry::default()).unwrap();
        let (s, _) = d.dial(&relay.addr).await.unwrap();
        conns.push(s);
    }
    let r = pier_ca::ca_revoke(&pki.dir.path().join("ca"), &name("n2"), None).unwrap();
    let dir = pki.dir.path().join("n1");
    std::fs::copy(&r.crl, dir.join(".crl.pem.new")).unwrap();
    std::fs::rename(dir.join(".crl.pem.new"), dir.join("crl.pem")).unwrap();
    let mut n3 = conns.pop().unwrap();
    let mut n2 = conns.pop().unwrap();
    let mut buf = Vec::new();
    let cut = tokio::time::timeout(RELOAD_POLL * 3, n2.read_to_end(&mut buf)).await;
    assert!(cut.is_ok(), "n2 still connected after 3 reload polls");
    assert!(buf.is_empty(), "{buf:?}");
    n3.write_all(b"still\n").await.unwrap();
    let mut b3 = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), n3.read(&mut b3))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&b3[..n]).ends_with(" still\n"));
    let m = relay.metrics();
    assert!(
        m.contains("relay_refusals_total{reason=\"revoked\"} 1"),
        "{m}"
    );
    // And n2 cannot come back.
    let d = RelayDialer::new(&pki.cfg("n2"), name("n2"), &mut Registry::default()).unwrap();
    if let Ok((mut s, _)) = d.dial(&relay.addr).await {
        let _ = s.write_all(b"again\n").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("the relay answers or closes");
        assert!(r.is_err() || buf.is_empty(), "served: {buf:?}");
    }
    relay.cancel.cancel();
}

/// The relay's ALPN is not the mesh's: a relay client dialing a mesh
/// listener fails the handshake.
#[tokio::test]
async fn relay_client_cannot_dial_a_mesh_port() {
    let pki = Pki::new();
    pki.issue("n1");
    pki.issue("n2");
    let (_tx, snap) = tokio::sync::watch::channel(Arc::new(pier_model::Snapshot::default()));
    let (_ltx, local) = tokio::sync::watch::channel(Arc::new(Default::default()));
    let server = pier_proxy::mesh::MeshServer::new(
        &pki.cfg("n1"),
        name("n1"),
        snap,
        local,
        &mut Registry::default(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cancel = CancellationToken::new();
    tokio::spawn(server.serve(listener, cancel.clone()));
    let d = RelayDialer::new(&pki.cfg("n2"), name("n2"), &mut Registry::default()).unwrap();
    let e = d
        .dial(&addr)
        .await
        .expect_err("a mesh port speaks no relay");
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    cancel.cancel();
}
