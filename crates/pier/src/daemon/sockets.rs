//! A worker's listening sockets: from the keeper when there is one
//! ([`super::keeper`]), else bound here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::fdpass::{self, Proto, Reply, Request, SockKey};

/// A message with the descriptor that came with it.
type Msg = (String, Option<OwnedFd>);

/// Answers come within milliseconds; a keeper that hangs is a bug.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The worker's sockets and its line to the keeper.
#[derive(Debug)]
pub struct Sockets {
    /// Started by a keeper (even if it is gone now): sockets are shared
    /// with it, SIGUSR2 hands off.
    managed: bool,
    /// The keeper's socket: stdin at first, an adoption connection after
    /// an adoption, `None` while orphaned (or without a keeper). One
    /// request at a time: each waits for its answer, which the connection's
    /// reader thread passes on. A std mutex: nothing awaits inside.
    keeper: Mutex<Option<Conn>>,
    /// A copy of every listening socket this worker serves on (managed
    /// only), so that an orphan can hand them all to the keeper that
    /// adopts it. Removed on release.
    held: Mutex<BTreeMap<SockKey, OwnedFd>>,
}

#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    answers: mpsc::Receiver<Msg>,
    /// The reader's copy, until [`Sockets::start`] hands it to the thread.
    reader: Option<(OwnedFd, mpsc::Sender<Msg>)>,
}

impl Conn {
    fn new(fd: OwnedFd) -> std::io::Result<Conn> {
        let (tx, answers) = mpsc::channel();
        let r = fd.try_clone()?;
        Ok(Conn {
            fd,
            answers,
            reader: Some((r, tx)),
        })
    }
}

/// What the connection's reader does when the keeper is gone.
pub trait OnKeeperGone: Send + Sync + 'static {
    fn keeper_gone(self: Arc<Self>, sockets: &Arc<Sockets>);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sockets {
    /// Without a keeper: every socket is bound here and closes with this
    /// process.
    pub fn local() -> Sockets {
        Sockets {
            managed: false,
            keeper: Mutex::new(None),
            held: Mutex::default(),
        }
    }

    /// Under a keeper: stdin is its socket. [`Sockets::start`] before the
    /// first request.
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
        Self::over(fd.try_clone_to_owned()?)
    }

    /// Over `fd`, a keeper's end (stdin, or in tests a socket pair).
    fn over(fd: OwnedFd) -> std::io::Result<Sockets> {
        Ok(Sockets {
            managed: true,
            keeper: Mutex::new(Some(Conn::new(fd)?)),
            held: Mutex::default(),
        })
    }

    /// Starts the reader of the keeper's socket: it passes answers on,
    /// and calls `gone` when the keeper's end closes.
    pub fn start(self: &Arc<Self>, gone: Arc<dyn OnKeeperGone>) -> std::io::Result<()> {
        let reader = lock(&self.keeper).as_mut().and_then(|c| c.reader.take());
        if let Some((fd, tx)) = reader {
            let me = self.clone();
            std::thread::Builder::new()
                .name("keeper-reader".into())
                .spawn(move || read_keeper(fd, tx, me, gone))?;
        }
        Ok(())
    }

    /// Started by a keeper.
    pub fn has_keeper(&self) -> bool {
        self.managed
    }

    /// The keeper is gone: from now on sockets are bound here.
    pub fn forget_keeper(&self) {
        lock(&self.keeper).take();
    }

    /// A keeper adopts this orphan over `fd`: it becomes this worker's
    /// keeper; every socket this worker serves on goes to it (`HOLD`),
    /// then `READY`.
    pub fn adopted(
        self: &Arc<Self>,
        fd: OwnedFd,
        gone: Arc<dyn OnKeeperGone>,
    ) -> std::io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Send,
            Some(ANSWER_WITHIN),
        )?;
        let mut k = lock(&self.keeper);
        *k = Some(Conn::new(fd)?);
        drop(k);
        self.start(gone)?;
        // The keeper's lock across the whole list: a socket bound
        // meanwhile waits, and is handed over as the next one asked for.
        let k = lock(&self.keeper);
        let Some(conn) = k.as_ref() else {
            return Err(std::io::Error::other("the adopting keeper is gone"));
        };
        let held = lock(&self.held);
        for (key, fd) in held.iter() {
            match ask_on(conn, &Request::Hold(*key), Some(fd.as_fd()))? {
                (Reply::Ok, _) => {}
                (r, _) => {
                    return Err(std::io::Error::other(format!(
                        "the adopting keeper refused {key:?}: {r:?}"
                    )));
                }
            }
        }
        let n = held.len();
        drop(held);
        ask_on(conn, &Request::Ready, None)?;
        tracing::info!(
            sockets = n,
            "adopted: every listening socket handed to the new keeper"
        );
        Ok(())
    }

    /// The socket on `key`: the keeper's copy, else `bind()` handed to the
    /// keeper (or kept here alone while orphaned).
    fn get_or_bind<T: AsFd + From<OwnedFd>>(
        &self,
        key: SockKey,
        bind: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        if !self.managed {
            return bind();
        }
        let k = lock(&self.keeper);
        let s = match k.as_ref() {
            Some(conn) => {
                if let (Reply::Fd, Some(fd)) = ask_on(conn, &Request::Get(key), None)? {
                    tracing::debug!(proto = ?key.0, addr = %key.1, "listening socket from the keeper");
                    T::from(fd)
                } else {
                    let s = bind()?;
                    match ask_on(conn, &Request::Hold(key), Some(s.as_fd()))? {
                        (Reply::Ok, _) => s,
                        (r, _) => {
                            return Err(std::io::Error::other(format!(
                                "the keeper refused {key:?}: {r:?}"
                            )));
                        }
                    }
                }
            }
            // Orphaned: a copy still held here, else a new bind.
            None => match lock(&self.held).get(&key) {
                Some(fd) => T::from(fd.try_clone()?),
                None => bind()?,
            },
        };
        lock(&self.held).insert(key, s.as_fd().try_clone_to_owned()?);
        drop(k);
        Ok(s)
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

    /// Tells the keeper something; logged, not fatal, when it fails or
    /// when there is no keeper (orphaned).
    pub fn notify(&self, req: Request) {
        if !self.managed {
            return;
        }
        let k = lock(&self.keeper);
        let Some(conn) = k.as_ref() else {
            // Orphaned: the keeper that adopts it gets the sockets held
            // now, and READY.
            tracing::debug!(request = %req.encode(), "no keeper (orphaned); not told");
            return;
        };
        if let Err(e) = ask_on(conn, &req, None) {
            tracing::warn!(request = %req.encode(), error = %e, "cannot tell the keeper");
        }
    }
}

/// One request and its answer.
fn ask_on(
    conn: &Conn,
    req: &Request,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<(Reply, Option<OwnedFd>)> {
    // An answer left over from a request that timed out is stale.
    while conn.answers.try_recv().is_ok() {}
    fdpass::send(conn.fd.as_fd(), &req.encode(), fd)?;
    match conn.answers.recv_timeout(ANSWER_WITHIN) {
        Ok((text, fd)) => Ok((Reply::parse(&text), fd)),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the keeper did not answer {} within {} s",
                req.encode(),
                ANSWER_WITHIN.as_secs()
            ),
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(std::io::Error::other("the keeper is gone"))
        }
    }
}

/// The keeper's socket's one reader: answers go to the asker; at end of
/// stream the keeper is gone.
fn read_keeper(
    fd: OwnedFd,
    tx: mpsc::Sender<Msg>,
    sockets: Arc<Sockets>,
    gone: Arc<dyn OnKeeperGone>,
) {
    loop {
        match fdpass::recv(fd.as_fd()) {
            Ok(Some(m)) => {
                let _ = tx.send(m);
            }
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading the keeper's socket failed");
                break;
            }
        }
    }
    drop(tx);
    drop(fd);
    gone.keeper_gone(&sockets);
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
        lock(&self.held).remove(&(p, a));
        self.notify(Request::Release((p, a)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::keeper::plan::{Event, Holdings};
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};

    type Shared = Arc<Mutex<Holdings<OwnedFd>>>;

    /// A keeper's real request loop on a new socket pair, as worker `w`.
    fn keeper(
        w: i32,
    ) -> (
        OwnedFd,
        Shared,
        tokio::sync::mpsc::UnboundedReceiver<Event>,
        std::thread::JoinHandle<()>,
    ) {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let holdings: Shared = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let h = holdings.clone();
        let t = std::thread::spawn(move || super::super::keeper::serve_worker(w, ours, h, tx));
        (theirs, holdings, rx, t)
    }

    /// Counts the keeper's departures.
    #[derive(Default)]
    struct Gone(std::sync::atomic::AtomicU32);

    impl OnKeeperGone for Gone {
        fn keeper_gone(self: Arc<Self>, sockets: &Arc<Sockets>) {
            sockets.forget_keeper();
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// The worker's client against the keeper's real request loop: a
    /// socket handed over outlives the worker's copy, comes back on the
    /// next ask with the connections queued meanwhile, and is closed for
    /// good on release.
    #[test]
    fn sockets_survive_the_worker_and_close_on_release() {
        let (theirs, _h, mut rx, keeper) = keeper(7);
        let s = Arc::new(Sockets::over(theirs).unwrap());
        s.start(Arc::new(Gone::default())).unwrap();
        let a = free_addr();
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
        // Released: with the worker's copies gone too, the port is free.
        pier_proxy::ListenerSource::release(&*s, pier_model::Protocol::Tcp, a);
        drop(l);
        std::net::TcpListener::bind(a).expect("the port is free after the release");
        // Ready reaches the keeper's loop as an event.
        s.notify(Request::Ready);
        assert_eq!(rx.try_recv().unwrap(), Event::Ready(7));
        // The worker's end shuts: the keeper's thread ends.
        let fd = lock(&s.keeper).as_ref().unwrap().fd.try_clone().unwrap();
        rustix::net::shutdown(&fd, rustix::net::Shutdown::Both).unwrap();
        keeper.join().unwrap();
    }

    /// The keeper goes: the worker keeps its sockets and binds new ones
    /// alone; a keeper that adopts it gets every one of them, then READY.
    #[test]
    fn an_orphan_keeps_its_sockets_and_hands_them_all_to_its_adopter() {
        let (theirs, _h, _rx, first) = keeper(7);
        let s = Arc::new(Sockets::over(theirs).unwrap());
        let gone = Arc::new(Gone::default());
        s.start(gone.clone()).unwrap();
        let (a, b) = (free_addr(), free_addr());
        let la = s.tcp(a, || std::net::TcpListener::bind(a)).unwrap();
        let ub = s.udp(b, || std::net::UdpSocket::bind(b)).unwrap();
        // The keeper dies (its end closes).
        let fd = lock(&s.keeper).as_ref().unwrap().fd.try_clone().unwrap();
        rustix::net::shutdown(&fd, rustix::net::Shutdown::Both).unwrap();
        first.join().unwrap();
        let t0 = std::time::Instant::now();
        while gone.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "keeper_gone not called"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Orphaned: a new listener is bound here, asking no one.
        let c = free_addr();
        let lc = s.tcp(c, || std::net::TcpListener::bind(c)).unwrap();
        s.notify(Request::Ready); // logged, not fatal
        // Adopted by a new keeper: it holds all three, claimed by 50.
        let (theirs, holdings, mut rx, second) = keeper(50);
        s.adopted(theirs, gone.clone()).unwrap();
        assert_eq!(rx.try_recv().unwrap(), Event::Ready(50));
        {
            let mut h = lock(&holdings);
            for key in [(Proto::Tcp, a), (Proto::Udp, b), (Proto::Tcp, c)] {
                assert!(h.get(50, &key).is_some(), "{key:?} not handed over");
            }
        }
        // The adopter's copy is the same socket: a connection made now is
        // accepted through it.
        let kept = lock(&holdings)
            .get(50, &(Proto::Tcp, a))
            .unwrap()
            .try_clone()
            .unwrap();
        let kept = std::net::TcpListener::from(kept);
        let conn = std::net::TcpStream::connect(a).unwrap();
        kept.set_nonblocking(false).unwrap();
        let (_s, peer) = kept.accept().unwrap();
        assert_eq!(peer, conn.local_addr().unwrap());
        drop((la, ub, lc));
        // A release reaches the adopter.
        pier_proxy::ListenerSource::release(&*s, pier_model::Protocol::Tcp, c);
        assert!(lock(&holdings).get(50, &(Proto::Tcp, c)).is_none());
        let fd = lock(&s.keeper).as_ref().unwrap().fd.try_clone().unwrap();
        rustix::net::shutdown(&fd, rustix::net::Shutdown::Both).unwrap();
        second.join().unwrap();
    }
}
