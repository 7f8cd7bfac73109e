//! Active health checks (TCP connect, HTTP GET) run by one task per target.
//!
//! `docker` and `none` checks need no task: the agent reads Docker's health
//! status from events and inspects, and `none` is ready while running.

use std::net::SocketAddr;
use std::time::Duration;

use pier_model::{HealthCheck, HealthKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// While a target has never passed, probe at most this often, so a new
/// container is ready about 100 ms after it listens rather than a whole
/// interval later.
const STARTUP_PROBE: Duration = Duration::from_millis(100);

/// What one task checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub addr: SocketAddr,
    pub check: HealthCheck,
}

/// A flip of a target's readiness.
#[derive(Debug)]
pub(crate) struct Report {
    pub key: String,
    pub generation: u64,
    pub ready: bool,
}

/// One check. `Err` says why it failed, for debug logs.
pub(crate) async fn probe(t: &Target) -> Result<(), String> {
    let timeout = Duration::from_millis(t.check.timeout_ms.max(1));
    let fut = async {
        let mut s = TcpStream::connect(t.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", t.addr))?;
        match &t.check.kind {
            HealthKind::Http { path } => {
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: pier-health\r\nConnection: close\r\n\r\n",
                    t.addr
                );
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("write to {}: {e}", t.addr))?;
                let mut buf = [0u8; 64];
                let mut n = 0;
                // The status line fits in 64 bytes; read until it is complete.
                while n < buf.len() {
                    let m = s
                        .read(&mut buf[n..])
                        .await
                        .map_err(|e| format!("read from {}: {e}", t.addr))?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].contains(&b'\n') {
                        break;
                    }
                }
                let line = String::from_utf8_lossy(&buf[..n]);
                let code: u16 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("no HTTP status from {}: {line:?}", t.addr))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET {path} on {} answered {code}", t.addr))
                }
            }
            _ => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer from {} within {timeout:?}", t.addr)),
    }
}

/// Probe `target` until cancelled, reporting its first verdict (ready, or
/// not ready after `unhealthy_threshold` failures) and then each change,
/// with the thresholds of its check.
pub(crate) async fn run(
    key: String,
    generation: u64,
    target: Target,
    tx: mpsc::UnboundedSender<Report>,
    cancel: CancellationToken,
) {
    let interval = Duration::from_millis(target.check.interval_ms.max(10));
    let mut ready = false;
    let mut ever_ready = false;
    let mut reported = false;
    let (mut passes, mut fails) = (0u32, 0u32);
    // Sends a verdict; false once the agent is gone.
    let report = |ready: bool| {
        tx.send(Report {
            key: key.clone(),
            generation,
            ready,
        })
        .is_ok()
    };
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = probe(&target) => r,
        };
        match r {
            Ok(()) => {
                passes += 1;
                fails = 0;
                if !ready && passes >= target.check.healthy_threshold.max(1) {
                    ready = true;
                    ever_ready = true;
                    reported = true;
                    if !report(ready) {
                        return;
                    }
                }
            }
            Err(why) => {
                tracing::debug!(health.key = %key, error = %why, "health check failed");
                fails += 1;
                passes = 0;
                if (ready || !reported) && fails >= target.check.unhealthy_threshold.max(1) {
                    ready = false;
                    reported = true;
                    if !report(ready) {
                        return;
                    }
                }
            }
        }
        let wait = if ever_ready {
            interval
        } else {
            interval.min(STARTUP_PROBE)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_probe_reads_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for code in [200, 503] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 256];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.0 {code} X\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Target {
            addr,
            check: HealthCheck::new(HealthKind::Http { path: "/h".into() }),
        };
        assert_eq!(probe(&t).await, Ok(()));
        let e = probe(&t).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_closed_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let t = Target {
            addr,
            check: HealthCheck::new(HealthKind::Tcp),
        };
        assert!(probe(&t).await.is_err());
    }
}
