//! End-to-end scenarios against a real dockerd, real stores and the real
//! `pier` binary. One test binary; each module is one scenario family.

mod apps;
mod autoscale;
mod dashboard;
mod demo;
mod dns;
mod ipv6;
mod orphan;
mod resolve;
mod restart;
mod rollout;
mod store_pause;
mod udp;
