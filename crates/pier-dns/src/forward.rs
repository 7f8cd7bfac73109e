//! Forwarding names outside the mesh to the upstream resolvers, and the
//! cache of their answers.
//!
//! Each forwarded query goes out from a fresh socket (a random source port)
//! with a random ID, and only a response from that upstream with that ID and
//! the same question is taken. UDP first; TCP when the answer comes back
//! truncated. The whole exchange, over every upstream, is bounded by the
//! configured timeout, after which the client gets SERVFAIL.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::wire::{self, MAX_NAME, Query, rcode, rtype};

/// Longest time an upstream answer is cached, whatever its TTL.
const MAX_CACHE_TTL: u32 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    name: Box<[u8]>,
    qtype: u16,
    qclass: u16,
    /// Responses to queries with EDNS carry an OPT record; without, they must not.
    edns: bool,
}

impl CacheKey {
    pub fn new(lc_name: &[u8], q: &Query<'_>) -> CacheKey {
        CacheKey {
            name: lc_name.into(),
            qtype: q.qtype,
            qclass: q.qclass,
            edns: q.edns.is_some(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    bytes: Box<[u8]>,
    /// (offset of a TTL field, its value when stored)
    ttls: Box<[(u32, u32)]>,
    stored: Instant,
    expires: Instant,
}

#[derive(Debug)]
pub struct Cache {
    cap: usize,
    map: HashMap<CacheKey, Entry>,
    last_sweep: Instant,
}

impl Cache {
    pub fn new(cap: usize) -> Cache {
        Cache {
            cap,
            map: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Write the cached response for `q` into `out`, with the client's ID,
    /// flags and question case, and TTLs aged. False on a miss.
    pub fn get(&mut self, key: &CacheKey, q: &Query<'_>, out: &mut Vec<u8>) -> bool {
        let now = Instant::now();
        let Some(e) = self.map.get(key) else {
            return false;
        };
        if now >= e.expires {
            self.map.remove(key);
            return false;
        }
        let age = now.duration_since(e.stored).as_secs() as u32;
        out.clear();
        out.extend_from_slice(&e.bytes);
        for &(at, ttl) in e.ttls.iter() {
            let at = at as usize;
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
        patch(out, q);
        true
    }

    pub fn put(&mut self, key: CacheKey, resp: &[u8]) {
        if self.cap == 0 {
            return;
        }
        let Some((ttl, ttls)) = cacheable(resp) else {
            return;
        };
        let now = Instant::now();
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            if now.duration_since(self.last_sweep) >= Duration::from_secs(1) {
                self.map.retain(|_, e| e.expires > now);
                self.last_sweep = now;
            }
            if self.map.len() >= self.cap {
                // Full of live entries: drop an arbitrary one.
                if let Some(k) = self.map.keys().next().cloned() {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(
            key,
            Entry {
                bytes: resp.into(),
                ttls: ttls.into_boxed_slice(),
                stored: now,
                expires: now + Duration::from_secs(ttl as u64),
            },
        );
    }
}

/// Give a response the client's ID, RD/CD bits and question bytes.
pub fn patch(out: &mut [u8], q: &Query<'_>) {
    out[0..2].copy_from_slice(&q.id.to_be_bytes());
    // RD (0x0100) and CD (0x0010) are the client's.
    out[2] = (out[2] & !0x01) | ((q.flags >> 8) as u8 & 0x01);
    out[3] = (out[3] & !0x10) | (q.flags as u8 & 0x10);
    let ql = q.question.len();
    if out.len() >= wire::HDR + ql {
        out[wire::HDR..wire::HDR + ql].copy_from_slice(q.question);
    }
}

/// The cache TTL and the TTL fields of a response, if it may be cached:
/// NOERROR with answers (the least TTL among them), or NXDOMAIN / NODATA with
/// an SOA (RFC 2308 5: min of its TTL and MINIMUM). Never truncated ones.
fn cacheable(resp: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    if resp.len() < wire::HDR || resp[2] & 0x02 != 0 {
        return None;
    }
    let rc = resp[3] & 0x0f;
    let an = wire::be16(resp, 6) as usize;
    let ns = wire::be16(resp, 8) as usize;
    let ar = wire::be16(resp, 10) as usize;
    if wire::be16(resp, 4) != 1 {
        return None;
    }
    let mut pos = wire::skip_name(resp, wire::HDR)? + 4;
    let mut ttls = Vec::with_capacity(an + ns + ar);
    let mut min_an = u32::MAX;
    let mut neg = None;
    for i in 0..an + ns + ar {
        let r = wire::walk_record(resp, pos)?;
        if r.rtype != rtype::OPT {
            let ttl = wire::be32(resp, r.ttl_at);
            ttls.push((r.ttl_at as u32, ttl));
            if i < an {
                min_an = min_an.min(ttl);
            } else if i < an + ns && r.rtype == rtype::SOA && r.rdlen >= 22 {
                let minimum = wire::be32(resp, r.end - 4);
                neg = Some(ttl.min(minimum));
            }
        }
        pos = r.end;
    }
    let ttl = match rc {
        0 if an > 0 => min_an,
        0 | 3 => neg?,
        _ => return None,
    };
    let ttl = ttl.min(MAX_CACHE_TTL);
    (ttl > 0).then_some((ttl, ttls))
}

/// Why an exchange with an upstream failed.
#[derive(Debug)]
enum TryError {
    Io,
    Timeout,
    /// SERVFAIL or REFUSED: try the next one.
    Rcode,
}

#[derive(Debug)]
pub struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub cache: Mutex<Cache>,
}

impl Forwarder {
    /// Ask the upstreams. Returns the response with the client's ID and
    /// question, or `None` when every upstream failed within the bound.
    pub async fn resolve(&self, query: &[u8], q: &Query<'_>, lc_name: &[u8]) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let n = self.upstreams.len();
        for (i, up) in self.upstreams.iter().enumerate() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            // Share what is left fairly among the upstreams not yet tried.
            let per = (deadline - now) / (n - i) as u32;
            let id: u16 = rand::random();
            let mut msg = query.to_vec();
            msg[0..2].copy_from_slice(&id.to_be_bytes());
            let res = match tokio::time::timeout(per, udp_try(*up, &msg, id, q, lc_name)).await {
                Ok(Ok(r)) if r[2] & 0x02 != 0 => {
                    // Truncated: same upstream over TCP, within what is left.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(left, tcp_try(*up, &msg, id, q, lc_name)).await {
                        Ok(r) => r,
                        Err(_) => Err(TryError::Timeout),
                    }
                }
                Ok(r) => r,
                Err(_) => Err(TryError::Timeout),
            };
            match res {
                Ok(mut r) => {
                    patch(&mut r, q);
                    return Some(r);
                }
                Err(e) => {
                    tracing::debug!(upstream = %up, error = ?e, "upstream failed");
                }
            }
        }
        None
    }
}

fn matches(resp: &[u8], id: u16, q: &Query<'_>, lc_name: &[u8]) -> bool {
    if resp.len() < wire::HDR + q.question.len() || wire::be16(resp, 0) != id || resp[2] & 0x80 == 0
    {
        return false;
    }
    if wire::be16(resp, 4) != 1 {
        return false;
    }
    let qs = &resp[wire::HDR..wire::HDR + q.question.len()];
    // The name case-insensitively (upstreams may use 0x20 mixing), then type and class.
    let nl = q.name_len;
    qs[..nl]
        .iter()
        .zip(lc_name)
        .all(|(a, b)| a.to_ascii_lowercase() == *b)
        && qs[nl..] == q.question[nl..]
}

fn check(resp: Vec<u8>) -> Result<Vec<u8>, TryError> {
    let rc = resp[3] & 0x0f;
    if rc == rcode::SERVFAIL || rc == rcode::REFUSED {
        return Err(TryError::Rcode);
    }
    Ok(resp)
}

async fn udp_try(
    up: SocketAddr,
    msg: &[u8],
    id: u16,
    q: &Query<'_>,
    lc_name: &[u8],
) -> Result<Vec<u8>, TryError> {
    let local: IpAddr = if up.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = UdpSocket::bind((local, 0))
        .await
        .map_err(|_| TryError::Io)?;
    sock.connect(up).await.map_err(|_| TryError::Io)?;
    sock.send(msg).await.map_err(|_| TryError::Io)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|_| TryError::Io)?;
        if matches(&buf[..n], id, q, lc_name) {
            buf.truncate(n);
            return check(buf);
        }
    }
}

async fn tcp_try(
    up: SocketAddr,
    msg: &[u8],
    id: u16,
    q: &Query<'_>,
    lc_name: &[u8],
) -> Result<Vec<u8>, TryError> {
    let mut s = TcpStream::connect(up).await.map_err(|_| TryError::Io)?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    framed.extend_from_slice(msg);
    s.write_all(&framed).await.map_err(|_| TryError::Io)?;
    loop {
        let len = s.read_u16().await.map_err(|_| TryError::Io)? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.map_err(|_| TryError::Io)?;
        if matches(&buf, id, q, lc_name) {
            return check(buf);
        }
    }
}

/// The nameservers of a resolv.conf, on port 53.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            // Drop a zone index (fe80::1%eth0): it cannot be parsed as an IpAddr.
            let a = w.next()?.split('%').next()?;
            a.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Keep the lower-cased name of a forwarded query alive across an await.
pub fn owned_name(lc: &[u8; MAX_NAME], len: usize) -> Vec<u8> {
    lc[..len].to_vec()
}

/// The forwarder's handling of one upstream response, minus the sockets:
/// `resp` is matched against the query (the client's `query`, sent
/// upstream with ID `id`), checked, given the client's ID and question,
/// cached, and read back from the cache. The entry point of
/// `fuzz/fuzz_targets/upstream_response.rs`. Asserts the invariants: no
/// panic; a response is taken only if it carries `id`, QR and the question;
/// what the client gets has its ID and question and the response's length;
/// the cached copy is the same bytes (TTLs aged by at most the test's
/// runtime, here zero seconds).
#[doc(hidden)]
pub fn fuzz_response(query: &[u8], id: u16, resp: &[u8]) {
    let mut lc = [0u8; MAX_NAME];
    let wire::Parsed::Query(q) = wire::parse(query, &mut lc) else {
        return;
    };
    let lc_name = owned_name(&lc, q.name_len);
    // Caching alone: must not panic on anything.
    let _ = cacheable(resp);
    if !matches(resp, id, &q, &lc_name) {
        return;
    }
    assert!(resp.len() >= wire::HDR + q.question.len());
    assert_eq!(wire::be16(resp, 0), id);
    let Ok(mut r) = check(resp.to_vec()) else {
        return;
    };
    patch(&mut r, &q);
    assert_eq!(r.len(), resp.len());
    assert_eq!(wire::be16(&r, 0), q.id);
    assert_eq!(&r[wire::HDR..wire::HDR + q.question.len()], q.question);
    let key = CacheKey::new(&lc_name, &q);
    let mut cache = Cache::new(4);
    cache.put(key.clone(), &r);
    let mut out = Vec::new();
    if cache.get(&key, &q, &mut out) {
        assert_eq!(out, r, "the cached answer differs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resolv_conf() {
        let t = "# c\nnameserver 10.0.0.2\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_nameservers(t),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    /// The fuzz harness's path on a real answer (taken, patched, cached
    /// and read back the same) and on near misses (another ID, a response
    /// bit unset, a truncated header): its assertions decide.
    #[test]
    fn fuzz_response_harness_on_an_answer_and_near_misses() {
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(b"\x03www\x07example\x03com\x00\x00\x01\x00\x01");
        let mut resp = vec![0x5a, 0x17, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        // The question in mixed case (0x20), then an A record by pointer.
        resp.extend_from_slice(b"\x03wWw\x07exAmple\x03com\x00\x00\x01\x00\x01");
        resp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        fuzz_response(&query, 0x5a17, &resp);
        fuzz_response(&query, 0x5a18, &resp);
        let mut no_qr = resp.clone();
        no_qr[2] &= 0x7f;
        fuzz_response(&query, 0x5a17, &no_qr);
        fuzz_response(&query, 0x5a17, &resp[..20]);
        // What the harness checks, checked here too: the client gets its
        // own ID and question.
        let mut lc = [0u8; MAX_NAME];
        let wire::Parsed::Query(q) = wire::parse(&query, &mut lc) else {
            panic!("the query parses");
        };
        let name = owned_name(&lc, q.name_len);
        assert!(matches(&resp, 0x5a17, &q, &name));
        let mut r = resp.clone();
        patch(&mut r, &q);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(&r[12..12 + q.question.len()], q.question);
    }
}
