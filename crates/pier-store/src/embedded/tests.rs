//! Unit tests of the embedded store; the conformance suite (tests/conformance.rs)
//! checks it against etcd.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::*;

#[tokio::test]
async fn smoke_put_get_list_delete_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        assert_eq!(
            store.put("/a/1", b"x".to_vec(), None).await.expect("put"),
            2
        );
        assert_eq!(
            store.put("/a/1", b"y".to_vec(), None).await.expect("put"),
            3
        );
        assert_eq!(
            store.put("/a/0", b"z".to_vec(), None).await.expect("put"),
            4
        );
        let kv = store.get("/a/1").await.expect("get").expect("present");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        assert_eq!(kv.value, b"y");
        let list = store.list("/a/").await.expect("list");
        let keys: Vec<_> = list.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/a/0", "/a/1"]);
        assert_eq!(list.revision, 4);
        assert_eq!(store.delete("/a/0").await.expect("delete"), (true, 5));
        assert_eq!(store.delete("/a/0").await.expect("delete"), (false, 5));
        let err = EmbeddedStore::open(dir.path()).expect_err("second open must fail");
        assert!(err.to_string().contains("store.redb"), "{err}");
    }
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    let list = store.list("").await.expect("list");
    assert_eq!(list.revision, 5);
    assert_eq!(list.kvs.len(), 1);
    assert_eq!(list.kvs[0].mod_revision, 3);
    // History is not persisted.
    assert!(matches!(
        store.watch("/a/", 3).await.err(),
        Some(StoreError::Compacted { .. })
    ));
    let mut w = store.watch("/a/", 6).await.expect("watch");
    store.put("/a/2", b"w".to_vec(), None).await.expect("put");
    let item = w.next().await.expect("item").expect("ok");
    assert!(
        matches!(item, WatchItem::Events { revision: 6, .. }),
        "{item:?}"
    );
}

#[tokio::test]
async fn lease_survives_reopen_with_restarted_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = Ttl::from_secs(2).expect("ttl");
    let lease = {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let lease = store.lease_grant(ttl).await.expect("grant");
        store
            .put("/l/k", b"v".to_vec(), Some(lease))
            .await
            .expect("put");
        lease
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // 2.5 s after grant, but only 1 s after reopen: still there.
    assert!(store.get("/l/k").await.expect("get").is_some());
    assert_eq!(store.lease_keepalive(lease).await.expect("keepalive"), ttl);
    store.lease_revoke(lease).await.expect("revoke");
    assert!(store.get("/l/k").await.expect("get").is_none());
    assert!(matches!(
        store.lease_keepalive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_unique_contiguous_revisions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut revs = Vec::new();
            for i in 0..20 {
                let key = format!("/g/{w:02}/{i:02}");
                revs.push(store.put(&key, vec![1], None).await.expect("put"));
            }
            revs
        });
    }
    let mut revs = Vec::new();
    while let Some(r) = tasks.join_next().await {
        revs.extend(r.expect("task"));
    }
    revs.sort_unstable();
    let expected: Vec<Revision> = (2..2 + 32 * 20).collect();
    assert_eq!(revs, expected);
    let list = store.list("/g/").await.expect("list");
    assert_eq!(list.kvs.len(), 640);
    assert_eq!(list.revision, 641);
}

#[tokio::test]
async fn lease_expiry_is_on_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let ttl = Ttl::from_secs(2).expect("ttl");
    let mut w = store.watch("/e/", 0).await.expect("watch");
    let start = Instant::now();
    let lease = store.lease_grant(ttl).await.expect("grant");
    store
        .put("/e/k", b"v".to_vec(), Some(lease))
        .await
        .expect("put");
    let item = w.next().await.expect("put item").expect("ok");
    assert!(matches!(item, WatchItem::Events { .. }), "{item:?}");
    let item = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("expiry within 5 s")
        .expect("item")
        .expect("ok");
    let elapsed = start.elapsed();
    match item {
        WatchItem::Events { events, .. } => assert!(
            matches!(&events[..], [WatchEvent::Delete { key, .. }] if key == "/e/k"),
            "{events:?}"
        ),
        other => panic!("expected the delete, got {other:?}"),
    }
    // The deadline is measured from the grant's commit, a little after `start`.
    assert!(elapsed >= Duration::from_secs(2), "early: {elapsed:?}");
    // Correctness bound with margin for a loaded CI machine; the design
    // target is one commit (a few ms) late.
    assert!(elapsed < Duration::from_millis(2500), "late: {elapsed:?}");
}

#[tokio::test]
async fn watches_end_with_closed_when_store_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let mut w = store.watch("/", 0).await.expect("watch");
    drop(store);
    assert!(matches!(w.next().await, Some(Err(StoreError::Closed))));
    assert!(w.next().await.is_none());
    // And the file lock is released: it opens again at once.
    EmbeddedStore::open(dir.path()).expect("reopen after drop");
}

#[tokio::test]
async fn history_cap_compacts_oldest_revisions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    const CAP: usize = 100;
    store.set_history_cap(CAP);
    // One txn of CAP puts, then one more: revision 2 drops out.
    let txn = Txn {
        compares: vec![],
        success: (0..CAP)
            .map(|i| TxnOp::Put {
                key: format!("/h/{i:06}"),
                value: vec![],
                lease: None,
            })
            .collect(),
        failure: vec![],
    };
    assert_eq!(store.txn(txn).await.expect("txn").revision, 2);
    assert!(store.watch("/h/", 2).await.is_ok());
    store.put("/h/x", vec![], None).await.expect("put");
    match store.watch("/h/", 2).await {
        Err(StoreError::Compacted {
            requested: 2,
            compact_revision: 3,
        }) => {}
        other => panic!("expected Compacted, got {:?}", other.err()),
    }
    assert!(store.watch("/h/", 3).await.is_ok());
}

/// Attack (S1): the store holds pod environments (secrets); with a 022
/// umask, or an existing world-readable store, other local users could
/// read it. The dir ends 0700 and the file 0600 either way; a symlink
/// planted as the database file is refused.
#[test]
fn attack_store_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("data").join("store");
    let s = EmbeddedStore::open(&dir).expect("open");
    drop(s);
    let file = dir.join(DB_FILE);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&file), 0o600);
    // An existing store left open to everyone is tightened.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(EmbeddedStore::open(&dir).expect("reopen"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&file), 0o600);
    // A symlink in place of the database file is refused, and its target
    // is left alone.
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let target = d.path().join("elsewhere.redb");
    std::fs::write(&target, b"").unwrap();
    std::os::unix::fs::symlink(&target, other.join(DB_FILE)).unwrap();
    match EmbeddedStore::open(&other) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("symbolic link"), "{m}"),
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("a symlinked store file was opened"),
    }
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
}
