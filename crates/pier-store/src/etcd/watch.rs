//! One watch ([`WatchTask`]) in its own task: it feeds the stream, reopens
//! a broken one from the revision after the last delivered (yielding
//! `Disconnected` then `Resumed`), and ends with `Compacted` when that
//! revision is gone.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::convert::convert_events;
use super::errors::map_err;
use super::{BACKOFF_MIN, Inner, PROBE_IDLE, PROBE_TIMEOUT, WATCH_BACKOFF_MAX};
use crate::{Revision, StoreError, WatchEvent, WatchItem};

// Built once per watch (re)open; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Opened {
    Open {
        stream: etcd_client::WatchStream,
        header_rev: Revision,
        first: Option<etcd_client::WatchResponse>,
    },
    Compacted(Revision),
}

/// One watch: feeds `tx` until the receiver goes away or the revision to
/// resume from is compacted.
pub(crate) struct WatchTask {
    pub(crate) inner: Arc<Inner>,
    pub(crate) prefix: String,
    /// The revision to resume from: one past the last delivered.
    pub(crate) next: Revision,
    pub(crate) tx: mpsc::Sender<Result<WatchItem, StoreError>>,
}

pub(crate) enum Step {
    /// The stream broke; reopen.
    Broken(String),
    /// The receiver is gone or the watch ended for good.
    Done,
}

impl WatchTask {
    pub(super) async fn run(
        mut self,
        stream: etcd_client::WatchStream,
        first: Option<etcd_client::WatchResponse>,
    ) {
        let mut current = Some((stream, first));
        let mut disconnected = false;
        let mut backoff = BACKOFF_MIN;
        loop {
            let (stream, first) = match current.take() {
                Some(s) => s,
                None => {
                    let opened = tokio::select! {
                        _ = self.tx.closed() => return,
                        r = self.inner.open_watch(&self.prefix, self.next) => r,
                    };
                    match opened {
                        Ok(Opened::Open { stream, first, .. }) => {
                            backoff = BACKOFF_MIN;
                            if disconnected {
                                disconnected = false;
                                tracing::info!(prefix = %self.prefix, from = self.next, "watch resumed");
                                if self.tx.send(Ok(WatchItem::Resumed)).await.is_err() {
                                    return;
                                }
                            }
                            (stream, first)
                        }
                        Ok(Opened::Compacted(c)) => {
                            self.send_compacted(c).await;
                            return;
                        }
                        Err(e) => {
                            if !disconnected {
                                disconnected = true;
                                if !self.send_disconnected(e.to_string()).await {
                                    return;
                                }
                            }
                            tokio::select! {
                                _ = self.tx.closed() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                            continue;
                        }
                    }
                }
            };
            match self.pump(stream, first).await {
                Step::Done => return,
                Step::Broken(reason) => {
                    tracing::warn!(prefix = %self.prefix, from = self.next, "watch broken: {reason}");
                    let idx = self.inner.current.load(Ordering::Relaxed);
                    self.inner.rotate(idx);
                    if !disconnected {
                        disconnected = true;
                        if !self.send_disconnected(reason).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    pub(super) async fn send_disconnected(&self, reason: String) -> bool {
        self.tx
            .send(Ok(WatchItem::Disconnected { reason }))
            .await
            .is_ok()
    }

    pub(super) async fn send_compacted(&self, compact_revision: Revision) {
        let _ = self
            .tx
            .send(Err(StoreError::Compacted {
                requested: self.next,
                compact_revision,
            }))
            .await;
    }

    /// Delivers responses until the stream breaks.
    pub(super) async fn pump(
        &mut self,
        mut stream: etcd_client::WatchStream,
        first: Option<etcd_client::WatchResponse>,
    ) -> Step {
        let mut pending = first;
        // When the stream has been quiet for PROBE_IDLE, ask for a progress
        // notification; no answer within PROBE_TIMEOUT means the member or
        // the path to it is gone (the connection's keep-alive would take
        // 5 s + 5 s to say so).
        let mut probing = false;
        loop {
            let resp = match pending.take() {
                Some(r) => r,
                None => {
                    let quiet = if probing { PROBE_TIMEOUT } else { PROBE_IDLE };
                    let msg = tokio::select! {
                        _ = self.tx.closed() => return Step::Done,
                        m = stream.message() => m,
                        _ = tokio::time::sleep(quiet) => {
                            if probing {
                                return Step::Broken(format!(
                                    "no answer to a progress request in {PROBE_TIMEOUT:?}"
                                ));
                            }
                            match tokio::time::timeout(PROBE_TIMEOUT, stream.request_progress()).await {
                                Ok(Ok(())) => probing = true,
                                Ok(Err(e)) => return Step::Broken(map_err("watch progress request", e).to_string()),
                                Err(_) => return Step::Broken("could not send a progress request".into()),
                            }
                            continue;
                        }
                    };
                    probing = false;
                    match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Step::Broken("watch stream ended".into()),
                        Err(e) => return Step::Broken(map_err("watch", e).to_string()),
                    }
                }
            };
            if resp.compact_revision() > 0 {
                self.send_compacted(resp.compact_revision()).await;
                return Step::Done;
            }
            if resp.canceled() {
                return Step::Broken(format!("watch canceled by etcd: {}", resp.cancel_reason()));
            }
            let events = convert_events(&resp);
            let Some(last) = events.last() else { continue };
            let revision = match last {
                WatchEvent::Put(kv) => kv.mod_revision,
                WatchEvent::Delete { mod_revision, .. } => *mod_revision,
            };
            if self
                .tx
                .send(Ok(WatchItem::Events { revision, events }))
                .await
                .is_err()
            {
                return Step::Done;
            }
            self.next = revision + 1;
        }
    }
}

/// A `Compacted` error names the revision asked for (etcd's error does not
/// say which); any other error is left as it is.
pub(crate) fn compacted_at(e: StoreError, revision: Revision) -> StoreError {
    match e {
        StoreError::Compacted { .. } => StoreError::Compacted {
            requested: revision,
            compact_revision: revision,
        },
        other => other,
    }
}
