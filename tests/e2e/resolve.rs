//! A static endpoint given by name, as a user meets it: `pier expose
//! external db --endpoint db.pier-resolve.test:8080`, with a real resolver
//! the test controls (dnsmasq on loopback, the agent's `[dns] upstreams`,
//! answering from a hosts file it re-reads on SIGHUP, TTL 1 s so the agent
//! asks every 5 s). The record moves from one backend container to another
//! and the VIP follows; it then points at 127.0.0.1 and is refused with
//! the note; then the resolver dies and the last answer is kept for
//! `static_name_stale_ms` (here 8 s), then dropped. The CLI resolves the
//! name too (the address it stores is checked by the API at once): it runs
//! in a mount namespace whose /etc/hosts holds the name, so nothing on the
//! host is changed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use pier_tests::{AgentOpts, AgentProc, Scenario, TEST_IMAGE, eventually, http_get, pier_bin};

const NAME: &str = "db.pier-resolve.test";

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output()?;
    ensure!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A dnsmasq this test started, stopped by its PID when dropped.
struct Dnsmasq(Child);
impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq answering only from `hosts` (no upstream of its own, so no
/// query leaves the host), on 127.0.0.1:`port`, every answer with TTL 1.
fn dnsmasq(hosts: &std::path::Path, port: u16) -> Result<Dnsmasq> {
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local-ttl=1",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq (tests/run.sh installs dnsmasq-base)")?;
    Ok(Dnsmasq(child))
}

/// Point NAME at `ip` in the resolver's hosts file and have it re-read.
fn point(hosts: &std::path::Path, d: &Dnsmasq, ip: &str) -> Result<()> {
    std::fs::write(hosts, format!("{ip} {NAME}\n"))?;
    let st = Command::new("kill")
        .args(["-HUP", &d.0.id().to_string()])
        .status()?;
    ensure!(st.success(), "SIGHUP to dnsmasq");
    Ok(())
}

/// The value of `pier_static_name_lookups_total{outcome}`.
fn lookups(a: &AgentProc, outcome: &str) -> Result<u64> {
    let (code, body) = a.api_get("/metrics")?;
    ensure!(code == 200, "/metrics: {code}");
    let want = format!("pier_static_name_lookups_total{{outcome=\"{outcome}\"}} ");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map(|v| v.trim().parse().unwrap_or(0))
        .unwrap_or(0))
}

#[test]
fn an_external_endpoint_by_name_follows_its_record() -> Result<()> {
    let port = pier_tests::free_port();
    let a = Scenario::start(AgentOpts {
        store: "embedded".into(),
        node: "resolve-1".into(),
        // Inside [agent], then the resolver as the only upstream.
        extra_toml: format!(
            "static_name_stale_ms = 8000\n[dns]\nupstreams = [\"127.0.0.1:{port}\"]\nupstream_timeout_ms = 500\n"
        ),
    })?;
    // Two backends on Docker's bridge, each serving its hostname; the
    // agent does not take them (no pier.service), the run label removes them.
    let mut ips = Vec::new();
    for h in ["backend-a", "backend-b"] {
        let id = docker(&[
            "run",
            "-d",
            "--hostname",
            h,
            "--label",
            &format!("pier.test-run={}", a.run_label),
            TEST_IMAGE,
        ])?;
        ips.push(docker(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}}",
            &id,
        ])?);
    }
    let dir = tempfile::tempdir()?;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("{} {NAME}\n", ips[0]))?;
    let dns = dnsmasq(&hosts, port)?;

    // The CLI resolves the name through the ordinary resolver, here an
    // /etc/hosts of this mount namespace only.
    let etc_hosts = dir.path().join("etc-hosts");
    std::fs::write(&etc_hosts, format!("{} {NAME}\n", ips[0]))?;
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
        ])
        .arg(&etc_hosts)
        .arg(pier_bin()?)
        .arg("--config")
        .arg(a.dir.path().join("pier.toml"))
        .args(["expose", "external", "db", "--port", "8080", "--endpoint"])
        .arg(format!("{NAME}:8080"))
        .output()
        .context("running the CLI under unshare -m")?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(out.status.success(), "expose external: {stdout}{stderr}");
    ensure!(
        stderr.contains(&format!(
            "note: --endpoint {NAME}:8080 is {}:8080 now",
            ips[0]
        )) && stderr.contains("looks db.pier-resolve.test up again"),
        "the note: {stderr}"
    );
    ensure!(
        stdout.contains(&format!("endpoints {NAME}:8080 (now {})", ips[0])),
        "{stdout}"
    );
    let svc = a.cli_json(&["get", "svc", "db"])?;
    ensure!(svc[0]["static_endpoints"][0]["name"] == NAME, "{svc}");
    let vip: std::net::IpAddr = svc[0]["vip"].as_str().context("a VIP")?.parse()?;
    let vip = std::net::SocketAddr::new(vip, 8080);
    let reaches = |who: &'static str| {
        move || -> Result<Option<()>> {
            Ok(http_get(&vip, "/")
                .ok()
                .filter(|(c, b)| *c == 200 && b.trim() == who)
                .map(|_| ()))
        }
    };
    eventually(
        Duration::from_secs(15),
        "the VIP reaches backend-a",
        reaches("backend-a"),
    )
    .with_context(|| a.log_tail())?;

    // The record moves: within the clamped TTL (5 s) and a health check.
    point(&hosts, &dns, &ips[1])?;
    eventually(
        Duration::from_secs(15),
        "the VIP follows to backend-b",
        reaches("backend-b"),
    )
    .with_context(|| a.log_tail())?;
    ensure!(lookups(&a, "changed")? >= 1, "changed lookups counted");
    ensure!(
        a.log_tail().contains("static endpoint name: new addresses"),
        "the change is logged:\n{}",
        a.log_tail()
    );

    // The record points at the host's loopback: refused, with the note,
    // and the VIP reaches nothing (it never reaches this host's port 8080).
    point(&hosts, &dns, "127.0.0.1")?;
    eventually(
        Duration::from_secs(15),
        "the loopback answer refused",
        || {
            let log = std::fs::read_to_string(&a.log)?;
            Ok(log
                .lines()
                .any(|l| l.contains("ignoring a static endpoint") && l.contains("127.0.0.1:8080"))
                .then_some(()))
        },
    )?;
    eventually(Duration::from_secs(10), "the VIP has no endpoint", || {
        Ok(http_get(&vip, "/").is_err().then_some(()))
    })?;

    // Back to backend-b; then the resolver dies. Its last answer is kept
    // (stale) and then, 8 s after it was given, dropped.
    point(&hosts, &dns, &ips[1])?;
    eventually(
        Duration::from_secs(15),
        "backend-b again",
        reaches("backend-b"),
    )?;
    drop(dns);
    eventually(
        Duration::from_secs(10),
        "a failed lookup kept stale",
        || Ok((lookups(&a, "stale")? >= 1).then_some(())),
    )?;
    // Kept, not dropped at the first failure: still served.
    ensure!(lookups(&a, "dropped")? == 0, "dropped at the first failure");
    let (c, b) = http_get(&vip, "/")?;
    ensure!(
        c == 200 && b.trim() == "backend-b",
        "kept while stale: {c} {b}"
    );
    eventually(Duration::from_secs(20), "the stale answer dropped", || {
        Ok((lookups(&a, "dropped")? >= 1).then_some(()))
    })?;
    eventually(
        Duration::from_secs(10),
        "the VIP empty after the drop",
        || Ok(http_get(&vip, "/").is_err().then_some(())),
    )?;
    let log = std::fs::read_to_string(&a.log)?;
    if !log.contains("its addresses are dropped until it resolves again") {
        bail!("the drop is not logged:\n{}", a.log_tail());
    }
    Ok(())
}
