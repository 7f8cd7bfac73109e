//! pier-agent integration tests: one binary, against the real dockerd and
//! real stores (embedded in a temp dir; etcd for the process tests).

mod discovery;
mod harness;
mod pods;
mod process;
