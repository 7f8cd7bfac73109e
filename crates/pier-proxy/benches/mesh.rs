//! The same service reached locally and through the mesh hop, in one run,
//! over loopback (release build):
//!
//!   cargo bench -p pier-proxy --bench mesh
//!
//! Everything runs in this process on a 2-worker runtime: the client, the
//! real [`Proxy`] of node n1 (unprivileged mode: VIPs in 127.79/16), the
//! real [`MeshServer`] of node n2, and the targets. Paths:
//!
//! - `local`: client → n1's proxy → target (splice);
//! - `mesh`: client → n1's proxy → mTLS → n2's mesh server → target; the
//!   service's endpoint is registered on n2, so the proxy picks the mesh;
//! - reference lines: plain TCP client → target, and a bare
//!   [`MeshConnector`] doing a full handshake per connect.
//!
//! Connection setup: sequential connect + 1-byte round trip to the target.
//! The mesh runs with the default pool (2 warm connections per peer, and
//! the tunnels of finished connections), and again on a second proxy
//! whose connector keeps no pool (a TLS 1.3 resumption per connect).
//! Bulk: N MiB one way, client → target (upload) and target → client
//! (download), with this process's CPU time per GiB (all parts included).
//!
//! Env: MESH_BENCH_CONNECTS (default 2000), MESH_BENCH_MIB (default 512),
//! MESH_BENCH_PROFILE=up|down (only that mesh bulk line, for perf).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pier_model::{
    Endpoint, EndpointMap, EndpointPort, Name, Namespace, Node, PortNum, Service, Snapshot,
};
use pier_proxy::mesh::{MeshConnector, MeshServer};
use pier_proxy::tls::MeshConfig;
use pier_proxy::{Proxy, ProxyConfig};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

async fn serve_each<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(f(s));
        }
    });
    a
}

/// Echo one byte per connection, then close.
async fn ping_server() -> SocketAddr {
    serve_each(|mut s| async move {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_ok() {
            let _ = s.write_all(&b).await;
        }
    })
    .await
}

/// Read to EOF, then answer with the byte count.
async fn sink_server() -> SocketAddr {
    serve_each(|mut s| async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        let _ = s.write_all(&n.to_be_bytes()).await;
    })
    .await
}

/// Read a byte count, send that many bytes, close.
async fn source_server() -> SocketAddr {
    serve_each(|mut s| async move {
        let mut n = [0u8; 8];
        if s.read_exact(&mut n).await.is_err() {
            return;
        }
        let mut left = u64::from_be_bytes(n);
        let chunk = vec![7u8; 1 << 20];
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..k]).await.is_err() {
                return;
            }
            left -= k as u64;
        }
        let _ = s.shutdown().await;
    })
    .await
}

async fn ping<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("read");
}

/// The threads of each emulated host: A runs the client and n1's proxy
/// (and the main thread, where the client loops run), B runs n2's mesh
/// server and the targets. Each has its own 2-worker runtime.
static HOST_A: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static HOST_B: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn register(host: &Mutex<Vec<i32>>) {
    // /proc/thread-self links to "PID/task/TID".
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok());
    if let (Some(tid), Ok(mut h)) = (tid, host.lock()) {
        h.push(tid);
    }
}

/// User + system CPU time of one host's threads, from
/// /proc/self/task/TID/stat in clock ticks of 10 ms. Kernel work done in a
/// thread's context (on loopback the receiver's softirq often runs in the
/// sender's) counts for that thread.
fn cpu_time(host: &Mutex<Vec<i32>>) -> Duration {
    let tids = host.lock().map(|h| h.clone()).unwrap_or_default();
    let mut ticks = 0;
    for tid in tids {
        let stat =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime) are the 12th and 13th after ")".
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        ticks += num(11) + num(12);
    }
    Duration::from_millis(ticks * 10)
}

fn cpu_now() -> (Duration, Duration) {
    (cpu_time(&HOST_A), cpu_time(&HOST_B))
}

#[derive(Clone, Copy)]
struct Bulk {
    mib_s: f64,
    /// CPU seconds per GiB on host A (client, proxy) and B (mesh server,
    /// targets).
    cpu_a: f64,
    cpu_b: f64,
}

impl Bulk {
    fn cpu(&self) -> f64 {
        self.cpu_a + self.cpu_b
    }
    /// The busier host's CPU per GiB: what bounds a cross-host transfer
    /// when each host has its own cores.
    fn cpu_max(&self) -> f64 {
        self.cpu_a.max(self.cpu_b)
    }
}

/// `mib` MiB client → sink, then the count back.
async fn upload(addr: SocketAddr, mib: usize) -> Bulk {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let chunk = vec![7u8; 1 << 20];
    let cpu0 = cpu_now();
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await.expect("write");
    }
    s.shutdown().await.expect("shutdown");
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.expect("count");
    assert_eq!(u64::from_be_bytes(n), (mib as u64) << 20);
    done(t, cpu0, mib)
}

/// `mib` MiB source → client.
async fn download(addr: SocketAddr, mib: usize) -> Bulk {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut buf = vec![0u8; 1 << 18];
    let cpu0 = cpu_now();
    let t = Instant::now();
    s.write_all(&((mib as u64) << 20).to_be_bytes())
        .await
        .expect("ask");
    let mut got = 0u64;
    loop {
        match s.read(&mut buf).await.expect("read") {
            0 => break,
            k => got += k as u64,
        }
    }
    assert_eq!(got, (mib as u64) << 20);
    done(t, cpu0, mib)
}

fn done(t: Instant, cpu0: (Duration, Duration), mib: usize) -> Bulk {
    let wall = t.elapsed().as_secs_f64();
    let (a, b) = cpu_now();
    let per_gib = |d: Duration| d.as_secs_f64() * 1024.0 / mib as f64;
    Bulk {
        mib_s: mib as f64 / wall,
        cpu_a: per_gib(a - cpu0.0),
        cpu_b: per_gib(b - cpu0.1),
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Wall time and CPU time per host (A, B) of a run of connections.
struct Setup {
    wall: Duration,
    cpu: Option<(Duration, Duration)>,
}

fn setup_line(what: &str, n: usize, x: Setup, extra: &str) -> f64 {
    let r = rate(n, x.wall);
    let cpu = x.cpu.map_or(String::new(), |(a, b)| {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        format!("CPU µs/conn A {:>4.0} B {:>4.0}", us(a), us(b))
    });
    println!(
        "  {what:<34} {r:>6.0} conn/s {:>7.1} µs/conn  {cpu}  {extra}",
        x.wall.as_secs_f64() * 1e6 / n as f64
    );
    r
}

async fn sequential(addr: SocketAddr, n: usize) -> Setup {
    let c0 = cpu_now();
    let t = Instant::now();
    for _ in 0..n {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        ping(s).await;
    }
    let wall = t.elapsed();
    let c1 = cpu_now();
    Setup {
        wall,
        cpu: Some((c1.0 - c0.0, c1.1 - c0.1)),
    }
}

fn main() {
    let rt = |host: &'static Mutex<Vec<i32>>| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(move || register(host))
            .enable_all()
            .build()
            .expect("runtime")
    };
    let a = rt(&HOST_A);
    let b = rt(&HOST_B);
    register(&HOST_A);
    a.block_on(run(b.handle().clone()));
}

/// Runs `f` on host B's runtime and waits for it.
async fn on_b<F, T>(b: &tokio::runtime::Handle, f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    b.spawn(f).await.expect("host B task")
}

fn service(svc: &str, vip: SocketAddr) -> Arc<Service> {
    // From JSON, so that fields added to the record later take defaults.
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "name": svc,
            "vip": vip.ip(),
            "ports": [{"name": "p", "port": vip.port(), "target_port": 8080}],
            "lb": "p2c",
        }))
        .expect("service"),
    )
}

/// A node whose mesh is at `addr` (0: no mesh), from JSON as above.
fn node(n: &str, addr: SocketAddr) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "name": n, "addr": addr.ip(), "mesh_port": addr.port(),
        }))
        .expect("node"),
    )
}

fn endpoint(svc: &str, node: &str, a: SocketAddr) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        service: name(svc),
        namespace: Namespace::default(),
        node: name(node),
        id: name(&format!("{svc}-{node}")),
        pod: None,
        hostname: None,
        ip: a.ip(),
        ports: vec![EndpointPort {
            name: name("p"),
            port: PortNum::new(a.port()).expect("port"),
            protocol: Default::default(),
        }],
        ready: true,
        is_static: false,
        addr: None,
    })
}

/// A free port for the VIPs (127.79/16 shares the port space of 127/8 in
/// the sense that nothing else binds these addresses).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start_proxy(
    snap: watch::Receiver<Arc<Snapshot>>,
    mesh: MeshConnector,
    reg: &mut Registry,
    cancel: CancellationToken,
) {
    let cfg = ProxyConfig {
        node_port_addr: "127.0.0.1".parse().expect("addr"),
        direct_allow: vec!["127.0.0.0/8".parse().expect("CIDR")],
        ..ProxyConfig::unprivileged()
    };
    let p = Proxy::new(
        cfg,
        name("n1"),
        "127.0.0.0/8".parse().expect("cidr"),
        snap,
        Some(mesh),
        reg,
    )
    .expect("proxy");
    tokio::spawn(p.run(cancel));
}

async fn wait_listening(a: SocketAddr) {
    for _ in 0..500 {
        if let Ok(s) = TcpStream::connect(a).await {
            ping(s).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("proxy not listening on {a}");
}

fn mesh_counters(reg: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, reg).expect("encode");
    out.lines()
        .filter(|l| {
            l.starts_with("pier_mesh_client_handshakes_total{")
                || l.starts_with("pier_mesh_client_pool_hits_total ")
                || l.starts_with("pier_mesh_client_tunnel_reuses_total ")
        })
        .map(|l| l.trim_start_matches("pier_mesh_client_").to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run(b: tokio::runtime::Handle) {
    let connects = env_num("MESH_BENCH_CONNECTS", 2000);
    let mib = env_num("MESH_BENCH_MIB", 512);
    let dir = tempfile::tempdir().expect("tempdir");
    pier_ca::ca_init(&dir.path().join("ca")).expect("ca");
    for n in ["n1", "n2"] {
        pier_ca::ca_issue(&name(n), &dir.path().join("ca"), &dir.path().join(n), 30)
            .expect("issue");
    }
    let cfg =
        |n: &str| MeshConfig::from_dir("127.0.0.1:0".parse().expect("addr"), &dir.path().join(n));

    let pinger = on_b(&b, ping_server()).await;
    let sink = on_b(&b, sink_server()).await;
    let source = on_b(&b, source_server()).await;

    // n2's mesh server, on host B.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let mesh_addr = l.local_addr().expect("addr");
    let cancel = CancellationToken::new();

    // Services: {local, mesh} x {ping, sink, source}, plus the mesh ones
    // again on a second VIP for the no-pool proxy.
    let octet = (std::process::id() % 200) as u8 + 1;
    let vip = |i: u8| SocketAddr::from(([127, 79, octet, i], free_port()));
    let targets = [("ping", pinger), ("sink", sink), ("source", source)];
    let mut services = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let mut vips = BTreeMap::new();
    let mut i = 1;
    for (route, node) in [("local", "n1"), ("mesh", "n2"), ("nopool", "n2")] {
        for (what, target) in targets {
            let svc = format!("{route}-{what}");
            let v = vip(i);
            i += 1;
            vips.insert(svc.clone(), v);
            let k = (Namespace::default(), name(&svc));
            services.insert(k.clone(), service(&svc, v));
            let ep = endpoint(&svc, node, target);
            let mut m = EndpointMap::new();
            m.insert((ep.node.clone(), ep.id.clone()), ep);
            endpoints.insert(k, Arc::new(m));
        }
    }
    let mut nodes = BTreeMap::new();
    // n1 is the client: n2's listener relays only for a node it knows.
    nodes.insert(name("n1"), node("n1", SocketAddr::new(mesh_addr.ip(), 0)));
    nodes.insert(name("n2"), node("n2", mesh_addr));
    let all = Arc::new(Snapshot {
        nodes: pier_model::Map::from(nodes),
        services: pier_model::Map::from(services),
        endpoints: pier_model::Map::from(endpoints),
        ..Snapshot::default()
    });
    // Each proxy serves only its own services: the pooled one local-* and
    // mesh-*, the other nopool-*.
    let only = |keep: &dyn Fn(&str) -> bool| {
        let mut s = (*all).clone();
        s.services = s
            .services
            .iter()
            .filter(|(k, _)| keep(k.1.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Arc::new(s)
    };
    let (_tx_srv, rx_srv) = watch::channel(all.clone());
    // n2's agent's own view: its endpoints (all ready).
    let local: pier_proxy::mesh::LocalTargets = all
        .endpoints
        .values()
        .flat_map(|m| m.values())
        .filter(|e| e.node.as_str() == "n2")
        .flat_map(|e| e.ports.iter().map(|p| SocketAddr::new(e.ip, p.port.get())))
        .collect();
    let (_tx_local, rx_local) = watch::channel(Arc::new(local));
    let server = MeshServer::new(
        &cfg("n2"),
        name("n2"),
        rx_srv,
        rx_local,
        &mut Registry::default(),
    )
    .expect("server");
    let c = cancel.clone();
    b.spawn(async move {
        let l = TcpListener::from_std(l).expect("listener");
        server.serve(l, c).await
    });

    let mut reg = Registry::with_prefix("pier");
    let pooled = MeshConnector::new(&cfg("n1"), name("n1"), &mut reg).expect("connector");
    let (_tx1, rx1) = watch::channel(only(&|s| !s.starts_with("nopool")));
    start_proxy(rx1, pooled.clone(), &mut reg, cancel.clone()).await;
    let mut reg0 = Registry::with_prefix("pier");
    let nopool =
        MeshConnector::with_pool_size(&cfg("n1"), name("n1"), &mut reg0, 0).expect("connector");
    let (_tx2, rx2) = watch::channel(only(&|s| s.starts_with("nopool")));
    start_proxy(rx2, nopool.clone(), &mut reg0, cancel.clone()).await;
    // Every listener of a proxy comes up in its first reconcile.
    for k in ["local-ping", "mesh-ping", "nopool-ping"] {
        wait_listening(vips[k]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // For profiling one path alone: MESH_BENCH_PROFILE=up|down runs that
    // mesh bulk line only.
    if let Ok(dir) = std::env::var("MESH_BENCH_PROFILE") {
        let b = if dir == "up" {
            upload(vips["mesh-sink"], mib).await
        } else {
            download(vips["mesh-source"], mib).await
        };
        println!(
            "{dir}: {:.0} MiB/s, CPU-s/GiB A {:.2} B {:.2}",
            b.mib_s, b.cpu_a, b.cpu_b
        );
        return;
    }
    println!(
        "mesh bench: {connects} sequential connects per line, {mib} MiB per bulk line; loopback, one process: host A and host B each a 2-worker runtime, sharing 2 cores"
    );
    println!("connection setup (connect + 1-byte round trip to the target):");
    let direct = setup_line(
        "plain TCP, no proxy",
        connects,
        sequential(pinger, connects).await,
        "",
    );
    let local = setup_line(
        "proxy, local endpoint",
        connects,
        sequential(vips["local-ping"], connects).await,
        "",
    );
    let mesh = setup_line(
        "proxy, mesh hop, pool (reuse)",
        connects,
        sequential(vips["mesh-ping"], connects).await,
        &format!("[{}]", mesh_counters(&reg)),
    );
    let resumed = setup_line(
        "proxy, mesh hop, no pool (resumed)",
        connects,
        sequential(vips["nopool-ping"], connects).await,
        &format!("[{}]", mesh_counters(&reg0)),
    );
    // Reference: a full handshake per connect (a fresh connector, so an
    // empty session cache); only the connect and round trip are timed.
    let full_n = (connects / 4).max(50);
    let mut full = Duration::ZERO;
    for _ in 0..full_n {
        let c = MeshConnector::with_pool_size(&cfg("n1"), name("n1"), &mut Registry::default(), 0)
            .expect("connector");
        let t = Instant::now();
        ping(
            c.connect(mesh_addr, &name("n2"), pinger)
                .await
                .expect("mesh"),
        )
        .await;
        full += t.elapsed();
    }
    setup_line(
        "bare mesh connect, full handshake",
        full_n,
        Setup {
            wall: full,
            cpu: None,
        },
        "(no proxy; reference)",
    );
    println!(
        "  ratios: mesh/local {:.2} (pool), {:.2} (resumed); local/plain {:.2}",
        mesh / local,
        resumed / local,
        local / direct
    );

    println!(
        "bulk throughput ({mib} MiB one way; CPU-s per GiB: total = A + B; A = client + n1's proxy, B = n2's mesh server + target):"
    );
    let line = |what: &str, x: Bulk| {
        println!(
            "  {what:<32} {:>6.0} MiB/s  CPU {:>5.2} = A {:>4.2} + B {:>4.2}",
            x.mib_s,
            x.cpu(),
            x.cpu_a,
            x.cpu_b
        );
    };
    let mut rows = Vec::new();
    for (dir, plain, local, mesh) in [
        ("upload", sink, vips["local-sink"], vips["mesh-sink"]),
        (
            "download",
            source,
            vips["local-source"],
            vips["mesh-source"],
        ),
    ] {
        let run = |a| async move {
            if dir == "upload" {
                upload(a, mib).await
            } else {
                download(a, mib).await
            }
        };
        let p = run(plain).await;
        line(&format!("{dir}, plain TCP, no proxy"), p);
        let l = run(local).await;
        line(&format!("{dir}, proxy, local endpoint"), l);
        let m = run(mesh).await;
        line(&format!("{dir}, proxy, mesh hop"), m);
        rows.push((dir, l, m));
    }
    for (dir, l, m) in rows {
        println!(
            "  {dir:<8} mesh/local: throughput {:.2} (one box, shared cores); CPU per GiB {:.2}x in all, busier host {:.2}x -> cross-host estimate {:.2} of local",
            m.mib_s / l.mib_s,
            m.cpu() / l.cpu(),
            m.cpu_max() / l.cpu(),
            l.cpu() / m.cpu_max()
        );
    }
    cancel.cancel();
    pooled.close().await;
    nopool.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
}
