//! Watch relays (`pier_store::relay`) against a real etcd: a relay's list
//! and watch are etcd's; a client moves on at once when its relay stops
//! in order, and resumes after a break when one crashes; a client behind
//! the history relists; the relay's upstream cut reaches its clients as
//! Disconnected/Resumed and the reflector's sync barrier completes through
//! the relay; a slow client is cut off without holding up the others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use pier_model::{Name, Namespace, Snapshot, keys};
use pier_store::reflector::{HoldPolicy, Reflector, build};
use pier_store::relay::{Relay, RelayOptions, TcpDial, relayed, wire};
use pier_store::testing::EtcdServer;
use pier_store::{EtcdStore, Revision, Store, Ttl, Txn, TxnOp, WatchEvent, WatchItem, WatchStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn key(k: &str) -> String {
    format!("{}test/{k}", keys::ROOT)
}

async fn start_etcd() -> (EtcdServer, Arc<dyn Store>) {
    let etcd = EtcdServer::start().expect("start etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect");
    (etcd, Arc::new(store))
}

/// The store's current revision.
async fn now(store: &dyn Store) -> Revision {
    store.txn(Txn::default()).await.expect("txn").revision
}

/// A relay served on a loopback port; `stop` ends it in order (its
/// clients told `Closing`), `crash` drops its listener and connections
/// without a word, as a killed process does.
struct Served {
    relay: Arc<Relay>,
    addr: String,
    cancel: CancellationToken,
    crashed: CancellationToken,
}

impl Served {
    async fn start(upstream: Arc<dyn Store>, opts: RelayOptions) -> Served {
        Self::start_on(upstream, opts, "127.0.0.1:0").await
    }

    async fn start_on(upstream: Arc<dyn Store>, opts: RelayOptions, at: &str) -> Served {
        let cancel = CancellationToken::new();
        let relay = Relay::start(upstream, opts, cancel.clone());
        let listener = TcpListener::bind(at).await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let crashed = CancellationToken::new();
        let (r, c, x) = (relay.clone(), cancel.clone(), crashed.clone());
        tokio::spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    _ = c.cancelled() => return,
                    _ = x.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (r, x) = (r.clone(), x.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = x.cancelled() => {}
                        _ = r.serve(sock, peer.to_string()) => {}
                    }
                });
            }
        });
        let served = Served {
            relay,
            addr,
            cancel,
            crashed,
        };
        served.wait("synced", |s| s.synced && s.live).await;
        served
    }

    async fn wait(&self, what: &str, f: impl Fn(&pier_store::relay::RelayStats) -> bool) {
        let ok = tokio::time::timeout(Duration::from_secs(20), async {
            while !f(&self.relay.stats()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "relay {}: {what}: {:?}",
            self.addr,
            self.relay.stats()
        );
    }

    fn stop(&self) {
        self.cancel.cancel();
    }

    fn crash(&self) {
        self.crashed.cancel();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Reads `w` until an `Events` item at or past `last`.
async fn collect_until(w: &mut WatchStream, last: Revision) -> Vec<WatchItem> {
    let mut items = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(item) = w.next().await {
            let item = item.expect("watch item");
            let at = matches!(&item, WatchItem::Events { revision, .. } if *revision >= last);
            items.push(item);
            if at {
                return;
            }
        }
        panic!("watch ended");
    })
    .await;
    assert!(
        done.is_ok(),
        "no events up to {last} within 30 s; got {items:?}"
    );
    items
}

fn events_of(items: &[WatchItem]) -> Vec<WatchEvent> {
    items
        .iter()
        .flat_map(|i| match i {
            WatchItem::Events { events, .. } => events.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn event_rev(e: &WatchEvent) -> Revision {
    match e {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

/// No etcd revision's events are split across two items, and each item's
/// revision is its last event's.
fn assert_whole_revisions(items: &[WatchItem]) {
    let mut seen = std::collections::BTreeSet::new();
    for i in items {
        if let WatchItem::Events { revision, events } = i {
            let revs: std::collections::BTreeSet<_> = events.iter().map(event_rev).collect();
            assert_eq!(revs.last(), Some(revision), "{i:?}");
            for r in revs {
                assert!(seen.insert(r), "revision {r} split across items");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_list_and_watch_are_etcds() {
    let (_etcd, etcd) = start_etcd().await;
    for i in 0..20 {
        etcd.put(
            &key(&format!("k{i:02}")),
            format!("v{i}").into_bytes(),
            None,
        )
        .await
        .expect("put");
    }
    etcd.put("/elsewhere/x", b"x".to_vec(), None)
        .await
        .expect("put");
    let served = Served::start(etcd.clone(), RelayOptions::default()).await;
    let client = relayed(etcd.clone(), vec![served.addr.clone()], Arc::new(TcpDial));
    let local = served.relay.local_store();

    let from = now(&*etcd).await + 1;
    let mut direct = etcd.watch(keys::ROOT, from).await.expect("direct watch");
    let mut through = client.watch(keys::ROOT, from).await.expect("relayed watch");
    let mut through_local = local.watch(keys::ROOT, from).await.expect("local watch");

    etcd.put(&key("k00"), b"changed".to_vec(), None)
        .await
        .expect("put");
    etcd.delete(&key("k01")).await.expect("delete");
    let lease = etcd
        .lease_grant(Ttl::from_secs(30).expect("ttl"))
        .await
        .expect("lease");
    for i in 0..3 {
        etcd.put(&key(&format!("leased{i}")), b"l".to_vec(), Some(lease))
            .await
            .expect("put leased");
    }
    // One revision with several events (two puts, a delete).
    etcd.txn(Txn {
        compares: vec![],
        success: vec![
            TxnOp::Put {
                key: key("t1"),
                value: b"1".to_vec(),
                lease: None,
            },
            TxnOp::Put {
                key: key("t2"),
                value: b"2".to_vec(),
                lease: None,
            },
            TxnOp::Delete { key: key("k02") },
        ],
        failure: vec![],
    })
    .await
    .expect("txn");
    etcd.put("/elsewhere/y", b"y".to_vec(), None)
        .await
        .expect("put");
    // Revoking deletes its three keys at one revision.
    etcd.lease_revoke(lease).await.expect("revoke");
    let last = etcd
        .put(&key("last"), vec![0u8, 255, 7], None)
        .await
        .expect("put");

    let want = events_of(&collect_until(&mut direct, last).await);
    let got = collect_until(&mut through, last).await;
    assert_whole_revisions(&got);
    assert_eq!(events_of(&got), want, "relayed watch");
    let got_local = collect_until(&mut through_local, last).await;
    assert_whole_revisions(&got_local);
    assert_eq!(events_of(&got_local), want, "local watch");
    assert!(want.len() >= 11, "{want:?}");

    served.wait("caught up", |s| s.revision >= last).await;
    let truth = etcd.list(keys::ROOT).await.expect("list");
    for (name, store) in [("relayed", &client), ("local", &local)] {
        let l = store
            .list(keys::ROOT)
            .await
            .expect("list through the relay");
        assert_eq!(l.kvs, truth.kvs, "{name} list");
        assert!(
            l.revision >= last && l.revision <= truth.revision,
            "{name}: {}",
            l.revision
        );
    }
    // Other prefixes, gets and writes go to etcd.
    let other = client.list("/elsewhere/").await.expect("list other");
    assert_eq!(other.kvs.len(), 2);
    // A watch from before the relay's history is Compacted.
    let old = client.watch(keys::ROOT, 2).await;
    assert!(
        matches!(
            old,
            Err(pier_store::StoreError::Compacted { requested: 2, .. })
        ),
        "{:?}",
        old.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_moves_on_at_a_relays_stop_and_resumes_after_a_crash() {
    let (_etcd, etcd) = start_etcd().await;
    let a = Served::start(etcd.clone(), RelayOptions::default()).await;
    let b = Served::start(etcd.clone(), RelayOptions::default()).await;
    let client = relayed(
        etcd.clone(),
        vec![a.addr.clone(), b.addr.clone()],
        Arc::new(TcpDial),
    );
    let from = now(&*etcd).await + 1;
    let mut direct = etcd.watch(keys::ROOT, from).await.expect("direct watch");
    let mut w = client.watch(keys::ROOT, from).await.expect("relayed watch");
    a.wait("client on a", |s| s.clients == 1).await;

    let mut items = Vec::new();
    let mut last = 0;
    for i in 0..5 {
        last = etcd
            .put(&key(&format!("a{i}")), b"1".to_vec(), None)
            .await
            .expect("put");
    }
    items.extend(collect_until(&mut w, last).await);

    // a stops in order: the watch moves to b at once, with no break
    // reported.
    a.stop();
    for i in 0..5 {
        last = etcd
            .put(&key(&format!("b{i}")), b"2".to_vec(), None)
            .await
            .expect("put");
    }
    items.extend(collect_until(&mut w, last).await);
    b.wait("client on b", |s| s.clients == 1).await;

    // a comes back on its address (a new relay); b crashes: the break is
    // reported, and the watch resumes on a.
    let a2 = Served::start_on(etcd.clone(), RelayOptions::default(), &a.addr).await;
    b.crash();
    for i in 0..5 {
        last = etcd
            .put(&key(&format!("c{i}")), b"3".to_vec(), None)
            .await
            .expect("put");
    }
    last = last.max(etcd.delete(&key("a0")).await.expect("delete").1);
    items.extend(collect_until(&mut w, last).await);
    a2.wait("client on the restarted a", |s| s.clients == 1)
        .await;

    let want = events_of(&collect_until(&mut direct, last).await);
    assert_eq!(events_of(&items), want, "nothing missed, nothing doubled");
    assert_whole_revisions(&items);
    let kinds: Vec<&str> = items
        .iter()
        .filter_map(|i| match i {
            WatchItem::Disconnected { .. } => Some("disconnected"),
            WatchItem::Resumed => Some("resumed"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["disconnected", "resumed"], "{items:?}");
    // And the one break is b's crash, after every event through b.
    let broke = items
        .iter()
        .position(|i| matches!(i, WatchItem::Disconnected { .. }))
        .expect("a break");
    let through_b = items
        .iter()
        .rposition(|i| matches!(i, WatchItem::Events { events, .. } if events.iter().any(|e| matches!(e, WatchEvent::Put(kv) if kv.key == key("b4")))))
        .expect("b4 seen");
    assert!(broke > through_b, "{items:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_revision_is_passed_over_for_one_with_it() {
    let (_etcd, etcd) = start_etcd().await;
    let from = now(&*etcd).await + 1;
    let b = Served::start(etcd.clone(), RelayOptions::default()).await;
    let mut last = 0;
    for i in 0..10 {
        last = etcd
            .put(&key(&format!("k{i}")), b"v".to_vec(), None)
            .await
            .expect("put");
    }
    b.wait("b caught up", |s| s.revision >= last).await;
    // a starts after the writes: its history begins after `from`.
    let a = Served::start(etcd.clone(), RelayOptions::default()).await;
    assert!(a.relay.stats().history_from > from);
    let client = relayed(
        etcd.clone(),
        vec![a.addr.clone(), b.addr.clone()],
        Arc::new(TcpDial),
    );
    let mut w = client.watch(keys::ROOT, from).await.expect("watch from b");
    let mut direct = etcd.watch(keys::ROOT, from).await.expect("direct watch");
    let want = events_of(&collect_until(&mut direct, last).await);
    assert_eq!(events_of(&collect_until(&mut w, last).await), want);
    b.wait("the watch on b", |s| s.clients == 1).await;
    // Neither reaches back to revision 1 (b's history starts after its
    // list, at 1): Compacted.
    assert!(matches!(
        client.watch(keys::ROOT, 1).await,
        Err(pier_store::StoreError::Compacted { requested: 1, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_relay_down_the_client_uses_etcd() {
    let (_etcd, etcd) = start_etcd().await;
    etcd.put(&key("a"), b"1".to_vec(), None).await.expect("put");
    // A loopback port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let client = relayed(etcd.clone(), vec![dead], Arc::new(TcpDial));
    let truth = etcd.list(keys::ROOT).await.expect("list");
    let l = client.list(keys::ROOT).await.expect("list from etcd");
    assert_eq!(l.kvs, truth.kvs);
    let from = now(&*etcd).await + 1;
    let mut w = client.watch(keys::ROOT, from).await.expect("watch on etcd");
    let last = etcd.put(&key("b"), b"2".to_vec(), None).await.expect("put");
    let items = collect_until(&mut w, last).await;
    assert_eq!(events_of(&items).len(), 1, "{items:?}");
}

/// A TCP forwarder that can be cut: `set_down` closes every connection
/// and refuses new ones; `set_silent` stops forwarding on the open ones
/// without closing them (and refuses new ones).
struct Cut {
    addr: String,
    down: Arc<AtomicBool>,
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
                if d.load(Ordering::SeqCst) || q.load(Ordering::SeqCst) {
                    continue;
                }
                let token = c.lock().expect("lock").clone();
                let (target, q, s) = (target.clone(), q.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    if q.load(Ordering::SeqCst) {
                        // Silenced: keep both sockets open, say nothing.
                        s.cancelled().await;
                    }
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

    fn cut_conns(&self) {
        let mut c = self.conns.lock().expect("lock");
        c.cancel();
        *c = CancellationToken::new();
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut_conns();
        }
    }

    fn set_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        self.cut_conns();
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().map(|c| c.cancel()).ok();
    }
}

fn ns() -> Namespace {
    Namespace::default()
}

async fn put_service(store: &dyn Store, svc: &str) -> Revision {
    let k = keys::service(&ns(), &Name::new(svc).expect("name"));
    let value = format!(
        r#"{{"name":"{svc}","namespace":"{}","ports":[]}}"#,
        ns().as_str()
    );
    store
        .put(&k, value.into_bytes(), None)
        .await
        .expect("put service")
}

async fn wait_snap(r: &Reflector, what: &str, f: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let mut rx = r.subscribe();
    let res = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                return s;
            }
            rx.changed().await.expect("reflector alive");
        }
    })
    .await;
    match res {
        Ok(s) => s,
        Err(_) => panic!("timed out waiting for {what}: {:?}", r.snapshot().revision),
    }
}

async fn assert_equals_etcd(etcd: &dyn Store, snap: &Snapshot) {
    let list = etcd.list(keys::ROOT).await.expect("list");
    let fresh = build(&list.kvs, list.revision);
    assert_eq!(snap.services, fresh.services, "services");
    assert_eq!(snap.nodes, fresh.nodes, "nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_behind_the_history_relists_through_a_relay_and_converges() {
    let (_etcd, etcd) = start_etcd().await;
    for i in 0..3 {
        put_service(&*etcd, &format!("s{i}")).await;
    }
    let a = Served::start(etcd.clone(), RelayOptions::default()).await;
    // b keeps 5 events: a client 20 changes behind has fallen out.
    let b = Served::start(
        etcd.clone(),
        RelayOptions {
            history_events: 5,
            ..RelayOptions::default()
        },
    )
    .await;
    // The client reaches a through a path that can go silent.
    let path = Cut::start(a.addr.clone()).await;
    let client = relayed(
        etcd.clone(),
        vec![path.addr.clone(), b.addr.clone()],
        Arc::new(TcpDial),
    );
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let r = Reflector::spawn(client, cancel.clone());
    wait_snap(&r, "synced", |s| s.services.len() == 3).await;
    a.wait("reflector on a", |s| s.clients == 1).await;

    path.set_silent();
    let mut last = 0;
    for i in 3..23 {
        last = put_service(&*etcd, &format!("s{i}")).await;
    }
    b.wait("b caught up", |s| {
        s.revision >= last && s.history_events <= 5
    })
    .await;
    // Silence, then b: Compacted (behind its history), a relist from b.
    let snap = wait_snap(&r, "converged through b", |s| {
        s.revision >= last && s.stale_since_ms.is_none()
    })
    .await;
    assert_eq!(snap.services.len(), 23);
    assert_equals_etcd(&*etcd, &snap).await;
    b.wait("reflector on b", |s| s.clients == 1).await;
    // Live again through b.
    let last = put_service(&*etcd, "after").await;
    let snap = wait_snap(&r, "live through b", |s| s.revision >= last).await;
    assert_equals_etcd(&*etcd, &snap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_upstream_cut_reaches_its_clients_and_the_barrier_completes_through_it() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("pier_store=debug")
        .try_init();
    let etcd_server = EtcdServer::start().expect("start etcd");
    let etcd: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd_server.endpoint))
            .await
            .expect("connect"),
    );
    put_service(&*etcd, "a").await;
    // The relay watches etcd through a path that can be cut.
    let cut = Cut::start(etcd_server.endpoint.clone()).await;
    let relay_upstream: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&cut.addr))
            .await
            .expect("connect via cut"),
    );
    // A 3 s heartbeat: clients wait 9 s before leaving a quiet relay,
    // longer than this cut.
    let served = Served::start(
        relay_upstream,
        RelayOptions {
            heartbeat: Duration::from_secs(3),
            ..RelayOptions::default()
        },
    )
    .await;
    let client = relayed(etcd.clone(), vec![served.addr.clone()], Arc::new(TcpDial));
    let from = now(&*etcd).await + 1;
    let mut direct = etcd.watch(keys::ROOT, from).await.expect("direct watch");
    let mut w = client.watch(keys::ROOT, from).await.expect("relayed watch");
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let (_health_tx, health) = tokio::sync::watch::channel(true);
    let node = Name::new("h1").expect("name");
    let r = Reflector::spawn_with_hold(
        client.clone(),
        cancel.clone(),
        health,
        HoldPolicy::for_ttl(Ttl::from_secs(10).expect("ttl")),
        &node,
    );
    wait_snap(&r, "synced", |s| s.services.len() == 1).await;
    served.wait("two clients", |s| s.clients == 2).await;

    cut.set_down(true);
    served.wait("upstream down", |s| !s.live).await;
    let stale = wait_snap(&r, "stale", |s| s.stale_since_ms.is_some()).await;
    assert_eq!(stale.services.len(), 1);
    let mut last = 0;
    for svc in ["b", "c"] {
        last = put_service(&*etcd, svc).await;
    }
    cut.set_down(false);
    served
        .wait("upstream back", |s| s.live && s.revision >= last)
        .await;

    // The reflector resumed through the relay, wrote its barrier to etcd
    // and saw it come back through the relay.
    let snap = wait_snap(&r, "fresh after the barrier", |s| {
        s.stale_since_ms.is_none() && s.services.len() == 3
    })
    .await;
    assert_equals_etcd(&*etcd, &snap).await;
    let barrier = keys::sync(&node);
    let items = collect_until(&mut w, snap.revision).await;
    assert!(
        events_of(&items)
            .iter()
            .any(|e| matches!(e, WatchEvent::Put(kv) if kv.key == barrier)),
        "the barrier came through the relay: {items:?}"
    );
    // The plain watch saw the relay's Disconnected then Resumed, and
    // exactly etcd's events.
    let kinds: Vec<&str> = items
        .iter()
        .filter_map(|i| match i {
            WatchItem::Disconnected { .. } => Some("disconnected"),
            WatchItem::Resumed => Some("resumed"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["disconnected", "resumed"], "{items:?}");
    let want = events_of(&collect_until(&mut direct, snap.revision).await);
    assert_eq!(events_of(&items), want);
    // Both stayed on the relay (no fallback to etcd).
    assert_eq!(served.relay.stats().clients, 2);
}

/// etcd out of the relays' reach (an election, an overload): the clients
/// wait for the relays instead of all watching etcd at once, and resume
/// through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_without_etcd_are_waited_for_not_bypassed() {
    let etcd_server = EtcdServer::start().expect("start etcd");
    let etcd: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd_server.endpoint))
            .await
            .expect("connect"),
    );
    let cut = Cut::start(etcd_server.endpoint.clone()).await;
    let relay_upstream: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&cut.addr))
            .await
            .expect("connect via cut"),
    );
    let served = Served::start(relay_upstream, RelayOptions::default()).await;
    let client = relayed(etcd.clone(), vec![served.addr.clone()], Arc::new(TcpDial));
    let from = now(&*etcd).await + 1;
    let mut direct = etcd.watch(keys::ROOT, from).await.expect("direct watch");
    let mut w = client.watch(keys::ROOT, from).await.expect("relayed watch");

    cut.set_down(true);
    served.wait("upstream down", |s| !s.live).await;
    let mut last = 0;
    for i in 0..3 {
        last = etcd
            .put(&key(&format!("k{i}")), b"v".to_vec(), None)
            .await
            .expect("put");
    }
    // Past the client's silence limit (3 heartbeats): it has left the
    // relay and found no relay with a live view, and it has not gone to
    // etcd: none of the writes reaches it.
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = w.next().await {
            seen.push(item.expect("watch item"));
        }
    })
    .await;
    assert!(
        matches!(seen.as_slice(), [WatchItem::Disconnected { .. }]),
        "{seen:?}"
    );
    // A list waits for the relays too.
    assert!(matches!(
        client.list(keys::ROOT).await,
        Err(pier_store::StoreError::Unavailable(_))
    ));

    cut.set_down(false);
    let mut items = seen;
    items.extend(collect_until(&mut w, last).await);
    assert!(matches!(items[1], WatchItem::Resumed), "{items:?}");
    let want = events_of(&collect_until(&mut direct, last).await);
    assert_eq!(events_of(&items), want);
    served.wait("back on the relay", |s| s.clients == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_and_does_not_hold_up_others() {
    let (_etcd, etcd) = start_etcd().await;
    let served = Served::start(
        etcd.clone(),
        RelayOptions {
            write_timeout: Duration::from_secs(1),
            ..RelayOptions::default()
        },
    )
    .await;
    let from = now(&*etcd).await + 1;
    // The slow client asks for a watch and never reads.
    let mut slow = TcpStream::connect(&served.addr).await.expect("connect");
    let hello = wire::encode(&wire::Frame::Hello {
        version: wire::VERSION,
        op: wire::Op::Watch { from },
    });
    slow.write_all(&hello).await.expect("hello");
    let client = relayed(etcd.clone(), vec![served.addr.clone()], Arc::new(TcpDial));
    let mut w = client.watch(keys::ROOT, from).await.expect("relayed watch");
    served.wait("two clients", |s| s.clients == 2).await;

    // 48 MiB of values: far more than the slow socket's buffers hold.
    let value = vec![b'x'; 1 << 20];
    let mut last = 0;
    for i in 0..48 {
        last = etcd
            .put(&key(&format!("big{}", i % 4)), value.clone(), None)
            .await
            .expect("put");
    }
    let items = collect_until(&mut w, last).await;
    assert_eq!(
        events_of(&items).len(),
        48,
        "the reading client got every change"
    );
    served
        .wait("the slow client cut off", |s| s.clients == 1)
        .await;
    // The slow client finds its connection closed after what was sent.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the slow client's connection was closed");
    assert!(
        got < 48 << 20,
        "the relay did not buffer everything for it: {got}"
    );
    // The relay still serves: a new list is whole.
    let l = client.list(keys::ROOT).await.expect("list");
    assert_eq!(l.kvs.len(), 4);
}
