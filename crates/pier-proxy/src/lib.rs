//! pier-proxy: the L4 data path of a pier node.
//!
//! It owns the `pier0` link and its VIPs ([`setup_iface`],
//! [`teardown_iface`]), one listener per service port on its VIP and per
//! node port, the balancers (P2C over outstanding connections weighted by
//! a decaying connect-latency EWMA, or round-robin; a connect through the
//! mesh gives no latency sample, since its cost is the peer's pool's, not
//! the endpoint's, so mesh endpoints are balanced by outstanding
//! connections alone), connect retries, passive outlier ejection, drains, the splice(2) copy loop, PROXY protocol v2 and the
//! mTLS mesh hop to endpoints on other nodes ([`mesh`], [`tls`]); UDP
//! service ports as per-client flows with an idle timeout, over the mesh
//! as length-prefixed datagrams; session affinity by client IP
//! (rendezvous hashing, then a pin).
//!
//! It is not a store client: it reads a `watch::Receiver<Arc<Snapshot>>`
//! and publishes problems and stats for the agent to write. It is not an
//! HTTP proxy: it never looks inside the bytes.

pub mod mesh;
pub mod relay_tls;
pub mod tls;

mod affinity;
mod balance;
mod config;
mod conn;
mod copy;
mod error;
mod iface;
mod limit;
mod metrics;
pub mod ppv2;
mod server;
mod udp;

pub use config::{MAX_CONNECT_ATTEMPTS, ProxyConfig};
pub use copy::spliced_directions;
pub use error::{ConnectCause, ProxyError, Side};
pub use iface::{setup_iface, teardown_iface};
pub use server::{ListenerSource, Problems, Proxy, StatsMap};
