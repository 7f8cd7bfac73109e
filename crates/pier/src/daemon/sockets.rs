//! A worker's listening sockets: from the keeper when there is one
//! ([`super::keeper`]), else bound here.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use super::fdpass::{self, Proto, Reply, Request, SockKey};

/// The worker's end of the keeper's socket pair (its stdin), or nothing.
#[derive(Debug)]
pub struct Sockets {
    /// One request at a time: each waits for its answer. A std mutex: the
    /// keeper answers at once, and nothing awaits inside.
    keeper: Option<Mutex<KeeperEnd>>,
}

/// Where the keeper is: stdin, or (in tests) one end of a socket pair.
#[derive(Debug)]
enum KeeperEnd {
    Stdin(std::io::Stdin),
    #[cfg(test)]
    Fd(OwnedFd),
}

impl AsFd for KeeperEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            KeeperEnd::Stdin(s) => s.as_fd(),
            #[cfg(test)]
            KeeperEnd::Fd(f) => f.as_fd(),
        }
    }
}

impl Sockets {
    /// Without a keeper: every socket is bound here and closes with this
    /// process.
    pub fn local() -> Sockets {
        Sockets { keeper: None }
    }

    /// Under a keeper: stdin is its socket.
    pub fn from_keeper() -> std::io::Result<Sockets> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let st = rustix::fs::fstat(fd)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
            return Err(std::io::Error::other(format!(
                "{} is set but stdin is not the keeper's socket (run `pier agent` without it)",
                super::keeper::WORKER_ENV
            )));
        }
        // Answers come within milliseconds; a keeper that hangs is a bug.
        rustix::net::sockopt::set_socket_timeout(
            fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_secs(10)),
        )?;
        Ok(Sockets {
            keeper: Some(Mutex::new(KeeperEnd::Stdin(stdin))),
        })
    }

    pub fn has_keeper(&self) -> bool {
        self.keeper.is_some()
    }

    fn ask(
        &self,
        req: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<(Reply, Option<OwnedFd>)> {
        let Some(k) = &self.keeper else {
            return Ok((Reply::None, None));
        };
        let k = k.lock().unwrap_or_else(|p| p.into_inner());
        fdpass::send(k.as_fd(), &req.encode(), fd)?;
        match fdpass::recv(k.as_fd())? {
            Some((text, fd)) => Ok((Reply::parse(&text), fd)),
            None => Err(std::io::Error::other("the keeper is gone")),
        }
    }

    /// The socket on `key`: the keeper's copy, else `bind()` handed to the
    /// keeper.
    fn get_or_bind<T: AsFd + From<OwnedFd>>(
        &self,
        key: SockKey,
        bind: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        if self.keeper.is_none() {
            return bind();
        }
        if let (Reply::Fd, Some(fd)) = self.ask(&Request::Get(key), None)? {
            tracing::debug!(proto = ?key.0, addr = %key.1, "listening socket from the keeper");
            return Ok(T::from(fd));
        }
        let s = bind()?;
        match self.ask(&Request::Hold(key), Some(s.as_fd()))? {
            (Reply::Ok, _) => Ok(s),
            (r, _) => Err(std::io::Error::other(format!(
                "the keeper refused {key:?}: {r:?}"
            ))),
        }
    }

    pub fn tcp(
        &self,
        a: SocketAddr,
        bind: impl FnOnce() -> std::io::Result<std::net::TcpListener>,
    ) -> std::io::Result<std::net::TcpListener> {
        let l = self.get_or_bind((Proto::Tcp, a), bind)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    pub fn udp(
        &self,
        a: SocketAddr,
        bind: impl FnOnce() -> std::io::Result<std::net::UdpSocket>,
    ) -> std::io::Result<std::net::UdpSocket> {
        let s = self.get_or_bind((Proto::Udp, a), bind)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }

    /// Tells the keeper something; logged, not fatal, when it fails.
    pub fn notify(&self, req: Request) {
        if self.keeper.is_some()
            && let Err(e) = self.ask(&req, None)
        {
            tracing::warn!(request = %req.encode(), error = %e, "cannot tell the keeper");
        }
    }
}

impl pier_proxy::ListenerSource for Sockets {
    fn listen(
        &self,
        a: SocketAddr,
        bind: fn(SocketAddr) -> std::io::Result<std::net::TcpListener>,
    ) -> std::io::Result<std::net::TcpListener> {
        self.tcp(a, || bind(a))
    }

    fn listen_udp(
        &self,
        a: SocketAddr,
        bind: fn(SocketAddr) -> std::io::Result<std::net::UdpSocket>,
    ) -> std::io::Result<std::net::UdpSocket> {
        self.udp(a, || bind(a))
    }

    fn release(&self, proto: pier_model::Protocol, a: SocketAddr) {
        let p = match proto {
            pier_model::Protocol::Tcp => Proto::Tcp,
            pier_model::Protocol::Udp => Proto::Udp,
        };
        self.notify(Request::Release((p, a)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::keeper::plan::Event;
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};

    /// The worker's client against the keeper's real request loop: a
    /// socket handed over outlives the worker's copy, comes back on the
    /// next ask with the connections queued meanwhile, and is closed for
    /// good on release.
    #[test]
    fn sockets_survive_the_worker_and_close_on_release() {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let holdings = std::sync::Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let keeper = std::thread::spawn({
            let h = std::sync::Arc::clone(&holdings);
            move || super::super::keeper::serve_worker(7, ours, h, tx)
        });
        let s = Sockets {
            keeper: Some(Mutex::new(KeeperEnd::Fd(theirs))),
        };
        let a: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        // Not held yet: bound here and handed over.
        let l = s.tcp(a, || std::net::TcpListener::bind(a)).unwrap();
        drop(l);
        // The keeper's copy still listens: a connection waits in the backlog.
        let c = std::net::TcpStream::connect(a).unwrap();
        // Held now: the same socket comes back, never bound again.
        let l = s.tcp(a, || panic!("bound twice")).unwrap();
        l.set_nonblocking(false).unwrap();
        let (_conn, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        // Released: with the worker's copy gone too, the port is free.
        pier_proxy::ListenerSource::release(&s, pier_model::Protocol::Tcp, a);
        drop(l);
        std::net::TcpListener::bind(a).expect("the port is free after the release");
        // Ready reaches the keeper's loop as an event.
        s.notify(Request::Ready);
        assert_eq!(rx.try_recv().unwrap(), Event::Ready(7));
        // The worker goes: the keeper's thread ends.
        drop(s);
        keeper.join().unwrap();
    }
}
