//! The leader's batches: many sets planned on one snapshot and written
//! several to a transaction, against the embedded store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, ensure};
use pier_model::{Namespace, Pod, Resources, encode, keys};
use pier_store::{
    Compare, EmbeddedStore, KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Ttl, Txn,
    TxnOp, TxnResult, WatchStream,
};

use crate::harness::*;

const WITHIN: Duration = Duration::from_secs(15);

/// All `names`' replica sets in one transaction: one snapshot shows them
/// together, so the leader plans them in one batch.
async fn put_sets_at_once(store: &dyn Store, names: &[String], replicas: u32) -> Result<()> {
    let success = names
        .iter()
        .map(|s| {
            let rs = replicaset(s, replicas);
            TxnOp::Put {
                key: keys::replicaset(&rs.namespace, &rs.name),
                value: encode(&rs),
                lease: None,
            }
        })
        .collect();
    let r = store
        .txn(Txn {
            compares: vec![],
            success,
            failure: vec![],
        })
        .await?;
    ensure!(r.succeeded);
    Ok(())
}

fn sets_of(
    snap: &pier_model::Snapshot,
    names: &[String],
) -> BTreeMap<String, BTreeMap<String, usize>> {
    names
        .iter()
        .map(|s| (s.clone(), per_node(snap, s)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_created_together_fill_every_node_without_overfilling_one() -> Result<()> {
    init_tracing();
    let c = Cluster::embedded().await?;
    let cap = Resources {
        pods: 4,
        ..Default::default()
    };
    for name in ["a", "b", "c"] {
        c.add_node(name, &[], cap).await?;
    }
    let _sup = c.supervisor("a", test_config())?;
    // 6 sets of 2 on 3 nodes with room for 4 pods each: exactly full.
    // Planned on one snapshot without each other's pods, every set would
    // pick a and b.
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    put_sets_at_once(&*c.store, &names, 2).await?;
    let snap = c
        .wait_for("6 sets of 2 ready pods", WITHIN, |s| {
            names.iter().all(|n| all_ready(s, n, 2))
        })
        .await?;
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for p in snap.pods.values() {
        *per.entry(p.node.to_string()).or_default() += 1;
    }
    ensure!(
        per == BTreeMap::from([("a".into(), 4), ("b".into(), 4), ("c".into(), 4)]),
        "pods per node: {per:?}"
    );
    for (s, nodes) in sets_of(&snap, &names) {
        ensure!(nodes.len() == 2, "{s} not spread over two nodes: {nodes:?}");
    }
    let problems = _sup.problems.borrow().clone();
    ensure!(problems.is_empty(), "problems: {problems:?}");
    Ok(())
}

/// The embedded store, with another writer that, the first time a
/// transaction carries several sets' creates, takes the name of the first
/// pod it creates just before it lands: a real conflict on a shared
/// transaction. It records the transactions that follow.
#[derive(Debug)]
struct Racing {
    inner: Arc<dyn Store>,
    /// The sets in the transaction that lost the race (none yet: armed).
    raced: Mutex<Option<BTreeSet<String>>>,
    /// The sets each transaction with creates carried after the race.
    after: Mutex<Vec<BTreeSet<String>>>,
}

/// The sets whose creates `txn` guards (their `replicasets/` compares).
fn sets_in(txn: &Txn) -> BTreeSet<String> {
    let prefix = keys::replicaset(&Namespace::default(), &n("x"));
    let prefix = &prefix[..prefix.len() - 1];
    txn.compares
        .iter()
        .filter_map(|c| match c {
            Compare::Exists(k) => k.strip_prefix(prefix).map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[async_trait::async_trait]
impl Store for Racing {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        self.inner.list(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<(bool, Revision), StoreError> {
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let sets = sets_in(&txn);
        let race = {
            let mut raced = self.raced.lock().expect("lock");
            if raced.is_none() && sets.len() > 1 {
                *raced = Some(sets.clone());
                true
            } else {
                if raced.is_some() && !sets.is_empty() {
                    self.after.lock().expect("lock").push(sets.clone());
                }
                false
            }
        };
        if race {
            // Another writer creates the first pod's name first: a pod of
            // the same set on node c.
            let pod = txn.success.iter().find_map(|op| match op {
                TxnOp::Put { key, value, .. } if key.contains("/pods/") => {
                    serde_json::from_slice::<Pod>(value).ok()
                }
                _ => None,
            });
            if let Some(mut pod) = pod {
                pod.node = n("c");
                self.inner
                    .put(&keys::pod(&pod.namespace, &pod.name), encode(&pod), None)
                    .await?;
            }
        }
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl: Ttl) -> Result<LeaseId, StoreError> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keepalive(&self, lease: LeaseId) -> Result<Ttl, StoreError> {
        self.inner.lease_keepalive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.lease_revoke(lease).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, from).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_txn_that_loses_a_race_is_retried_set_by_set() -> Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let racing = Arc::new(Racing {
        inner: Arc::new(EmbeddedStore::open(dir.path())?),
        raced: Mutex::new(None),
        after: Mutex::new(Vec::new()),
    });
    let c = Cluster::with_store(racing.clone(), Some(dir)).await;
    for name in ["a", "b", "c"] {
        c.add_node(name, &[], Resources::default()).await?;
    }
    let _sup = c.supervisor("a", test_config())?;
    let names: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    put_sets_at_once(&*c.store, &names, 3).await?;
    // Every set at its count exactly: the other writer's pod counts as
    // one of its set's three (or, made surplus, is removed).
    let snap = c
        .wait_for("8 sets of 3 ready pods", WITHIN, |s| {
            names.iter().all(|n| all_ready(s, n, 3)) && s.pods.len() == 24
        })
        .await?;
    let raced = racing.raced.lock().expect("lock").clone();
    let Some(raced) = raced else {
        anyhow::bail!("no transaction carried several sets");
    };
    ensure!(raced.len() > 1, "{raced:?}");
    // The sets of the lost transaction were written again each in a
    // transaction of its own.
    let after = racing.after.lock().expect("lock").clone();
    for s in &raced {
        let mine: Vec<&BTreeSet<String>> = after.iter().filter(|t| t.contains(s)).collect();
        ensure!(
            !mine.is_empty() && mine.iter().all(|t| t.len() == 1),
            "{s} after the race: {mine:?} (all: {after:?})"
        );
    }
    for (s, nodes) in sets_of(&snap, &names) {
        ensure!(nodes.values().sum::<usize>() == 3, "{s}: {nodes:?}");
    }
    Ok(())
}
