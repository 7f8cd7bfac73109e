//! Start a server on 127.0.0.1 with a snapshot the test controls, and query it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name as DnsName, RecordType};
use pier_dns::{DnsConfig, DnsServer};
use pier_model::{
    Cidr, Endpoint, EndpointMap, EndpointPort, Name, Namespace, PortNum, Service, Snapshot,
};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub addr: SocketAddr,
    pub snap: watch::Sender<Arc<Snapshot>>,
    pub nets: watch::Sender<Vec<Cidr>>,
    pub registry: Arc<Registry>,
    cancel: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl TestServer {
    pub async fn start(cfg: DnsConfig, snap: Snapshot) -> Result<TestServer> {
        let (snap_tx, snap_rx) = watch::channel(Arc::new(snap));
        let (nets_tx, nets_rx) = watch::channel(Vec::new());
        let mut registry = Registry::default();
        let srv = DnsServer::new(cfg, snap_rx, nets_rx, &mut registry)?;
        // UDP and TCP on the same port, as clients expect for TC fallback.
        let (udp, tcp) = bind_pair("127.0.0.1").await?;
        let addr = udp.local_addr()?;
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = srv.serve(vec![udp], vec![tcp], c).await {
                eprintln!("serve: {e}");
            }
        });
        Ok(TestServer {
            addr,
            snap: snap_tx,
            nets: nets_tx,
            registry: Arc::new(registry),
            cancel,
        })
    }

    pub fn publish(&self, snap: Snapshot) {
        self.snap.send_replace(Arc::new(snap));
    }

    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode metrics");
        s
    }
}

pub async fn bind_pair(host: &str) -> Result<(UdpSocket, TcpListener)> {
    for _ in 0..50 {
        let udp = UdpSocket::bind((host, 0)).await?;
        let port = udp.local_addr()?.port();
        if let Ok(tcp) = TcpListener::bind((host, port)).await {
            return Ok((udp, tcp));
        }
    }
    bail!("no free UDP+TCP port pair")
}

pub fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

pub fn service(ns: &str, svc: &str, vip: Option<&str>, ports: &[(&str, u16)]) -> Service {
    serde_json::from_value(serde_json::json!({
        "name": svc,
        "namespace": ns,
        "vip": vip,
        "ports": ports.iter().map(|(n, p)| serde_json::json!({"name": n, "port": p, "target_port": p})).collect::<Vec<_>>(),
    }))
    .expect("service")
}

pub fn endpoint(
    svc: &Service,
    id: &str,
    pod: Option<&str>,
    ip: &str,
    ports: &[(&str, u16)],
    ready: bool,
) -> Endpoint {
    Endpoint {
        service: svc.name.clone(),
        namespace: svc.namespace.clone(),
        node: name("node1"),
        id: name(id),
        pod: pod.map(name),
        hostname: None,
        ip: ip.parse().expect("ip"),
        ports: ports
            .iter()
            .map(|(n, p)| EndpointPort {
                name: name(n),
                port: PortNum::new(*p).expect("port"),
                protocol: Default::default(),
            })
            .collect(),
        ready,
        is_static: false,
        // The tests' addresses stand for what DNS answers: the endpoint VIP.
        addr: Some(ip.parse().expect("ip")),
    }
}

/// A snapshot of these services and endpoints.
pub fn snapshot(revision: i64, services: &[Service], endpoints: &[Endpoint]) -> Snapshot {
    let mut svcs = BTreeMap::new();
    for s in services {
        svcs.insert((s.namespace.clone(), s.name.clone()), Arc::new(s.clone()));
    }
    let mut eps: BTreeMap<(Namespace, Name), EndpointMap> = BTreeMap::new();
    for e in endpoints {
        eps.entry((e.namespace.clone(), e.service.clone()))
            .or_default()
            .insert((e.node.clone(), e.id.clone()), Arc::new(e.clone()));
    }
    Snapshot {
        revision,
        services: pier_model::Map::from(svcs),
        endpoints: eps.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        ..Snapshot::default()
    }
}

/// A query message as hickory's client would send it.
pub fn query_msg(qname: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = rand_id();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        DnsName::from_ascii(qname).expect("name"),
        rtype,
    ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static N: AtomicU16 = AtomicU16::new(4242);
    N.fetch_add(7, Ordering::Relaxed)
}

/// Send raw bytes over UDP from `from` and wait for one datagram back.
pub async fn udp_raw_from(
    from: &str,
    server: SocketAddr,
    pkt: &[u8],
    wait: Duration,
) -> Result<Option<Vec<u8>>> {
    let s = UdpSocket::bind((from, 0)).await?;
    s.send_to(pkt, server).await?;
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(r) => {
            let (n, _) = r?;
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(_) => Ok(None),
    }
}

pub async fn udp_raw(server: SocketAddr, pkt: &[u8], wait: Duration) -> Result<Option<Vec<u8>>> {
    udp_raw_from("127.0.0.1", server, pkt, wait).await
}

/// Query over UDP and decode the answer.
pub async fn udp_query(server: SocketAddr, m: &Message) -> Result<Message> {
    udp_query_from("127.0.0.1", server, m).await
}

pub async fn udp_query_from(from: &str, server: SocketAddr, m: &Message) -> Result<Message> {
    let raw = udp_raw_from(from, server, &m.to_vec()?, Duration::from_secs(3))
        .await?
        .context("no UDP answer within 3 s")?;
    let r = Message::from_vec(&raw)?;
    if r.metadata.id != m.metadata.id {
        bail!("answer id {} != query id {}", r.metadata.id, m.metadata.id);
    }
    Ok(r)
}

/// Query over UDP as a stub resolver does: the same message is sent again
/// every 500 ms until an answer comes, for up to `limit`. For queries that
/// follow a flood: while the server's socket queue is still full, the
/// kernel drops a datagram silently, and only a retry can tell a server
/// that lives on from one that stopped answering.
pub async fn udp_query_retrying(
    server: SocketAddr,
    m: &Message,
    limit: Duration,
) -> Result<Message> {
    let s = UdpSocket::bind(("127.0.0.1", 0)).await?;
    let pkt = m.to_vec()?;
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 65535];
    while tokio::time::Instant::now() < deadline {
        s.send_to(&pkt, server).await?;
        let wait = Duration::from_millis(500).min(deadline - tokio::time::Instant::now());
        // Answers to an earlier copy carry the same id and are as good.
        if let Ok(r) = tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
            let (n, _) = r?;
            let r = Message::from_vec(&buf[..n])?;
            if r.metadata.id != m.metadata.id {
                bail!("answer id {} != query id {}", r.metadata.id, m.metadata.id);
            }
            return Ok(r);
        }
    }
    bail!("no UDP answer within {limit:?} (retrying every 500 ms)")
}

/// Query over TCP and decode the answer.
pub async fn tcp_query(server: SocketAddr, m: &Message) -> Result<Message> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(server)).await??;
    let b = m.to_vec()?;
    let mut framed = (b.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&b);
    s.write_all(&framed).await?;
    let len = tokio::time::timeout(Duration::from_secs(3), s.read_u16()).await?? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(Message::from_vec(&buf)?)
}

/// A records' addresses in an answer section.
pub fn ips(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m.answers.iter().filter_map(|r| r.data.ip_addr()).collect();
    v.sort();
    v
}

/// Run `dig` with these arguments against the server; returns stdout.
pub async fn dig(server: SocketAddr, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+tries=1", "+time=3"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("run dig")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Poll `f` until it returns true or `within` passes; returns the time it took.
pub async fn within<F, Fut>(within: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let t0 = std::time::Instant::now();
    loop {
        if f().await? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!("condition not met within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn test_config() -> DnsConfig {
    DnsConfig {
        // No upstream unless a test starts one: nothing leaves loopback.
        upstreams: vec!["127.0.0.1:9".parse().expect("addr")],
        upstream_timeout_ms: 500,
        ..DnsConfig::default()
    }
}

/// web (VIP 10.96.0.10, ports http 80 / admin 9000) with two ready pods and
/// one unready; db headless with two ready endpoints (one without a pod);
/// v6svc with a v6 VIP.
pub fn base_snapshot() -> (Vec<Service>, Vec<Endpoint>) {
    let web = service(
        "default",
        "web",
        Some("10.96.0.10"),
        &[("http", 80), ("admin", 9000)],
    );
    let db = service("prod", "db", None, &[("pg", 5432)]);
    let v6 = service("default", "v6svc", Some("fd00::10"), &[("http", 80)]);
    let eps = vec![
        endpoint(
            &web,
            "aaaaaaaaaaa1",
            Some("web-1"),
            "172.18.0.2",
            &[("http", 8080), ("admin", 9100)],
            true,
        ),
        endpoint(
            &web,
            "aaaaaaaaaaa2",
            Some("web-2"),
            "172.18.0.3",
            &[("http", 8081), ("admin", 9101)],
            true,
        ),
        endpoint(
            &web,
            "aaaaaaaaaaa3",
            Some("web-3"),
            "172.18.0.4",
            &[("http", 8082)],
            false,
        ),
        endpoint(&db, "bbbbbbbbbbb1", Some("db-0"), "172.18.1.2", &[], true),
        endpoint(&db, "bbbbbbbbbbb2", None, "172.18.1.3", &[], true),
    ];
    (vec![web, db, v6], eps)
}

pub async fn base_server() -> Result<TestServer> {
    let (s, e) = base_snapshot();
    TestServer::start(test_config(), snapshot(7, &s, &e)).await
}
