//! The supervisor's writes as transactions (pure: no I/O). The leader plans
//! many replica sets on one snapshot; their writes go out together, several
//! sets per transaction, instead of one transaction and one wait for the
//! snapshot per set.
//!
//! - [`set_parts`]: one set's pod creates and deletes and its rollout
//!   record as transaction parts: the compares that guard them and the
//!   operations. A set of up to [`SET_CHUNK`] actions is one part; a bigger
//!   one is several, written one after another, each only if the one before
//!   succeeded (as before batching).
//! - [`pack`]: parts of different sets in as few transactions as etcd
//!   takes ([`MAX_TXN_OPS`] compares and as many operations each), every
//!   one fenced by the election key. A key written twice never shares a
//!   transaction (etcd refuses that).
//!
//! A packed transaction is all or nothing: one set's failed compare (a node
//! gone since the snapshot, a pod name taken) fails its neighbours too. The
//! controller then plans each of them again after a short delay and writes
//! it in a transaction of its own ([`Packed::sets`] says whose parts a
//! transaction holds), so a set that keeps conflicting never holds others
//! back.

use std::collections::HashSet;

use pier_model::{Name, ObjectKey, ReplicaSetProblem, encode, keys};
use pier_store::{Compare, LeaseId, Txn, TxnOp};

use crate::plan::{Action, RolloutWrite};

/// etcd's default `--max-txn-ops`: compares and operations are each
/// limited to this many per transaction.
pub const MAX_TXN_OPS: usize = pier_store::writes::app::MAX_TXN_OPS;

/// Actions per part: a part of 50 creates needs up to 50 + 50 + 1 compares
/// (pod absent, node present, set present), 52 with the fence and the
/// rollout record's guard.
pub const SET_CHUNK: usize = 50;

/// Part of one set's write: what must hold, and what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Without the election fence (each transaction carries it once).
    pub compares: Vec<Compare>,
    pub ops: Vec<TxnOp>,
}

/// `key`'s actions and rollout record as parts of at most [`SET_CHUNK`]
/// actions: creates guarded by create-if-absent, their node's presence and
/// their set's; the rollout record (in the first part, so a failure counted
/// in it and the deletion of the failed pod happen together) guarded by
/// the set's presence, so a late write never outlives a deleted set.
pub fn set_parts(key: &ObjectKey, actions: &[Action], rollout: Option<&RolloutWrite>) -> Vec<Part> {
    let rs_key = keys::replicaset(&key.0, &key.1);
    let mut chunks: Vec<&[Action]> = actions.chunks(SET_CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let mut rollout = rollout;
    let mut parts = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let mut compares = Vec::new();
        let mut ops = Vec::with_capacity(chunk.len() + 1);
        let mut set_guard = false;
        if let Some(r) = rollout.take() {
            let k = keys::rollout(&key.0, &key.1);
            ops.push(match r {
                RolloutWrite::Put(r) => {
                    set_guard = true;
                    TxnOp::Put {
                        key: k,
                        value: encode(r),
                        lease: None,
                    }
                }
                RolloutWrite::Delete => TxnOp::Delete { key: k },
            });
        }
        let mut nodes: Vec<&Name> = Vec::new();
        for a in chunk {
            match a {
                Action::Create(pod) => {
                    let k = keys::pod(&pod.namespace, &pod.name);
                    compares.push(Compare::Absent(k.clone()));
                    if !nodes.contains(&&pod.node) {
                        nodes.push(&pod.node);
                    }
                    set_guard = true;
                    ops.push(TxnOp::Put {
                        key: k,
                        value: encode(pod),
                        lease: None,
                    });
                }
                Action::Delete { pod, .. } => ops.push(TxnOp::Delete {
                    key: keys::pod(&pod.0, &pod.1),
                }),
            }
        }
        if set_guard {
            compares.push(Compare::Exists(rs_key.clone()));
        }
        nodes.sort();
        compares.extend(nodes.into_iter().map(|n| Compare::Exists(keys::node(n))));
        parts.push(Part { compares, ops });
    }
    parts
}

/// The write of `key`'s problem report: the sentence under the election
/// lease, or its deletion when the set has no problem.
pub fn problem_part(key: &ObjectKey, problem: Option<&ReplicaSetProblem>, lease: LeaseId) -> Part {
    let k = keys::problem(&key.0, &key.1);
    let op = match problem {
        Some(p) => TxnOp::Put {
            key: k,
            value: encode(p),
            lease: Some(lease),
        },
        None => TxnOp::Delete { key: k },
    };
    Part {
        compares: Vec::new(),
        ops: vec![op],
    }
}

/// One transaction of [`pack`] and the parts it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub txn: Txn,
    /// The `id`s of the parts in it, in order.
    pub sets: Vec<usize>,
}

fn op_key(op: &TxnOp) -> &str {
    match op {
        TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
    }
}

/// Packs `parts` (each with the caller's id) into transactions, in order,
/// each starting with `fence` and holding at most `max_ops` compares and
/// `max_ops` operations. A compare two parts share (a node's presence) is
/// made once per transaction. A part too big for an empty transaction gets
/// one of its own (etcd then refuses it, as it would alone).
pub fn pack(fence: &Compare, parts: Vec<(usize, Part)>, max_ops: usize) -> Vec<Packed> {
    let mut out: Vec<Packed> = Vec::new();
    let mut cur: Option<(Packed, HashSet<String>, HashSet<String>)> = None;
    for (id, part) in parts {
        let fits = |c: &(Packed, HashSet<String>, HashSet<String>)| {
            let (p, compared, written) = c;
            let new_compares = part
                .compares
                .iter()
                .filter(|k| !compared.contains(&compare_id(k)))
                .count();
            p.txn.compares.len() + new_compares <= max_ops
                && p.txn.success.len() + part.ops.len() <= max_ops
                && part.ops.iter().all(|o| !written.contains(op_key(o)))
        };
        if let Some(c) = &cur
            && !fits(c)
        {
            out.push(cur.take().expect("checked").0);
        }
        let c = cur.get_or_insert_with(|| {
            (
                Packed {
                    txn: Txn {
                        compares: vec![fence.clone()],
                        success: Vec::new(),
                        failure: Vec::new(),
                    },
                    sets: Vec::new(),
                },
                HashSet::from([compare_id(fence)]),
                HashSet::new(),
            )
        });
        for cmp in part.compares {
            if c.1.insert(compare_id(&cmp)) {
                c.0.txn.compares.push(cmp);
            }
        }
        for op in part.ops {
            c.2.insert(op_key(&op).to_owned());
            c.0.txn.success.push(op);
        }
        c.0.sets.push(id);
    }
    out.extend(cur.map(|c| c.0));
    out
}

/// A compare as a string, to find the same one twice.
fn compare_id(c: &Compare) -> String {
    match c {
        Compare::ModRevision(k, r) => format!("m{r} {k}"),
        Compare::Absent(k) => format!("a {k}"),
        Compare::Exists(k) => format!("e {k}"),
    }
}

#[cfg(test)]
mod tests;
