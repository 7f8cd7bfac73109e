//! EtcdStore against a real etcd (Debian's /usr/bin/etcd): endpoints,
//! reconnects, watch resume and compaction, leases.

use std::time::Duration;

use futures::StreamExt;
use pier_store::testing::EtcdServer;
use pier_store::{EtcdStore, Store, StoreError, Ttl, WatchEvent, WatchItem, WatchStream};

async fn next_item(w: &mut WatchStream) -> Result<WatchItem, StoreError> {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("watch item within 20 s")
        .expect("watch stream still open")
}

/// Collects the keys of Put events until `n` have been seen, returning every
/// item met on the way.
async fn collect_puts(w: &mut WatchStream, n: usize) -> (Vec<String>, Vec<WatchItem>) {
    let mut keys = Vec::new();
    let mut items = Vec::new();
    while keys.len() < n {
        let item = next_item(w).await.expect("watch ok");
        if let WatchItem::Events { events, .. } = &item {
            for e in events {
                if let WatchEvent::Put(kv) = e {
                    keys.push(kv.key.clone());
                }
            }
        }
        items.push(item);
    }
    (keys, items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_ops_and_unknown_lease() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let r1 = store.put("/t/a", b"1".to_vec(), None).await.expect("put");
    let kv = store.get("/t/a").await.expect("get").expect("present");
    assert_eq!(kv.value, b"1");
    assert_eq!(kv.mod_revision, r1);
    assert_eq!(kv.version, 1);
    let (existed, _) = store.delete("/t/a").await.expect("delete");
    assert!(existed);
    assert!(store.get("/t/a").await.expect("get").is_none());
    let err = store
        .lease_keepalive(pier_store::LeaseId(12345))
        .await
        .expect_err("unknown lease");
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err:?}");
    let err = store
        .put("/t/b", b"x".to_vec(), Some(pier_store::LeaseId(12345)))
        .await
        .expect_err("put under unknown lease");
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_past_one_page() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    // More than one list page (5 000), in txns of 100 puts.
    let n = 5_250;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let txn = pier_store::Txn {
            success: chunk
                .iter()
                .map(|i| pier_store::TxnOp::Put {
                    key: format!("/p/{i:05}"),
                    value: i.to_string().into_bytes(),
                    lease: None,
                })
                .collect(),
            ..Default::default()
        };
        store.txn(txn).await.expect("txn");
    }
    store
        .put("/q/outside", b"x".to_vec(), None)
        .await
        .expect("put");
    let list = store.list("/p/").await.expect("list");
    assert_eq!(list.kvs.len(), n);
    let keys: Vec<_> = list.kvs.iter().map(|kv| kv.key.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "sorted, no duplicates");
    assert!(list.revision >= list.kvs.iter().map(|k| k.mod_revision).max().unwrap_or(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_endpoint_dead_still_works() {
    let etcd = EtcdServer::start().expect("start etcd");
    // A port nobody listens on: bind then drop.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let store = EtcdStore::connect(&[dead.clone(), etcd.endpoint.clone()])
        .await
        .expect("connect with the first endpoint dead");
    store.put("/d/a", b"1".to_vec(), None).await.expect("put");
    assert!(store.get("/d/a").await.expect("get").is_some());

    // Two live members is not possible with single-member servers sharing no
    // data, so check the rotation the other way: both endpoints up at first,
    // then the current one dies and the next call moves on and fails over to
    // the other *process* — here a second independent etcd.
    let other = EtcdServer::start().expect("start second etcd");
    let mut first = EtcdServer::start().expect("start first etcd");
    let store = EtcdStore::connect(&[first.endpoint.clone(), other.endpoint.clone()])
        .await
        .expect("connect");
    assert!(store.current_endpoint().ends_with(&first.endpoint));
    store
        .put("/d/b", b"1".to_vec(), None)
        .await
        .expect("put on first");
    first.kill();
    let rev = store
        .put("/d/c", b"2".to_vec(), None)
        .await
        .expect("put carries on past the dead endpoint");
    assert!(rev > 0);
    assert!(store.current_endpoint().ends_with(&other.endpoint));
    // It landed on the live one.
    let direct = EtcdStore::connect(std::slice::from_ref(&other.endpoint))
        .await
        .expect("connect other");
    assert!(direct.get("/d/c").await.expect("get").is_some());
}

/// Agents spread over the members by node name (issue 17: from the first
/// endpoint, every agent's watch was on one member), the same name always
/// to the same member, and a dead member is still passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_spread_starts_on_the_member_the_key_hashes_to() {
    let (a, b) = (
        EtcdServer::start().expect("start etcd a"),
        EtcdServer::start().expect("start etcd b"),
    );
    let eps = [a.endpoint.clone(), b.endpoint.clone()];
    let sec = pier_store::EtcdSecurity::default();
    let mut on_a = 0;
    for i in 0..16 {
        let key = format!("host-{i}");
        let s = EtcdStore::connect_spread(&eps, &sec, &key)
            .await
            .expect("connect");
        let again = EtcdStore::connect_spread(&eps, &sec, &key)
            .await
            .expect("connect");
        assert_eq!(s.current_endpoint(), again.current_endpoint(), "{key}");
        if s.current_endpoint().ends_with(&a.endpoint) {
            on_a += 1;
        }
    }
    assert!((4..=12).contains(&on_a), "{on_a} of 16 on the first member");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    for i in 0..4 {
        let s =
            EtcdStore::connect_spread(&[dead.clone(), a.endpoint.clone()], &sec, &format!("h{i}"))
                .await
                .expect("a dead member is passed over");
        assert!(s.current_endpoint().ends_with(&a.endpoint));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_when_nothing_answers() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let err = EtcdStore::connect(&[dead])
        .await
        .expect_err("nothing answers");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_restart_without_losing_changes() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let start = store.put("/w/0", b"0".to_vec(), None).await.expect("put");
    let mut w = store.watch("/w/", start + 1).await.expect("watch");
    for i in 1..=3 {
        store
            .put(&format!("/w/{i}"), b"x".to_vec(), None)
            .await
            .expect("put");
    }
    let (keys, _) = collect_puts(&mut w, 3).await;
    assert_eq!(keys, ["/w/1", "/w/2", "/w/3"]);

    etcd.kill();
    let item = next_item(&mut w).await.expect("ok");
    assert!(matches!(item, WatchItem::Disconnected { .. }), "{item:?}");
    etcd.restart().expect("restart");
    for i in 4..=6 {
        store
            .put(&format!("/w/{i}"), b"x".to_vec(), None)
            .await
            .expect("put after restart");
    }
    let (keys, items) = collect_puts(&mut w, 3).await;
    assert_eq!(keys, ["/w/4", "/w/5", "/w/6"], "no change lost or repeated");
    assert!(
        items.iter().any(|i| matches!(i, WatchItem::Resumed)),
        "Resumed before the new events: {items:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_compacted_revision_is_compacted() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let r1 = store.put("/c/a", b"1".to_vec(), None).await.expect("put");
    let r2 = store.put("/c/a", b"2".to_vec(), None).await.expect("put");
    let r3 = store.put("/c/a", b"3".to_vec(), None).await.expect("put");
    store.compact(r3).await.expect("compact");
    let res = store.watch("/c/", r1).await;
    let err = match res {
        Err(e) => e,
        Ok(mut w) => next_item(&mut w).await.expect_err("compacted"),
    };
    assert!(matches!(err, StoreError::Compacted { .. }), "{err:?}");
    let _ = r2;
    // Compacting again at or below the compaction point says so.
    let err = store.compact(r2).await.expect_err("already compacted");
    assert!(matches!(err, StoreError::Compacted { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_compacted_while_disconnected_ends_with_compacted() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let start = store.put("/k/0", b"0".to_vec(), None).await.expect("put");
    let mut w = store.watch("/k/", start + 1).await.expect("watch");
    store.put("/k/1", b"1".to_vec(), None).await.expect("put");
    collect_puts(&mut w, 1).await;
    etcd.kill();
    let item = next_item(&mut w).await.expect("ok");
    assert!(matches!(item, WatchItem::Disconnected { .. }), "{item:?}");
    etcd.restart().expect("restart");
    // While the watch backs off, write and compact past its resume point with
    // another client. The watch may or may not have resumed already; if it
    // did, it sees the writes; if not, it must end with Compacted.
    let other = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let mut last = 0;
    for i in 2..5 {
        last = other
            .put(&format!("/k/{i}"), b"x".to_vec(), None)
            .await
            .expect("put");
    }
    other.compact(last).await.expect("compact");
    let mut seen = Vec::new();
    loop {
        match next_item(&mut w).await {
            Ok(WatchItem::Events { events, .. }) => {
                for e in events {
                    if let WatchEvent::Put(kv) = e {
                        seen.push(kv.key);
                    }
                }
                if seen.len() == 3 {
                    break;
                }
            }
            Ok(_) => {}
            Err(StoreError::Compacted { .. }) => break,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_not_renewed_takes_its_keys() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let ttl = Ttl::from_secs(2).expect("ttl");
    let lease = store.lease_grant(ttl).await.expect("grant");
    store
        .put("/l/a", b"1".to_vec(), Some(lease))
        .await
        .expect("put");
    store
        .put("/l/b", b"1".to_vec(), Some(lease))
        .await
        .expect("put");
    store
        .put("/l/keep", b"1".to_vec(), None)
        .await
        .expect("put");
    let kv = store.get("/l/a").await.expect("get").expect("present");
    assert_eq!(kv.lease, Some(lease));
    let left = store.lease_keepalive(lease).await.expect("keepalive");
    assert!(left.secs() >= 1);
    // No more renewals: gone within TTL plus etcd's expiry granularity.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = store.list("/l/").await.expect("list");
        let keys: Vec<_> = list.kvs.iter().map(|k| k.key.as_str()).collect();
        if keys == ["/l/keep"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leased keys still there: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = store.lease_keepalive(lease).await.expect_err("expired");
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err:?}");
}

/// etcd's count of `metric` for the LeaseKeepAlive method, from its
/// /metrics on the (plain) client port.
fn keepalive_metric(etcd: &EtcdServer, metric: &str) -> u64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(&etcd.endpoint).expect("connect to /metrics");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        conn,
        "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n",
        etcd.endpoint
    )
    .expect("send");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("read /metrics");
    let line = body
        .lines()
        .find(|l| l.starts_with(metric) && l.contains("grpc_method=\"LeaseKeepAlive\""))
        .unwrap_or_else(|| panic!("{metric} for LeaseKeepAlive not in etcd's /metrics"));
    let value = line.rsplit(' ').next().unwrap_or_default();
    value.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_share_one_stream_until_it_breaks() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let ttl = Ttl::from_secs(30).expect("ttl");
    let lease = store.lease_grant(ttl).await.expect("grant");
    for _ in 0..5 {
        assert_eq!(store.lease_keepalive(lease).await.expect("keepalive"), ttl);
    }
    // One stream for the five renewals; on it, the open's own renewal, the
    // one after it that reads the TTL, and four more.
    assert_eq!(keepalive_metric(&etcd, "grpc_server_started_total"), 1);
    assert_eq!(keepalive_metric(&etcd, "grpc_server_msg_received_total"), 6);

    // The stream breaks with the member; the next renewal opens another
    // (etcd keeps leases across a restart).
    etcd.restart().expect("restart");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.lease_keepalive(lease).await {
            Ok(t) => {
                assert_eq!(t, ttl);
                break;
            }
            Err(StoreError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("keepalive after restart: {e}");
            }
            Err(e) => panic!("keepalive after restart: {e:?}"),
        }
    }
    store.lease_keepalive(lease).await.expect("keepalive");
    assert_eq!(keepalive_metric(&etcd, "grpc_server_started_total"), 1);

    // A revoked lease is not found, on a fresh stream.
    store.lease_revoke(lease).await.expect("revoke");
    let err = store.lease_keepalive(lease).await.expect_err("revoked");
    assert!(
        matches!(err, StoreError::LeaseNotFound(l) if l == lease),
        "{err:?}"
    );
}
