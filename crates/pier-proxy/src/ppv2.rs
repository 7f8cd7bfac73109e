//! PROXY protocol version 2 headers (the binary form), so that an endpoint
//! sees the client's address.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2, command PROXY.
const VER_CMD_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The longest header: 16 fixed bytes plus 36 for two IPv6 addresses and ports.
pub const MAX_LEN: usize = 16 + 36;

/// Writes the header for a TCP connection from `src` to `dst` into `buf`
/// and returns its length. Mixed families are sent as IPv6 (v4-mapped).
pub fn encode(src: SocketAddr, dst: SocketAddr, buf: &mut [u8; MAX_LEN]) -> usize {
    buf[..12].copy_from_slice(&SIGNATURE);
    buf[12] = VER_CMD_PROXY;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            buf[13] = TCP4;
            buf[14..16].copy_from_slice(&12u16.to_be_bytes());
            buf[16..20].copy_from_slice(&s.octets());
            buf[20..24].copy_from_slice(&d.octets());
            buf[24..26].copy_from_slice(&src.port().to_be_bytes());
            buf[26..28].copy_from_slice(&dst.port().to_be_bytes());
            28
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            buf[13] = TCP6;
            buf[14..16].copy_from_slice(&36u16.to_be_bytes());
            buf[16..32].copy_from_slice(&v6(s).octets());
            buf[32..48].copy_from_slice(&v6(d).octets());
            buf[48..50].copy_from_slice(&src.port().to_be_bytes());
            buf[50..52].copy_from_slice(&dst.port().to_be_bytes());
            52
        }
    }
}

/// Parses a header at the start of `buf`: `(src, dst, header length)`.
/// For tests and for backends written in Rust.
pub fn decode(buf: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    if buf.len() < 16 || buf[..12] != SIGNATURE || buf[12] != VER_CMD_PROXY {
        return None;
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let body = buf.get(16..16 + len)?;
    match buf[13] {
        TCP4 if len >= 12 => {
            let s: [u8; 4] = body[0..4].try_into().ok()?;
            let d: [u8; 4] = body[4..8].try_into().ok()?;
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Some((
                SocketAddr::from((s, sp)),
                SocketAddr::from((d, dp)),
                16 + len,
            ))
        }
        TCP6 if len >= 36 => {
            let s: [u8; 16] = body[0..16].try_into().ok()?;
            let d: [u8; 16] = body[16..32].try_into().ok()?;
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Some((
                SocketAddr::from((s, sp)),
                SocketAddr::from((d, dp)),
                16 + len,
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trip_matches_the_spec_layout() {
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let dst: SocketAddr = "10.213.0.5:80".parse().unwrap();
        let mut b = [0u8; MAX_LEN];
        let n = encode(src, dst, &mut b);
        assert_eq!(n, 28);
        assert_eq!(&b[..16], b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c");
        assert_eq!(&b[16..20], &[192, 0, 2, 7]);
        assert_eq!(decode(&b[..n]), Some((src, dst, 28)));
    }

    #[test]
    fn mixed_families_become_v6() {
        let src: SocketAddr = "[2001:db8::1]:1234".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut b = [0u8; MAX_LEN];
        let n = encode(src, dst, &mut b);
        assert_eq!(n, 52);
        let (s, d, l) = decode(&b[..n]).unwrap();
        assert_eq!((s, l), (src, 52));
        assert_eq!(d, "[::ffff:10.0.0.1]:80".parse().unwrap());
        assert!(decode(&b[..20]).is_none());
    }
}
