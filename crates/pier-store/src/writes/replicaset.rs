//! Replica sets (create, scale, autoscale, a new spec, delete), the
//! autoscaler's fenced count changes, and pod deletes.

use pier_model::api::Resource;
use pier_model::autoscale::{AutoscaleStatus, ScaleDecision};
use pier_model::{
    Name, Namespace, ReplicaSet, Replicas, Sla, TemplateRevision, decode, encode, keys,
};

use super::{Batch, Conflict, UPDATE_ATTEMPTS, WriteError, back_off};
use crate::election::Fence;
use crate::{Revision, Store};

/// Create `rs` if absent. Returns the store's revision after the write.
pub async fn create_replicaset(store: &dyn Store, rs: &ReplicaSet) -> Result<Revision, WriteError> {
    let mut b = Batch::default();
    b.claim(keys::replicaset(&rs.namespace, &rs.name), encode(rs));
    let r = b.commit(store).await?;
    if !r.succeeded {
        return Err(WriteError::ReplicaSetExists {
            namespace: rs.namespace.clone(),
            name: rs.name.clone(),
        });
    }
    Ok(r.revision)
}

/// A new replica count: this one, or the current one plus or minus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(Replicas),
    By(i64),
}

/// Held from a replica-set update's read to its compare-and-swap: updates
/// made by this process take turns instead of racing each other's revision
/// (one client winning every round could make the other fail all its
/// attempts). Updates through other hosts' APIs still meet the
/// compare-and-swap and its retries.
static UPDATE_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scale by compare-and-swap on the replica set's `mod_revision`: a racing
/// writer makes the txn fail, and the scale is recomputed from the new value,
/// so neither update is lost. An autoscaled set's count is the
/// autoscaler's: scaling it is a [`WriteError::Autoscaled`]. Returns the
/// replica set as written and the store's revision after the write.
pub async fn scale_replicaset(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    scale: Scale,
) -> Result<(ReplicaSet, Revision), WriteError> {
    let r = update_replicaset(store, ns, name, "it was being scaled", |rs| {
        if let Some((min, max, _)) = rs.autoscale() {
            return Err(WriteError::Autoscaled {
                name: name.clone(),
                min,
                max,
            });
        }
        rs.replicas = match scale {
            Scale::To(r) => r,
            Scale::By(d) => {
                let want = rs.replicas.get() as i64 + d;
                u32::try_from(want)
                    .ok()
                    .and_then(|w| Replicas::new(w).ok())
                    .ok_or_else(|| {
                        WriteError::Invalid(format!(
                            "delta: {d} would make {want} replicas; replicas are 0 to {}",
                            Replicas::MAX
                        ))
                    })?
            }
        };
        Ok(())
    })
    .await?;
    tracing::info!(namespace = %ns, replicaset = %name, replicas = r.0.replicas.get(), "replica set scaled");
    Ok(r)
}

/// Sets a set's autoscaling bounds and targets (`Some((min, max, sla))`) or
/// turns it off (`None`), by compare-and-swap like [`scale_replicaset`].
pub async fn set_autoscale(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    bounds: Option<(Replicas, Replicas, Sla)>,
) -> Result<(ReplicaSet, Revision), WriteError> {
    update_replicaset(store, ns, name, "its autoscaling was being set", |rs| {
        match &bounds {
            Some((min, max, sla)) => {
                rs.min_replicas = Some(*min);
                rs.max_replicas = Some(*max);
                rs.sla = Some(sla.clone());
            }
            None => {
                rs.min_replicas = None;
                rs.max_replicas = None;
                rs.sla = None;
            }
        }
        Ok(())
    })
    .await
}

/// A new spec for a replica set (`PUT`, set image, roll back), by
/// compare-and-swap like [`scale_replicaset`]: `change` edits the spec (and
/// checks it), the server's fields are kept, and a changed template becomes
/// the next revision ([`next_spec`]). `what` names the change in the
/// history. Returns the set and the store's revision after the write (the
/// set's own when nothing changed: then nothing is written).
pub async fn update_spec<E: From<WriteError>>(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    what: &str,
    now: u64,
    mut change: impl FnMut(&mut ReplicaSet) -> Result<(), E>,
) -> Result<(ReplicaSet, Revision), E> {
    let r = update_replicaset::<E>(store, ns, name, "it was being updated", |rs| {
        let mut want = rs.clone();
        change(&mut want)?;
        *rs = next_spec(rs, want, what, now);
        Ok(())
    })
    .await?;
    tracing::info!(namespace = %ns, replicaset = %name, revision = r.0.revision, what, "replica set updated");
    Ok(r)
}

/// `want` as it replaces `old` (pure): the fields the server keeps (name,
/// namespace, creation time, revision, history) are `old`'s; when the
/// template changed, `old`'s goes into the history (newest last, each
/// template once, at most [`ReplicaSet::HISTORY_LIMIT`]) and the revision
/// goes up by one, which the supervisor rolls out.
pub fn next_spec(old: &ReplicaSet, mut want: ReplicaSet, what: &str, now: u64) -> ReplicaSet {
    want.name = old.name.clone();
    want.namespace = old.namespace.clone();
    want.created_at = old.created_at;
    want.revision = old.revision;
    want.history = old.history.clone();
    if want.template.hash() != old.template.hash() {
        want.history.push(TemplateRevision {
            revision: old.revision,
            template: old.template.clone(),
            replaced_at: now,
            replaced_by: what.to_owned(),
        });
        // The same template twice in the history is kept once, newest.
        let h = want.template.hash();
        want.history.retain(|t| t.template.hash() != h);
        let excess = want.history.len().saturating_sub(ReplicaSet::HISTORY_LIMIT);
        want.history.drain(..excess);
        want.revision = old.revision + 1;
    }
    want
}

/// Read, `change`, and write back if nobody wrote in between (compare on
/// `mod_revision`); on a race, back off a little and start again from the
/// new value, [`UPDATE_ATTEMPTS`] times. A change that changes nothing
/// writes nothing. `doing` names the change in the conflict ("it was being
/// scaled").
async fn update_replicaset<E: From<WriteError>>(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
    doing: &'static str,
    mut change: impl FnMut(&mut ReplicaSet) -> Result<(), E>,
) -> Result<(ReplicaSet, Revision), E> {
    let key = keys::replicaset(ns, name);
    for attempt in 0..UPDATE_ATTEMPTS {
        let turn = UPDATE_TURN.lock().await;
        let kv = store
            .get(&key)
            .await
            .map_err(WriteError::from)?
            .ok_or_else(|| WriteError::NotFound {
                kind: Resource::ReplicaSets,
                namespace: ns.clone(),
                name: name.clone(),
            })?;
        let old: ReplicaSet =
            decode(&key, &kv.value).map_err(|error| WriteError::Corrupt { error })?;
        let mut rs = old.clone();
        change(&mut rs)?;
        if rs == old {
            return Ok((rs, kv.mod_revision));
        }
        let mut b = Batch::default();
        b.at_revision(key.clone(), kv.mod_revision);
        b.put(key.clone(), encode(&rs));
        let r = b.commit(store).await.map_err(WriteError::from)?;
        drop(turn);
        if r.succeeded {
            tracing::debug!(namespace = %ns, replicaset = %name, attempt, "replica set updated");
            return Ok((rs, r.revision));
        }
        // Someone else wrote it between our read and our txn.
        back_off(attempt).await;
    }
    Err(WriteError::Conflict(Conflict::Update {
        name: name.clone(),
        doing,
        attempts: UPDATE_ATTEMPTS,
    })
    .into())
}

/// The autoscaler leader's step: `ns/name`'s count from `decision.from`
/// to `decision.to`, with the decision appended to `autoscale/<ns>/<rs>`,
/// in one txn fenced by the leader's election key ([`Fence`]) and the set's
/// revision. `Ok(false)`: nothing written, because the set changed
/// meanwhile (a user's write wins; the next round decides again), is no
/// longer autoscaled, or this node no longer leads.
pub async fn autoscale_step(
    store: &dyn Store,
    fence: &Fence,
    ns: &Namespace,
    name: &Name,
    decision: ScaleDecision,
) -> Result<bool, WriteError> {
    let rs_key = keys::replicaset(ns, name);
    let st_key = keys::autoscale(ns, name);
    let kv = store
        .get(&rs_key)
        .await?
        .ok_or_else(|| WriteError::NotFound {
            kind: Resource::ReplicaSets,
            namespace: ns.clone(),
            name: name.clone(),
        })?;
    let mut rs: ReplicaSet =
        decode(&rs_key, &kv.value).map_err(|error| WriteError::Corrupt { error })?;
    if rs.replicas.get() != decision.from || rs.autoscale().is_none() {
        return Ok(false);
    }
    rs.replicas = Replicas::new(decision.to).map_err(|e| WriteError::Invalid(e.to_string()))?;
    let mut status = match store.get(&st_key).await? {
        Some(s) => decode::<AutoscaleStatus>(&st_key, &s.value).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "autoscale status replaced");
            AutoscaleStatus::default()
        }),
        None => AutoscaleStatus::default(),
    };
    status.push(decision);
    let mut b = Batch::default();
    b.at_revision(fence.0.clone(), fence.1);
    b.at_revision(rs_key.clone(), kv.mod_revision);
    b.put(rs_key, encode(&rs));
    b.put(st_key, encode(&status));
    Ok(b.commit(store).await?.succeeded)
}

/// Delete a replica set (the supervisor then deletes its pods). Returns
/// whether it existed, and the store's revision after the delete.
pub async fn delete_replicaset(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
) -> Result<(bool, Revision), WriteError> {
    Ok(store.delete(&keys::replicaset(ns, name)).await?)
}

/// Delete a pod (the supervisor replaces it). Returns whether it existed,
/// and the store's revision after the delete.
pub async fn delete_pod(
    store: &dyn Store,
    ns: &Namespace,
    name: &Name,
) -> Result<(bool, Revision), WriteError> {
    Ok(store.delete(&keys::pod(ns, name)).await?)
}
