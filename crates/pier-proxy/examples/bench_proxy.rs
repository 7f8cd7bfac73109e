//! Runs the proxy alone for the loopback benchmark in /work/shared/bench
//! (`run_proxy_baselines.sh --extra-proxy name=pier,...`): unprivileged
//! mode, two services with static endpoints registered by this node.
//!
//! ```sh
//! cargo build --release -p pier-proxy --example bench_proxy
//! taskset -c 1 target/release/examples/bench_proxy &
//! ```
//! Options: `--threads N` (default 1: a current-thread runtime, for one
//! pinned core), `--no-splice`, `--pipe-kib N`, `--bulk VIP:PORT=BACKEND`, `--http
//! VIP:PORT=BACKEND,BACKEND`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pier_model::{
    Cidr, Endpoint, EndpointMap, Name, Namespace, PortNum, Service, ServicePort, ServiceType,
    Snapshot,
};
use pier_proxy::{Proxy, ProxyConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn service(
    name: &str,
    listen: SocketAddr,
    backends: &[SocketAddr],
    node: &Name,
) -> (Arc<Service>, EndpointMap) {
    let svc = Service {
        name: Name::new(name).expect("name"),
        namespace: Namespace::default(),
        vip: Some(listen.ip()),
        vip6: None,
        headless: false,
        external_name: None,
        service_type: ServiceType::ClusterIP,
        ports: vec![ServicePort {
            name: Name::new("p").expect("name"),
            port: PortNum::new(listen.port()).expect("port"),
            target_port: PortNum::new(backends[0].port()).expect("port"),
            node_port: None,
            protocol: Default::default(),
        }],
        selector: Default::default(),
        static_endpoints: Vec::new(),
        lb: pier_model::LbPolicy::RoundRobin,
        proxy_protocol: false,
        prefer_local: false,
        drain_timeout_ms: None,
        health: None,
        sla: None,
        session_affinity: None,
        created_at: 0,
        accept_labelled: false,
    };
    let mut eps = EndpointMap::new();
    for (i, b) in backends.iter().enumerate() {
        let id = Name::new(&format!("static-{i}")).expect("id");
        eps.insert(
            (node.clone(), id.clone()),
            Arc::new(Endpoint {
                service: svc.name.clone(),
                namespace: Namespace::default(),
                node: node.clone(),
                id,
                pod: None,
                hostname: None,
                ip: b.ip(),
                ports: vec![pier_model::EndpointPort {
                    name: Name::new("p").expect("name"),
                    port: PortNum::new(b.port()).expect("port"),
                    protocol: Default::default(),
                }],
                ready: true,
                is_static: true,
                addr: None,
            }),
        );
    }
    (Arc::new(svc), eps)
}

fn parse_spec(s: &str) -> (SocketAddr, Vec<SocketAddr>) {
    let (l, b) = s.split_once('=').expect("VIP:PORT=BACKEND[,BACKEND]");
    (
        l.parse().expect("listen address"),
        b.split(',')
            .map(|x| x.parse().expect("backend address"))
            .collect(),
    )
}

fn main() {
    let mut threads = 1usize;
    let mut splice = true;
    let mut pipe_kib = ProxyConfig::default().pipe_size_kib;
    let mut bulk = parse_spec("127.0.0.1:19101=127.0.0.1:15201");
    let mut http = parse_spec("127.0.0.1:19102=127.0.0.1:18081,127.0.0.1:18082");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--threads N")
            }
            "--no-splice" => splice = false,
            "--pipe-kib" => {
                pipe_kib = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--pipe-kib N")
            }
            "--bulk" => bulk = parse_spec(&args.next().expect("--bulk SPEC")),
            "--http" => http = parse_spec(&args.next().expect("--http SPEC")),
            _ => panic!("unknown option {a}"),
        }
    }
    // 10k+ held connections need ~4 fds each (two sockets, pipes are lazy).
    if let Ok(cur) = std::fs::read_to_string("/proc/sys/fs/nr_open") {
        let max: u64 = cur.trim().parse().unwrap_or(1 << 20);
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max.min(1 << 20)),
                maximum: Some(max.min(1 << 20)),
            },
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();

    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    rt.block_on(async move {
        let node = Name::new("bench").expect("node");
        let mut services = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        for (name, (l, b)) in [("bulk", &bulk), ("http", &http)] {
            let (s, e) = service(name, *l, b, &node);
            let k = (s.namespace.clone(), s.name.clone());
            services.insert(k.clone(), s);
            endpoints.insert(k, Arc::new(e));
        }
        let snap = Snapshot {
            services: pier_model::Map::from(services),
            endpoints: pier_model::Map::from(endpoints),
            ..Default::default()
        };
        let (_tx, rx) = watch::channel(Arc::new(snap));
        let cfg = ProxyConfig {
            splice,
            pipe_size_kib: pipe_kib,
            direct_allow: vec!["127.0.0.0/8".parse().expect("CIDR")],
            ..ProxyConfig::unprivileged()
        };
        let mut reg = prometheus_client::registry::Registry::default();
        let cidr: Cidr = "127.0.0.0/8".parse().expect("cidr");
        let proxy = Proxy::new(cfg, node, cidr, rx, None, &mut reg).expect("proxy");
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c2.cancel();
        });
        println!(
            "pid={} bulk={} http={} threads={threads} splice={splice}",
            std::process::id(),
            bulk.0,
            http.0
        );
        proxy.run(cancel).await.expect("proxy run");
    });
}
