//! Put → new snapshot at a reader, against a real etcd loaded with 10 000
//! services and 100 000 endpoints. Prints p50/p99 latency, the reflector
//! process's resident memory (VmRSS) and etcd's.
//!
//! `cargo run --release -p pier-store --example reflector_latency`
//! (`PIER_BENCH_SAMPLES=N` changes the number of timed puts, default 500.)

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pier_model::{Endpoint, EndpointPort, Name, Namespace, PortNum, keys};
use pier_store::reflector::Reflector;
use pier_store::testing::EtcdServer;
use pier_store::{EtcdStore, Store, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
/// etcd's default `--max-txn-ops` is 128.
const OPS_PER_TXN: usize = 110;

fn endpoint(ns: &Namespace, svc: &Name, s: usize, e: usize, generation: u8) -> (String, Vec<u8>) {
    let node = Name::new(&format!("node-{}", e % 5)).expect("name");
    let id = Name::new(&format!("c{s:06}{e:02}")).expect("name");
    let ep = Endpoint {
        service: svc.clone(),
        namespace: ns.clone(),
        node: node.clone(),
        id: id.clone(),
        pod: None,
        hostname: None,
        ip: IpAddr::from([10, (s / 256) as u8, (s % 256) as u8, e as u8 + 2]),
        ports: vec![EndpointPort {
            name: Name::new("http").expect("name"),
            port: PortNum::new(8080).expect("port"),
            protocol: Default::default(),
        }],
        ready: generation % 2 == 0,
        is_static: false,
        addr: None,
    };
    (keys::endpoint(ns, svc, &node, &id), pier_model::encode(&ep))
}

fn vm_rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::var("PIER_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let etcd = EtcdServer::start()?;
    let store = Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)).await?);
    let ns = Namespace::default();

    let load = Instant::now();
    let mut ops = Vec::new();
    let mut txns = Vec::new();
    for s in 0..SERVICES {
        let svc = Name::new(&format!("svc-{s}"))?;
        let value = format!(
            r#"{{"name":"{}","namespace":"{}","vip":"10.96.{}.{}","ports":[{{"name":"http","port":80,"target_port":8080}}]}}"#,
            svc.as_str(),
            ns.as_str(),
            s / 250,
            s % 250 + 2
        );
        ops.push(TxnOp::Put {
            key: keys::service(&ns, &svc),
            value: value.into_bytes(),
            lease: None,
        });
        for e in 0..ENDPOINTS_PER_SERVICE {
            let (key, value) = endpoint(&ns, &svc, s, e, 0);
            ops.push(TxnOp::Put {
                key,
                value,
                lease: None,
            });
        }
        if ops.len() >= OPS_PER_TXN {
            txns.push(std::mem::take(&mut ops));
        }
    }
    if !ops.is_empty() {
        txns.push(ops);
    }
    // A few writers in parallel to load faster.
    let mut set = tokio::task::JoinSet::new();
    let chunks: Vec<Vec<Vec<TxnOp>>> = {
        let per = txns.len().div_ceil(4);
        txns.chunks(per).map(|c| c.to_vec()).collect()
    };
    drop(txns);
    for chunk in chunks {
        let store = store.clone();
        set.spawn(async move {
            for success in chunk {
                store
                    .txn(Txn {
                        success,
                        ..Default::default()
                    })
                    .await?;
            }
            Ok::<_, pier_store::StoreError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    println!(
        "loaded {SERVICES} services, {} endpoints in {:?}",
        SERVICES * ENDPOINTS_PER_SERVICE,
        load.elapsed()
    );

    let cancel = CancellationToken::new();
    let sync_start = Instant::now();
    let store_dyn: Arc<dyn Store> = store.clone();
    let r = Reflector::spawn(store_dyn, cancel.clone());
    r.synced().await;
    let snap = r.snapshot();
    println!(
        "initial list+build: {:?} ({} services, {} endpoints)",
        sync_start.elapsed(),
        snap.services.len(),
        snap.endpoints.values().map(|m| m.len()).sum::<usize>()
    );
    drop(snap);

    let mut rx = r.subscribe();
    let mut lat = Vec::with_capacity(samples);
    let mut put_only = Vec::with_capacity(samples);
    for i in 0..samples {
        let s = (i * 7919) % SERVICES;
        let e = i % ENDPOINTS_PER_SERVICE;
        let svc = Name::new(&format!("svc-{s}"))?;
        let (key, value) = endpoint(&ns, &svc, s, e, (i % 2 + 1) as u8);
        let t0 = Instant::now();
        let rev = store.put(&key, value, None).await?;
        put_only.push(t0.elapsed());
        loop {
            if rx.borrow_and_update().revision >= rev {
                break;
            }
            tokio::time::timeout(Duration::from_secs(5), rx.changed()).await??;
        }
        lat.push(t0.elapsed());
        // Spread the puts a little (not a burst test).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    lat.sort();
    put_only.sort();
    let self_rss = vm_rss_kb("self");
    let etcd_rss = etcd.pid().map(|p| vm_rss_kb(&p.to_string())).unwrap_or(0);
    println!(
        "put -> snapshot at reader over {samples} puts: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    );
    println!(
        "of which the put round trip alone: p50 {:.2} ms, p99 {:.2} ms",
        pct(&put_only, 0.50).as_secs_f64() * 1e3,
        pct(&put_only, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "VmRSS: this process (reflector + client) {} MB; etcd {} MB",
        self_rss / 1024,
        etcd_rss / 1024
    );
    cancel.cancel();
    Ok(())
}
