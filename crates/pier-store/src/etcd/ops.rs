//! The [`Store`] trait on etcd: each call as etcd requests, through the
//! endpoint rotation and retries of `Inner`; lists paged at one revision.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{DeleteOptions, PutOptions};
use tokio::sync::mpsc;

use super::convert::{convert_compare, convert_kv, convert_op, prefix_end};
use super::errors::{chain, is_lease_not_found};
use super::watch::{Opened, WatchTask, compacted_at};
use super::{EtcdStore, RETRY_BUDGET};
use crate::{
    KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Ttl, Txn, TxnOp, TxnResult,
    WatchStream,
};

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kvs = self
            .inner
            .call(&format!("get {key}"), RETRY_BUDGET, |mut c| async move {
                let mut resp = c.get(key, None).await?;
                Ok(resp.take_kvs())
            })
            .await?;
        Ok(kvs.first().map(convert_kv))
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut kvs = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let (page, more, rev) = self
                .inner
                .list_page(from.clone(), end.clone(), revision)
                .await
                .map_err(|e| compacted_at(e, revision))?;
            if revision == 0 {
                revision = rev;
            }
            let last = page.last().map(|kv| kv.key.clone());
            kvs.extend(page);
            match (more, last) {
                (true, Some(last)) => {
                    from = last.into_bytes();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(ListResult { kvs, revision })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let res = self
            .inner
            .call(&format!("put {key}"), RETRY_BUDGET, |mut c| {
                let value = value.clone();
                async move {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
                    let resp = c.put(key, value, opts).await?;
                    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
                }
            })
            .await;
        match (res, lease) {
            (Err(e), Some(l)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(l)),
            (r, _) => r,
        }
    }

    async fn delete(&self, key: &str) -> Result<(bool, Revision), StoreError> {
        self.inner
            .call(&format!("delete {key}"), RETRY_BUDGET, |mut c| async move {
                let resp = c.delete(key, None::<DeleteOptions>).await?;
                Ok((
                    resp.deleted() > 0,
                    resp.header().map(|h| h.revision()).unwrap_or(0),
                ))
            })
            .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let compares: Vec<_> = txn.compares.iter().map(convert_compare).collect();
        let success: Vec<_> = txn.success.iter().map(convert_op).collect();
        let failure: Vec<_> = txn.failure.iter().map(convert_op).collect();
        let res = self
            .inner
            .call("txn", RETRY_BUDGET, |mut c| {
                let t = etcd_client::Txn::new()
                    .when(compares.clone())
                    .and_then(success.clone())
                    .or_else(failure.clone());
                async move {
                    let resp = c.txn(t).await?;
                    Ok(TxnResult {
                        succeeded: resp.succeeded(),
                        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
                    })
                }
            })
            .await;
        match res {
            Err(e) if is_lease_not_found(&e) => {
                let lease = txn
                    .success
                    .iter()
                    .chain(&txn.failure)
                    .find_map(|op| match op {
                        TxnOp::Put { lease, .. } => *lease,
                        TxnOp::Delete { .. } => None,
                    });
                match lease {
                    Some(l) => Err(StoreError::LeaseNotFound(l)),
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    async fn lease_grant(&self, ttl: Ttl) -> Result<LeaseId, StoreError> {
        let id = self
            .inner
            .call("lease grant", RETRY_BUDGET, |mut c| async move {
                let resp = c.lease_grant(ttl.secs() as i64, None).await?;
                Ok(LeaseId(resp.id()))
            })
            .await?;
        // A keepalive must be able to give up on a silent member and reach
        // another well within the shortest TTL granted.
        let ms = (ttl.as_duration() / 4).as_millis() as u64;
        self.inner
            .keepalive_attempt_ms
            .fetch_min(ms.max(200), Ordering::Relaxed);
        Ok(id)
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<Ttl, StoreError> {
        let attempt =
            Duration::from_millis(self.inner.keepalive_attempt_ms.load(Ordering::Relaxed));
        let slot = self.inner.keepalive_slot(lease);
        // The kept stream first: one message each way. The slot is held
        // only for that, so that a renewal tried meanwhile (the lease
        // keeper tries again while one hangs) opens its own.
        let mut answer = None;
        {
            let mut kept = slot.lock().await;
            kept.used = Instant::now();
            if let Some(mut chan) = kept.chan.take() {
                let endpoint = &self.inner.endpoints[chan.idx];
                match tokio::time::timeout(attempt, chan.renew()).await {
                    Ok(Ok(ttl)) => {
                        answer = Some(ttl);
                        kept.chan = Some(chan);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(
                            "lease keepalive {lease} on {endpoint}: stream broken ({}); opening another",
                            chain(&e)
                        );
                        self.inner.rotate(chan.idx);
                    }
                    Err(_) => {
                        tracing::debug!(
                            "lease keepalive {lease} on {endpoint}: no answer in {attempt:?}; opening another stream"
                        );
                        self.inner.redial(chan.idx, &chan.conn);
                        self.inner.rotate(chan.idx);
                    }
                }
            }
        }
        // None, or it broke: open one on every endpoint at once
        // (etcd-client's open renews once and swallows the answer; the
        // renewal after it gives the TTL).
        let ttl = match answer {
            Some(ttl) => ttl,
            None => {
                let (chan, ttl) = self.inner.open_keepalive(lease, attempt).await?;
                if let Some(chan) = chan {
                    let mut kept = slot.lock().await;
                    if kept.chan.is_none() {
                        kept.chan = Some(chan);
                    }
                }
                ttl
            }
        };
        if ttl <= 0 {
            slot.lock().await.chan = None;
            self.inner.forget_keepalive(lease);
            return Err(StoreError::LeaseNotFound(lease));
        }
        // etcd never reports less than the minimum TTL for a live lease,
        // but be lenient with rounding.
        Ttl::from_secs((ttl as u32).max(Ttl::MIN))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.forget_keepalive(lease);
        self.inner
            .call(
                &format!("lease revoke {lease}"),
                RETRY_BUDGET,
                |mut c| async move {
                    c.lease_revoke(lease.0).await?;
                    Ok(())
                },
            )
            .await
            .map_err(|e| {
                if is_lease_not_found(&e) {
                    StoreError::LeaseNotFound(lease)
                } else {
                    e
                }
            })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (stream, header_rev, first) = match self.inner.open_watch(prefix, from).await? {
            Opened::Open {
                stream,
                header_rev,
                first,
            } => (stream, header_rev, first),
            Opened::Compacted(c) => {
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: c,
                });
            }
        };
        let next = if from > 0 { from } else { header_rev + 1 };
        let (tx, rx) = mpsc::channel(256);
        let task = WatchTask {
            inner: self.inner.clone(),
            prefix: prefix.to_owned(),
            next,
            tx,
        };
        tokio::spawn(task.run(stream, first));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner
            .call(
                &format!("compact {revision}"),
                RETRY_BUDGET,
                |mut c| async move {
                    c.compact(revision, None).await?;
                    Ok(())
                },
            )
            .await
            .map_err(|e| compacted_at(e, revision))
    }
}
