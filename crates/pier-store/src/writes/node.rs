//! Node labels set through the API (`pier label node`), laid over a
//! node's own `[node] labels` by `Snapshot::node_labels`.

use std::collections::BTreeMap;

use pier_model::{Name, NodeLabels, decode, encode, keys};

use super::{Batch, Conflict, UPDATE_ATTEMPTS, WriteError, back_off};
use crate::{Revision, Store};

/// Merges `labels` into `nodelabels/<node>` (`None` removes a label, also
/// one the node's config sets) by compare-and-swap, creating the key if
/// absent. Returns the store's revision after the write.
pub async fn label_node(
    store: &dyn Store,
    node: &Name,
    labels: &BTreeMap<String, Option<String>>,
) -> Result<Revision, WriteError> {
    let key = keys::node_labels(node);
    for attempt in 0..UPDATE_ATTEMPTS {
        let kv = store.get(&key).await?;
        let mut cur: NodeLabels = match &kv {
            Some(kv) => decode(&key, &kv.value).map_err(|error| WriteError::Corrupt { error })?,
            None => NodeLabels::default(),
        };
        for (k, v) in labels {
            cur.labels.insert(k.clone(), v.clone());
        }
        let mut b = Batch::default();
        match &kv {
            Some(kv) => {
                b.at_revision(key.clone(), kv.mod_revision);
                b.put(key.clone(), encode(&cur));
            }
            None => b.claim(key.clone(), encode(&cur)),
        }
        let r = b.commit(store).await?;
        if r.succeeded {
            return Ok(r.revision);
        }
        back_off(attempt).await;
    }
    Err(WriteError::Conflict(Conflict::NodeLabels {
        node: node.clone(),
        attempts: UPDATE_ATTEMPTS,
    }))
}
