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

use std::sync::Arc;

use anyhow::{Context, Result};
use pier_model::Name;
use pier_proxy::relay_tls::{RelayAcceptor, RelayDialer};
use pier_store::Store;
use pier_store::relay::{Dial, Relay, RelayIo, RelayOptions};
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
        let store = pier_store::relay::relayed(upstream, relays, Arc::new(MeshDial(dialer)));
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
