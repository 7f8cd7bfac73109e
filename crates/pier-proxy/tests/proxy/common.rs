use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pier_model::{Cidr, Endpoint, EndpointMap, EndpointPort, Name, PortNum, Service, Snapshot};
use pier_proxy::{Problems, Proxy, ProxyConfig, StatsMap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const NODE: &str = "n1";

pub fn node() -> Name {
    Name::new(NODE).unwrap()
}

/// A VIP no other test in this process uses, and a random port.
pub fn unique_vip() -> SocketAddr {
    static N: AtomicU32 = AtomicU32::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed) + (std::process::id() % 200) * 256;
    let ip = Ipv4Addr::new(127, 77, (n >> 8) as u8, (n & 0xff) as u8);
    let port = 20_000 + (rand_u32() % 10_000) as u16;
    SocketAddr::new(IpAddr::V4(ip), port)
}

pub fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    h.finish() as u32
}

pub fn service(name: &str, vip: SocketAddr) -> Service {
    // From JSON, so that fields added to the record later take defaults.
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vip": vip.ip(),
        "ports": [{"name": "p", "port": vip.port(), "target_port": 8080}],
        "lb": "p2c",
    }))
    .unwrap()
}

/// A static endpoint registered by this node.
pub fn endpoint(svc: &Service, id: &str, addr: SocketAddr, ready: bool) -> Endpoint {
    Endpoint {
        service: svc.name.clone(),
        namespace: svc.namespace.clone(),
        node: node(),
        id: Name::new(id).unwrap(),
        pod: None,
        hostname: None,
        ip: addr.ip(),
        ports: vec![EndpointPort {
            name: Name::new("p").unwrap(),
            port: PortNum::new(addr.port()).unwrap(),
            protocol: Default::default(),
        }],
        ready,
        is_static: true,
        addr: None,
    }
}

pub fn snapshot(items: &[(&Service, &[Endpoint])]) -> Arc<Snapshot> {
    let mut services = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for (s, eps) in items {
        let k = (s.namespace.clone(), s.name.clone());
        services.insert(k.clone(), Arc::new((*s).clone()));
        let mut m = EndpointMap::new();
        for e in *eps {
            m.insert((e.node.clone(), e.id.clone()), Arc::new(e.clone()));
        }
        endpoints.insert(k, Arc::new(m));
    }
    Arc::new(Snapshot {
        services: pier_model::Map::from(services),
        endpoints: pier_model::Map::from(endpoints),
        ..Default::default()
    })
}

/// A running proxy; cancelled and awaited on drop.
pub struct Running {
    pub tx: watch::Sender<Arc<Snapshot>>,
    pub problems: watch::Receiver<Arc<Problems>>,
    pub stats: watch::Receiver<Arc<StatsMap>>,
    pub registry: prometheus_client::registry::Registry,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), pier_proxy::ProxyError>>>,
}

impl Running {
    pub fn publish(&self, s: Arc<Snapshot>) {
        self.tx.send_replace(s);
    }
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn test_config() -> ProxyConfig {
    ProxyConfig {
        node_port_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        // The fixtures' backends listen on loopback.
        direct_allow: vec!["127.0.0.0/8".parse().expect("CIDR")],
        stats_interval_ms: 200,
        drain_timeout_ms: 2_000,
        ..ProxyConfig::unprivileged()
    }
}

pub fn start(cfg: ProxyConfig, initial: Arc<Snapshot>) -> Running {
    start_with_cidr(cfg, "127.0.0.0/8".parse().unwrap(), initial)
}

pub fn start_with_cidr(cfg: ProxyConfig, cidr: Cidr, initial: Arc<Snapshot>) -> Running {
    start_with_cidrs(cfg, cidr, None, initial)
}

/// As [`start_with_cidr`], dual stack when `cidr6` is given.
pub fn start_with_cidrs(
    cfg: ProxyConfig,
    cidr: Cidr,
    cidr6: Option<Cidr>,
    initial: Arc<Snapshot>,
) -> Running {
    let (tx, rx) = watch::channel(initial);
    // As the daemon does: every name under `pier_`.
    let mut registry = prometheus_client::registry::Registry::with_prefix("pier");
    let p = Proxy::new(cfg, node(), cidr, rx, None, &mut registry)
        .unwrap()
        .with_service_cidr6(cidr6);
    let problems = p.problems();
    let stats = p.stats();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(p.run(cancel.clone()));
    Running {
        tx,
        problems,
        stats,
        registry,
        cancel,
        task: Some(task),
    }
}

/// Connects, retrying until `within` (the listener may not be up yet).
pub async fn connect_within(addr: SocketAddr, within: Duration) -> TcpStream {
    let end = tokio::time::Instant::now() + within;
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < end => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("no listener on {addr} within {within:?}: {e}"),
        }
    }
}

/// A backend that writes `id` and closes each connection.
pub async fn id_backend(id: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let l = listener();
    let a = l.local_addr().unwrap();
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
    (a, h)
}

/// A loopback listener with a 4096 backlog: bursts of 1,000 connects must
/// not overflow a test backend's accept queue.
pub fn listener() -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(4096).unwrap();
    s.set_nonblocking(true).unwrap();
    TcpListener::from_std(s.into()).unwrap()
}

/// A backend that echoes everything until EOF.
pub async fn echo_backend() -> (SocketAddr, JoinHandle<()>) {
    let l = listener();
    let a = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (a, h)
}

/// A port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Reads the whole reply of a connection to an id backend.
pub async fn request_id(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Waits until `f` holds for the latest value of `rx`.
pub async fn wait_for<T: Clone, F: Fn(&T) -> bool>(
    rx: &mut watch::Receiver<T>,
    within: Duration,
    f: F,
) -> T {
    tokio::time::timeout(within, async {
        loop {
            {
                let v = rx.borrow_and_update().clone();
                if f(&v) {
                    return v;
                }
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("condition not reached in time")
}
