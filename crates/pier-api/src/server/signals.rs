//! `GET /api/v1/signals[?watch=true]`: each service's traffic (every
//! node's `stats/` record summed) and each replica set's autoscaler
//! decisions (`autoscale/`), for the dashboard. These records are not in
//! the snapshot, so this read goes to the store: a list of both prefixes,
//! then (with `watch=true`) a store watch of each from the list's revision,
//! as JSON lines like the other watches. A broken store watch ends the
//! stream; the client lists again by reconnecting.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use pier_model::api::{AutoscaleSignal, Signal, TrafficView, WatchEventType};
use pier_model::autoscale::AutoscaleStatus;
use pier_model::keys::{self, Key};
use pier_model::sketch::Sketch;
use pier_model::{Name, Namespace, Stats};
use pier_store::{KeyValue, WatchEvent, WatchItem};

use super::Inner;
use super::plumbing::{Body, Fail, json};
use super::watch::{END_OF_CURRENT, WATCH_HEARTBEAT};

/// Every node's latest record, per service.
type StatsMap = BTreeMap<(Namespace, Name), BTreeMap<Name, Stats>>;

/// A service's records summed: the view the dashboard charts. Pure.
pub(crate) fn traffic_view(
    ns: &Namespace,
    svc: &Name,
    recs: &BTreeMap<Name, Stats>,
) -> TrafficView {
    let mut fb = Sketch::default();
    let mut v = TrafficView {
        namespace: ns.clone(),
        service: svc.clone(),
        at: 0,
        nodes: 0,
        active: 0,
        conn_rate: 0.0,
        connect_errors: 0,
        p50_first_byte_ms: None,
        p99_first_byte_ms: None,
    };
    for s in recs.values() {
        v.nodes += 1;
        v.at = v.at.max(s.at);
        v.active += s.active;
        v.conn_rate += s.conn_rate();
        v.connect_errors += s.connect_errors;
        fb.merge(&s.first_byte);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    v.p50_first_byte_ms = fb.quantile(0.5).map(ms);
    v.p99_first_byte_ms = fb.quantile(0.99).map(ms);
    v
}

/// What one store record changes: the signal to send, `None` for a key
/// this stream does not show or a value that does not parse (logged).
fn apply(stats: &mut StatsMap, ev: &WatchEvent) -> Option<(WatchEventType, Signal)> {
    let (key, value) = match ev {
        WatchEvent::Put(kv) => (kv.key.as_str(), Some(kv.value.as_slice())),
        WatchEvent::Delete { key, .. } => (key.as_str(), None),
    };
    match Key::parse(key) {
        Ok(Key::Stats {
            namespace,
            service,
            node,
        }) => {
            let k = (namespace, service);
            match value {
                Some(v) => match pier_model::decode::<Stats>(key, v) {
                    Ok(st) => {
                        let m = stats.entry(k.clone()).or_default();
                        let t = if m.is_empty() {
                            WatchEventType::Added
                        } else {
                            WatchEventType::Modified
                        };
                        m.insert(node, st);
                        Some((t, Signal::Traffic(traffic_view(&k.0, &k.1, m))))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stats record skipped");
                        None
                    }
                },
                None => {
                    let m = stats.get_mut(&k)?;
                    m.remove(&node)?;
                    let v = traffic_view(&k.0, &k.1, m);
                    if m.is_empty() {
                        stats.remove(&k);
                        Some((WatchEventType::Deleted, Signal::Traffic(v)))
                    } else {
                        Some((WatchEventType::Modified, Signal::Traffic(v)))
                    }
                }
            }
        }
        Ok(Key::Autoscale(namespace, replicaset)) => {
            let st = match value {
                Some(v) => match pier_model::decode::<AutoscaleStatus>(key, v) {
                    Ok(st) => st,
                    Err(e) => {
                        tracing::warn!(error = %e, "autoscale record skipped");
                        return None;
                    }
                },
                None => AutoscaleStatus::default(),
            };
            let t = if value.is_some() {
                WatchEventType::Modified
            } else {
                WatchEventType::Deleted
            };
            Some((
                t,
                Signal::Autoscale(AutoscaleSignal {
                    namespace,
                    replicaset,
                    decisions: st.decisions,
                    total: st.total,
                }),
            ))
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "not a stats or autoscale key; skipped");
            None
        }
    }
}

/// A store watch that can sit in a response body (which must be `Sync`):
/// it is only ever polled through `&mut`, so the mutex is never contended.
struct SyncWatch(std::sync::Mutex<pier_store::WatchStream>);

impl futures::Stream for SyncWatch {
    type Item = Result<WatchItem, pier_store::StoreError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .poll_next_unpin(cx)
    }
}

fn line(t: WatchEventType, s: &Signal) -> Bytes {
    let mut b = serde_json::to_vec(&serde_json::json!({"type": t, "object": s}))
        .expect("signals serialize");
    b.push(b'\n');
    Bytes::from(b)
}

/// The current signals from both lists, and the lists' revisions.
async fn initial(inner: &Inner) -> Result<(StatsMap, Vec<Signal>, i64, i64), Fail> {
    let store = &inner.st.store;
    let stats_list = store.list(keys::prefix::STATS).await?;
    let auto_list = store.list(keys::prefix::AUTOSCALE).await?;
    let mut stats = StatsMap::new();
    let mut out = Vec::new();
    let put = |kv: &KeyValue| WatchEvent::Put(kv.clone());
    for kv in &stats_list.kvs {
        apply(&mut stats, &put(kv));
    }
    for ((ns, svc), m) in &stats {
        out.push(Signal::Traffic(traffic_view(ns, svc, m)));
    }
    for kv in &auto_list.kvs {
        if let Some((_, s)) = apply(&mut stats, &put(kv)) {
            out.push(s);
        }
    }
    Ok((stats, out, stats_list.revision, auto_list.revision))
}

pub(super) async fn signals(
    inner: &Arc<Inner>,
    watch: bool,
    peer: std::net::IpAddr,
) -> Result<Response<Body>, Fail> {
    if !watch {
        let (_, out, _, _) = initial(inner).await?;
        return Ok(json(StatusCode::OK, &out));
    }
    let slot = inner
        .watches
        .take(peer)
        .map_err(|m| Fail::new(StatusCode::TOO_MANY_REQUESTS, m))?;
    let (stats, out, r1, r2) = initial(inner).await?;
    let store = &inner.st.store;
    let w1 = store.watch(keys::prefix::STATS, r1 + 1).await?;
    let w2 = store.watch(keys::prefix::AUTOSCALE, r2 + 1).await?;
    struct S {
        events: futures::stream::Select<SyncWatch, SyncWatch>,
        stats: StatsMap,
        pending: VecDeque<Bytes>,
        cancel: tokio_util::sync::CancellationToken,
        _slot: crate::guard::WatchSlot,
    }
    let s = S {
        events: futures::stream::select(
            SyncWatch(std::sync::Mutex::new(w1)),
            SyncWatch(std::sync::Mutex::new(w2)),
        ),
        stats,
        pending: out
            .iter()
            .map(|s| line(WatchEventType::Added, s))
            .chain([Bytes::from_static(END_OF_CURRENT)])
            .collect(),
        cancel: inner.cancel.clone(),
        _slot: slot,
    };
    let stream = futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(b) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Frame::data(b)), s));
            }
            let item = tokio::select! {
                _ = s.cancel.cancelled() => return None,
                it = s.events.next() => it,
                _ = tokio::time::sleep(WATCH_HEARTBEAT) => {
                    return Some((Ok(Frame::data(Bytes::from_static(b"\n"))), s));
                }
            };
            match item {
                Some(Ok(WatchItem::Events { events, .. })) => {
                    for ev in &events {
                        if let Some((t, sig)) = apply(&mut s.stats, ev) {
                            s.pending.push_back(line(t, &sig));
                        }
                    }
                }
                Some(Ok(WatchItem::Disconnected { .. } | WatchItem::Resumed)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "signals watch ended; the client lists again");
                    return None;
                }
                None => return None,
            }
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(active: u64, new_conns: u64, errors: u64, fb_us: &[u64]) -> Stats {
        let mut counts = vec![0u64; pier_model::sketch::BUCKETS];
        for us in fb_us {
            counts[pier_model::sketch::bucket(*us)] += 1;
        }
        Stats {
            active,
            new_conns,
            window_ms: 1000,
            connect_errors: errors,
            at: 5,
            first_byte: Sketch::from_counts(&counts),
            ..Stats::default()
        }
    }

    #[test]
    fn traffic_sums_nodes_and_merges_sketches() {
        let ns = Namespace::default();
        let svc = Name::new("web").unwrap();
        let mut m = BTreeMap::new();
        // Node a: 99 fast answers; node b: one slow one. The p99 is over
        // both (an average of the nodes' p99s would say ~50 ms).
        m.insert(Name::new("a").unwrap(), stats(3, 10, 1, &[1000; 99]));
        m.insert(Name::new("b").unwrap(), stats(2, 5, 2, &[100_000]));
        let v = traffic_view(&ns, &svc, &m);
        assert_eq!((v.nodes, v.active, v.connect_errors), (2, 5, 3));
        assert!((v.conn_rate - 15.0).abs() < 1e-9);
        let p50 = v.p50_first_byte_ms.unwrap();
        assert!((p50 - 1.0).abs() < 0.07, "{p50}");
        let p99 = v.p99_first_byte_ms.unwrap();
        assert!((p99 - 1.0).abs() < 0.07, "{p99}: the 99th of 100 is fast");
        m.insert(Name::new("b").unwrap(), stats(2, 5, 2, &[100_000; 2]));
        let p99 = traffic_view(&ns, &svc, &m).p99_first_byte_ms.unwrap();
        assert!((p99 - 100.0).abs() < 6.5, "{p99}");
        let idle = traffic_view(&ns, &svc, &BTreeMap::new());
        assert_eq!((idle.nodes, idle.p99_first_byte_ms), (0, None));
    }

    #[test]
    fn records_come_and_go() {
        let mut st = StatsMap::new();
        let ns = Namespace::default();
        let (web, a, b) = (
            Name::new("web").unwrap(),
            Name::new("a").unwrap(),
            Name::new("b").unwrap(),
        );
        let put = |node: &Name, s: &Stats| {
            WatchEvent::Put(KeyValue {
                key: keys::stats(&ns, &web, node),
                value: serde_json::to_vec(s).unwrap(),
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: None,
            })
        };
        let del = |node: &Name| WatchEvent::Delete {
            key: keys::stats(&ns, &web, node),
            mod_revision: 2,
        };
        let (t, _) = apply(&mut st, &put(&a, &stats(1, 0, 0, &[]))).unwrap();
        assert_eq!(t, WatchEventType::Added);
        let (t, s) = apply(&mut st, &put(&b, &stats(4, 0, 0, &[]))).unwrap();
        assert_eq!(t, WatchEventType::Modified);
        let Signal::Traffic(v) = s else { panic!() };
        assert_eq!(v.active, 5);
        let (t, _) = apply(&mut st, &del(&a)).unwrap();
        assert_eq!(t, WatchEventType::Modified);
        let (t, _) = apply(&mut st, &del(&b)).unwrap();
        assert_eq!(t, WatchEventType::Deleted);
        assert!(
            apply(&mut st, &del(&b)).is_none(),
            "a second delete is nothing"
        );
        // A value that does not parse is skipped, not a crash.
        let bad = WatchEvent::Put(KeyValue {
            key: keys::stats(&ns, &web, &a),
            value: b"{".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        });
        assert!(apply(&mut st, &bad).is_none());
        // Autoscale records.
        let ak = keys::autoscale(&ns, &web);
        let ev = WatchEvent::Put(KeyValue {
            key: ak.clone(),
            value: serde_json::to_vec(&AutoscaleStatus::default()).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        });
        assert!(matches!(
            apply(&mut st, &ev),
            Some((WatchEventType::Modified, Signal::Autoscale(_)))
        ));
    }
}
