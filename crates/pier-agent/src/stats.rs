//! The proxy's per-service traffic stats → `stats/<ns>/<svc>/<node>` keys,
//! under the node lease, written on a real change or a periodic refresh.

use std::collections::BTreeMap;
use std::sync::Arc;

use pier_model::{Name, ObjectKey, Stats};
use pier_store::{LeaseId, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Writes each sample of `stats` worth writing against the last one
/// written (`Stats::worth_writing`: a real change or a refresh), until
/// `cancel`. Nothing is written while the
/// lease is being re-granted; a failed put is retried on the next sample.
pub async fn write_stats(
    store: Arc<dyn Store>,
    node: Name,
    mut stats: watch::Receiver<Arc<BTreeMap<ObjectKey, Stats>>>,
    lease: watch::Receiver<Option<LeaseId>>,
    cancel: CancellationToken,
) {
    let mut last: BTreeMap<ObjectKey, Stats> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = stats.changed() => if r.is_err() { return },
        }
        let Some(lease_id) = *lease.borrow() else {
            continue;
        };
        let cur = stats.borrow_and_update().clone();
        for ((ns, svc), st) in cur.iter() {
            if !st.worth_writing(last.get(&(ns.clone(), svc.clone()))) {
                continue;
            }
            let key = pier_model::keys::stats(ns, svc, &node);
            if let Err(e) = store
                .put(&key, pier_model::encode(st), Some(lease_id))
                .await
            {
                tracing::debug!(key = %key, error = %e, "writing proxy stats failed; will retry on the next sample");
                continue;
            }
            last.insert((ns.clone(), svc.clone()), st.clone());
        }
    }
}
