//! The forwarder's handling of an upstream's response (matched against the
//! query's ID and question, checked, patched, cached, read back), minus
//! the sockets. The query is fixed, `www.example.com A` with EDNS; the
//! first input byte picks whether the response gets the right ID and
//! question spliced in (so the fuzzer gets past the matching quickly).
//! `fuzz_response` asserts the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

const ID: u16 = 0x5a17;

fn query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for label in ["www", "example", "com"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    // OPT: root, type 41, payload 1232, no flags, no options.
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    q
}

fuzz_target!(|data: &[u8]| {
    let q = query();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        pier_dns::fuzz_response(&q, ID, rest);
        return;
    }
    // The ID, QR set, one question (the query's, in random case), then the
    // fuzzer's counts and records.
    let question = &q[12..q.len() - 11];
    let mut r = Vec::with_capacity(12 + question.len() + rest.len());
    r.extend_from_slice(&ID.to_be_bytes());
    r.push(0x80 | rest.first().copied().unwrap_or(0));
    r.push(rest.get(1).copied().unwrap_or(0));
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(rest.get(2..8).unwrap_or(&[0; 6]));
    let body = rest.get(8..).unwrap_or(&[]);
    let mut flip = body.iter().copied().cycle();
    for &b in question {
        let upper = mode & 2 == 2 && flip.next().is_some_and(|f| f & 1 == 1);
        r.push(if upper { b.to_ascii_uppercase() } else { b });
    }
    r.extend_from_slice(body);
    pier_dns::fuzz_response(&q, ID, &r);
});
