//! A real headless Chromium for the dashboard test, driven over the
//! DevTools protocol on `--remote-debugging-pipe` (fd 3 in, fd 4 out,
//! messages separated by NUL bytes): no WebSocket, no port, no crate.
//!
//! Everything the page logs is kept: [`Browser::console_errors`] lists the
//! console errors, uncaught exceptions and browser log errors (a failed
//! load, a CSP refusal) seen so far, [`Browser::console_warnings`] the
//! warnings; a [`Browser::wait_for`] that times out shows both.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The command the test runs (scripts/deps.sh checks for it).
pub const CHROMIUM: &str = "chromium";

/// One headless Chromium with one page. Dropping it kills the browser (by
/// its PID) and removes its profile.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    to: ChildStdin,
    from: Receiver<Value>,
    next_id: u64,
    session: String,
    /// Events not looked at yet.
    events: VecDeque<Value>,
    errors: Vec<String>,
    /// Console warnings and browser log warnings (the dashboard warns
    /// when a stream breaks and it reconnects).
    warnings: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start Chromium (headless, as root so without its sandbox), open a
    /// blank page of `width`×`height` and attach to it.
    pub fn start(width: u32, height: u32, log: &Path) -> Result<Browser> {
        let profile = tempfile::tempdir()?;
        let logf = std::fs::File::create(log)?;
        // The shell puts our pipes on fds 3 and 4, where
        // --remote-debugging-pipe expects them, and gives Chromium
        // /dev/null as stdin and the log as stdout.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .with_context(|| {
                format!("starting {CHROMIUM} (install Debian's chromium; tests/run.sh does)")
            })?;
        let to = child.stdin.take().context("chromium's pipe")?;
        let out = child.stdout.take().context("chromium's pipe")?;
        let (tx, rx) = channel();
        // Reads messages until the browser closes the pipe.
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut b = Browser {
            child,
            to,
            from: rx,
            next_id: 0,
            session: String::new(),
            events: VecDeque::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            _profile: profile,
        };
        let t = b.call_browser("Target.createTarget", json!({"url": "about:blank"}))?;
        let target = t["targetId"].as_str().context("no targetId")?.to_owned();
        let s = b.call_browser(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )?;
        b.session = s["sessionId"].as_str().context("no sessionId")?.to_owned();
        for m in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(m, json!({}))?;
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        Ok(b)
    }

    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .with_context(|| format!("sending {method} to chromium"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.from.recv_timeout(left) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => bail!("chromium did not answer {method} in 20 s"),
                Err(RecvTimeoutError::Disconnected) => bail!("chromium exited during {method}"),
            };
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            self.note(v);
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Result<Value> {
        self.send(None, method, params)
    }

    /// A command to the page.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let s = self.session.clone();
        self.send(Some(&s), method, params)
    }

    /// Keep an event, and the errors among them.
    fn note(&mut self, v: Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") if p["type"] == "error" || p["type"] == "assert" => {
                self.errors
                    .push(format!("console.error: {}", console_args(p)));
            }
            Some("Runtime.consoleAPICalled") if p["type"] == "warning" => {
                self.warnings
                    .push(format!("console.warn: {}", console_args(p)));
            }
            Some("Runtime.exceptionThrown") => {
                let d = &p["exceptionDetails"];
                self.errors.push(format!(
                    "exception: {} {}",
                    d["text"], d["exception"]["description"]
                ));
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                self.errors
                    .push(format!("log: {} {}", p["entry"]["text"], p["entry"]["url"]));
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "warning" => {
                self.warnings
                    .push(format!("log: {} {}", p["entry"]["text"], p["entry"]["url"]));
            }
            _ => {}
        }
        self.events.push_back(v);
        while self.events.len() > 1000 {
            self.events.pop_front();
        }
    }

    /// Take in whatever arrived without a command.
    fn drain(&mut self) {
        while let Ok(v) = self.from.try_recv() {
            self.note(v);
        }
    }

    /// Open `url` in the page.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(e) = r["errorText"].as_str() {
            bail!("navigating to {url}: {e}");
        }
        Ok(())
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(d) = r.get("exceptionDetails") {
            bail!("evaluating {expr}: {d}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluate `expr` every 100 ms until it is `true`, or fail after
    /// `limit` with the last value of `show` (what the page showed).
    pub fn wait_for(&mut self, limit: Duration, what: &str, expr: &str, show: &str) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.eval(expr)? == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let seen = self.eval(show).unwrap_or_default();
                let errors = self.console_errors();
                bail!(
                    "timed out after {limit:?} waiting for {what}; the page showed: {seen}; errors: {errors:?}; warnings: {:?}",
                    self.warnings
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The page's errors so far (console errors, uncaught exceptions,
    /// browser log errors).
    pub fn console_errors(&mut self) -> Vec<String> {
        self.drain();
        self.errors.clone()
    }

    /// The page's warnings so far (console warnings, browser log
    /// warnings).
    pub fn console_warnings(&mut self) -> Vec<String> {
        self.drain();
        self.warnings.clone()
    }

    /// A PNG of the whole page, written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<PathBuf> {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let data = r["data"].as_str().context("no screenshot data")?;
        let png = base64_decode(data).context("the screenshot is not base64")?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, png)?;
        Ok(path.to_owned())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask first (Chromium then ends its helper processes itself), then
        // make sure: the child is the shell that exec'd Chromium, same PID.
        let _ = self.call_browser("Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments of a console call, as text.
fn console_args(p: &Value) -> String {
    p["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    x["value"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| x["description"].to_string())
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Standard base64 with padding (what DevTools sends).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        match chunk.len() {
            4 => out.extend_from_slice(&bytes),
            3 => out.extend_from_slice(&bytes[..2]),
            2 => out.push(bytes[0]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert!(super::base64_decode("a").is_none());
        assert!(super::base64_decode("a*==").is_none());
    }
}
