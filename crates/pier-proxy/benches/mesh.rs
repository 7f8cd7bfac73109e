//! Mesh hop vs direct, in one run, over loopback (release build):
//!
//!   cargo bench -p pier-proxy --bench mesh
//!
//! - connection setup: sequential connect + 1-byte round trip, direct TCP;
//!   through the mesh with a full handshake each time (fresh session cache);
//!   with TLS 1.3 resumption; and with the warm pool;
//! - bulk throughput: 512 MiB one way into a sink, direct vs through the mesh.
//!
//! Env: MESH_BENCH_CONNECTS (default 2000), MESH_BENCH_MIB (default 512).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pier_model::{Endpoint, EndpointMap, EndpointPort, Name, Namespace, PortNum, Snapshot};
use pier_proxy::mesh::{MeshConnector, MeshServer};
use pier_proxy::tls::{self, MeshConfig};
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

/// Echo one byte per connection, then close.
async fn ping_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            });
        }
    });
    a
}

/// Read to EOF, then answer with the byte count.
async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    a
}

async fn ping<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("read");
}

/// This process's user + system CPU time (both ends of every connection
/// run in it), from /proc/self/stat in clock ticks of 10 ms.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after ")".
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = num(11) + num(12);
    Duration::from_millis(ticks * 10)
}

/// Returns (MiB/s wall, CPU seconds per GiB).
async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, mib: usize) -> (f64, f64) {
    let chunk = vec![7u8; 1 << 20];
    let cpu0 = cpu_time();
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await.expect("write");
    }
    s.shutdown().await.expect("shutdown");
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.expect("count");
    assert_eq!(u64::from_be_bytes(n), (mib as u64) << 20);
    let cpu = (cpu_time() - cpu0).as_secs_f64() * 1024.0 / mib as f64;
    ((mib as f64) / t.elapsed().as_secs_f64(), cpu)
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{:>8.0} conn/s  {:>7.1} µs/conn",
        n as f64 / d.as_secs_f64(),
        d.as_secs_f64() * 1e6 / n as f64
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let connects = env_num("MESH_BENCH_CONNECTS", 2000);
    let mib = env_num("MESH_BENCH_MIB", 512);
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ca_init(&dir.path().join("ca")).expect("ca");
    for n in ["n1", "n2"] {
        tls::ca_issue(&name(n), &dir.path().join("ca"), &dir.path().join(n), 30).expect("issue");
    }
    let cfg =
        |n: &str| MeshConfig::from_dir("127.0.0.1:0".parse().expect("addr"), &dir.path().join(n));

    let pinger = ping_server().await;
    let sink = sink_server().await;
    let ep = |id: &str, a: SocketAddr| {
        Arc::new(Endpoint {
            service: name("bench"),
            namespace: Namespace::default(),
            node: name("n1"),
            id: name(id),
            pod: None,
            hostname: None,
            ip: a.ip(),
            ports: vec![EndpointPort {
                name: name("p"),
                port: PortNum::new(a.port()).expect("port"),
            }],
            ready: true,
            is_static: false,
        })
    };
    let mut m = EndpointMap::new();
    for e in [ep("ping", pinger), ep("sink", sink)] {
        m.insert((e.node.clone(), e.id.clone()), e);
    }
    let mut all = BTreeMap::new();
    all.insert((Namespace::default(), name("bench")), Arc::new(m));
    let (_tx, rx) = watch::channel(Arc::new(Snapshot {
        endpoints: Arc::new(all),
        ..Snapshot::default()
    }));

    let server =
        MeshServer::new(&cfg("n1"), name("n1"), rx, &mut Registry::default()).expect("server");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mesh = l.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let srv = tokio::spawn(server.serve(l, cancel.clone()));
    let n1 = name("n1");

    println!(
        "mesh bench: {connects} sequential connects each, {mib} MiB bulk; loopback, 2 worker threads"
    );
    println!("connection setup (connect + 1-byte round trip to the target):");
    let t = Instant::now();
    for _ in 0..connects {
        let s = TcpStream::connect(pinger).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        ping(s).await;
    }
    let direct = t.elapsed();
    println!("  direct TCP          {}", rate(connects, direct));

    // Full handshakes: a fresh connector (empty session cache) per connect;
    // only the connect itself is timed.
    let full_n = (connects / 4).max(50);
    let mut full = Duration::ZERO;
    for _ in 0..full_n {
        let c = MeshConnector::with_pool_size(&cfg("n2"), name("n2"), &mut Registry::default(), 0)
            .expect("connector");
        let t = Instant::now();
        ping(c.connect(mesh, &n1, pinger).await.expect("mesh connect")).await;
        full += t.elapsed();
    }
    println!("  mesh, full handshake {}", rate(full_n, full));

    let mut reg = Registry::default();
    let c = MeshConnector::with_pool_size(&cfg("n2"), name("n2"), &mut reg, 0).expect("connector");
    ping(c.connect(mesh, &n1, pinger).await.expect("mesh connect")).await;
    let t = Instant::now();
    for _ in 0..connects {
        ping(c.connect(mesh, &n1, pinger).await.expect("mesh connect")).await;
    }
    let resumed = t.elapsed();
    println!(
        "  mesh, resumed        {}   [{}]",
        rate(connects, resumed),
        handshakes(&reg)
    );

    let mut reg = Registry::default();
    let c = MeshConnector::with_pool_size(&cfg("n2"), name("n2"), &mut reg, 2).expect("connector");
    ping(c.connect(mesh, &n1, pinger).await.expect("mesh connect")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    for _ in 0..connects {
        ping(c.connect(mesh, &n1, pinger).await.expect("mesh connect")).await;
    }
    let warm = t.elapsed();
    println!(
        "  mesh, warm pool (2)  {}   [{}]",
        rate(connects, warm),
        handshakes(&reg)
    );
    c.close().await;

    println!("bulk throughput ({mib} MiB one way, then the count back):");
    let s = TcpStream::connect(sink).await.expect("connect");
    let (d, dc) = bulk(s, mib).await;
    println!("  direct TCP   {d:>8.0} MiB/s   {dc:.2} CPU s/GiB (both ends, this process)");
    let s = MeshConnector::with_pool_size(&cfg("n2"), name("n2"), &mut Registry::default(), 0)
        .expect("connector")
        .connect(mesh, &n1, sink)
        .await
        .expect("mesh connect");
    let (m, mc) = bulk(s, mib).await;
    println!(
        "  mesh hop     {m:>8.0} MiB/s   {mc:.2} CPU s/GiB (client + mesh server + target)   ({:.2} of direct)",
        m / d
    );
    cancel.cancel();
    let _ = srv.await;
}

fn handshakes(reg: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, reg).expect("encode");
    out.lines()
        .filter(|l| {
            l.starts_with("mesh_client_handshakes_total{")
                || l.starts_with("mesh_client_pool_hits_total ")
        })
        .map(|l| l.trim_start_matches("mesh_client_").to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}
