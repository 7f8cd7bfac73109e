//! pier-dns against real sockets on 127.0.0.1 and real DNS clients (hickory's
//! wire codec over UDP/TCP, and `dig`).

mod container;
mod forwarding;
mod harness;
mod protocol;
mod records;
