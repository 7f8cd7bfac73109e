//! The reflector against a real etcd: restarts, compaction while
//! disconnected, bad values, staleness.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pier_model::{Endpoint, EndpointPort, Name, Namespace, PortNum, Snapshot, keys};
use pier_store::lease::LeaseKeeper;
use pier_store::reflector::{Reflector, build};
use pier_store::testing::EtcdServer;
use pier_store::{EtcdStore, Revision, Store, Ttl};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

fn ns() -> Namespace {
    Namespace::default()
}

fn endpoint(svc: &str, node: &str, id: &str, last: u8) -> Endpoint {
    Endpoint {
        service: name(svc),
        namespace: ns(),
        node: name(node),
        id: name(id),
        pod: None,
        hostname: None,
        ip: IpAddr::from([10, 1, 0, last]),
        ports: vec![EndpointPort {
            name: name("http"),
            port: PortNum::new(8080).expect("port"),
            protocol: Default::default(),
        }],
        ready: true,
        is_static: false,
        addr: None,
    }
}

async fn put_service(store: &dyn Store, svc: &str) -> Revision {
    let key = keys::service(&ns(), &name(svc));
    let value = format!(
        r#"{{"name":"{svc}","namespace":"{}","ports":[]}}"#,
        ns().as_str()
    );
    store
        .put(&key, value.into_bytes(), None)
        .await
        .expect("put service")
}

async fn put_endpoint(store: &dyn Store, svc: &str, node: &str, id: &str, last: u8) -> Revision {
    let ep = endpoint(svc, node, id, last);
    let key = keys::endpoint(&ns(), &name(svc), &name(node), &name(id));
    store
        .put(&key, pier_model::encode(&ep), None)
        .await
        .expect("put endpoint")
}

async fn delete_endpoint(store: &dyn Store, svc: &str, node: &str, id: &str) -> Revision {
    let key = keys::endpoint(&ns(), &name(svc), &name(node), &name(id));
    store.delete(&key).await.expect("delete").1
}

/// Waits until the reflector's snapshot satisfies `f`.
async fn wait_for(r: &Reflector, what: &str, f: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let mut rx = r.subscribe();
    let res = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                return s;
            }
            if rx.changed().await.is_err() {
                panic!("reflector stopped while waiting for {what}");
            }
        }
    })
    .await;
    match res {
        Ok(s) => s,
        Err(_) => panic!("timed out waiting for {what}: {:?}", r.snapshot()),
    }
}

/// The reflector's state equals a fresh list of the store.
async fn assert_equals_fresh_list(store: &dyn Store, snap: &Snapshot) {
    let list = store.list(keys::ROOT).await.expect("list");
    let fresh = build(&list.kvs, list.revision);
    assert_eq!(snap.nodes, fresh.nodes, "nodes");
    assert_eq!(snap.services, fresh.services, "services");
    assert_eq!(snap.replicasets, fresh.replicasets, "replicasets");
    assert_eq!(snap.pods, fresh.pods, "pods");
    assert_eq!(snap.pod_statuses, fresh.pod_statuses, "pod statuses");
    assert_eq!(snap.endpoints, fresh.endpoints, "endpoints");
}

fn endpoint_count(s: &Snapshot) -> usize {
    s.endpoints.values().map(|m| m.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_under_watch_misses_nothing() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .expect("connect"),
    );
    for i in 0..5u8 {
        put_service(&*store, &format!("svc{i}")).await;
        for j in 0..4u8 {
            put_endpoint(&*store, &format!("svc{i}"), "node-a", &format!("c{j}"), j).await;
        }
    }
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(store.clone(), cancel.clone());
    tokio::time::timeout(Duration::from_secs(20), r.synced())
        .await
        .expect("synced");
    assert_eq!(r.snapshot().services.len(), 5);
    assert_eq!(endpoint_count(&r.snapshot()), 20);
    assert!(r.snapshot().synced_at_ms > 0);
    // Changes seen live before the kill.
    put_endpoint(&*store, "svc0", "node-b", "x1", 100).await;
    delete_endpoint(&*store, "svc1", "node-a", "c0").await;
    wait_for(&r, "live changes", |s| endpoint_count(s) == 20).await;

    etcd.kill();
    let stale = wait_for(&r, "stale flag", |s| s.stale_since_ms.is_some()).await;
    // Still serving the last state while down.
    assert_eq!(endpoint_count(&stale), 20);
    assert_eq!(stale.services.len(), 5);

    etcd.restart().expect("restart");
    let mut last = 0;
    for j in 0..4u8 {
        last = put_endpoint(&*store, "svc4", "node-c", &format!("n{j}"), 50 + j).await;
    }
    last = last.max(delete_endpoint(&*store, "svc2", "node-a", "c1").await);
    last = last.max(put_service(&*store, "svc-new").await);
    let snap = wait_for(&r, "changes after restart", |s| s.revision >= last).await;
    assert!(snap.stale_since_ms.is_none(), "fresh again");
    assert_eq!(endpoint_count(&snap), 23);
    assert_equals_fresh_list(&*store, &snap).await;
}

/// A TCP forwarder to etcd that can be cut: while down it closes every
/// connection and refuses new ones, so one client is partitioned from etcd
/// while another keeps writing.
struct Cut {
    addr: String,
    down: Arc<AtomicBool>,
    /// While set, bytes are no longer forwarded but no connection is
    /// closed: a silent partition (packets dropped), not a refusal.
    silent: Arc<AtomicBool>,
    conns: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Cut {
    async fn start(target: String) -> Cut {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let down = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (d, c, s, q) = (down.clone(), conns.clone(), stop.clone(), silent.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = c.lock().expect("lock").clone();
                let target = target.clone();
                let (q, s) = (q.clone(), s.clone());
                tokio::spawn(async move {
                    if q.load(Ordering::SeqCst) {
                        // Hold the connection, say nothing.
                        s.cancelled().await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    if q.load(Ordering::SeqCst) {
                        // Silenced: keep both sockets open until the end.
                        s.cancelled().await;
                    }
                    drop((inbound, outbound));
                });
            }
        });
        Cut {
            addr,
            down,
            silent,
            conns,
            stop,
        }
    }

    /// Stop forwarding without closing anything (and hold new connections
    /// silently), or forward again for new connections.
    fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
        if silent {
            let mut c = self.conns.lock().expect("lock");
            c.cancel();
            *c = CancellationToken::new();
        }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            let mut c = self.conns.lock().expect("lock");
            c.cancel();
            *c = CancellationToken::new();
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().map(|c| c.cancel()).ok();
    }
}

/// A real etcd, a client straight to it, a [`Cut`] in front of it, and a
/// store that goes through the cut.
async fn partitionable_etcd() -> (EtcdServer, EtcdStore, Cut, Arc<dyn Store>) {
    let etcd = EtcdServer::start().expect("start etcd");
    let direct = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    let cut = Cut::start(etcd.endpoint.clone()).await;
    let via_cut: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&cut.addr))
            .await
            .expect("connect via cut"),
    );
    (etcd, direct, cut, via_cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_while_partitioned_arrive_after_resume() {
    let (_etcd, direct, cut, via_cut) = partitionable_etcd().await;
    put_service(&direct, "a").await;
    put_endpoint(&direct, "a", "n1", "e1", 1).await;
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(via_cut, cancel.clone());
    r.synced().await;
    cut.set_down(true);
    wait_for(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    put_endpoint(&direct, "a", "n1", "e2", 2).await;
    put_endpoint(&direct, "a", "n1", "e1", 11).await;
    let last = delete_endpoint(&direct, "a", "n1", "e2").await;
    let last = last.max(put_endpoint(&direct, "a", "n2", "e3", 3).await);
    cut.set_down(false);
    let snap = wait_for(&r, "resumed", |s| {
        s.revision >= last && s.stale_since_ms.is_none()
    })
    .await;
    assert_equals_fresh_list(&direct, &snap).await;
    let eps: Vec<_> = snap
        .endpoints_of(&ns(), &name("a"))
        .map(|e| (e.id.as_str().to_owned(), e.ip))
        .collect();
    assert_eq!(
        eps,
        [
            ("e1".to_owned(), IpAddr::from([10, 1, 0, 11])),
            ("e3".to_owned(), IpAddr::from([10, 1, 0, 3]))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_partitioned_relists_without_loss_or_doubling() {
    let (_etcd, direct, cut, via_cut) = partitionable_etcd().await;
    for s in ["a", "b", "c"] {
        put_service(&direct, s).await;
        for i in 0..3u8 {
            put_endpoint(&direct, s, "n1", &format!("e{i}"), i).await;
        }
    }
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(via_cut, cancel.clone());
    r.synced().await;
    assert_eq!(endpoint_count(&r.snapshot()), 9);

    cut.set_down(true);
    wait_for(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    // Delete a whole service and its endpoints, change and add others, then
    // compact past the reflector's resume point.
    direct
        .delete(&keys::service(&ns(), &name("b")))
        .await
        .expect("delete");
    for i in 0..3u8 {
        delete_endpoint(&direct, "b", "n1", &format!("e{i}")).await;
    }
    put_endpoint(&direct, "a", "n1", "e0", 200).await;
    put_service(&direct, "d").await;
    let last = put_endpoint(&direct, "d", "n9", "e0", 9).await;
    direct.compact(last).await.expect("compact");
    cut.set_down(false);

    let snap = wait_for(&r, "relisted", |s| {
        s.revision >= last && s.stale_since_ms.is_none()
    })
    .await;
    assert_equals_fresh_list(&direct, &snap).await;
    let services: Vec<_> = snap
        .services
        .keys()
        .map(|(_, n)| n.as_str().to_owned())
        .collect();
    assert_eq!(services, ["a", "c", "d"]);
    assert_eq!(
        endpoint_count(&snap),
        7,
        "3 + 3 + 1, none doubled, none lost"
    );
    assert!(!snap.endpoints.contains_key(&(ns(), name("b"))));
    // And it keeps watching after the relist.
    let rev = put_endpoint(&direct, "c", "n1", "e9", 99).await;
    let snap = wait_for(&r, "watching again", |s| s.revision >= rev).await;
    assert_eq!(endpoint_count(&snap), 8);
}

/// A silent partition (nothing closed, nothing answered) is seen through
/// the node lease within about its TTL, long before the watch connection's
/// keep-alive (5 s + 5 s) would notice; and the snapshot is fresh again
/// after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partition_is_seen_through_the_lease() {
    let (_etcd, direct, cut, via_cut) = partitionable_etcd().await;
    put_service(&direct, "a").await;
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let lease = LeaseKeeper::start(
        via_cut.clone(),
        Ttl::from_secs(2).expect("ttl"),
        cancel.clone(),
    )
    .await
    .expect("lease");
    let r = Reflector::spawn_with_health(via_cut, cancel.clone(), lease.health());
    r.synced().await;
    // The watch is live (not only the first list) before the cut.
    let rev = put_endpoint(&direct, "a", "n1", "e0", 1).await;
    wait_for(&r, "watching", |s| s.revision >= rev).await;
    assert!(r.snapshot().stale_since_ms.is_none());

    cut.set_silent(true);
    let t = std::time::Instant::now();
    wait_for(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    // Bound, not a measurement: the lease (TTL 2 s: a renewal every
    // 0.67 s, each given 2 s) must be what noticed, not the 10 s
    // keep-alive.
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "stale only after {:?}",
        t.elapsed()
    );
    assert!(!*lease.health().borrow(), "the lease reports the partition");

    cut.set_silent(false);
    let rev = put_endpoint(&direct, "a", "n1", "e1", 2).await;
    let snap = wait_for(&r, "fresh again", |s| {
        s.stale_since_ms.is_none() && s.revision >= rev
    })
    .await;
    assert_equals_fresh_list(&direct, &snap).await;
    assert!(*lease.health().borrow());
}

/// A watch on a member that went silent (no lease in play) is broken by
/// an unanswered progress request, not left to the connection keep-alive
/// (5 s + 5 s): the snapshot goes stale, and a write made meanwhile
/// arrives after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_watch_is_found_out_by_progress_requests() {
    let (_etcd, direct, cut, via_cut) = partitionable_etcd().await;
    put_service(&direct, "a").await;
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(via_cut, cancel.clone());
    r.synced().await;
    let rev = put_endpoint(&direct, "a", "n1", "e0", 1).await;
    wait_for(&r, "watching", |s| s.revision >= rev).await;
    // Quiet for several probe periods: progress answers keep it fresh.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        r.snapshot().stale_since_ms.is_none(),
        "an idle watch stays fresh"
    );

    cut.set_silent(true);
    let t = std::time::Instant::now();
    wait_for(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    // Bound, not a measurement: 1 s idle + 2 s unanswered = 3 s; the
    // keep-alive alone cannot notice before 5 s (its ping timeout), 5-10 s
    // after the cut.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stale only after {:?}",
        t.elapsed()
    );
    let rev = put_endpoint(&direct, "a", "n1", "e1", 2).await;
    cut.set_silent(false);
    let snap = wait_for(&r, "fresh again", |s| {
        s.stale_since_ms.is_none() && s.revision >= rev
    })
    .await;
    assert_equals_fresh_list(&direct, &snap).await;
}

/// A node lease is kept through a silent cut of 0.6 of its TTL (1.2 s of
/// 2 s) that begins just as a renewal is due, the worst moment: the last
/// renewal was a period (TTL/3) before, so etcd expires the lease about
/// 0.13 s after the heal (plus its 0.5 s expiry loop). The connections cut
/// stay silent for good (as a TCP connection does until it retransmits),
/// so the keeper must renew on a new one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_kept_through_a_cut_of_most_of_its_ttl() {
    let (_etcd, direct, cut, via_cut) = partitionable_etcd().await;
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let ttl = Ttl::from_secs(2).expect("ttl");
    let lease = LeaseKeeper::start(via_cut.clone(), ttl, cancel.clone())
        .await
        .expect("lease");
    let t0 = tokio::time::Instant::now();
    let id = lease.current().expect("a lease");
    let key = keys::node(&name("n1"));
    direct
        .put(&key, b"{}".to_vec(), Some(id))
        .await
        .expect("put under the lease");
    // Renewals are due at t0 + k × TTL/3: cut 30 ms before the third.
    let period = ttl.as_duration() / 3;
    tokio::time::sleep_until(t0 + period * 3 - Duration::from_millis(30)).await;
    let mut health = lease.health();
    let felt = tokio::spawn(async move {
        // The cut is felt (a renewal fails), then renewals get through.
        let _ = health.wait_for(|h| !*h).await;
        let _ = health.wait_for(|h| *h).await;
        std::time::Instant::now()
    });
    cut.set_silent(true);
    tokio::time::sleep(ttl.as_duration() * 6 / 10).await;
    cut.set_silent(false);
    let healed = std::time::Instant::now();
    let renewed = tokio::time::timeout(Duration::from_secs(10), felt)
        .await
        .expect("a renewal failed during the cut, and one got through after it")
        .expect("join");
    eprintln!(
        "renewed {:?} after the heal",
        renewed.saturating_duration_since(healed)
    );
    // Past the TTL and etcd's expiry loop: still the same lease, key kept.
    tokio::time::sleep(ttl.as_duration() + Duration::from_millis(600)).await;
    assert_eq!(lease.current(), Some(id), "the lease was never lost");
    let kv = direct.get(&key).await.expect("get").expect("key kept");
    assert_eq!(kv.lease, Some(id));
}

/// A store that passes everything to `inner` but holds back the first watch
/// item after each `Resumed` for `delay`: the replayed changes of a
/// reopened watch arrive late, as they may from a busy etcd (the race a
/// resumed watch has with its own replay, made certain).
#[derive(Debug)]
struct SlowReplay {
    inner: Arc<dyn Store>,
    delay: Duration,
    /// How many `Resumed` it passed on.
    resumed: Arc<std::sync::atomic::AtomicUsize>,
    /// Hold back every item by `delay` instead (order kept): a watch that
    /// stays open but lags, as one does through a short cut.
    lag_all: bool,
}

#[async_trait::async_trait]
impl Store for SlowReplay {
    async fn get(&self, key: &str) -> Result<Option<pier_store::KeyValue>, pier_store::StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<pier_store::ListResult, pier_store::StoreError> {
        self.inner.list(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<pier_store::LeaseId>,
    ) -> Result<Revision, pier_store::StoreError> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<(bool, Revision), pier_store::StoreError> {
        self.inner.delete(key).await
    }
    async fn txn(
        &self,
        txn: pier_store::Txn,
    ) -> Result<pier_store::TxnResult, pier_store::StoreError> {
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl: Ttl) -> Result<pier_store::LeaseId, pier_store::StoreError> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keepalive(
        &self,
        lease: pier_store::LeaseId,
    ) -> Result<Ttl, pier_store::StoreError> {
        self.inner.lease_keepalive(lease).await
    }
    async fn lease_revoke(&self, lease: pier_store::LeaseId) -> Result<(), pier_store::StoreError> {
        self.inner.lease_revoke(lease).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: Revision,
    ) -> Result<pier_store::WatchStream, pier_store::StoreError> {
        use futures::StreamExt;
        let mut inner = self.inner.watch(prefix, from).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let (delay, resumed) = (self.delay, self.resumed.clone());
        if self.lag_all {
            let (qtx, mut qrx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(item) = inner.next().await {
                    if qtx
                        .send((tokio::time::Instant::now() + delay, item))
                        .is_err()
                    {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, item)) = qrx.recv().await {
                    tokio::time::sleep_until(at).await;
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            });
            return Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        }
        tokio::spawn(async move {
            let mut hold = false;
            while let Some(item) = inner.next().await {
                if std::mem::take(&mut hold) {
                    tokio::time::sleep(delay).await;
                }
                let is_resumed = matches!(item, Ok(pier_store::WatchItem::Resumed));
                if tx.send(item).await.is_err() {
                    return;
                }
                if is_resumed {
                    resumed.fetch_add(1, Ordering::SeqCst);
                    hold = true;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
    async fn compact(&self, revision: Revision) -> Result<(), pier_store::StoreError> {
        self.inner.compact(revision).await
    }
}

/// A reflector cut off from etcd while endpoints are deleted and changed
/// is never fresh again while it still shows them: after the heal, with
/// the reopened watch's replay held back 1 s, every fresh snapshot it
/// publishes already lacks the deleted endpoints. `barrier`: the agent's
/// reflector (a node name: the sync barrier), else a plain one (relist).
async fn never_fresh_while_missing_the_cuts_changes(barrier: bool) {
    let (_etcd, direct, cut, via_cut) = partitionable_etcd().await;
    put_service(&direct, "a").await;
    for (i, id) in ["e1", "e2", "e3"].iter().enumerate() {
        put_endpoint(&direct, "a", "n1", id, i as u8 + 1).await;
    }
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let resumed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow: Arc<dyn Store> = Arc::new(SlowReplay {
        inner: via_cut,
        delay: Duration::from_secs(1),
        resumed: resumed.clone(),
        lag_all: false,
    });
    let node = name("h1");
    let direct_dyn: Arc<dyn Store> = Arc::new(direct.clone());
    let r = if barrier {
        // The lease through the direct client: the barrier alone decides.
        let ttl = Ttl::from_secs(2).expect("ttl");
        let lease = LeaseKeeper::start(direct_dyn.clone(), ttl, cancel.clone())
            .await
            .expect("lease");
        Reflector::spawn_with_hold(
            slow,
            cancel.clone(),
            lease.health(),
            pier_store::reflector::HoldPolicy::for_ttl(ttl),
            &node,
        )
    } else {
        Reflector::spawn(slow, cancel.clone())
    };
    r.synced().await;
    let rev = put_endpoint(&direct, "a", "n1", "e0", 9).await;
    wait_for(&r, "watching", |s| {
        s.revision >= rev && s.stale_since_ms.is_none()
    })
    .await;

    cut.set_down(true);
    wait_for(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    // Every snapshot published from here on: a fresh one must not show
    // what the cut deleted.
    let seen = Arc::new(Mutex::new(Vec::<Arc<Snapshot>>::new()));
    let mut rx = r.subscribe();
    let (s2, stop) = (seen.clone(), cancel.child_token());
    let observer = tokio::spawn(async move {
        loop {
            s2.lock()
                .expect("lock")
                .push(rx.borrow_and_update().clone());
            tokio::select! {
                _ = stop.cancelled() => return,
                c = rx.changed() => if c.is_err() { return },
            }
        }
    });
    delete_endpoint(&direct, "a", "n1", "e1").await;
    delete_endpoint(&direct, "a", "n1", "e2").await;
    let last = put_endpoint(&direct, "a", "n1", "e3", 33).await;
    cut.set_down(false);
    let snap = wait_for(&r, "fresh after the heal", |s| {
        s.stale_since_ms.is_none() && s.revision >= last
    })
    .await;
    assert_equals_fresh_list(&direct, &snap).await;
    let ids: Vec<_> = snap
        .endpoints_of(&ns(), &name("a"))
        .map(|e| (e.id.as_str().to_owned(), e.ip))
        .collect();
    assert_eq!(
        ids,
        [
            ("e0".to_owned(), IpAddr::from([10, 1, 0, 9])),
            ("e3".to_owned(), IpAddr::from([10, 1, 0, 33]))
        ]
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    let _ = observer.await;
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    let fresh: Vec<_> = seen.iter().filter(|s| s.stale_since_ms.is_none()).collect();
    assert!(!fresh.is_empty(), "the observer saw the fresh snapshot");
    for s in &fresh {
        let ids: Vec<_> = s
            .endpoints_of(&ns(), &name("a"))
            .map(|e| e.id.as_str().to_owned())
            .collect();
        assert!(
            !ids.iter().any(|i| i == "e1" || i == "e2"),
            "a fresh snapshot (revision {}, the deletes at or before {last}) still shows deleted endpoints: {ids:?}",
            s.revision
        );
    }
    // The heal went through a reopened watch (its replay held back).
    assert!(resumed.load(Ordering::SeqCst) >= 1, "the watch resumed");
    if barrier {
        // The barrier went again.
        let key = keys::sync(&node);
        let gone = tokio::time::timeout(Duration::from_secs(10), async {
            while direct.get(&key).await.expect("get").is_some() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "the sync barrier {key} was left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_agent_reflector_is_stale_until_its_barrier_arrives() {
    never_fresh_while_missing_the_cuts_changes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_plain_reflector_relists() {
    never_fresh_while_missing_the_cuts_changes(false).await;
}

/// A cut shorter than the watch's own liveness probe: the lease fails and
/// renews again while the watch stays open, delivering late (every item
/// held back 1 s here). The agent's reflector is stale while the lease
/// fails and stays stale after it renews until its sync barrier has come
/// back through the watch, so no fresh snapshot shows an endpoint deleted
/// during the cut. (The chaos run's stale answer, session 11: a healed
/// host wrote the endpoint of a pod the leader had deleted in the cut.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_is_fresh_only_after_its_barrier() {
    let etcd = EtcdServer::start().expect("start etcd");
    let direct = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    put_service(&direct, "a").await;
    put_endpoint(&direct, "a", "n1", "e1", 1).await;
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let lagging: Arc<dyn Store> = Arc::new(SlowReplay {
        inner: Arc::new(direct.clone()),
        delay: Duration::from_secs(1),
        resumed: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        lag_all: true,
    });
    // The lease's health, driven by the test.
    let (health, health_rx) = tokio::sync::watch::channel(true);
    let node = name("h1");
    let r = Reflector::spawn_with_hold(
        lagging,
        cancel.clone(),
        health_rx,
        pier_store::reflector::HoldPolicy::for_ttl(Ttl::from_secs(2).expect("ttl")),
        &node,
    );
    r.synced().await;
    let rev = put_endpoint(&direct, "a", "n1", "e0", 9).await;
    wait_for(&r, "watching", |s| {
        s.revision >= rev && s.stale_since_ms.is_none()
    })
    .await;

    let seen = Arc::new(Mutex::new(Vec::<Arc<Snapshot>>::new()));
    let mut rx = r.subscribe();
    let (s2, stop) = (seen.clone(), cancel.child_token());
    let observer = tokio::spawn(async move {
        loop {
            s2.lock()
                .expect("lock")
                .push(rx.borrow_and_update().clone());
            tokio::select! {
                _ = stop.cancelled() => return,
                c = rx.changed() => if c.is_err() { return },
            }
        }
    });
    health.send_replace(false);
    wait_for(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    let deleted = delete_endpoint(&direct, "a", "n1", "e1").await;
    // The lease renews before the watch has delivered the delete.
    health.send_replace(true);
    let snap = wait_for(&r, "fresh after the renewal", |s| {
        s.stale_since_ms.is_none() && s.revision >= deleted
    })
    .await;
    assert_equals_fresh_list(&direct, &snap).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    let _ = observer.await;
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    // The renewal came 1 s before the delete arrived: from the first stale
    // snapshot on, every fresh one lacks e1.
    let first_stale = seen
        .iter()
        .position(|s| s.stale_since_ms.is_some())
        .expect("the reflector was stale while the lease failed");
    let fresh_with_e1: Vec<Revision> = seen[first_stale..]
        .iter()
        .filter(|s| s.stale_since_ms.is_none())
        .filter(|s| {
            s.endpoints_of(&ns(), &name("a"))
                .any(|e| e.id.as_str() == "e1")
        })
        .map(|s| s.revision)
        .collect();
    assert!(
        fresh_with_e1.is_empty(),
        "fresh snapshots after the lease renewed still showed e1 (deleted at {deleted}): revisions {fresh_with_e1:?}"
    );
    let key = keys::sync(&node);
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while direct.get(&key).await.expect("get").is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the sync barrier {key} was left behind");
}

/// Captures log output for one current-thread test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

// Current-thread runtime: every task logs through this thread's subscriber.
#[tokio::test]
async fn unparsable_values_are_logged_and_skipped() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let etcd = EtcdServer::start().expect("start etcd");
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .expect("connect"),
    );
    put_service(&*store, "good").await;
    let bad_key = keys::service(&ns(), &name("bad"));
    store
        .put(&bad_key, b"{not json".to_vec(), None)
        .await
        .expect("put");
    store
        .put("/pier/v1/nonsense/x", b"{}".to_vec(), None)
        .await
        .expect("put");
    // Keys the reflector does not use are ignored silently.
    store
        .put(&keys::election(&name("leader")), b"me".to_vec(), None)
        .await
        .expect("put");
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(store.clone(), cancel.clone());
    r.synced().await;
    let snap = r.snapshot();
    let names: Vec<_> = snap
        .services
        .keys()
        .map(|(_, n)| n.as_str().to_owned())
        .collect();
    assert_eq!(names, ["good"]);
    let text = logs.text();
    assert!(
        text.contains(&bad_key),
        "bad value logged with its key: {text}"
    );
    assert!(
        text.contains("/pier/v1/nonsense/x"),
        "bad key logged: {text}"
    );

    // Through the watch: a bad value next to good ones in one batch.
    let txn = pier_store::Txn {
        success: vec![
            pier_store::TxnOp::Put {
                key: keys::endpoint(&ns(), &name("good"), &name("n1"), &name("e1")),
                value: pier_model::encode(&endpoint("good", "n1", "e1", 1)),
                lease: None,
            },
            pier_store::TxnOp::Put {
                key: keys::endpoint(&ns(), &name("good"), &name("n1"), &name("broken")),
                value: br#"{"service":"good"}"#.to_vec(),
                lease: None,
            },
            pier_store::TxnOp::Put {
                key: keys::service(&ns(), &name("good")),
                value: b"garbage".to_vec(),
                lease: None,
            },
        ],
        ..Default::default()
    };
    let rev = store.txn(txn).await.expect("txn").revision;
    let snap = wait_for(&r, "batch", |s| s.revision >= rev).await;
    assert_eq!(endpoint_count(&snap), 1);
    // The service's value no longer parses: it is dropped, as a relist would.
    assert!(snap.services.is_empty());
    assert_equals_fresh_list(&*store, &snap).await;
    let text = logs.text();
    assert!(text.contains("/broken"), "bad endpoint logged: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_copies_only_that_services_endpoint_map() {
    let etcd = EtcdServer::start().expect("start etcd");
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .expect("connect"),
    );
    put_endpoint(&*store, "a", "n1", "e1", 1).await;
    put_endpoint(&*store, "b", "n1", "e1", 2).await;
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(store.clone(), cancel.clone());
    r.synced().await;
    let before = r.snapshot();
    let rev = put_endpoint(&*store, "a", "n1", "e2", 3).await;
    let after = wait_for(&r, "change", |s| s.revision >= rev).await;
    let key_a = (ns(), name("a"));
    let key_b = (ns(), name("b"));
    assert!(Arc::ptr_eq(
        &before.endpoints[&key_b],
        &after.endpoints[&key_b]
    ));
    assert!(!Arc::ptr_eq(
        &before.endpoints[&key_a],
        &after.endpoints[&key_a]
    ));
    assert!(
        before.services.ptr_eq(&after.services),
        "untouched maps shared"
    );
}
