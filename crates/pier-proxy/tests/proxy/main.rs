//! Integration tests of pier-proxy over real sockets on loopback. VIPs are
//! unique addresses in 127.77.0.0/16 (unprivileged mode); snapshots are
//! built by hand and pushed through a watch channel.

mod common;
mod drain;
mod failures;
mod forwarding;
mod iface;
mod listeners;
mod signals;
mod udp;
