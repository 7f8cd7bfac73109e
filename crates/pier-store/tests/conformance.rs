//! The conformance suite: every body runs against `EmbeddedStore` (in a temp
//! dir), against `EtcdStore` on a real etcd (`testing::EtcdServer`), and
//! against `EtcdStore` on a real etcd serving TLS with client-certificate
//! authentication and etcd's users on (pier logs in as a user that may
//! read and write `/` only, not root), each on a fresh store. Bodies assert absolute revisions, so the two stores are
//! checked to give the same revisions for the same operations;
//! `same_trace_on_both_stores` also compares a full trace directly.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use pier_store::testing::{EtcdServer, TestPki, TlsEtcdOptions};
use pier_store::{
    Compare, EmbeddedStore, EtcdSecurity, EtcdStore, EtcdTls, EtcdUser, KeyValue, LeaseId, Store,
    StoreError, Ttl, Txn, TxnOp, WatchEvent, WatchItem, WatchStream,
};

type Guard = Box<dyn Any + Send>;

fn embedded_store() -> Result<(Arc<dyn Store>, Guard)> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path())?;
    // The store goes first, then the dir.
    Ok((Arc::new(store), Box::new(dir)))
}

async fn etcd_store() -> Result<(Arc<dyn Store>, Guard)> {
    let server = tokio::task::spawn_blocking(EtcdServer::start)
        .await?
        .context("start etcd")?;
    let store = EtcdStore::connect(std::slice::from_ref(&server.endpoint)).await?;
    Ok((Arc::new(store), Box::new(server)))
}

/// etcd with TLS, `--client-cert-auth` and auth enabled; the store
/// presents the client certificate and logs in as `conformance`, whose
/// role may read and write every key under `/`.
async fn etcd_tls_store() -> Result<(Arc<dyn Store>, Guard)> {
    let pki = Arc::new(TestPki::new("conformance-client").context("certificates")?);
    let p = pki.clone();
    let server = tokio::task::spawn_blocking(move || {
        let s = EtcdServer::start_tls(&p, &TlsEtcdOptions::default())?;
        s.enable_auth("root-secret")?;
        s.add_user("root-secret", "conformance", "conformance-secret", "/")?;
        std::io::Result::Ok(s)
    })
    .await?
    .context("start etcd with TLS and auth")?;
    let security = EtcdSecurity {
        tls: Some(EtcdTls::from_files(
            &pki.ca,
            Some((&pki.client_cert, &pki.client_key)),
        )?),
        user: Some(EtcdUser::new("conformance", "conformance-secret")),
    };
    let store = EtcdStore::connect_with(std::slice::from_ref(&server.endpoint), &security).await?;
    ensure!(store.current_endpoint().starts_with("https://"));
    // The server goes first, then the certificates.
    Ok((Arc::new(store), Box::new((server, pki))))
}

fn put(key: &str, value: &str) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.into(),
        lease: None,
    }
}

fn del(key: &str) -> TxnOp {
    TxnOp::Delete { key: key.into() }
}

fn ttl2() -> Ttl {
    // 2 s: etcd's minimum lease TTL.
    Ttl::from_secs(2).expect("2 s is a valid TTL")
}

fn summary(kv: &KeyValue) -> (String, String, i64, i64, i64) {
    (
        kv.key.clone(),
        String::from_utf8_lossy(&kv.value).into_owned(),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
    )
}

/// A watch event as (kind, key, revision, value).
fn ev(e: &WatchEvent) -> (&'static str, String, i64, String) {
    match e {
        WatchEvent::Put(kv) => (
            "put",
            kv.key.clone(),
            kv.mod_revision,
            String::from_utf8_lossy(&kv.value).into_owned(),
        ),
        WatchEvent::Delete { key, mod_revision } => {
            ("delete", key.clone(), *mod_revision, String::new())
        }
    }
}

/// Reads events until `n` have arrived, or fails after `timeout`.
async fn next_events(
    w: &mut WatchStream,
    n: usize,
    timeout: Duration,
) -> Result<Vec<(&'static str, String, i64, String)>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let item = tokio::time::timeout_at(deadline, w.next())
            .await
            .with_context(|| format!("timed out with {} of {n} events: {out:?}", out.len()))?;
        match item {
            Some(Ok(WatchItem::Events { revision, events })) => {
                for e in &events {
                    let e = ev(e);
                    ensure!(
                        e.2 <= revision,
                        "event {e:?} beyond item revision {revision}"
                    );
                    out.push(e);
                }
            }
            Some(Ok(WatchItem::Disconnected { .. } | WatchItem::Resumed)) => {}
            Some(Err(e)) => bail!("watch failed: {e}"),
            None => bail!("watch ended after {out:?}"),
        }
    }
    Ok(out)
}

/// Nothing more arrives within `wait`.
async fn no_more_events(w: &mut WatchStream, wait: Duration) -> Result<()> {
    match tokio::time::timeout(wait, w.next()).await {
        Err(_) => Ok(()),
        Ok(Some(Ok(WatchItem::Events { events, .. }))) => {
            bail!(
                "unexpected events {:?}",
                events.iter().map(ev).collect::<Vec<_>>()
            )
        }
        Ok(other) => bail!("unexpected watch item {other:?}"),
    }
}

async fn wait_gone(store: &dyn Store, key: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while store.get(key).await?.is_some() {
        ensure!(
            start.elapsed() < timeout,
            "{key} still present after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

// ---- bodies -------------------------------------------------------------

async fn kv_revisions_and_prefix_list(s: Arc<dyn Store>) -> Result<()> {
    let empty = s.list("/c/").await?;
    ensure!(
        empty.kvs.is_empty() && empty.revision == 1,
        "fresh store: {empty:?}"
    );
    ensure!(s.get("/c/a").await?.is_none());

    ensure!(
        s.put("/c/b", b"1".to_vec(), None).await? == 2,
        "first write is revision 2"
    );
    ensure!(s.put("/c/a", b"2".to_vec(), None).await? == 3);
    ensure!(s.put("/c/b", b"3".to_vec(), None).await? == 4);
    ensure!(s.put("/d/x", b"4".to_vec(), None).await? == 5);
    ensure!(s.put("/c", b"5".to_vec(), None).await? == 6);

    let b = s.get("/c/b").await?.context("/c/b present")?;
    ensure!(summary(&b) == ("/c/b".into(), "3".into(), 2, 4, 2), "{b:?}");
    ensure!(b.lease.is_none());

    let list = s.list("/c/").await?;
    let got: Vec<_> = list.kvs.iter().map(summary).collect();
    ensure!(
        got == [
            ("/c/a".into(), "2".into(), 3, 3, 1),
            ("/c/b".into(), "3".into(), 2, 4, 2)
        ],
        "{got:?}"
    );
    ensure!(list.revision == 6, "list revision {}", list.revision);

    ensure!(s.delete("/c/b").await? == (true, 7));
    // Deleting an absent key changes nothing, not even the revision.
    ensure!(s.delete("/c/b").await? == (false, 7));
    ensure!(s.get("/c/b").await?.is_none());
    // Re-created: a new create_revision, version starts again at 1.
    ensure!(s.put("/c/b", b"6".to_vec(), None).await? == 8);
    let b = s.get("/c/b").await?.context("/c/b present")?;
    ensure!(summary(&b) == ("/c/b".into(), "6".into(), 8, 8, 1), "{b:?}");
    let all = s.list("/").await?;
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(keys == ["/c", "/c/a", "/c/b", "/d/x"], "{keys:?}");
    ensure!(all.revision == 8);
    Ok(())
}

async fn txn_compare_and_swap(s: Arc<dyn Store>) -> Result<()> {
    // Create-if-absent succeeds once.
    let create = Txn {
        compares: vec![Compare::Absent("/t/k".into())],
        success: vec![put("/t/k", "first")],
        failure: vec![],
    };
    let r = s.txn(create.clone()).await?;
    ensure!(r.succeeded && r.revision == 2, "{r:?}");
    let r = s.txn(create).await?;
    // Failed, nothing to do: no new revision.
    ensure!(!r.succeeded && r.revision == 2, "{r:?}");
    ensure!(s.get("/t/k").await?.context("/t/k")?.value == b"first");

    // ModRevision 0 means absent.
    let r = s
        .txn(Txn {
            compares: vec![Compare::ModRevision("/t/absent".into(), 0)],
            success: vec![put("/t/absent", "made")],
            failure: vec![],
        })
        .await?;
    ensure!(r.succeeded && r.revision == 3, "{r:?}");

    // CAS on the right mod_revision, two ops in one revision.
    let r = s
        .txn(Txn {
            compares: vec![
                Compare::ModRevision("/t/k".into(), 2),
                Compare::Exists("/t/absent".into()),
            ],
            success: vec![put("/t/k", "second"), del("/t/absent"), put("/t/n", "x")],
            failure: vec![put("/t/wrong", "x")],
        })
        .await?;
    ensure!(r.succeeded && r.revision == 4, "{r:?}");
    let k = s.get("/t/k").await?.context("/t/k")?;
    ensure!(
        summary(&k) == ("/t/k".into(), "second".into(), 2, 4, 2),
        "{k:?}"
    );
    ensure!(s.get("/t/absent").await?.is_none());
    ensure!(s.get("/t/n").await?.context("/t/n")?.mod_revision == 4);

    // CAS on a stale mod_revision: the failure branch runs.
    let r = s
        .txn(Txn {
            compares: vec![Compare::ModRevision("/t/k".into(), 2)],
            success: vec![put("/t/k", "third")],
            failure: vec![put("/t/fail", "ran"), del("/t/n")],
        })
        .await?;
    ensure!(!r.succeeded && r.revision == 5, "{r:?}");
    ensure!(s.get("/t/k").await?.context("/t/k")?.value == b"second");
    ensure!(s.get("/t/fail").await?.context("/t/fail")?.mod_revision == 5);
    ensure!(s.get("/t/n").await?.is_none());

    // Exists on an absent key fails; Absent on a present key fails.
    let r = s
        .txn(Txn {
            compares: vec![Compare::Exists("/t/nope".into())],
            success: vec![put("/t/nope", "x")],
            failure: vec![],
        })
        .await?;
    ensure!(!r.succeeded && r.revision == 5, "{r:?}");
    let r = s
        .txn(Txn {
            compares: vec![Compare::Absent("/t/k".into())],
            success: vec![],
            failure: vec![del("/t/k")],
        })
        .await?;
    ensure!(!r.succeeded && r.revision == 6, "{r:?}");
    ensure!(s.get("/t/k").await?.is_none());

    // A txn whose only op deletes an absent key changes nothing.
    let r = s
        .txn(Txn {
            compares: vec![],
            success: vec![del("/t/ghost")],
            failure: vec![],
        })
        .await?;
    ensure!(r.succeeded && r.revision == 6, "{r:?}");
    Ok(())
}

async fn put_with_unknown_lease_fails(s: Arc<dyn Store>) -> Result<()> {
    let bogus = LeaseId(0x1234_5678);
    match s.put("/u/k", b"v".to_vec(), Some(bogus)).await {
        Err(StoreError::LeaseNotFound(id)) if id == bogus => {}
        other => bail!("put under unknown lease gave {other:?}"),
    }
    let r = s
        .txn(Txn {
            compares: vec![],
            success: vec![
                put("/u/a", "x"),
                TxnOp::Put {
                    key: "/u/b".into(),
                    value: b"y".to_vec(),
                    lease: Some(bogus),
                },
            ],
            failure: vec![],
        })
        .await;
    ensure!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
    // Nothing of the txn applied.
    let list = s.list("/u/").await?;
    ensure!(list.kvs.is_empty() && list.revision == 1, "{list:?}");
    Ok(())
}

async fn lease_expiry_takes_keys(s: Arc<dyn Store>) -> Result<()> {
    // The TTL runs from the grant: the "too early" bound is measured from
    // here, not from after the writes below (slow on a loaded machine).
    let granted = Instant::now();
    let lease = s.lease_grant(ttl2()).await?;
    ensure!(s.put("/l/a", b"1".to_vec(), Some(lease)).await? == 2);
    ensure!(s.put("/l/b", b"2".to_vec(), Some(lease)).await? == 3);
    ensure!(s.put("/l/keep", b"3".to_vec(), None).await? == 4);
    // Re-put without the lease: detached, so it stays.
    ensure!(s.put("/l/c", b"4".to_vec(), Some(lease)).await? == 5);
    ensure!(s.put("/l/c", b"5".to_vec(), None).await? == 6);
    let a = s.get("/l/a").await?.context("/l/a")?;
    ensure!(a.lease == Some(lease), "{a:?}");
    let mut w = s.watch("/l/", 7).await?;

    // TTL 2 s; etcd checks expiry every 500 ms and may be up to ~1 s late.
    wait_gone(&*s, "/l/a", Duration::from_secs(6)).await?;
    let lived = granted.elapsed();
    ensure!(
        lived >= Duration::from_millis(1500),
        "gone too early: {lived:?} after the grant"
    );
    ensure!(s.get("/l/b").await?.is_none());
    ensure!(s.get("/l/keep").await?.is_some());
    ensure!(s.get("/l/c").await?.is_some());
    // Both keys go in one revision.
    let events = next_events(&mut w, 2, Duration::from_secs(5)).await?;
    ensure!(
        events
            == [
                ("delete", "/l/a".into(), 7, String::new()),
                ("delete", "/l/b".into(), 7, String::new())
            ],
        "{events:?}"
    );
    ensure!(s.list("/l/").await?.revision == 7);
    match s.lease_keepalive(lease).await {
        Err(StoreError::LeaseNotFound(id)) if id == lease => {}
        other => bail!("keepalive of expired lease gave {other:?}"),
    }
    Ok(())
}

async fn lease_keepalive_keeps_keys(s: Arc<dyn Store>) -> Result<()> {
    let lease = s.lease_grant(ttl2()).await?;
    s.put("/k/a", b"1".to_vec(), Some(lease)).await?;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let ttl = s.lease_keepalive(lease).await?;
        ensure!(ttl == ttl2(), "keepalive returned {ttl:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        s.get("/k/a").await?.is_some(),
        "key lost despite keepalives"
    );
    s.lease_revoke(lease).await?;
    Ok(())
}

async fn lease_revoke_deletes_at_once(s: Arc<dyn Store>) -> Result<()> {
    let lease = s.lease_grant(Ttl::from_secs(60)?).await?;
    let empty = s.lease_grant(Ttl::from_secs(60)?).await?;
    ensure!(lease != empty);
    s.put("/r/a", b"1".to_vec(), Some(lease)).await?;
    s.put("/r/b", b"2".to_vec(), Some(lease)).await?;
    let mut w = s.watch("/r/", 4).await?;
    s.lease_revoke(lease).await?;
    // No waiting: gone as soon as revoke returns.
    ensure!(s.get("/r/a").await?.is_none() && s.get("/r/b").await?.is_none());
    ensure!(s.list("/r/").await?.revision == 4);
    let events = next_events(&mut w, 2, Duration::from_secs(5)).await?;
    ensure!(
        events
            == [
                ("delete", "/r/a".into(), 4, String::new()),
                ("delete", "/r/b".into(), 4, String::new())
            ],
        "{events:?}"
    );
    // Revoking a lease with no keys changes no revision.
    s.lease_revoke(empty).await?;
    ensure!(s.list("/r/").await?.revision == 4);
    for id in [lease, empty] {
        match s.lease_revoke(id).await {
            Err(StoreError::LeaseNotFound(got)) if got == id => {}
            other => bail!("second revoke gave {other:?}"),
        }
    }
    Ok(())
}

async fn keepalive_of_unknown_lease_is_not_found(s: Arc<dyn Store>) -> Result<()> {
    let bogus = LeaseId(0x7777_0000_1111);
    match s.lease_keepalive(bogus).await {
        Err(StoreError::LeaseNotFound(id)) if id == bogus => Ok(()),
        other => bail!("keepalive of unknown lease gave {other:?}"),
    }
}

async fn watch_from_past_revision_replays(s: Arc<dyn Store>) -> Result<()> {
    s.put("/w/a", b"1".to_vec(), None).await?; // 2
    s.put("/other", b"x".to_vec(), None).await?; // 3
    s.put("/w/b", b"2".to_vec(), None).await?; // 4
    s.put("/w/a", b"3".to_vec(), None).await?; // 5
    s.delete("/w/b").await?; // 6
    let mut w = s.watch("/w/", 3).await?;
    let replay = next_events(&mut w, 3, Duration::from_secs(5)).await?;
    ensure!(
        replay
            == [
                ("put", "/w/b".into(), 4, "2".into()),
                ("put", "/w/a".into(), 5, "3".into()),
                ("delete", "/w/b".into(), 6, String::new()),
            ],
        "{replay:?}"
    );
    // Live events follow, in order; other prefixes are not seen.
    s.put("/other", b"y".to_vec(), None).await?; // 7
    s.txn(Txn {
        compares: vec![],
        success: vec![put("/w/c", "4"), del("/w/a")],
        failure: vec![],
    })
    .await?; // 8
    let live = next_events(&mut w, 2, Duration::from_secs(5)).await?;
    ensure!(
        live == [
            ("put", "/w/c".into(), 8, "4".into()),
            ("delete", "/w/a".into(), 8, String::new()),
        ],
        "{live:?}"
    );
    no_more_events(&mut w, Duration::from_millis(300)).await?;

    // A watch from a future revision waits for it.
    let mut future = s.watch("/w/", 10).await?;
    s.put("/w/d", b"5".to_vec(), None).await?; // 9
    s.put("/w/e", b"6".to_vec(), None).await?; // 10
    let got = next_events(&mut future, 1, Duration::from_secs(5)).await?;
    ensure!(got == [("put", "/w/e".into(), 10, "6".into())], "{got:?}");

    // Put events carry the full key metadata.
    let mut all = s.watch("/w/e", 10).await?;
    match all.next().await {
        Some(Ok(WatchItem::Events { events, .. })) => match events.first() {
            Some(WatchEvent::Put(kv)) => {
                ensure!(
                    summary(kv) == ("/w/e".into(), "6".into(), 10, 10, 1),
                    "{kv:?}"
                )
            }
            other => bail!("expected a put, got {other:?}"),
        },
        other => bail!("expected events, got {other:?}"),
    }
    Ok(())
}

async fn compaction_gives_compacted(s: Arc<dyn Store>) -> Result<()> {
    for i in 0..5 {
        s.put("/x/k", format!("{i}").into_bytes(), None).await?; // 2..=6
    }
    s.compact(4).await?;
    match s.watch("/x/", 3).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => {
            ensure!(
                requested == 3 && compact_revision == 4,
                "{requested} {compact_revision}"
            )
        }
        // etcd reports it on the stream.
        Ok(mut w) => match tokio::time::timeout(Duration::from_secs(5), w.next()).await? {
            Some(Err(StoreError::Compacted {
                compact_revision, ..
            })) => {
                ensure!(compact_revision == 4, "compact_revision {compact_revision}")
            }
            other => bail!("watch from a compacted revision gave {other:?}"),
        },
        Err(e) => bail!("watch from a compacted revision gave {e}"),
    }
    // The compaction revision itself is still watchable, as in etcd.
    let mut w = s.watch("/x/", 4).await?;
    let got = next_events(&mut w, 3, Duration::from_secs(5)).await?;
    let revs: Vec<_> = got.iter().map(|e| e.2).collect();
    ensure!(revs == [4, 5, 6], "{got:?}");
    // Current data is untouched.
    let k = s.get("/x/k").await?.context("/x/k")?;
    ensure!(summary(&k) == ("/x/k".into(), "4".into(), 2, 6, 5), "{k:?}");
    Ok(())
}

/// One scripted sequence; the trace of revisions and results it yields.
async fn trace(s: &dyn Store) -> Result<Vec<String>> {
    let mut t = Vec::new();
    t.push(format!("put {}", s.put("/s/a", b"1".to_vec(), None).await?));
    t.push(format!("put {}", s.put("/s/b", b"2".to_vec(), None).await?));
    t.push(format!("del {:?}", s.delete("/s/a").await?));
    t.push(format!("del {:?}", s.delete("/s/a").await?));
    let lease = s.lease_grant(Ttl::from_secs(30)?).await?;
    t.push(format!(
        "put {}",
        s.put("/s/c", b"3".to_vec(), Some(lease)).await?
    ));
    let r = s
        .txn(Txn {
            compares: vec![Compare::ModRevision("/s/b".into(), 3)],
            success: vec![put("/s/b", "4"), put("/s/d", "5")],
            failure: vec![],
        })
        .await?;
    t.push(format!("txn {r:?}"));
    let r = s
        .txn(Txn {
            compares: vec![Compare::Absent("/s/b".into())],
            success: vec![],
            failure: vec![put("/s/e", "6")],
        })
        .await?;
    t.push(format!("txn {r:?}"));
    s.lease_revoke(lease).await?;
    let list = s.list("/s/").await?;
    t.push(format!("rev {}", list.revision));
    for kv in &list.kvs {
        t.push(format!("{:?}", summary(kv)));
    }
    Ok(t)
}

async fn same_trace_on_both_stores() -> Result<()> {
    let (emb, _g1) = embedded_store()?;
    let (etcd, _g2) = etcd_store().await?;
    let a = trace(&*emb).await?;
    let b = trace(&*etcd).await?;
    ensure!(a == b, "embedded {a:#?}\n  etcd {b:#?}");
    ensure!(a.len() > 8, "{a:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_trace_on_embedded_and_etcd() -> Result<()> {
    same_trace_on_both_stores().await
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let (store, _guard) = super::embedded_store()?;
                    super::$name(store).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let (store, _guard) = super::etcd_store().await?;
                    super::$name(store).await
                }
            )*
        }
        mod etcd_tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let (store, _guard) = super::etcd_tls_store().await?;
                    super::$name(store).await
                }
            )*
        }
    };
}

conformance!(
    kv_revisions_and_prefix_list,
    txn_compare_and_swap,
    put_with_unknown_lease_fails,
    lease_expiry_takes_keys,
    lease_keepalive_keeps_keys,
    lease_revoke_deletes_at_once,
    keepalive_of_unknown_lease_is_not_found,
    watch_from_past_revision_replays,
    compaction_gives_compacted,
);
