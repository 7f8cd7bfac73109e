//! Holds N idle connections through a running proxy and reports the
//! proxy's memory per connection (RSS delta / N).
//!
//! ```sh
//! taskset -c 1 target/release/examples/bench_proxy --http 127.0.0.1:19103=127.0.0.1:18090 &
//! target/release/examples/hold_conns --pid $! --proxy 127.0.0.1:19103 --backend 127.0.0.1:18090 --n 10000
//! ```
//! With `--role both` (default) it runs the echo backend itself; a process
//! has at most RLIMIT_NOFILE descriptors (20,000 hard here, without
//! CAP_SYS_RESOURCE), so for 10k connections run `--role backend` and
//! `--role client` as two processes. It opens the connections in batches,
//! checks one echo on each (so each is established end to end), then reads
//! the proxy's VmRSS and the kernel's Slab, holds for `--hold-s`, and closes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn kb(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut pid = 0u32;
    let mut proxy: SocketAddr = "127.0.0.1:19103".parse().expect("addr");
    let mut backend: SocketAddr = "127.0.0.1:18090".parse().expect("addr");
    let mut n = 10_000usize;
    let mut hold_s = 2u64;
    let mut role = String::from("both");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().expect("option value");
        match a.as_str() {
            "--pid" => pid = v.parse().expect("pid"),
            "--proxy" => proxy = v.parse().expect("proxy addr"),
            "--backend" => backend = v.parse().expect("backend addr"),
            "--n" => n = v.parse().expect("n"),
            "--hold-s" => hold_s = v.parse().expect("seconds"),
            "--role" => role = v,
            _ => panic!("unknown option {a}"),
        }
    }
    assert!(
        proxy.ip().is_loopback() && backend.ip().is_loopback(),
        "loopback only"
    );
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1 << 20),
            maximum: Some(1 << 20),
        },
    );
    if role != "client" {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_reuse_address(true).expect("reuse");
        sock.bind(&backend.into()).expect("bind backend");
        sock.listen(4096).expect("listen");
        sock.set_nonblocking(true).expect("nonblocking");
        let l = TcpListener::from_std(sock.into()).expect("listener");
        let serve = async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        };
        if role == "backend" {
            println!("echo backend on {backend}");
            return serve.await;
        }
        tokio::spawn(serve);
    }
    let status = format!("/proc/{pid}/status");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = kb(&status, "VmRSS:");
    let slab0 = kb("/proc/meminfo", "Slab:");
    let mut conns = Vec::with_capacity(n);
    let t0 = std::time::Instant::now();
    while conns.len() < n {
        let batch = (n - conns.len()).min(500);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(proxy).await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                std::io::Result::Ok(s)
            }));
        }
        for t in tasks {
            conns.push(
                tokio::time::timeout(Duration::from_secs(10), t)
                    .await
                    .expect("timeout")
                    .expect("join")
                    .expect("connect/echo"),
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = kb(&status, "VmRSS:");
    let slab1 = kb("/proc/meminfo", "Slab:");
    println!(
        "held={} open_s={:.2} proxy_rss_kib_before={} after={} per_conn_bytes={:.0} slab_delta_kib={} (all 4 sockets of each conn, both processes)",
        conns.len(),
        t0.elapsed().as_secs_f64(),
        rss0,
        rss1,
        (rss1.saturating_sub(rss0) as f64 * 1024.0) / n as f64,
        slab1 as i64 - slab0 as i64
    );
    tokio::time::sleep(Duration::from_secs(hold_s)).await;
    // Every one still works after the hold.
    let mut ok = 0;
    for s in conns.iter_mut() {
        s.write_all(b"y").await.expect("write after hold");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("echo after hold");
        ok += 1;
    }
    println!("still_working={ok}");
}
