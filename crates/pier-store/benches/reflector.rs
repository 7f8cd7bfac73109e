//! The reflector's rebuild cost: a full list of 10 000 services and 100 000
//! endpoints applied into a fresh `Snapshot` (decode + key parse + insert),
//! and one incremental batch on top of that state.
//!
//! `cargo bench -p pier-store --bench reflector`
//! (put → snapshot latency against a real etcd:
//! `cargo run --release -p pier-store --example reflector_latency`)

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use pier_model::{Endpoint, EndpointPort, Name, Namespace, PortNum, keys};
use pier_store::reflector::build;
use pier_store::{KeyValue, WatchEvent};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;

fn kv(key: String, value: Vec<u8>, rev: i64) -> KeyValue {
    KeyValue {
        key,
        value,
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: None,
    }
}

fn dataset() -> Vec<KeyValue> {
    let ns = Namespace::default();
    let mut kvs = Vec::with_capacity(SERVICES * (ENDPOINTS_PER_SERVICE + 1));
    let mut rev = 1;
    for s in 0..SERVICES {
        let svc = Name::new(&format!("svc-{s}")).expect("name");
        let value = format!(
            r#"{{"name":"{}","namespace":"{}","vip":"10.96.{}.{}","ports":[{{"name":"http","port":80,"target_port":8080}}]}}"#,
            svc.as_str(),
            ns.as_str(),
            s / 250,
            s % 250 + 2
        );
        rev += 1;
        kvs.push(kv(keys::service(&ns, &svc), value.into_bytes(), rev));
        for e in 0..ENDPOINTS_PER_SERVICE {
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
                ready: true,
                is_static: false,
                addr: None,
            };
            rev += 1;
            kvs.push(kv(
                keys::endpoint(&ns, &svc, &node, &id),
                pier_model::encode(&ep),
                rev,
            ));
        }
    }
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    kvs
}

fn bench(c: &mut Criterion) {
    let kvs = dataset();
    let rev = kvs.len() as i64 + 1;
    let mut g = c.benchmark_group("reflector");
    g.sample_size(10);
    g.bench_function("full_list_10k_services_100k_endpoints", |b| {
        b.iter(|| black_box(build(black_box(&kvs), rev)))
    });
    // One watch batch (a single endpoint flip) applied to the full state and
    // published: what every reader sees per change.
    let base = build(&kvs, rev);
    let ep_kv = kvs
        .iter()
        .find(|k| k.key.starts_with(keys::prefix::ENDPOINTS))
        .expect("an endpoint")
        .clone();
    let events = vec![WatchEvent::Put(ep_kv)];
    g.bench_function("one_endpoint_batch_on_100k", |b| {
        b.iter(|| {
            let mut s = base.clone();
            pier_store::reflector::apply_events(&mut s, black_box(&events), rev + 1);
            black_box(std::sync::Arc::new(s))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
