//! Every packet goes through pier-dns's synchronous request path (the one
//! the UDP and TCP loops call) over UDP and TCP, from an allowed and a
//! refused client. `fuzz_one` asserts the invariants: no panic, any reply
//! is well-formed, echoes the ID, and fits the UDP limit.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pier_dns::zone::{Zone, sample_zone};

static ZONE: OnceLock<Zone> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let zone = ZONE.get_or_init(sample_zone);
    pier_dns::engine::fuzz_one(zone, data);
});
