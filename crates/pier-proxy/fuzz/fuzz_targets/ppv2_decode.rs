//! The PROXY protocol v2 decoder. Asserts: no panic; an accepted header
//! lies within the input, is at least the 16 fixed bytes, and (when it
//! carries exactly the addresses) re-encodes to the same bytes; and what
//! `encode` writes for the addresses the input spells decodes back to
//! them (a mixed v4/v6 pair as v4-mapped IPv6).
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use pier_proxy::ppv2::{MAX_LEN, decode, encode};

fn mapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((src, dst, n)) = decode(data) {
        assert!(n >= 16 && n <= data.len(), "length {n} of {}", data.len());
        let body = u16::from_be_bytes([data[14], data[15]]) as usize;
        assert_eq!(n, 16 + body);
        if body == 12 || body == 36 {
            let mut buf = [0u8; MAX_LEN];
            let m = encode(src, dst, &mut buf);
            assert_eq!(
                &buf[..m],
                &data[..n],
                "{src} -> {dst} re-encodes differently"
            );
        }
    }
    // The other way round: addresses from the input, encoded, decoded.
    if data.len() >= 37 {
        let ip = |b: &[u8], v4: bool| -> IpAddr {
            if v4 {
                IpAddr::from([b[0], b[1], b[2], b[3]])
            } else {
                let o: [u8; 16] = b[..16].try_into().unwrap();
                IpAddr::V6(Ipv6Addr::from(o))
            }
        };
        let src = SocketAddr::new(
            ip(&data[1..17], data[0] & 1 == 1),
            u16::from_be_bytes([data[33], data[34]]),
        );
        let dst = SocketAddr::new(
            ip(&data[17..33], data[0] & 2 == 2),
            u16::from_be_bytes([data[35], data[36]]),
        );
        let mut buf = [0u8; MAX_LEN];
        let m = encode(src, dst, &mut buf);
        let (s, d, n) = decode(&buf[..m]).expect("decode what encode wrote");
        assert_eq!(n, m);
        if src.is_ipv4() && dst.is_ipv4() {
            assert_eq!((s, d), (src, dst));
        } else {
            assert_eq!((s, d), (mapped(src), mapped(dst)));
        }
    }
});
