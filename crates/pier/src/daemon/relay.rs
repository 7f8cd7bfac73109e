//! Watch relays in the agent (ARCHITECTURE "Watch relays"): the glue
//! between `pier_store::relay` (the cache, the wire, the client store) and
//! `pier_proxy::relay_tls` (the mesh certificates over TLS).
//!
//! - `[relay]`: [`serve`] starts the [`Relay`] on etcd, gives this agent's
//!   own reflector its in-process `local_store` (one etcd watcher per relay
//!   host, not two), and accepts clients on `relay.listen` (bound through
//!   the keeper, as the mesh is: a successor takes the same socket over).
//! - `store.relays`: [`relayed`] is the agent's store, listing and watching
//!   `keys::ROOT` through the relays, dialled by [`MeshDial`]; everything
//!   else (leases, writes, other watches) goes to etcd.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use anyhow::{Context, Result};
use pier_model::Name;
use pier_proxy::relay_tls::{RelayAcceptor, RelayDialer};
use pier_store::Store;
use pier_store::relay::{ClientStats, Dial, Relay, RelayIo, RelayOptions};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::config::Config;
use super::sockets::Sockets;

/// A relay client's way to its relays: TCP, then TLS with this node's mesh
/// certificate (the relay must show a node certificate of the same CA).
#[derive(Debug)]
pub(super) struct MeshDial(RelayDialer);

#[async_trait::async_trait]
impl Dial for MeshDial {
    async fn dial(&self, relay: &str) -> std::io::Result<Box<dyn RelayIo>> {
        let (stream, node) = self.0.dial(relay).await?;
        debug!(relay, relay.node = %node, "relay: connected");
        Ok(Box::new(stream))
    }
}

/// The relay this agent serves: stopped with the control plane (at a
/// shutdown and at a handoff, when the successor's takes over the socket).
pub(super) struct Serving {
    pub cancel: CancellationToken,
    pub done: JoinHandle<()>,
}

/// The store the agent runs on, given etcd (`upstream`): the relay's local
/// store with `[relay]`, the relayed store with `store.relays`, else etcd.
pub(super) fn wrap_store(
    cfg: &Config,
    node: &Name,
    upstream: Arc<dyn Store>,
    sockets: &Sockets,
    registry: &mut Registry,
) -> Result<(Arc<dyn Store>, Option<Serving>)> {
    if let Some(rc) = &cfg.relay {
        // Validated: [relay] comes with [mesh].
        let mesh = cfg.mesh.as_ref().context("[relay] needs [mesh]")?;
        let acceptor = RelayAcceptor::new(mesh, node.clone(), registry)
            .context("loading the mesh certificates for the relay listener")?;
        let listener = sockets
            .tcp(rc.listen, || std::net::TcpListener::bind(rc.listen))
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("binding the watch relay on {}", rc.listen))?;
        let cancel = CancellationToken::new();
        let relay = Relay::start(upstream, RelayOptions::default(), cancel.clone());
        registry.register_collector(Box::new(RelayMetrics(Arc::downgrade(&relay))));
        let store = relay.local_store();
        let c = cancel.clone();
        let done = tokio::spawn(async move {
            acceptor
                .run(listener, c, move |stream, peer| {
                    relay.clone().serve(stream, peer)
                })
                .await;
        });
        info!(listen = %rc.listen, "watch relay: serving this agent and the agents that name it in store.relays");
        return Ok((store, Some(Serving { cancel, done })));
    }
    if !cfg.store.relays.is_empty() {
        let mesh = cfg.mesh.as_ref().context("store.relays needs [mesh]")?;
        let dialer = RelayDialer::new(mesh, node.clone(), registry)
            .context("loading the mesh certificates for the relay client")?;
        let relays = spread(&cfg.store.relays, node.as_str());
        info!(relays = ?relays, "listing and watching the store through watch relays, in this order (leases and writes go to etcd)");
        let (store, stats) =
            pier_store::relay::relayed_with_stats(upstream, relays, Arc::new(MeshDial(dialer)));
        registry.register_collector(Box::new(ClientMetrics(stats)));
        return Ok((store, None));
    }
    Ok((upstream, None))
}

/// `relays` rotated to start at the one `node` picks (FNV-1a of the name,
/// stable across processes and versions, as the etcd members are picked):
/// with the same list on every host, the hosts spread over the relays
/// instead of all watching through the first.
fn spread(relays: &[String], node: &str) -> Vec<String> {
    let h = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let n = relays.len().max(1) as u64;
    let start = (h % n) as usize;
    relays[start..]
        .iter()
        .chain(&relays[..start])
        .cloned()
        .collect()
}

/// A relay's state on each scrape (`pier_relay_*`; `pier_relay_clients`
/// and the refusals are the TLS listener's).
#[derive(Debug)]
struct RelayMetrics(Weak<Relay>);

impl Collector for RelayMetrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(relay) = self.0.upgrade() else {
            return Ok(());
        };
        let st = relay.stats();
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        for (name, help, v) in [
            (
                "relay_live",
                "1 while the relay has listed etcd and its watch of etcd is live (it serves lists and new watches), else 0",
                i64::from(st.synced && st.live),
            ),
            (
                "relay_revision",
                "The etcd revision the relay's view is at",
                st.revision,
            ),
            (
                "relay_history_from",
                "The oldest revision a client may resume a watch from on this relay",
                st.history_from,
            ),
            (
                "relay_history_events",
                "Events in the relay's history",
                n(st.history_events),
            ),
            (
                "relay_history_bytes",
                "The relay's history, encoded, in bytes",
                n(st.history_bytes),
            ),
            ("relay_keys", "Keys in the relay's view", n(st.keys)),
            (
                "relay_view_bytes",
                "The relay's view's keys and values, in bytes",
                n(st.map_bytes),
            ),
        ] {
            gauge(&mut enc, name, help, v)?;
        }
        Ok(())
    }
}

/// A host's relayed store on each scrape (`pier_store_relay_*`): whether
/// it is on etcd directly, and its watches' breaks and moves.
#[derive(Debug)]
struct ClientMetrics(Arc<ClientStats>);

impl Collector for ClientMetrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.0;
        let on_etcd = s.watches_on_etcd.load(Ordering::Relaxed);
        gauge(
            &mut enc,
            "store_relay_watches_on_etcd",
            "This host's watches of the store on etcd directly, every watch relay having failed (0 while on relays)",
            i64::try_from(on_etcd).unwrap_or(i64::MAX),
        )?;
        for (name, help, v) in [
            (
                "store_relay_lists_on_etcd",
                "Lists of the store that went to etcd directly, every watch relay having failed",
                &s.lists_on_etcd,
            ),
            (
                "store_relay_watch_breaks",
                "Breaks of this host's store watch (a relay crashed, went silent or was cut off), each one a stale snapshot until the watch resumes",
                &s.watch_breaks,
            ),
            (
                "store_relay_watch_moves",
                "Watches moved to another relay (or the same address's successor) at once at a relay's orderly stop, with no break",
                &s.watch_moves,
            ),
        ] {
            let c = ConstCounter::new(v.load(Ordering::Relaxed));
            let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        Ok(())
    }
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Serving {
    /// Stops accepting and cuts the relay's clients (they move to another
    /// relay, or etcd, and resume from their revision).
    pub(super) async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.done.await {
            error!(error = %e, "watch relay listener task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's counters, as `/metrics` shows them with the agent's
    /// prefix.
    #[test]
    fn client_metrics_are_encoded_with_their_names() {
        let stats = Arc::new(ClientStats::default());
        stats.watches_on_etcd.store(1, Ordering::Relaxed);
        stats.watch_breaks.store(3, Ordering::Relaxed);
        stats.watch_moves.store(2, Ordering::Relaxed);
        stats.lists_on_etcd.store(4, Ordering::Relaxed);
        let mut reg = Registry::with_prefix("pier");
        reg.register_collector(Box::new(ClientMetrics(stats)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            "pier_store_relay_watches_on_etcd 1",
            "pier_store_relay_watch_breaks_total 3",
            "pier_store_relay_watch_moves_total 2",
            "pier_store_relay_lists_on_etcd_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    /// Every relay kept, in the list's cyclic order, from a start the name
    /// fixes; 300 hosts with one list spread over 3 relays about evenly.
    #[test]
    fn hosts_spread_over_the_relays() {
        let relays: Vec<String> = ["a:7444", "b:7444", "c:7444"].map(String::from).into();
        let mut first = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..300 {
            let node = format!("host-{i}");
            let got = spread(&relays, &node);
            assert_eq!(got, spread(&relays, &node), "not stable");
            let start = relays.iter().position(|r| *r == got[0]).unwrap();
            let want: Vec<String> = (0..3).map(|k| relays[(start + k) % 3].clone()).collect();
            assert_eq!(got, want, "{node}");
            *first.entry(got[0].clone()).or_default() += 1;
        }
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(
            first.values().all(|&n| (70..=130).contains(&n)),
            "{first:?}"
        );
        assert_eq!(spread(&relays[..1], "x"), relays[..1].to_vec());
        assert!(spread(&[], "x").is_empty());
    }
}
