//! Entry points for the cargo-fuzz targets in `crates/pier-proxy/fuzz/`:
//! the record opener and the mesh header parser, driven exactly as the
//! tunnel drives them, with the invariants asserted. Not part of the API
//! (`#[doc(hidden)]`); nothing here changes what the mesh does.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::crypto::cipher::{AeadKey, Iv};

use super::record::{
    self, APPLICATION_DATA, Content, HEADER, Keys, MAX_CIPHERTEXT, MAX_PLAIN, MAX_RECORD,
};
use super::{HeaderError, ReadPlain, encode_header, read_header};

const KEY: [u8; 32] = [0x42; 32];
const IV: [u8; 12] = [0x17; 12];
const TAG: usize = 16;

/// Takes bytes off the front of the fuzzer's input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// The sending side: seals any TLSInnerPlaintext the fuzzer gives (any
/// length, any content type, any padding), as a TLS 1.3 peer (or a
/// malicious one holding the keys) could.
struct Sender {
    key: LessSafeKey,
    seq: u64,
}

impl Sender {
    fn seal(&mut self, inner: &[u8], header_override: Option<[u8; 3]>) -> Vec<u8> {
        let ct_len = inner.len() + TAG;
        let mut header = [APPLICATION_DATA, 3, 3, (ct_len >> 8) as u8, ct_len as u8];
        if let Some([t, v0, v1]) = header_override {
            header[0] = t;
            header[1] = v0;
            header[2] = v1;
        }
        let mut n = IV;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        let mut body = inner.to_vec();
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from(header),
                &mut body,
            )
            .expect("seal");
        let mut rec = header.to_vec();
        rec.extend_from_slice(&body);
        rec.extend_from_slice(tag.as_ref());
        rec
    }
}

/// What the opener must make of a sealed, untampered record.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// Application data with this content.
    Data(Vec<u8>),
    Closed,
    /// Anything else: refused (an error), whatever the reason.
    Refused,
}

/// The opener's expected verdict on `inner`, per RFC 8446 §5.2/§5.4 and
/// this layer's rules (alerts other than close_notify, handshake and
/// unknown types end the tunnel; an inner plaintext, padding included,
/// over 2^14 + 1 bytes is refused).
fn expect(inner: &[u8]) -> Expect {
    // The whole TLSInnerPlaintext, padding included (RFC 8446 §5.2).
    if inner.len() > MAX_PLAIN + 1 {
        return Expect::Refused;
    }
    let Some(end) = inner.iter().rposition(|&b| b != 0) else {
        return Expect::Refused;
    };
    let (content, ty) = (&inner[..end], inner[end]);
    match (ty, content) {
        (APPLICATION_DATA, c) => Expect::Data(c.to_vec()),
        (record::ALERT, [_, 0]) => Expect::Closed,
        _ => Expect::Refused,
    }
}

/// Drives the record opener over a stream the fuzzer scripts: sealed
/// records (any inner plaintext, possibly a bad header), raw bytes, bit
/// flips, and a starting sequence number near the AES-GCM record limit.
/// The receiver takes records off the stream as the tunnel does
/// (`record_len`, then `open_record`) until one is refused or the stream
/// ends. Asserts: no panic; a record is never longer than the buffer or
/// [`MAX_RECORD`]; plaintext lies inside its record and is at most
/// [`MAX_PLAIN`] bytes; every untampered record in a clean stream opens
/// to exactly what was sealed, or is refused when it must be.
pub fn open_records(data: &[u8]) {
    let mut input = Input(data);
    let Some(mode) = input.byte() else { return };
    let chacha = mode & 1 == 1;
    // Near the AES-GCM limit (2^24 records) or from 0.
    let start = if mode & 2 == 2 { (1u64 << 24) - 3 } else { 0 };
    let (alg, secrets) = if chacha {
        (
            &aead::CHACHA20_POLY1305,
            ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from(KEY),
                iv: Iv::new(IV),
            },
        )
    } else {
        (
            &aead::AES_256_GCM,
            ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from(KEY),
                iv: Iv::new(IV),
            },
        )
    };
    let mut keys = Keys::new(start, secrets).expect("keys");
    let mut sender = Sender {
        key: LessSafeKey::new(UnboundKey::new(alg, &KEY).expect("key")),
        seq: start,
    };

    // The stream, and per sealed record: where it starts, its expected
    // verdict, and whether the stream is still clean up to its end.
    let mut stream = Vec::new();
    let mut sealed: Vec<(usize, usize, Expect)> = Vec::new();
    let mut clean_until = 0usize;
    let mut clean = true;
    while let Some(op) = input.byte() {
        match op % 4 {
            0 | 3 => {
                let Some(len) = input.u16() else { break };
                let len = usize::from(len) % (MAX_CIPHERTEXT + 64);
                // What the input holds, then a fill byte up to `len`: a
                // short input still makes full-size (and oversized)
                // records.
                let fill = input.byte().unwrap_or(0);
                let mut inner = input.take(len).to_vec();
                inner.resize(len, fill);
                // A header other than application_data, TLS 1.2 (the
                // AAD then differs too).
                let bad_header = (op % 4 == 3)
                    .then(|| [input.byte().unwrap_or(0), 3, 3])
                    .filter(|h| h[0] != APPLICATION_DATA);
                let rec = sender.seal(&inner, bad_header);
                // Refused: a bad header, a ciphertext over the limit, or
                // a record past the key's limit.
                let verdict = if bad_header.is_some()
                    || inner.len() + TAG > MAX_CIPHERTEXT
                    || keys_limit_reached(chacha, sender.seq - 1)
                {
                    Expect::Refused
                } else {
                    expect(&inner)
                };
                sealed.push((stream.len(), rec.len(), verdict));
                stream.extend_from_slice(&rec);
                if clean {
                    clean_until = stream.len();
                }
            }
            1 => {
                let n = usize::from(input.byte().unwrap_or(0));
                stream.extend_from_slice(input.take(n));
                clean = false;
            }
            _ => {
                let at = usize::from(input.u16().unwrap_or(0));
                if !stream.is_empty() {
                    let i = at % stream.len();
                    stream[i] ^= 1 << (at % 8);
                }
                clean = false;
                clean_until = clean_until.min(at % stream.len().max(1));
            }
        }
    }

    let mut pos = 0usize;
    let mut next_sealed = 0usize;
    loop {
        let buf = &mut stream[pos..];
        let n = match record::record_len(buf) {
            Ok(Some(n)) => n,
            Ok(None) | Err(_) => break,
        };
        assert!(n <= buf.len() && n <= MAX_RECORD, "record of {n} bytes");
        assert!(n > HEADER);
        let rec = &mut buf[..n];
        let got = match record::open_record(&mut keys, rec) {
            Ok(Content::Data(r)) => {
                assert!(
                    r.start >= HEADER && r.end <= n && r.start <= r.end,
                    "{r:?} out of a record of {n}"
                );
                assert!(r.len() <= MAX_PLAIN, "{} bytes of plaintext", r.len());
                Expect::Data(rec[r].to_vec())
            }
            Ok(Content::Closed) => Expect::Closed,
            Err(_) => Expect::Refused,
        };
        // Compare with what was sealed while the stream is clean.
        if pos + n <= clean_until
            && let Some((at, len, want)) = sealed.get(next_sealed)
            && *at == pos
            && *len == n
        {
            assert_eq!(&got, want, "record {next_sealed} at {pos}");
        }
        next_sealed += 1;
        pos += n;
        // Only application data lets the tunnel read on.
        if !matches!(got, Expect::Data(_)) {
            break;
        }
    }
}

/// Whether record number `seq` is past the key's limit.
fn keys_limit_reached(chacha: bool, seq: u64) -> bool {
    !chacha && seq >= 1 << 24
}

/// A reader that hands out its bytes in the chunk sizes the fuzzer picks
/// (never pending, like the header phase's reader once data is there).
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    i: usize,
}

impl ReadPlain for Chunked<'_> {
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let size = match self.sizes.get(self.i % self.sizes.len().max(1)) {
            Some(&s) => usize::from(s % 8) + 1,
            None => out.len(),
        };
        self.i += 1;
        let n = size.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Polls a future that never waits (its reader never pends) to the end.
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1024 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("read_header did not finish on a reader that never pends");
}

/// Drives the mesh header parser (`read_header`, as the listener calls it)
/// over the fuzzer's bytes, delivered in the chunk sizes it picks.
/// Asserts: no panic; it finishes; `Closed` only on no input; a header it
/// accepts is exactly `encode_header` of the target it returns, and the
/// bytes after it are left unread.
pub fn header(data: &[u8]) {
    let (sizes, body) = match data.split_first() {
        Some((&k, rest)) => rest.split_at(usize::from(k % 4).min(rest.len())),
        None => (&[][..], data),
    };
    let mut r = Chunked {
        data: body,
        sizes,
        i: 0,
    };
    let res: Result<SocketAddr, HeaderError> = run(read_header(&mut r));
    match res {
        Ok(addr) => {
            let enc = encode_header(addr);
            assert!(
                body.starts_with(&enc),
                "accepted {addr} from {body:?}, which encodes as {enc:?}"
            );
            assert_eq!(r.data, &body[enc.len()..], "read past the header");
        }
        Err(HeaderError::Closed) => assert!(body.is_empty(), "Closed with input"),
        Err(HeaderError::Bad(_)) => assert!(!body.is_empty()),
        Err(HeaderError::Io(e)) => panic!("an in-memory reader cannot fail: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script: mode, then one sealed record of `len` bytes of inner
    /// plaintext: `content`, then `fill` up to `len`.
    fn one_record(mode: u8, len: u16, fill: u8, content: &[u8]) -> Vec<u8> {
        let mut d = vec![mode, 0];
        d.extend_from_slice(&len.to_be_bytes());
        d.push(fill);
        d.extend_from_slice(content);
        d
    }

    /// The fuzzer's inputs that once failed (a harness that did not count
    /// padding towards 2^14 + 1), and the cases around the limit: each
    /// runs through the harness, whose assertions decide.
    #[test]
    fn fuzz_regressions_and_the_plaintext_limit() {
        let crash_47ca35dc: &[u8] = &[
            0xb8, 0xc3, 0xc3, 0x03, 0x00, 0xc3, 0xc3, 0x17, 0xc3, 0xc3, 0xc3, 0xd3, 0xc3, 0x17,
            0x00, 0x00, 0xc3, 0xf8, 0x10, 0xc3, 0xc3, 0x03, 0x00, 0xc3, 0xc3, 0x17, 0xc3, 0xc3,
            0xc3, 0xd3, 0xc3, 0x17, 0x00,
        ];
        open_records(crash_47ca35dc);
        let max = MAX_PLAIN as u16;
        for mode in [0, 1, 2, 3] {
            // Exactly 2^14 bytes of data and its type: accepted.
            open_records(&one_record(mode, max + 1, APPLICATION_DATA, &[]));
            // One byte more, as data or as padding: refused.
            open_records(&one_record(mode, max + 2, APPLICATION_DATA, &[]));
            let mut padded = vec![7u8; 10];
            padded.push(APPLICATION_DATA);
            open_records(&one_record(mode, max + 2, 0, &padded));
        }
        // The harness's own verdicts, for these three.
        assert_eq!(
            expect(&vec![APPLICATION_DATA; MAX_PLAIN + 1]),
            Expect::Data(vec![APPLICATION_DATA; MAX_PLAIN])
        );
        assert_eq!(
            expect(&vec![APPLICATION_DATA; MAX_PLAIN + 2]),
            Expect::Refused
        );
        let mut padded = vec![7u8; 10];
        padded.push(APPLICATION_DATA);
        padded.resize(MAX_PLAIN + 2, 0);
        assert_eq!(expect(&padded), Expect::Refused);
    }

    #[test]
    fn header_harness_on_good_and_bad_headers() {
        for target in ["10.0.0.1:80", "[fd00::1]:8443"] {
            let h = encode_header(target.parse().unwrap());
            for chunking in 0..4u8 {
                let mut d = vec![chunking, 1, 2, 3];
                d.truncate(1 + usize::from(chunking % 4));
                d.extend_from_slice(&h);
                d.extend_from_slice(b"rest");
                header(&d);
            }
        }
        header(&[]);
        header(&[0, 9, 4, 1, 2]);
        header(&[0, 2, 5]);
        header(&[0, 2, 4, 1]);
    }
}
