//! The DNS wire format, only as far as this server needs it: parsing a query,
//! writing response headers, the EDNS OPT record, compressed names for the
//! pre-encoded answers, and walking the records of an upstream response.
//!
//! Nothing here allocates on the query path except the caller's output
//! buffer, which the loops reuse.

/// Header length (RFC 1035 4.1.1).
pub const HDR: usize = 12;
/// The longest name on the wire (RFC 1035 2.3.4).
pub const MAX_NAME: usize = 255;
/// UDP payload without EDNS (RFC 1035 4.2.1).
pub const UDP_PLAIN: usize = 512;

pub mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const MX: u16 = 15;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const ANY: u16 = 255;
}

pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
    /// Extended rcode 16 (RFC 6891 6.1.3): upper 8 bits go in the OPT TTL.
    pub const BADVERS: u16 = 16;
}

pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

const F_QR: u16 = 0x8000;
const F_OPCODE: u16 = 0x7800;
const F_AA: u16 = 0x0400;
const F_TC: u16 = 0x0200;
const F_RD: u16 = 0x0100;
const F_RA: u16 = 0x0080;
const F_CD: u16 = 0x0010;

#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
#[inline]
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The EDNS(0) part of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The requestor's UDP payload size, at least 512 (RFC 6891 6.2.5).
    pub payload: u16,
    /// DNSSEC OK: copied into the response (RFC 3225 3).
    pub dnssec_ok: bool,
}

/// A query whose header and question could be read.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub id: u16,
    pub flags: u16,
    /// The question as asked: name (no compression), type, class.
    pub question: &'a [u8],
    /// Length of the name inside `question`.
    pub name_len: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

impl Query<'_> {
    pub fn name(&self) -> &[u8] {
        &self.question[..self.name_len]
    }
}

/// What the parser made of a packet.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// No header, or a response: say nothing (answering responses invites loops).
    Drop,
    /// A header that can be answered only with an error.
    Error {
        id: u16,
        flags: u16,
        rcode: u16,
        question: Option<&'a [u8]>,
        edns: Option<Edns>,
    },
    Query(Query<'a>),
}

/// Read the name at `pos` without compression, writing it lower-cased into
/// `lc`. Returns the offset after the name.
fn read_plain_name(pkt: &[u8], mut pos: usize, lc: &mut [u8; MAX_NAME]) -> Option<usize> {
    let mut n = 0usize;
    loop {
        let len = *pkt.get(pos)? as usize;
        if len == 0 {
            if n + 1 > MAX_NAME {
                return None;
            }
            lc[n] = 0;
            return Some(pos + 1);
        }
        if len & 0xC0 != 0 {
            return None;
        }
        let end = pos + 1 + len;
        if end > pkt.len() || n + 1 + len + 1 > MAX_NAME {
            return None;
        }
        lc[n] = len as u8;
        for (d, s) in lc[n + 1..n + 1 + len].iter_mut().zip(&pkt[pos + 1..end]) {
            *d = s.to_ascii_lowercase();
        }
        n += 1 + len;
        pos = end;
    }
}

/// Skip a (possibly compressed) name; returns the offset after it.
pub fn skip_name(pkt: &[u8], mut pos: usize) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let len = *pkt.get(pos)? as usize;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => {
                total += len + 1;
                if total > MAX_NAME {
                    return None;
                }
                pos += 1 + len;
                if pos > pkt.len() {
                    return None;
                }
            }
            0xC0 => {
                return if pos + 2 <= pkt.len() {
                    Some(pos + 2)
                } else {
                    None
                };
            }
            _ => return None,
        }
    }
}

/// One resource record's fixed fields, as found by [`walk_record`].
#[derive(Debug, Clone, Copy)]
pub struct RecordPos {
    pub rtype: u16,
    pub class: u16,
    /// Offset of the TTL field.
    pub ttl_at: usize,
    pub rdata_at: usize,
    pub rdlen: usize,
    pub end: usize,
}

pub fn walk_record(pkt: &[u8], pos: usize) -> Option<RecordPos> {
    let p = skip_name(pkt, pos)?;
    if p + 10 > pkt.len() {
        return None;
    }
    let rdlen = be16(pkt, p + 8) as usize;
    let end = p + 10 + rdlen;
    if end > pkt.len() {
        return None;
    }
    Some(RecordPos {
        rtype: be16(pkt, p),
        class: be16(pkt, p + 2),
        ttl_at: p + 4,
        rdata_at: p + 10,
        rdlen,
        end,
    })
}

/// Parse a query. `lc` receives the lower-cased question name.
pub fn parse<'a>(pkt: &'a [u8], lc: &mut [u8; MAX_NAME]) -> Parsed<'a> {
    if pkt.len() < HDR {
        return Parsed::Drop;
    }
    let id = be16(pkt, 0);
    let flags = be16(pkt, 2);
    if flags & F_QR != 0 {
        return Parsed::Drop;
    }
    let err = |rcode: u8, question, edns| Parsed::Error {
        id,
        flags,
        rcode: rcode as u16,
        question,
        edns,
    };
    let qd = be16(pkt, 4);
    let an = be16(pkt, 6);
    let ns = be16(pkt, 8);
    let ar = be16(pkt, 10);
    if qd != 1 {
        // RFC 9619: a QUERY has exactly one question.
        let opcode_query = flags & F_OPCODE == 0;
        return err(
            if opcode_query {
                rcode::FORMERR
            } else {
                rcode::NOTIMP
            },
            None,
            None,
        );
    }
    let Some(qend) = read_plain_name(pkt, HDR, lc) else {
        return err(rcode::FORMERR, None, None);
    };
    if qend + 4 > pkt.len() {
        return err(rcode::FORMERR, None, None);
    }
    let name_len = qend - HDR;
    let question = &pkt[HDR..qend + 4];
    let qtype = be16(pkt, qend);
    let qclass = be16(pkt, qend + 2);
    // Walk the other sections for the OPT record.
    let mut pos = qend + 4;
    let mut edns = None;
    let mut badvers = false;
    for i in 0..(an as usize + ns as usize + ar as usize) {
        let Some(r) = walk_record(pkt, pos) else {
            return err(rcode::FORMERR, Some(question), None);
        };
        let in_additional = i >= an as usize + ns as usize;
        if r.rtype == rtype::OPT {
            // RFC 6891 6.1.1: one OPT, in the additional section, owned by the root.
            if !in_additional || edns.is_some() || pkt[pos] != 0 {
                return err(rcode::FORMERR, Some(question), None);
            }
            let ttl = be32(pkt, r.ttl_at);
            edns = Some(Edns {
                payload: r.class.max(UDP_PLAIN as u16),
                dnssec_ok: ttl & 0x8000 != 0,
            });
            badvers = (ttl >> 16) & 0xff != 0;
        }
        pos = r.end;
    }
    if badvers {
        return Parsed::Error {
            id,
            flags,
            rcode: rcode::BADVERS,
            question: Some(question),
            edns,
        };
    }
    if flags & F_OPCODE != 0 {
        return err(rcode::NOTIMP, Some(question), edns);
    }
    Parsed::Query(Query {
        id,
        flags,
        question,
        name_len,
        qtype,
        qclass,
        edns,
    })
}

/// The largest response the client takes over UDP.
pub fn udp_limit(edns: Option<Edns>, our_max: u16) -> usize {
    match edns {
        Some(e) => e.payload.min(our_max).max(UDP_PLAIN as u16) as usize,
        None => UDP_PLAIN,
    }
}

/// Response header fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Head {
    pub aa: bool,
    pub tc: bool,
    pub rcode: u16,
    pub qd: u16,
    pub an: u16,
    pub ns: u16,
    pub ar: u16,
}

/// Write a response header answering a query with these request flags.
pub fn write_header(out: &mut Vec<u8>, id: u16, req_flags: u16, h: Head) {
    let mut f = F_QR | (req_flags & (F_OPCODE | F_RD | F_CD)) | F_RA | (h.rcode & 0xF);
    if h.aa {
        f |= F_AA;
    }
    if h.tc {
        f |= F_TC;
    }
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&f.to_be_bytes());
    for c in [h.qd, h.an, h.ns, h.ar] {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

/// Our OPT record: our payload size, the upper bits of the rcode, DO copied.
pub fn write_opt(out: &mut Vec<u8>, our_payload: u16, rcode: u16, dnssec_ok: bool) {
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&our_payload.to_be_bytes());
    out.push((rcode >> 4) as u8);
    out.push(0); // version 0
    out.push(if dnssec_ok { 0x80 } else { 0 });
    out.push(0);
    out.extend_from_slice(&0u16.to_be_bytes());
}

pub const OPT_LEN: usize = 11;

/// An error response: header, the question when it was readable, our OPT
/// when the query had one.
pub fn write_error(
    out: &mut Vec<u8>,
    id: u16,
    flags: u16,
    rcode: u16,
    question: Option<&[u8]>,
    edns: Option<Edns>,
    our_payload: u16,
) {
    out.clear();
    write_header(
        out,
        id,
        flags,
        Head {
            rcode,
            qd: question.is_some() as u16,
            ar: edns.is_some() as u16,
            ..Head::default()
        },
    );
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
    if let Some(e) = edns {
        write_opt(out, our_payload, rcode, e.dnssec_ok);
    }
}

/// Set the TC bit and drop every record but the question (and OPT): the
/// client retries over TCP (RFC 2181 9, RFC 7766).
pub fn write_truncated(out: &mut Vec<u8>, q: &Query<'_>, aa: bool, rcode: u16, our_payload: u16) {
    out.clear();
    write_header(
        out,
        q.id,
        q.flags,
        Head {
            aa,
            tc: true,
            rcode,
            qd: 1,
            ar: q.edns.is_some() as u16,
            ..Head::default()
        },
    );
    out.extend_from_slice(q.question);
    if let Some(e) = q.edns {
        write_opt(out, our_payload, rcode, e.dnssec_ok);
    }
}

/// Encode a dotted name (lower-cased) into wire form. `None` when a label is
/// empty or too long, or the name is too long.
pub fn wire_name(dotted: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(dotted.len() + 2);
    let d = dotted.trim_end_matches('.');
    if !d.is_empty() {
        for label in d.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME).then_some(out)
}

/// Prepend labels to a wire name.
pub fn prepend(labels: &[&str], suffix: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(suffix.len() + labels.iter().map(|l| l.len() + 1).sum::<usize>());
    for l in labels {
        out.push(l.len() as u8);
        out.extend(l.bytes().map(|b| b.to_ascii_lowercase()));
    }
    out.extend_from_slice(suffix);
    out
}

/// Offsets of each label start in a wire name (no compression).
pub fn label_starts(name: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut i = 0usize;
    std::iter::from_fn(move || {
        let len = *name.get(i)? as usize;
        let at = i;
        if len == 0 {
            i = usize::MAX - 1;
            return Some(at);
        }
        i += 1 + len;
        Some(at)
    })
}

/// Where `suffix` starts in `name` on a label boundary, if `name` is or
/// is below `suffix`.
pub fn suffix_at(name: &[u8], suffix: &[u8]) -> Option<usize> {
    if name.len() < suffix.len() {
        return None;
    }
    let want = name.len() - suffix.len();
    label_starts(name)
        .take_while(|&s| s <= want)
        .find(|&s| s == want)
        .filter(|&s| &name[s..] == suffix)
}

/// Writes records after a question, compressing names against the question
/// and against earlier names. Used when the zone is built, never per query.
/// The names it is given must outlive it: the dictionary borrows them.
#[derive(Debug)]
pub struct Encoder<'a> {
    pub buf: Vec<u8>,
    base: usize,
    dict: Vec<(&'a [u8], u16)>,
}

impl<'a> Encoder<'a> {
    /// Records will follow a question whose name is `qname` (lower-case wire).
    pub fn new(qname: &'a [u8]) -> Encoder<'a> {
        let mut dict = Vec::with_capacity(16);
        for s in label_starts(qname) {
            if qname[s] != 0 {
                dict.push((&qname[s..], (HDR + s) as u16));
            }
        }
        Encoder {
            buf: Vec::with_capacity(64),
            base: HDR + qname.len() + 4,
            dict,
        }
    }

    pub fn name(&mut self, n: &'a [u8]) {
        let mut i = 0;
        loop {
            if n[i] == 0 {
                self.buf.push(0);
                return;
            }
            let suffix = &n[i..];
            if let Some((_, off)) = self.dict.iter().find(|(s, _)| *s == suffix) {
                self.buf.extend_from_slice(&(0xC000 | *off).to_be_bytes());
                return;
            }
            let here = self.base + self.buf.len();
            if here < 0x3FFF {
                self.dict.push((suffix, here as u16));
            }
            let len = n[i] as usize;
            self.buf.extend_from_slice(&n[i..i + 1 + len]);
            i += 1 + len;
        }
    }

    /// A record whose rdata `rdata` writes (it may write compressed names).
    pub fn record(
        &mut self,
        owner: &'a [u8],
        rtype: u16,
        ttl: u32,
        rdata: impl FnOnce(&mut Encoder<'a>),
    ) {
        self.name(owner);
        self.buf.extend_from_slice(&rtype.to_be_bytes());
        self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        rdata(self);
        let rdlen = (self.buf.len() - len_at - 2) as u16;
        self.buf[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
    }
}

/// The SOA record of the zone, owned by the name at `owner_off` in the
/// message (a compression pointer target). 50 bytes.
pub fn write_soa(out: &mut Vec<u8>, owner_off: usize, ttl: u32, serial: u32, minimum: u32) {
    let ptr = (0xC000 | owner_off as u16).to_be_bytes();
    out.extend_from_slice(&ptr);
    out.extend_from_slice(&rtype::SOA.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&38u16.to_be_bytes());
    out.extend_from_slice(b"\x02ns");
    out.extend_from_slice(&ptr);
    out.extend_from_slice(b"\x0ahostmaster");
    out.extend_from_slice(&ptr);
    for v in [serial, 3600, 600, 86400, minimum] {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_on_label_boundary_only() {
        let dom = wire_name("pier.internal").unwrap();
        let n = wire_name("web.default.svc.pier.internal").unwrap();
        assert_eq!(suffix_at(&n, &dom), Some(n.len() - dom.len()));
        // A label that contains the domain's bytes is not below the domain.
        let mut tricky = vec![7u8, b'x', b'x', 4, b'p', b'i', b'e', b'r'];
        tricky.extend_from_slice(b"\x08internal\x00");
        assert_eq!(suffix_at(&tricky, &dom), None);
        assert_eq!(suffix_at(&dom, &dom), Some(0));
        assert_eq!(suffix_at(&wire_name("example.com").unwrap(), &dom), None);
    }

    #[test]
    fn parse_lowercases_and_reads_edns() {
        let mut pkt = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        pkt.extend_from_slice(b"\x03WeB\x04pier\x08internal\x00\x00\x01\x00\x01");
        pkt.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]);
        let mut lc = [0u8; MAX_NAME];
        let Parsed::Query(q) = parse(&pkt, &mut lc) else {
            panic!("not a query")
        };
        assert_eq!(q.id, 0x1234);
        assert_eq!(&lc[..q.name_len], b"\x03web\x04pier\x08internal\x00");
        assert_eq!(q.name(), b"\x03WeB\x04pier\x08internal\x00");
        assert_eq!(q.qtype, 1);
        assert_eq!(
            q.edns,
            Some(Edns {
                payload: 4096,
                dnssec_ok: true
            })
        );
    }

    #[test]
    fn short_or_response_is_dropped() {
        let mut lc = [0u8; MAX_NAME];
        assert!(matches!(parse(&[1, 2, 3], &mut lc), Parsed::Drop));
        let pkt = [0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert!(matches!(parse(&pkt, &mut lc), Parsed::Drop));
    }
}
