//! The TLS 1.3 record layer of an established mesh tunnel (RFC 8446 §5).
//!
//! rustls does the handshake, the header and the reply; then it hands the
//! traffic keys and sequence numbers over (`dangerous_extract_secrets`, the
//! hand-over kTLS uses) and the tunnel's records are sealed and opened
//! here, in place, with ring's AEADs. What that saves over rustls' buffered
//! API on the bulk path: its copies into and out of its own buffers and an
//! allocation per record (both directions), so the only copies left are
//! the kernel's. The wire format is unchanged: a rustls peer reads these
//! records (tested below against rustls itself).
//!
//! What this layer does not do: key updates (it refuses one), and more
//! records per key than the AEAD's confidentiality limit (2^24 records,
//! 256 GiB of full records, for AES-GCM). A tunnel that reaches the limit
//! ends with an error; the peer and the proxy see a reset connection.

use std::io;
use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// The most plaintext one record carries.
pub(crate) const MAX_PLAIN: usize = 16 * 1024;
/// The record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
const TAG: usize = 16;
/// The longest ciphertext a TLS 1.3 record may carry (plaintext, the
/// content type, padding, the tag).
pub(crate) const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// The most bytes one record takes on the wire.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
/// A full record as this side writes it: header, 16 KiB, type, tag.
pub(crate) const FULL_RECORD: usize = HEADER + MAX_PLAIN + 1 + TAG;
/// What a record adds to its plaintext when this side seals it.
pub(crate) const OVERHEAD: usize = HEADER + 1 + TAG;

pub(crate) const CHANGE_CIPHER_SPEC: u8 = 20;
pub(crate) const ALERT: u8 = 21;
pub(crate) const HANDSHAKE: u8 = 22;
pub(crate) const APPLICATION_DATA: u8 = 23;

/// AES-GCM's confidentiality limit per key (RFC 8446 §5.5 gives 2^24.5
/// full records); ChaCha20-Poly1305 has none that matters.
const AES_GCM_LIMIT: u64 = 1 << 24;

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One direction's key, IV and next sequence number.
pub(crate) struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    limit: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("alg", self.key.algorithm())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// The keys rustls extracted for one direction, at sequence number
    /// `seq`.
    pub(crate) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Keys> {
        let (alg, key, iv, limit) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, AES_GCM_LIMIT)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, AES_GCM_LIMIT)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => return Err(invalid("mesh: unsupported cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| invalid("mesh: bad key"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("mesh: bad IV"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The per-record nonce: the IV xor the 64-bit sequence number,
    /// right-aligned (RFC 8446 §5.3). Fails once the key's limit is reached.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= self.limit {
            return Err(io::Error::other(
                "mesh: the tunnel reached its key's record limit",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seals the record in `rec[..len + OVERHEAD]`: the
    /// caller put `len` bytes of plaintext at `rec[HEADER..]`; this writes
    /// the header, the content type and the tag around them, and encrypts
    /// in place. Returns the record's length on the wire.
    pub(crate) fn seal(
        &mut self,
        rec: &mut [u8],
        len: usize,
        content_type: u8,
    ) -> io::Result<usize> {
        debug_assert!(len <= MAX_PLAIN);
        let total = len + OVERHEAD;
        let ct_len = (len + 1 + TAG) as u16;
        let header = [APPLICATION_DATA, 3, 3, (ct_len >> 8) as u8, ct_len as u8];
        rec[..HEADER].copy_from_slice(&header);
        rec[HEADER + len] = content_type;
        let nonce = self.next_nonce()?;
        let (body, tag_out) = rec[HEADER..total].split_at_mut(len + 1);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| io::Error::other("mesh: seal failed"))?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Opens the complete record `rec` (header included, as measured by
    /// [`record_len`]) in place: its content type and where its plaintext
    /// now is, relative to `rec`.
    pub(crate) fn open(&mut self, rec: &mut [u8]) -> io::Result<(u8, Range<usize>)> {
        let header: [u8; HEADER] = rec[..HEADER]
            .try_into()
            .map_err(|_| invalid("mesh: short record"))?;
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut rec[HEADER..])
            .map_err(|_| invalid("mesh: a record failed authentication"))?;
        // TLSInnerPlaintext: content, the type, then zero padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(invalid("mesh: a record has no content type"));
        };
        Ok((plain[end], HEADER..HEADER + end))
    }
}

/// The length of the complete record at the start of `buf`, or `None`
/// while it is incomplete. Only what an established TLS 1.3 connection
/// sends is accepted: an application_data record of legal length.
pub(crate) fn record_len(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if buf[0] != APPLICATION_DATA || buf[1] != 3 || buf[2] != 3 {
        return Err(invalid("mesh: not a TLS 1.3 record"));
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if !(1 + TAG..=MAX_CIPHERTEXT).contains(&len) {
        return Err(invalid("mesh: record length out of range"));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

/// What a decoded record means to the tunnel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Content {
    /// Application data at this range of the record (maybe empty).
    Data(Range<usize>),
    /// The peer's close_notify: it sends nothing more.
    Closed,
}

/// Opens `rec` and classifies it; any alert other than close_notify, and
/// any handshake message (key update, late ticket), ends the tunnel.
pub(crate) fn open_record(keys: &mut Keys, rec: &mut [u8]) -> io::Result<Content> {
    let (ty, range) = keys.open(rec)?;
    match ty {
        APPLICATION_DATA => Ok(Content::Data(range)),
        ALERT => match &rec[range] {
            [_, 0] => Ok(Content::Closed),
            [_, desc] => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("mesh: the peer sent TLS alert {desc}"),
            )),
            _ => Err(invalid("mesh: malformed alert")),
        },
        HANDSHAKE => Err(invalid(
            "mesh: unexpected handshake message on an established tunnel",
        )),
        _ => Err(invalid("mesh: unknown record content type")),
    }
}

/// Seals a close_notify alert into `out` (appended).
pub(crate) fn push_close_notify(keys: &mut Keys, out: &mut Vec<u8>) -> io::Result<()> {
    push_record(keys, out, &[1, 0], ALERT)
}

/// Seals `data` (at most [`MAX_PLAIN`]) as one record appended to `out`.
pub(crate) fn push_record(
    keys: &mut Keys,
    out: &mut Vec<u8>,
    data: &[u8],
    content_type: u8,
) -> io::Result<()> {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(data);
    out.extend_from_slice(&[0; 1 + TAG]);
    let n = keys.seal(&mut out[at..], data.len(), content_type)?;
    debug_assert_eq!(at + n, out.len());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::client::Resumption;
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::tls;

    /// Client and server configs of two nodes of one mesh CA, and the
    /// server's name.
    pub(crate) fn configs() -> (
        Arc<rustls::ClientConfig>,
        Arc<rustls::ServerConfig>,
        rustls::pki_types::ServerName<'static>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        tls::ca_init(&ca).expect("ca");
        let mut ids = Vec::new();
        for n in ["a", "b"] {
            let out = dir.path().join(n);
            tls::ca_issue(&pier_model::Name::new(n).expect("name"), &ca, &out, 1).expect("issue");
            ids.push(
                tls::load_identity(
                    &out.join("ca.pem"),
                    &out.join("node.pem"),
                    &out.join("node-key.pem"),
                )
                .expect("identity"),
            );
        }
        let sessions = tls::ServerSessionState::new().expect("sessions");
        let scfg = tls::server_config(&ids[1], &ca, &sessions).expect("server config");
        let ccfg = tls::client_config(&ids[0], &Resumption::disabled()).expect("client config");
        let name = tls::node_server_name(&pier_model::Name::new("b").expect("name")).expect("sn");
        (ccfg, scfg, name)
    }

    /// A rustls client and server, handshaken in memory.
    fn pair() -> (ClientConnection, ServerConnection) {
        let (ccfg, scfg, name) = configs();
        let mut c = ClientConnection::new(ccfg, name).expect("client");
        let mut s = ServerConnection::new(scfg).expect("server");
        for _ in 0..20 {
            shuttle(&mut c, &mut s);
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        shuttle(&mut c, &mut s);
        (c, s)
    }

    fn shuttle(c: &mut ClientConnection, s: &mut ServerConnection) {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client write_tls");
        }
        let mut r = &buf[..];
        while !r.is_empty() {
            s.read_tls(&mut r).expect("server read_tls");
        }
        s.process_new_packets().expect("server process");
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server write_tls");
        }
        let mut r = &buf[..];
        while !r.is_empty() {
            c.read_tls(&mut r).expect("client read_tls");
        }
        c.process_new_packets().expect("client process");
    }

    /// The server side leaves rustls; the client stays a rustls
    /// connection, so every record must be one rustls accepts and makes.
    fn ours_vs_rustls() -> (ClientConnection, Keys, Keys) {
        let (c, s) = pair();
        let secrets = s.dangerous_extract_secrets().expect("extract");
        let tx = Keys::new(secrets.tx.0, secrets.tx.1).expect("tx");
        let rx = Keys::new(secrets.rx.0, secrets.rx.1).expect("rx");
        (c, tx, rx)
    }

    #[test]
    fn rustls_reads_our_records_and_our_close_notify() {
        let (mut c, mut tx, _rx) = ours_vs_rustls();
        // Three sizes: empty, a full record, one byte.
        let data: Vec<u8> = (0..MAX_PLAIN + 1).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        for chunk in [&data[..0], &data[..MAX_PLAIN], &data[MAX_PLAIN..]] {
            push_record(&mut tx, &mut wire, chunk, APPLICATION_DATA).expect("seal");
        }
        push_close_notify(&mut tx, &mut wire).expect("close");
        let mut r = &wire[..];
        while !r.is_empty() {
            c.read_tls(&mut r).expect("read_tls");
            c.process_new_packets().expect("rustls accepts our records");
        }
        let mut got = Vec::new();
        c.reader()
            .read_to_end(&mut got)
            .expect("clean EOF after close_notify");
        assert_eq!(got, data);
    }

    #[test]
    fn we_read_rustls_records_then_its_close_notify() {
        let (mut c, _tx, mut rx) = ours_vs_rustls();
        let data: Vec<u8> = (0..3 * MAX_PLAIN + 5).map(|i| (i * 13) as u8).collect();
        c.writer().write_all(&data).expect("write");
        c.send_close_notify();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("write_tls");
        }
        let mut got = Vec::new();
        let mut at = 0;
        let closed = loop {
            let len = record_len(&wire[at..])
                .expect("a valid header")
                .expect("a complete record");
            let rec = &mut wire[at..at + len];
            match open_record(&mut rx, rec).expect("opens") {
                Content::Data(r) => got.extend_from_slice(&rec[r]),
                Content::Closed => break at + len,
            }
            at += len;
        };
        assert_eq!(closed, wire.len());
        assert_eq!(got, data);
    }

    /// Two records rustls wrote, split apart.
    fn two_rustls_records() -> (Vec<u8>, Vec<u8>, Keys) {
        let (mut c, _tx, rx) = ours_vs_rustls();
        let mut recs = Vec::new();
        for msg in [&b"first"[..], &b"second"[..]] {
            c.writer().write_all(msg).expect("write");
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("write_tls");
            }
            recs.push(wire);
        }
        let second = recs.pop().expect("two");
        let first = recs.pop().expect("two");
        (first, second, rx)
    }

    #[test]
    fn a_flipped_bit_fails_authentication() {
        for at in [HEADER + 1, 3] {
            let (mut first, _, mut rx) = two_rustls_records();
            first[at] ^= 1;
            let r = match record_len(&first) {
                Ok(Some(len)) => open_record(&mut rx, &mut first[..len]).map(|_| ()),
                Ok(None) => Err(invalid("incomplete")),
                Err(e) => Err(e),
            };
            assert!(r.is_err(), "a flipped bit at {at} went unnoticed");
        }
    }

    #[test]
    fn records_out_of_order_fail_authentication() {
        let (_, mut second, mut rx) = two_rustls_records();
        let len = record_len(&second).expect("header").expect("complete");
        let e = open_record(&mut rx, &mut second[..len]).expect_err("replayed out of order");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn record_headers_are_checked() {
        assert_eq!(record_len(&[23, 3, 3]).expect("short is fine"), None);
        assert_eq!(record_len(&[23, 3, 3, 0, 17]).expect("valid"), None);
        assert_eq!(record_len(&[23, 3, 3, 0, 17, 0, 0]).expect("valid"), None);
        let mut full = vec![23, 3, 3, 0, 17];
        full.extend_from_slice(&[0; 17]);
        assert_eq!(record_len(&full).expect("valid"), Some(22));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[22, 3, 1, 0, 40][..],
            &[23, 3, 3, 0, 16][..],
            &[23, 3, 3, 0x41, 1][..],
        ] {
            assert!(record_len(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_key_limit_ends_the_tunnel() {
        let (_c, mut tx, _) = ours_vs_rustls();
        tx.seq = tx.limit;
        let mut out = Vec::new();
        assert!(push_record(&mut tx, &mut out, b"x", APPLICATION_DATA).is_err());
    }
}
