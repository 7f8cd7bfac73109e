//! Batched UDP receive and send (`recvmmsg`/`sendmmsg`, through nix's safe
//! wrappers): one system call for up to [`BATCH`] datagrams each way. Under
//! load this is where most of a query's CPU goes, as NSD and Knot know.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Receive slot size: a query is a few hundred bytes; anything longer than
/// this arrives cut (MSG_TRUNC) and is answered FORMERR or dropped.
pub const SLOT: usize = 4096;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Rx {
    pub len: usize,
    pub peer: Option<SocketAddr>,
}

pub struct Batcher {
    rx_hdrs: MultiHeaders<SockaddrStorage>,
    tx_hdrs: MultiHeaders<SockaddrStorage>,
    /// BATCH slots of SLOT bytes.
    pub rx_buf: Box<[u8]>,
    pub rx: [Rx; BATCH],
    tx_addrs: Vec<Option<SockaddrStorage>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

fn to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

impl Batcher {
    pub fn new() -> Batcher {
        Batcher {
            rx_hdrs: MultiHeaders::preallocate(BATCH, None),
            tx_hdrs: MultiHeaders::preallocate(BATCH, None),
            rx_buf: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            rx: [Rx { len: 0, peer: None }; BATCH],
            tx_addrs: Vec::with_capacity(BATCH),
        }
    }

    /// The i-th received datagram.
    pub fn packet(&self, i: usize) -> &[u8] {
        let r = self.rx[i];
        &self.rx_buf[i * SLOT..i * SLOT + r.len.min(SLOT)]
    }

    /// Wait for one datagram (up to the socket's read timeout: `WouldBlock`),
    /// then take whatever else is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut chunks = self.rx_buf.chunks_exact_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let res = recvmmsg(
            fd,
            &mut self.rx_hdrs,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map_err(io::Error::from)?;
        let mut n = 0;
        for (slot, m) in self.rx.iter_mut().zip(res) {
            *slot = Rx {
                len: m.bytes,
                peer: m.address.as_ref().and_then(to_std),
            };
            n += 1;
        }
        Ok(n)
    }

    /// Send `msgs[i]` to `peers[i]`; returns how many went out.
    pub fn send(&mut self, fd: RawFd, msgs: &[&[u8]], peers: &[SocketAddr]) -> io::Result<usize> {
        self.tx_addrs.clear();
        self.tx_addrs
            .extend(peers.iter().map(|p| Some(SockaddrStorage::from(*p))));
        let n = msgs.len().min(BATCH);
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(msgs.get(i).copied().unwrap_or_default())]);
        let none: [ControlMessage<'_>; 0] = [];
        let res = sendmmsg(
            fd,
            &mut self.tx_hdrs,
            iovs[..n].iter(),
            &self.tx_addrs[..n],
            none,
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        Ok(res.count())
    }
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher::new()
    }
}
