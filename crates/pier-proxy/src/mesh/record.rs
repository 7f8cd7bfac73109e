//! The TLS 1.3 record layer of an established mesh tunnel (RFC 8446 §5).
//!
//! rustls does the handshake, the header and the reply (its unbuffered
//! API); then it hands the traffic keys and sequence numbers over with a
//! kernel connection (`dangerous_into_kernel_connection`, the hand-over
//! kTLS uses) and the tunnel's records are sealed and opened here, in
//! place, with ring's AEADs. What that saves over rustls' buffered
//! API on the bulk path: its copies into and out of its own buffers and an
//! allocation per record (both directions), so the only copies left are
//! the kernel's. The wire format is unchanged: a rustls peer reads these
//! records (tested below against rustls itself).
//!
//! Every record it opens is checked as RFC 8446 §5 asks: an
//! application_data header of legal length, authentic, and an inner
//! plaintext (content, type, padding) of at most 2^14 + 1 bytes. A record
//! that fails is answered with a fatal alert (bad_record_mac,
//! record_overflow, unexpected_message, decode_error) before the tunnel
//! closes, as rustls would.
//!
//! Key updates (RFC 8446 §4.6.3) are handled by the tunnel
//! (`stream::on_handshake`): the kernel connection derives the next
//! secret; a sender moves to a new key at half of the AEAD's
//! confidentiality limit ([`Keys::update_at`]: 2^23 records for AES-GCM)
//! and when the peer asks. [`open_record`] itself (no kernel connection)
//! refuses handshake messages. A tunnel is also retired from reuse once
//! either direction has used [`RETIRE_AT`] records of one key.

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

pub(crate) const ALERT: u8 = 21;
pub(crate) const HANDSHAKE: u8 = 22;
pub(crate) const APPLICATION_DATA: u8 = 23;

/// Handshake message types an established tunnel may carry (RFC 8446 §4).
pub(crate) const NEW_SESSION_TICKET: u8 = 4;
pub(crate) const KEY_UPDATE: u8 = 24;

/// AES-GCM's confidentiality limit per key (RFC 8446 §5.5 gives 2^24.5
/// full records); ChaCha20-Poly1305 has none that matters.
const AES_GCM_LIMIT: u64 = 1 << 24;
/// A tunnel whose keys have sealed or opened this many records (a quarter
/// of AES-GCM's limit: 2^22 records, 64 GiB of full records) carries no
/// further stream, so that a reused tunnel never starts a stream near the
/// limit.
pub(crate) const RETIRE_AT: u64 = AES_GCM_LIMIT / 4;

/// TLS alert descriptions (RFC 8446 §6).
pub(crate) mod alert {
    pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
    pub(crate) const BAD_RECORD_MAC: u8 = 20;
    pub(crate) const RECORD_OVERFLOW: u8 = 22;
    pub(crate) const DECODE_ERROR: u8 = 50;
    pub(crate) const INTERNAL_ERROR: u8 = 80;
}

/// A record this side refused, and the alert that tells the peer why.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) alert: u8,
    pub(crate) why: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.why)
    }
}

impl std::error::Error for Refused {}

pub(crate) fn refused(alert: u8, why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Refused { alert, why })
}

/// The alert to send for `e`, if it is a record this side refused.
pub(crate) fn alert_for(e: &io::Error) -> Option<u8> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<Refused>())
        .map(|r| r.alert)
}

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
            return Err(refused(
                alert::INTERNAL_ERROR,
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

    /// Records sealed or opened with this key so far.
    pub(crate) fn used(&self) -> u64 {
        self.seq
    }

    /// When the sender moves to the next key (a KeyUpdate): half of the
    /// AEAD's confidentiality limit (2^23 records for AES-GCM; never, in
    /// practice, for ChaCha20-Poly1305).
    pub(crate) fn update_at(&self) -> u64 {
        self.limit / 2
    }

    /// Moves the sequence number (both ends of a test must agree).
    #[cfg(test)]
    pub(crate) fn set_used(&mut self, seq: u64) {
        self.seq = seq;
    }

    /// Opens the complete record `rec` (header included, as measured by
    /// [`record_len`]) in place: its content type and where its plaintext
    /// now is, relative to `rec`.
    pub(crate) fn open(&mut self, rec: &mut [u8]) -> io::Result<(u8, Range<usize>)> {
        let header: [u8; HEADER] = rec[..HEADER]
            .try_into()
            .map_err(|_| refused(alert::DECODE_ERROR, "mesh: short record"))?;
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut rec[HEADER..])
            .map_err(|_| {
                refused(
                    alert::BAD_RECORD_MAC,
                    "mesh: a record failed authentication",
                )
            })?;
        // RFC 8446 §5.2: the TLSInnerPlaintext (content, type, padding)
        // is at most 2^14 + 1 bytes, whatever the ciphertext allows.
        if plain.len() > MAX_PLAIN + 1 {
            return Err(refused(
                alert::RECORD_OVERFLOW,
                "mesh: a record's plaintext is longer than 2^14 + 1 bytes",
            ));
        }
        // TLSInnerPlaintext: content, the type, then zero padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(refused(
                alert::UNEXPECTED_MESSAGE,
                "mesh: a record has no content type",
            ));
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
        return Err(refused(
            alert::UNEXPECTED_MESSAGE,
            "mesh: not a TLS 1.3 record",
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(refused(
            alert::RECORD_OVERFLOW,
            "mesh: record length out of range",
        ));
    }
    if len < 1 + TAG {
        return Err(refused(
            alert::DECODE_ERROR,
            "mesh: record length out of range",
        ));
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

/// What a record of an established tunnel holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    Content(Content),
    /// Handshake messages (KeyUpdate, NewSessionTicket) at this range.
    Handshake(Range<usize>),
}

/// Opens `rec` for the tunnel: like [`open_record`], but handshake
/// messages are handed back for the kernel connection to handle.
pub(crate) fn open_tunnel_record(keys: &mut Keys, rec: &mut [u8]) -> io::Result<Opened> {
    let (ty, range) = keys.open(rec)?;
    if ty == HANDSHAKE {
        return Ok(Opened::Handshake(range));
    }
    classify(ty, range, rec).map(Opened::Content)
}

/// Opens `rec` and classifies it; any alert other than close_notify, and
/// any handshake message (key update, late ticket), ends the tunnel.
pub(crate) fn open_record(keys: &mut Keys, rec: &mut [u8]) -> io::Result<Content> {
    let (ty, range) = keys.open(rec)?;
    classify(ty, range, rec)
}

fn classify(ty: u8, range: Range<usize>, rec: &[u8]) -> io::Result<Content> {
    match ty {
        APPLICATION_DATA => Ok(Content::Data(range)),
        ALERT => match &rec[range] {
            [_, 0] => Ok(Content::Closed),
            // The peer's alert ends the tunnel; no alert back.
            [_, desc] => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("mesh: the peer sent TLS alert {desc}"),
            )),
            _ => Err(refused(alert::DECODE_ERROR, "mesh: malformed alert")),
        },
        HANDSHAKE => Err(refused(
            alert::UNEXPECTED_MESSAGE,
            "mesh: unexpected handshake message (key update or ticket) on an established tunnel",
        )),
        _ => Err(refused(
            alert::UNEXPECTED_MESSAGE,
            "mesh: unknown record content type",
        )),
    }
}

/// Seals a close_notify alert into `out` (appended).
pub(crate) fn push_close_notify(keys: &mut Keys, out: &mut Vec<u8>) -> io::Result<()> {
    push_record(keys, out, &[1, 0], ALERT)
}

/// Seals a fatal alert `desc` into `out` (appended).
pub(crate) fn push_fatal_alert(keys: &mut Keys, out: &mut Vec<u8>, desc: u8) -> io::Result<()> {
    push_record(keys, out, &[2, desc], ALERT)
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
        configs_with(None)
    }

    /// [`configs`], the client offering only `suite` when given.
    pub(crate) fn configs_with(
        suite: Option<rustls::SupportedCipherSuite>,
    ) -> (
        Arc<rustls::ClientConfig>,
        Arc<rustls::ServerConfig>,
        rustls::pki_types::ServerName<'static>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        pier_ca::ca_init(&ca).expect("ca");
        let mut ids = Vec::new();
        for n in ["a", "b"] {
            let out = dir.path().join(n);
            pier_ca::ca_issue(&pier_model::Name::new(n).expect("name"), &ca, &out, 1)
                .expect("issue");
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
        let mut ccfg = tls::client_config(&ids[0], &Resumption::disabled()).expect("client config");
        if let Some(suite) = suite {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![suite];
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(p))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(ids[0].roots.clone())
                .with_client_auth_cert(ids[0].chain.clone(), ids[0].key.clone_key())
                .expect("client cert");
            c.alpn_protocols = vec![tls::MESH_ALPN.to_vec()];
            c.enable_secret_extraction = true;
            ccfg = Arc::new(c);
        }
        let name = tls::node_server_name(&pier_model::Name::new("b").expect("name")).expect("sn");
        (ccfg, scfg, name)
    }

    /// Seals any TLSInnerPlaintext `inner` (content, type, padding: any
    /// length, unlike [`Keys::seal`]) as one application_data record, as a
    /// misbehaving peer holding the keys could.
    pub(crate) fn seal_inner(keys: &mut Keys, inner: &[u8]) -> Vec<u8> {
        let ct_len = (inner.len() + TAG) as u16;
        let header = [APPLICATION_DATA, 3, 3, (ct_len >> 8) as u8, ct_len as u8];
        let nonce = keys.next_nonce().expect("nonce");
        let mut body = inner.to_vec();
        let tag = keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut body)
            .expect("seal");
        let mut rec = header.to_vec();
        rec.extend_from_slice(&body);
        rec.extend_from_slice(tag.as_ref());
        rec
    }

    /// A rustls client and server, handshaken in memory.
    fn pair() -> (ClientConnection, ServerConnection) {
        pair_with(None)
    }

    fn pair_with(
        suite: Option<rustls::SupportedCipherSuite>,
    ) -> (ClientConnection, ServerConnection) {
        let (ccfg, scfg, name) = configs_with(suite);
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
        ours_vs_rustls_with(None)
    }

    fn ours_vs_rustls_with(
        suite: Option<rustls::SupportedCipherSuite>,
    ) -> (ClientConnection, Keys, Keys) {
        let (c, s) = pair_with(suite);
        if let Some(suite) = suite {
            assert_eq!(c.negotiated_cipher_suite(), Some(suite));
        }
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

    /// The suites other than the default AES-128-GCM, both ways: rustls
    /// reads our records and we read rustls'.
    #[test]
    fn interop_with_aes256_gcm_and_chacha20_poly1305() {
        use rustls::crypto::ring::cipher_suite::{
            TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
        };
        for suite in [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
            let (mut c, mut tx, mut rx) = ours_vs_rustls_with(Some(suite));
            let data: Vec<u8> = (0..2 * MAX_PLAIN + 7).map(|i| (i * 31) as u8).collect();
            let mut wire = Vec::new();
            for chunk in data.chunks(MAX_PLAIN) {
                push_record(&mut tx, &mut wire, chunk, APPLICATION_DATA).expect("seal");
            }
            let mut r = &wire[..];
            while !r.is_empty() {
                c.read_tls(&mut r).expect("read_tls");
                c.process_new_packets().expect("rustls accepts our records");
            }
            let mut got = vec![0u8; data.len()];
            c.reader().read_exact(&mut got).expect("read");
            assert_eq!(got, data, "{suite:?}: ours -> rustls");

            c.writer().write_all(&data).expect("write");
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("write_tls");
            }
            let mut got = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let len = record_len(&wire[at..]).expect("header").expect("complete");
                let rec = &mut wire[at..at + len];
                match open_record(&mut rx, rec).expect("opens") {
                    Content::Data(r) => got.extend_from_slice(&rec[r]),
                    Content::Closed => panic!("no close_notify sent"),
                }
                at += len;
            }
            assert_eq!(got, data, "{suite:?}: rustls -> ours");
        }
    }

    /// Both ends leave rustls: the peer's sending keys and ours for
    /// opening what it sends (the same key, IV and sequence number).
    fn peer_tx_and_our_rx() -> (Keys, Keys) {
        let (c, s) = pair();
        let cs = c.dangerous_extract_secrets().expect("client extract");
        let ss = s.dangerous_extract_secrets().expect("server extract");
        (
            Keys::new(cs.tx.0, cs.tx.1).expect("peer tx"),
            Keys::new(ss.rx.0, ss.rx.1).expect("our rx"),
        )
    }

    /// Padding is legal (RFC 8446 §5.4): the content is what precedes the
    /// last non-zero byte, whatever follows.
    #[test]
    fn padded_records_open_to_their_content() {
        let (mut peer, mut rx) = peer_tx_and_our_rx();
        for (content, pad) in [
            (&b"hello"[..], 300usize),
            (&b"x"[..], 0),
            (&b"y"[..], 16_000),
        ] {
            let mut inner = content.to_vec();
            inner.push(APPLICATION_DATA);
            inner.extend(std::iter::repeat_n(0u8, pad));
            let mut rec = seal_inner(&mut peer, &inner);
            match open_record(&mut rx, &mut rec).expect("a padded record opens") {
                Content::Data(r) => assert_eq!(&rec[r], content),
                Content::Closed => panic!("not an alert"),
            }
        }
    }

    /// Attack (R2): a peer holding the keys seals an inner plaintext longer
    /// than 2^14 + 1 bytes (within the ciphertext limit). Refused with a
    /// record_overflow alert; the longest legal one opens.
    #[test]
    fn oversized_plaintext_is_refused_with_record_overflow() {
        // Exactly 2^14 of content and its type: legal.
        let (mut peer, mut rx) = peer_tx_and_our_rx();
        let mut inner = vec![7u8; MAX_PLAIN];
        inner.push(APPLICATION_DATA);
        let mut rec = seal_inner(&mut peer, &inner);
        assert!(
            matches!(open_record(&mut rx, &mut rec).expect("legal"), Content::Data(r) if r.len() == MAX_PLAIN)
        );
        // 2^14 + 2 inner bytes: padding after a full record, or content
        // past 2^14. A refusal ends the tunnel, so a fresh one each.
        for extra in [vec![0u8], vec![7u8, APPLICATION_DATA]] {
            let (mut peer, mut rx) = peer_tx_and_our_rx();
            let mut inner = vec![7u8; MAX_PLAIN];
            inner.push(APPLICATION_DATA);
            inner.extend_from_slice(&extra);
            let mut rec = seal_inner(&mut peer, &inner);
            assert!(rec.len() <= MAX_RECORD, "within the ciphertext limit");
            let len = record_len(&rec).expect("header").expect("complete");
            let e = open_record(&mut rx, &mut rec[..len]).expect_err("oversized accepted");
            assert_eq!(alert_for(&e), Some(alert::RECORD_OVERFLOW), "{e}");
        }
        // A ciphertext longer than 2^14 + 256: refused at the header.
        let e = record_len(&[23, 3, 3, 0x41, 1]).expect_err("too long");
        assert_eq!(alert_for(&e), Some(alert::RECORD_OVERFLOW));
    }

    /// Attack (R2): a KeyUpdate (which this layer cannot follow) and a
    /// record that fails authentication are refused with the alert that
    /// says so, and rustls reads that alert as fatal.
    #[test]
    fn refusals_carry_an_alert_that_rustls_reads() {
        let (mut c, mut tx, mut rx) = ours_vs_rustls();
        c.refresh_traffic_keys().expect("key update");
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("write_tls");
        }
        let len = record_len(&wire).expect("header").expect("complete");
        let e = open_record(&mut rx, &mut wire[..len]).expect_err("a key update is refused");
        assert_eq!(alert_for(&e), Some(alert::UNEXPECTED_MESSAGE), "{e}");
        let mut out = Vec::new();
        push_fatal_alert(&mut tx, &mut out, alert::UNEXPECTED_MESSAGE).expect("seal");
        let mut r = &out[..];
        c.read_tls(&mut r).expect("read_tls");
        let got = c
            .process_new_packets()
            .expect_err("rustls takes it as fatal");
        assert_eq!(
            got,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage)
        );

        let (first, _, mut rx) = two_rustls_records();
        let mut first = first;
        first[HEADER + 2] ^= 0x80;
        let len = record_len(&first).expect("header").expect("complete");
        let e = open_record(&mut rx, &mut first[..len]).expect_err("tampered");
        assert_eq!(alert_for(&e), Some(alert::BAD_RECORD_MAC), "{e}");
    }
}
