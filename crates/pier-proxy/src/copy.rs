//! The copy loop: splice(2) through a pipe per direction, or a plain
//! user-space copy.
//!
//! Half-close: when one side sends EOF, the loop shuts down writing towards
//! the other side and keeps copying the other direction until it ends too.
//! There is no idle timeout.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::error::Side;

/// The pipe capacity asked for (F_SETPIPE_SZ), in bytes; 0 keeps the
/// kernel's default (64 KiB). Set once from the config.
static PIPE_SIZE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub(crate) fn set_pipe_size(bytes: usize) {
    PIPE_SIZE.store(bytes, std::sync::atomic::Ordering::Relaxed);
}
/// Pipes kept for reuse; beyond this they are closed.
const POOL_MAX: usize = 1024;

/// A pipe pair (read end, write end).
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes one splice moves at most: the pipe's capacity, so that a
    /// splice into the empty pipe never stops on a full pipe.
    cap: usize,
}

/// Empty pipes from finished connections: a new connection takes one
/// instead of two pipe2 + four close calls. A std Mutex: the critical
/// section is a Vec push or pop, with no await inside.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Ok(mut p) = POOL.lock()
            && let Some(p) = p.pop()
        {
            return Ok(p);
        }
        let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let want = PIPE_SIZE.load(std::sync::atomic::Ordering::Relaxed);
        let cap = if want > 0 {
            // Above /proc/sys/fs/pipe-max-size (1 MiB) for an unprivileged
            // process this fails: keep the default then.
            rustix::pipe::fcntl_setpipe_size(&w, want).unwrap_or(64 * 1024)
        } else {
            rustix::pipe::fcntl_getpipe_size(&w).unwrap_or(64 * 1024)
        };
        Ok(Pipe { r, w, cap })
    }

    /// Only an empty pipe goes back: a pipe with bytes left in it belongs to
    /// a connection that broke mid-copy, and is closed.
    fn give_back(self) {
        if let Ok(mut p) = POOL.lock()
            && p.len() < POOL_MAX
        {
            p.push(self);
        }
    }
}

static SPLICED_DIRECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many connection directions have switched to splice since start (for
/// tests and debugging).
pub fn spliced_directions() -> u64 {
    SPLICED_DIRECTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Byte counters for one direction: the service port's and the endpoint's,
/// and the connection's first-byte timer with whether this direction is
/// client → endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters<'a> {
    pub svc: &'a Counter,
    pub ep: Option<&'a Counter>,
    pub first_byte: Option<(&'a crate::metrics::FirstByte<'a>, bool)>,
}

impl Counters<'_> {
    pub(crate) fn add(&self, n: usize) {
        self.svc.inc_by(n as u64);
        if let Some(ep) = self.ep {
            ep.inc_by(n as u64);
        }
        if let Some((fb, to_endpoint)) = self.first_byte {
            fb.on_bytes(to_endpoint);
        }
    }
}

/// The result of a copy: which side broke it, if any.
pub(crate) type CopyResult = Result<(), (Side, io::Error)>;

pub(crate) fn wouldblock(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Reads are first served through a buffer shared by all connections of a
/// thread; a read that fills it marks the direction as bulk, and from then
/// on it is spliced. Small exchanges (requests, responses, control
/// traffic) so cost one read and one write with no pipe, and an idle
/// connection holds no buffer at all.
const SMALL: usize = 16 * 1024;

thread_local! {
    static SHARED: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; SMALL].into_boxed_slice());
}

enum Step {
    /// Nothing to read after all (a stale readiness).
    Again,
    Eof,
    /// `n` bytes read; `full` when they filled the buffer; `rest` is what
    /// `dst` did not take at once; `last` when the peer's FIN follows them
    /// (they were sent corked, for the FIN to go in the same segment).
    Moved {
        n: usize,
        full: bool,
        rest: Option<Vec<u8>>,
        last: bool,
    },
}

/// One read from `src` into the shared buffer and as much of a write to
/// `dst` as it takes now, with no await in between (the buffer is the
/// thread's).
///
/// `closed` is the readiness saying `src`'s peer has sent its FIN. A short
/// read then took everything before it, so the next read would return 0:
/// the bytes are sent with MSG_MORE and the caller shuts `dst` down at
/// once, so that the data and the FIN leave in one segment (as HAProxy
/// sends them), rather than data, the peer's ACK, then a FIN: two packets
/// and a read fewer for every connection whose server closes first.
fn read_write_once(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    dst_side: Side,
    closed: bool,
) -> Result<Step, (Side, io::Error)> {
    SHARED.with_borrow_mut(|buf| {
        let mut got = 0usize;
        let r = src.try_io(Interest::READABLE, || {
            let n = rustix::io::read(src, &mut buf[..])?;
            got = n;
            if n > 0 && n < buf.len() {
                // A short TCP read means the receive queue was empty: say
                // so now, which clears the readiness, instead of paying
                // for a read that returns EAGAIN. tokio clears it only if
                // no new event came in meanwhile, so nothing is missed.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match r {
            Ok(0) => return Ok(Step::Eof),
            Ok(_) => {}
            Err(e) if wouldblock(&e) && got == 0 => return Ok(Step::Again),
            Err(e) if wouldblock(&e) => {}
            Err(e) => return Err((src_side, e)),
        }
        let n = got;
        let last = closed && n < buf.len();
        let mut off = 0;
        while off < n {
            let w = if last {
                dst.try_io(Interest::WRITABLE, || {
                    rustix::net::send(dst, &buf[off..n], rustix::net::SendFlags::MORE)
                        .map_err(io::Error::from)
                })
            } else {
                dst.try_write(&buf[off..n])
            };
            match w {
                Ok(m) => off += m,
                Err(e) if wouldblock(&e) => break,
                Err(e) => return Err((dst_side, e)),
            }
        }
        Ok(Step::Moved {
            n,
            full: n == buf.len(),
            rest: (off < n).then(|| buf[off..n].to_vec()),
            last,
        })
    })
}

pub(crate) async fn write_all(dst: &TcpStream, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        dst.writable().await?;
        match dst.try_write(b) {
            Ok(m) => b = &b[m..],
            Err(e) if wouldblock(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes an EOF on. When the other direction has already ended, both
/// sockets are about to be closed, and close sends the FIN: the shutdown
/// call is skipped.
fn shutdown_write(dst: &TcpStream, dst_side: Side, other_done: &AtomicBool) -> CopyResult {
    if other_done.swap(true, Relaxed) {
        return Ok(());
    }
    send_fin(dst, dst_side)
}

/// Shuts down writing to `dst` (a FIN); a peer already gone is not an
/// error.
pub(crate) fn send_fin(dst: &TcpStream, dst_side: Side) -> CopyResult {
    match rustix::net::shutdown(dst, rustix::net::Shutdown::Write) {
        Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
        Err(e) => Err((dst_side, e.into())),
    }
}

/// Copies `src` → `dst` until EOF, then shuts down `dst`'s write side.
/// Starts with read/write through the shared buffer and switches to
/// splice (when `use_splice`) once a read fills it. `pipe` is taken at the
/// switch and left in place for the caller to give back.
#[allow(clippy::too_many_arguments)]
async fn copy_one_tcp(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    dst_side: Side,
    use_splice: bool,
    pipe: &mut Option<Pipe>,
    clean: &mut bool,
    ended: &AtomicBool,
    cnt: Counters<'_>,
) -> CopyResult {
    loop {
        let ready = src
            .ready(Interest::READABLE)
            .await
            .map_err(|e| (src_side, e))?;
        match read_write_once(src, dst, src_side, dst_side, ready.is_read_closed())? {
            Step::Again => continue,
            Step::Eof => return shutdown_write(dst, dst_side, ended),
            Step::Moved {
                n,
                full,
                rest,
                last,
            } => {
                if let Some(rest) = rest {
                    write_all(dst, &rest).await.map_err(|e| (dst_side, e))?;
                }
                cnt.add(n);
                if last {
                    // The FIN flushes what MSG_MORE held back, whether or
                    // not the other direction has ended.
                    ended.store(true, Relaxed);
                    return send_fin(dst, dst_side);
                }
                if full && use_splice {
                    break;
                }
            }
        }
    }
    let p = pipe.insert(Pipe::take().map_err(|e| (Side::Internal, e))?);
    SPLICED_DIRECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    loop {
        src.readable().await.map_err(|e| (src_side, e))?;
        let n = match src.try_io(Interest::READABLE, || {
            splice(
                src,
                None,
                &p.w,
                None,
                p.cap,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            )
            .map_err(io::Error::from)
        }) {
            Ok(0) => return shutdown_write(dst, dst_side, ended),
            Ok(n) => n,
            Err(e) if wouldblock(&e) => continue,
            Err(e) => return Err((src_side, e)),
        };
        *clean = false;
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(
                    &p.r,
                    None,
                    dst,
                    None,
                    left,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )
                .map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if wouldblock(&e) => dst.writable().await.map_err(|e| (dst_side, e))?,
                Err(e) => return Err((dst_side, e)),
            }
        }
        *clean = true;
        cnt.add(n);
    }
}

/// Copies both directions of `client` ↔ `upstream` until both have seen
/// EOF, or either breaks; bulk directions are spliced when `use_splice`.
pub(crate) async fn tcp_bidi(
    client: &TcpStream,
    upstream: &TcpStream,
    use_splice: bool,
    c_in: Counters<'_>,
    c_out: Counters<'_>,
) -> CopyResult {
    let (mut p1, mut p2) = (None, None);
    let (mut clean1, mut clean2) = (true, true);
    let ended = AtomicBool::new(false);
    let r = {
        let d1 = copy_one_tcp(
            client,
            upstream,
            Side::Downstream,
            Side::Upstream,
            use_splice,
            &mut p1,
            &mut clean1,
            &ended,
            c_in,
        );
        let d2 = copy_one_tcp(
            upstream,
            client,
            Side::Upstream,
            Side::Downstream,
            use_splice,
            &mut p2,
            &mut clean2,
            &ended,
            c_out,
        );
        both(d1, d2).await
    };
    for (p, clean) in [(p1, clean1), (p2, clean2)] {
        if let Some(p) = p
            && clean
        {
            p.give_back();
        }
    }
    r
}

/// Runs both directions; the first error ends both.
pub(crate) async fn both(
    d1: impl Future<Output = CopyResult>,
    d2: impl Future<Output = CopyResult>,
) -> CopyResult {
    tokio::pin!(d1, d2);
    let (mut done1, mut done2) = (false, false);
    while !(done1 && done2) {
        tokio::select! {
            r = &mut d1, if !done1 => { r?; done1 = true; }
            r = &mut d2, if !done2 => { r?; done2 = true; }
        }
    }
    Ok(())
}
