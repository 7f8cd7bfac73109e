//! The mesh's TLS 1.3 record opener, fed a scripted stream of sealed
//! records (any inner plaintext, padding and content type, bad headers),
//! raw bytes and bit flips. `open_records` asserts the invariants: no
//! panic, records and plaintext within bounds (at most 2^14 bytes), and
//! every clean record opening to what was sealed or refused as it must be.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pier_proxy::mesh::fuzzing::open_records(data);
});
