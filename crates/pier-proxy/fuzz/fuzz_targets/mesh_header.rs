//! The mesh header parser, as the listener runs it, over bytes delivered
//! in fuzzer-chosen chunks. `header` asserts: no panic, it finishes, an
//! accepted header is exactly the encoding of the target it names, and
//! nothing past it is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pier_proxy::mesh::fuzzing::header(data);
});
