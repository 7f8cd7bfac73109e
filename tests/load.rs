//! Bounded client loops for restart tests: one new connection (or one DNS
//! query) at a time, a fixed count, each bounded in time, with failures
//! sorted by where they happened.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// What a loop saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: u32,
    pub ok: u32,
    /// A new connection (or query) that failed: refused, timed out, or
    /// answered wrongly.
    pub new_failed: u32,
    /// A connection accepted, then cut before its answer (one in flight
    /// through a process that died).
    pub cut: u32,
    /// The longest request, connect to last byte: the client-seen stall.
    pub longest: Duration,
    /// The first few failures, for the test's message.
    pub errors: Vec<String>,
}

impl LoadReport {
    fn note(&mut self, took: Duration, r: Result<(), (bool, String)>) {
        self.sent += 1;
        self.longest = self.longest.max(took);
        match r {
            Ok(()) => self.ok += 1,
            Err((cut, e)) => {
                if cut {
                    self.cut += 1;
                } else {
                    self.new_failed += 1;
                }
                if self.errors.len() < 5 {
                    self.errors.push(e);
                }
            }
        }
    }

    pub fn failed(&self) -> u32 {
        self.new_failed + self.cut
    }
}

/// `n` HTTP/1.0 GETs of `/` to `addr`, `gap` apart, each on a new
/// connection and bounded by 5 s; a 200 is a success.
pub fn http_loop(addr: SocketAddr, n: u32, gap: Duration) -> LoadReport {
    let mut rep = LoadReport::default();
    for _ in 0..n {
        let t = Instant::now();
        let r = http_once(addr);
        rep.note(t.elapsed(), r);
        std::thread::sleep(gap);
    }
    rep
}

fn http_once(addr: SocketAddr) -> Result<(), (bool, String)> {
    let limit = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, limit)
        .map_err(|e| (false, format!("connect {addr}: {e}")))?;
    let cut = |e: std::io::Error| (true, format!("{addr}: {e}"));
    s.set_read_timeout(Some(limit)).map_err(cut)?;
    s.set_write_timeout(Some(limit)).map_err(cut)?;
    write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(cut)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(cut)?;
    let text = String::from_utf8_lossy(&buf);
    if text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err((
            true,
            format!("{addr}: answer {:?}", text.lines().next().unwrap_or("")),
        ))
    }
}

/// `n` lookups of `name` (type A) with `dig` at `server`, `gap` apart,
/// one try each with a 5 s timeout; success when the answer is `expect`.
pub fn dns_loop(server: IpAddr, name: &str, expect: &str, n: u32, gap: Duration) -> LoadReport {
    let mut rep = LoadReport::default();
    for _ in 0..n {
        let t = Instant::now();
        let out = Command::new("dig")
            .arg(format!("@{server}"))
            .args([name, "A", "+short", "+tries=1", "+timeout=5"])
            .output();
        let r = match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == expect => Ok(()),
            Ok(o) => Err((
                false,
                format!(
                    "dig {name}: {} {}",
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )),
            Err(e) => Err((false, format!("running dig: {e}"))),
        };
        rep.note(t.elapsed(), r);
        std::thread::sleep(gap);
    }
    rep
}

/// The pids of `parent`'s children (a keeper's workers), from /proc.
pub fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces; split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}
