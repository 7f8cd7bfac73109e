//! `?watch=true`: a chunked stream of JSON lines that follows the snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use pier_model::Snapshot;
use pier_model::api::{Resource, WatchEventType};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Inner;
use super::plumbing::Body;
use crate::guard::WatchSlot;
use crate::views::{self, Filter};

/// 30 s between blank lines on an idle watch.
pub(super) const WATCH_HEARTBEAT: Duration = Duration::from_secs(30);

/// The blank line after a watch's first batch (the objects as they are):
/// what follows it is news. Clients skip blank lines (they are also the
/// heartbeat); the dashboard ends its quiet first batch on this one.
pub(super) const END_OF_CURRENT: &[u8] = b"\n";

/// A chunked stream of JSON lines: first the current objects as ADDED, then
/// one blank line (the end of the current state: a client can tell the
/// objects that were there from the ones that came later without guessing
/// from timing), then every change as the snapshot moves, with a blank
/// line now and then when idle. Ends when the client goes away or the
/// server shuts down.
///
/// Cost: snapshots are coalesced (a slow watcher sees only the latest), and
/// a new snapshot is rebuilt and diffed only when a map this view reads was
/// replaced ([`views::unchanged`]): a pod flapping costs a services watch,
/// or an endpoints watch of another service, a few pointer compares.
pub(super) fn watch_response(
    inner: Arc<Inner>,
    kind: Resource,
    f: Filter,
    slot: WatchSlot,
) -> Response<Body> {
    struct W {
        rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
        cancel: CancellationToken,
        last: Option<BTreeMap<String, Value>>,
        /// The snapshot `last` was built from.
        last_snap: Option<Arc<Snapshot>>,
        pending: VecDeque<Bytes>,
        kind: Resource,
        f: Filter,
        /// Given back when the stream is dropped.
        _slot: WatchSlot,
    }
    fn line(t: WatchEventType, v: &Value) -> Bytes {
        let mut b = serde_json::to_vec(&serde_json::json!({"type": t, "object": v}))
            .expect("watch events serialize");
        b.push(b'\n');
        Bytes::from(b)
    }
    let w = W {
        rx: inner.st.snapshot.clone(),
        cancel: inner.cancel.clone(),
        last: None,
        last_snap: None,
        pending: VecDeque::new(),
        kind,
        f,
        _slot: slot,
    };
    let stream = futures::stream::unfold(w, |mut w| async move {
        loop {
            if let Some(b) = w.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Frame::data(b)), w));
            }
            if w.last.is_some() {
                tokio::select! {
                    _ = w.cancel.cancelled() => return None,
                    r = w.rx.changed() => if r.is_err() { return None },
                    // A blank line now and then: writing is how a client
                    // that went away without closing is noticed.
                    _ = tokio::time::sleep(WATCH_HEARTBEAT) => {
                        return Some((Ok(Frame::data(Bytes::from_static(b"\n"))), w));
                    }
                }
            }
            let snap = w.rx.borrow_and_update().clone();
            if let Some(old) = &w.last_snap
                && views::unchanged(w.kind, &w.f, old, &snap)
            {
                continue;
            }
            let now = views::collect(w.kind, &snap, &w.f);
            let first = w.last.is_none();
            let old = w.last.take().unwrap_or_default();
            for (k, v) in &now {
                match old.get(k) {
                    None => w.pending.push_back(line(WatchEventType::Added, v)),
                    Some(o) if o != v => w.pending.push_back(line(WatchEventType::Modified, v)),
                    Some(_) => {}
                }
            }
            for (k, v) in &old {
                if !now.contains_key(k) {
                    w.pending.push_back(line(WatchEventType::Deleted, v));
                }
            }
            if first {
                w.pending.push_back(Bytes::from_static(END_OF_CURRENT));
            }
            w.last = Some(now);
            w.last_snap = Some(snap);
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}
