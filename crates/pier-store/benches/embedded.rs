//! EmbeddedStore benchmarks: put throughput (sequential, and 32 concurrent
//! writers sharing group commits) and get latency.
//!
//! Run: `cargo bench -p pier-store --bench embedded`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pier_store::{EmbeddedStore, Store};

/// Concurrent writers for the group-commit case.
const WRITERS: u64 = 32;

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    }
}

fn open(dir: &tempfile::TempDir) -> Arc<EmbeddedStore> {
    match EmbeddedStore::open(dir.path()) {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("open store: {e}"),
    }
}

fn puts(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let seq = AtomicU64::new(0);
    let value = vec![b'x'; 200];

    let mut g = c.benchmark_group("embedded_put");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("sequential", |b| {
        b.iter(|| {
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let key = format!("/bench/seq/{n:010}");
            rt.block_on(store.put(&key, value.clone(), None))
                .expect("put")
        })
    });
    g.bench_function("concurrent_32", |b| {
        // Time per put with 32 writers in flight: the total wall time of
        // `iters` puts spread over them, divided by criterion over `iters`.
        b.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for w in 0..WRITERS {
                    let store = store.clone();
                    let value = value.clone();
                    let base = seq.fetch_add(iters, Ordering::Relaxed);
                    let count = iters / WRITERS + u64::from(w < iters % WRITERS);
                    tasks.spawn(async move {
                        for i in 0..count {
                            let key = format!("/bench/con/{:010}", base + i);
                            store.put(&key, value.clone(), None).await.expect("put");
                        }
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.expect("writer task");
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn gets(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    const KEYS: u64 = 10_000;
    rt.block_on(async {
        // Loaded by 32 writers so group commit keeps set-up short.
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let store = store.clone();
            tasks.spawn(async move {
                for i in (w..KEYS).step_by(WRITERS as usize) {
                    let key = format!("/bench/get/{i:06}");
                    store.put(&key, vec![b'y'; 200], None).await.expect("put");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("loader task");
        }
    });
    let mut n = 0u64;
    c.bench_function("embedded_get", |b| {
        b.iter(|| {
            n = (n + 7919) % KEYS;
            let key = format!("/bench/get/{n:06}");
            black_box(rt.block_on(store.get(&key)).expect("get"))
        })
    });
}

criterion_group!(benches, puts, gets);
criterion_main!(benches);
