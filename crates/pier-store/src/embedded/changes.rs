//! A transaction applied to an overlay ([`Changes`]) over the committed
//! [`State`](super::State): compares, puts, deletes, lease grants and
//! revokes, with etcd's revision rules. Nothing here touches the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{State, no_lease_zero};
use crate::{Compare, KeyValue, LeaseId, Revision, StoreError, Ttl, Txn, TxnOp, WatchEvent};

pub(crate) struct TxnOutcome {
    pub(crate) succeeded: bool,
    pub(crate) revision: Revision,
    pub(crate) deleted: usize,
}

/// The changes of one batch, over the committed state.
#[derive(Default)]
pub(crate) struct Changes {
    pub(crate) kvs: BTreeMap<String, Option<KeyValue>>,
    /// `Some(ttl)`: granted in this batch; `None`: revoked.
    pub(crate) leases: HashMap<LeaseId, Option<Ttl>>,
    pub(crate) revision: Revision,
    pub(crate) events: Vec<(Revision, Vec<WatchEvent>)>,
}

impl Changes {
    pub(super) fn is_empty(&self) -> bool {
        self.kvs.is_empty() && self.leases.is_empty()
    }

    pub(super) fn kv<'a>(&'a self, base: &'a State, key: &str) -> Option<&'a KeyValue> {
        match self.kvs.get(key) {
            Some(v) => v.as_ref(),
            None => base.kvs.get(key),
        }
    }

    pub(super) fn lease_exists(&self, base: &State, id: LeaseId) -> bool {
        match self.leases.get(&id) {
            Some(v) => v.is_some(),
            None => base.leases.contains_key(&id),
        }
    }

    pub(super) fn lease_keys(&self, base: &State, id: LeaseId) -> BTreeSet<String> {
        let mut keys = base
            .leases
            .get(&id)
            .map(|l| l.keys.clone())
            .unwrap_or_default();
        for (key, kv) in &self.kvs {
            match kv {
                Some(kv) if kv.lease == Some(id) => keys.insert(key.clone()),
                _ => keys.remove(key),
            };
        }
        keys
    }

    pub(super) fn apply_txn(&mut self, base: &State, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        let succeeded = txn.compares.iter().all(|c| match c {
            Compare::ModRevision(key, rev) => {
                self.kv(base, key).map_or(0, |kv| kv.mod_revision) == *rev
            }
            Compare::Absent(key) => self.kv(base, key).is_none(),
            Compare::Exists(key) => self.kv(base, key).is_some(),
        });
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // Validate everything first: a txn applies whole or not at all.
        let mut seen = BTreeSet::new();
        for op in ops {
            let (key, lease) = match op {
                TxnOp::Put { key, lease, .. } => (key, no_lease_zero(*lease)),
                TxnOp::Delete { key } => (key, None),
            };
            if key.is_empty() {
                return Err(StoreError::Invalid("key is not provided".into()));
            }
            if !seen.insert(key.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "duplicate key {key:?} given in txn request"
                )));
            }
            if let Some(lease) = lease
                && !self.lease_exists(base, lease)
            {
                return Err(StoreError::LeaseNotFound(lease));
            }
        }
        let rev = self.revision + 1;
        let mut events = Vec::new();
        let mut deleted = 0;
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let prev = self.kv(base, key);
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.map_or(1, |p| p.version + 1),
                        lease: no_lease_zero(*lease),
                    };
                    self.kvs.insert(key.clone(), Some(kv.clone()));
                    events.push(WatchEvent::Put(kv));
                }
                TxnOp::Delete { key } => {
                    if self.kv(base, key).is_some() {
                        self.kvs.insert(key.clone(), None);
                        events.push(WatchEvent::Delete {
                            key: key.clone(),
                            mod_revision: rev,
                        });
                        deleted += 1;
                    }
                }
            }
        }
        // etcd bumps the revision only when something changed.
        if !events.is_empty() {
            self.revision = rev;
            self.events.push((rev, events));
        }
        Ok(TxnOutcome {
            succeeded,
            revision: self.revision,
            deleted,
        })
    }

    pub(super) fn revoke(&mut self, base: &State, id: LeaseId) -> Result<(), StoreError> {
        if !self.lease_exists(base, id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let keys = self.lease_keys(base, id);
        self.leases.insert(id, None);
        if !keys.is_empty() {
            // All the lease's keys go in one revision, as in etcd.
            let rev = self.revision + 1;
            let mut events = Vec::with_capacity(keys.len());
            for key in keys {
                self.kvs.insert(key.clone(), None);
                events.push(WatchEvent::Delete {
                    key,
                    mod_revision: rev,
                });
            }
            self.revision = rev;
            self.events.push((rev, events));
        }
        Ok(())
    }
}
