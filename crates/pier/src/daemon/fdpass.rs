//! The keeper's wire: one datagram per message over a `SOCK_SEQPACKET`
//! socket pair, a line of text and at most one file descriptor
//! (SCM_RIGHTS). The worker asks, the keeper answers; the keeper speaks to
//! a worker otherwise only with signals.
//!
//! | worker → keeper          | keeper → worker           |
//! |--------------------------|---------------------------|
//! | `GET tcp ADDR`           | `FD` + the socket, `NONE` |
//! | `HOLD tcp ADDR` + socket | `OK`                      |
//! | `RELEASE tcp ADDR`       | `OK`                      |
//! | `READY`                  | `OK`                      |
//! | `RELEASED`               | `OK`                      |
//!
//! `tcp` may be `udp`. `READY`: the worker serves (DNS, the proxy's
//! listeners for the synced snapshot, the mesh, the API). `RELEASED`: a
//! worker told to hand off has stopped writing to the store and closed it.
//!
//! The same messages run over an adoption connection
//! ([`super::orphan`]): an orphaned worker sends a `HOLD` for every
//! listening socket it serves on, then `READY`, and from then on the
//! connection is its keeper's socket.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// A listening socket's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A held socket's name: what it is bound to.
pub type SockKey = (Proto, SocketAddr);

/// What a worker asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get(SockKey),
    /// Comes with the socket.
    Hold(SockKey),
    Release(SockKey),
    Ready,
    Released,
}

/// What the keeper answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Comes with the socket.
    Fd,
    None,
    Ok,
    Err(String),
}

impl Request {
    pub fn encode(&self) -> String {
        let k = |v: &str, (p, a): &SockKey| format!("{v} {} {a}", p.as_str());
        match self {
            Request::Get(key) => k("GET", key),
            Request::Hold(key) => k("HOLD", key),
            Request::Release(key) => k("RELEASE", key),
            Request::Ready => "READY".into(),
            Request::Released => "RELEASED".into(),
        }
    }

    pub fn parse(s: &str) -> Result<Request, String> {
        let mut w = s.split(' ');
        let verb = w.next().unwrap_or_default();
        let mut key = || -> Result<SockKey, String> {
            let p = match w.next() {
                Some("tcp") => Proto::Tcp,
                Some("udp") => Proto::Udp,
                other => return Err(format!("{s:?}: protocol {other:?} is neither tcp nor udp")),
            };
            let a = w
                .next()
                .ok_or_else(|| format!("{s:?}: no address"))?
                .parse::<SocketAddr>()
                .map_err(|e| format!("{s:?}: {e}"))?;
            if w.next().is_some() {
                return Err(format!("{s:?}: trailing words"));
            }
            Ok((p, a))
        };
        match verb {
            "GET" => Ok(Request::Get(key()?)),
            "HOLD" => Ok(Request::Hold(key()?)),
            "RELEASE" => Ok(Request::Release(key()?)),
            "READY" if s == "READY" => Ok(Request::Ready),
            "RELEASED" if s == "RELEASED" => Ok(Request::Released),
            _ => Err(format!("{s:?}: unknown request")),
        }
    }
}

impl Reply {
    pub fn encode(&self) -> String {
        match self {
            Reply::Fd => "FD".into(),
            Reply::None => "NONE".into(),
            Reply::Ok => "OK".into(),
            Reply::Err(m) => format!("ERR {m}"),
        }
    }

    pub fn parse(s: &str) -> Reply {
        match s {
            "FD" => Reply::Fd,
            "NONE" => Reply::None,
            "OK" => Reply::Ok,
            _ => Reply::Err(s.strip_prefix("ERR ").unwrap_or(s).to_owned()),
        }
    }
}

/// Sends one message, with `fd` if given.
pub fn send(sock: BorrowedFd<'_>, msg: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(f) = fd {
        fds = [f];
        anc.push(SendAncillaryMessage::ScmRights(&fds));
    }
    sendmsg(
        sock,
        &[IoSlice::new(msg.as_bytes())],
        &mut anc,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives one message and the descriptor that came with it. `None` at
/// end of stream (the peer is gone).
pub fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; 512];
    // Room for a few: a peer that sends more than one gets them closed.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let r = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut got = None;
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                got.get_or_insert(f);
            }
        }
    }
    if r.bytes == 0 && got.is_none() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf[..r.bytes.min(buf.len())]).into_owned();
    Ok(Some((text, got)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn requests_round_trip_and_bad_ones_say_why() {
        let a: SocketAddr = "10.213.0.10:53".parse().unwrap();
        let v6: SocketAddr = "[::1]:30080".parse().unwrap();
        for r in [
            Request::Get((Proto::Tcp, a)),
            Request::Hold((Proto::Udp, a)),
            Request::Release((Proto::Tcp, v6)),
            Request::Ready,
            Request::Released,
        ] {
            assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        }
        assert!(
            Request::parse("GET sctp 1.2.3.4:5")
                .unwrap_err()
                .contains("sctp")
        );
        assert!(
            Request::parse("GET tcp")
                .unwrap_err()
                .contains("no address")
        );
        assert!(Request::parse("GET tcp 1.2.3.4").is_err());
        assert!(Request::parse("GET tcp 1.2.3.4:5 x").is_err());
        assert!(Request::parse("READY now").is_err());
        assert!(Request::parse("").is_err());
        for r in [Reply::Fd, Reply::None, Reply::Ok, Reply::Err("no".into())] {
            assert_eq!(Reply::parse(&r.encode()), r);
        }
    }

    #[test]
    fn a_socket_passes_and_still_listens() {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        send(a.as_fd(), "HOLD tcp x", Some(l.as_fd())).unwrap();
        drop(l);
        let (text, fd) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(text, "HOLD tcp x");
        let l2 = std::net::TcpListener::from(fd.expect("a descriptor"));
        assert_eq!(l2.local_addr().unwrap(), addr);
        // The same socket: a connection made now is accepted through it.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (_s, _) = l2.accept().unwrap();
        // A message without a descriptor, then the end of the stream.
        send(b.as_fd(), "OK", None).unwrap();
        let (text, fd) = recv(a.as_fd()).unwrap().unwrap();
        assert_eq!(text, "OK");
        assert!(fd.is_none());
        drop(b);
        assert!(recv(a.as_fd()).unwrap().is_none());
    }
}
