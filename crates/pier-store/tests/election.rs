//! Leader election and the lease keeper against a real etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pier_model::Name;
use pier_store::election::{campaign, leader};
use pier_store::lease::LeaseKeeper;
use pier_store::testing::EtcdServer;
use pier_store::{EtcdStore, Store, StoreError, Ttl};
use tokio_util::sync::CancellationToken;

async fn etcd_store(etcd: &EtcdServer) -> Arc<dyn Store> {
    Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .expect("connect"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_contenders_one_leader_and_takeover_within_ttl() {
    let etcd = EtcdServer::start().expect("start etcd");
    // Separate clients, as on two hosts.
    let store_a = etcd_store(&etcd).await;
    let store_b = etcd_store(&etcd).await;
    let name = Name::new("scheduler").expect("name");
    let ttl = Ttl::from_secs(2).expect("ttl");
    let cancel_a = CancellationToken::new();
    let cancel_b = CancellationToken::new();
    let _ga = cancel_a.clone().drop_guard();
    let _gb = cancel_b.clone().drop_guard();

    let a = campaign(store_a.clone(), &name, "a", ttl, &cancel_a)
        .await
        .expect("a leads");
    let b_task = {
        let (store_b, name, cancel_b) = (store_b.clone(), name.clone(), cancel_b.clone());
        tokio::spawn(async move { campaign(store_b, &name, "b", ttl, &cancel_b).await })
    };
    // B waits while A renews, for longer than several TTLs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!b_task.is_finished(), "b must not lead while a renews");
    assert_eq!(
        leader(&*store_b, &name).await.expect("leader"),
        Some("a".into())
    );

    // A's process "dies": its keepalive stops, nothing is revoked.
    let died = Instant::now();
    cancel_a.cancel();
    let b = tokio::time::timeout(Duration::from_secs(10), b_task)
        .await
        .expect("b leads in time")
        .expect("join")
        .expect("b campaign");
    let took = died.elapsed();
    // Within the TTL plus etcd's expiry check granularity (it checks every
    // 500 ms) and scheduling slack.
    assert!(
        took < ttl.as_duration() + Duration::from_secs(3),
        "took {took:?}"
    );
    assert_eq!(
        leader(&*store_a, &name).await.expect("leader"),
        Some("b".into())
    );
    assert_ne!(a.lease(), b.lease());
    tokio::time::timeout(Duration::from_secs(5), a.lost())
        .await
        .expect("a sees its leadership lost");

    // Resigning hands over at once.
    let cancel_c = CancellationToken::new();
    let _gc = cancel_c.clone().drop_guard();
    let c_task = {
        let (store, name, cancel_c) = (store_a.clone(), name.clone(), cancel_c.clone());
        tokio::spawn(async move { campaign(store, &name, "c", ttl, &cancel_c).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c_task.is_finished());
    let resigned = Instant::now();
    b.resign().await.expect("resign");
    let c = tokio::time::timeout(Duration::from_secs(5), c_task)
        .await
        .expect("c leads")
        .expect("join")
        .expect("c campaign");
    assert!(
        resigned.elapsed() < Duration::from_millis(1500),
        "{:?}",
        resigned.elapsed()
    );
    assert_eq!(
        leader(&*store_a, &name).await.expect("leader"),
        Some("c".into())
    );
    // Losing the key (deleted by someone else) is noticed by the leader.
    store_b
        .delete(&pier_model::keys::election(&name))
        .await
        .expect("delete");
    tokio::time::timeout(Duration::from_secs(5), c.lost())
        .await
        .expect("c sees the key gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_cancelled_returns_closed() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = etcd_store(&etcd).await;
    let name = Name::new("x").expect("name");
    let ttl = Ttl::from_secs(2).expect("ttl");
    let hold = CancellationToken::new();
    let _g = hold.clone().drop_guard();
    let _leader = campaign(store.clone(), &name, "holder", ttl, &hold)
        .await
        .expect("lead");
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c2.cancel();
    });
    let err = campaign(store.clone(), &name, "other", ttl, &cancel)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    assert_eq!(
        leader(&*store, &name).await.expect("leader"),
        Some("holder".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keeper_keeps_keys_past_ttl_and_revoke_removes_them() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = etcd_store(&etcd).await;
    let cancel = CancellationToken::new();
    let _g = cancel.clone().drop_guard();
    let keeper = LeaseKeeper::start(
        store.clone(),
        Ttl::from_secs(2).expect("ttl"),
        cancel.clone(),
    )
    .await
    .expect("start");
    let lease = keeper.subscribe().borrow().expect("lease");
    store
        .put("/k/a", b"1".to_vec(), Some(lease))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        store.get("/k/a").await.expect("get").is_some(),
        "kept alive past the TTL"
    );
    keeper.revoke().await.expect("revoke");
    assert!(
        store.get("/k/a").await.expect("get").is_none(),
        "gone at once"
    );
    assert_eq!(*keeper.subscribe().borrow(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keeper_detects_a_lost_lease_and_regrants() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = etcd_store(&etcd).await;
    let cancel = CancellationToken::new();
    let _g = cancel.clone().drop_guard();
    let keeper = LeaseKeeper::start(
        store.clone(),
        Ttl::from_secs(3).expect("ttl"),
        cancel.clone(),
    )
    .await
    .expect("start");
    let mut rx = keeper.subscribe();
    let old = rx.borrow_and_update().expect("lease");
    // Lost behind the keeper's back (as after a long partition).
    store.lease_revoke(old).await.expect("revoke");
    let new = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            rx.changed().await.expect("keeper alive");
            match *rx.borrow_and_update() {
                Some(id) if id != old => return id,
                // `None` while re-granting (a watch may skip it when the
                // new lease follows at once).
                _ => {}
            }
        }
    })
    .await
    .expect("re-granted in time");
    // The new lease is live.
    store.lease_keepalive(new).await.expect("new lease alive");
}

/// The election is generic over the store: the same takeover on the
/// embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(pier_store::EmbeddedStore::open(dir.path()).expect("open"));
    let name = Name::new("embedded-election").expect("name");
    let ttl = Ttl::from_secs(2).expect("ttl");
    let cancel_a = CancellationToken::new();
    let cancel_b = CancellationToken::new();
    let _ga = cancel_a.clone().drop_guard();
    let _gb = cancel_b.clone().drop_guard();
    let a = campaign(store.clone(), &name, "a", ttl, &cancel_a)
        .await
        .expect("a leads");
    let b_task = {
        let (store, name, cancel_b) = (store.clone(), name.clone(), cancel_b.clone());
        tokio::spawn(async move { campaign(store, &name, "b", ttl, &cancel_b).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!b_task.is_finished(), "b must not lead while a renews");
    let died = Instant::now();
    cancel_a.cancel();
    let _b = tokio::time::timeout(Duration::from_secs(10), b_task)
        .await
        .expect("b leads in time")
        .expect("join")
        .expect("b campaign");
    assert!(died.elapsed() < ttl.as_duration() + Duration::from_secs(3));
    assert_eq!(
        leader(&*store, &name).await.expect("leader"),
        Some("b".into())
    );
    tokio::time::timeout(Duration::from_secs(5), a.lost())
        .await
        .expect("a sees its leadership lost");
}
