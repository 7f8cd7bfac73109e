//! The supervisor against real stores (embedded in a temp dir; etcd for
//! the election), with fake nodes and a fake node agent.

mod batch;
mod election;
mod harness;
mod reconcile;
