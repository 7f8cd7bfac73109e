//! pier's DNS as a new user meets it, with real clients: `dig` from the host
//! itself, and busybox `nslookup` + `wget` from containers on Docker
//! networks created after the agent started (a plain one, an `--internal`
//! one, and a docker-compose project's). The agent's periodic resync is set
//! to 10 minutes, so only Docker's network events can let these in.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pier_tests::{AgentProc, NetGuard, Scenario, TEST_IMAGE, eventually};

const NAME: &str = "web.default.svc.pier.internal";

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

fn ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `docker-compose down` for a project, even when the test fails.
struct ComposeGuard {
    project: String,
    file: std::path::PathBuf,
}

impl Drop for ComposeGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker-compose")
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file)
            .args(["down", "--remove-orphans", "-t", "1"])
            .output();
    }
}

#[test]
fn dns_answers_the_host_and_networks_created_after_the_agent() -> Result<()> {
    // Inside [agent]: the safety-net resync cannot help within the test.
    // Upstreams: a dead loopback port, answered SERVFAIL in 200 ms, so
    // no name leaves the host.
    let a = Scenario::embedded(
        "dns-1",
        "resync_interval_ms = 600000\n\n[dns]\nupstreams = [\"127.0.0.1:9\"]\nupstream_timeout_ms = 200\n",
    )?;
    let dns = a.dns_vip()?;
    let vip = a.run_and_expose("web", &["--wait"], &[])?.vip.to_string();

    // 1. From the host itself: its query to the DNS VIP leaves from the
    //    VIP's own address, not from loopback. UDP and TCP.
    for tcp in [false, true] {
        let mut cmd = Command::new("dig");
        cmd.arg(format!("@{dns}"))
            .args([NAME, "A", "+time=2", "+tries=1"]);
        if tcp {
            cmd.arg("+tcp");
        }
        let out = eventually(Duration::from_secs(10), "the service's name", || {
            let s = ok(&mut cmd)?;
            Ok(s.contains(&vip).then_some(s))
        })
        .with_context(|| a.log_tail())?;
        ensure!(
            out.contains("status: NOERROR") && out.contains(&format!("{NAME}.")),
            "dig from the host (tcp={tcp}):\n{out}"
        );
    }

    // 2. Containers on networks created after the agent started, querying
    //    at once: the first query must be answered (no retry), and the VIP
    //    must route.
    for flags in [&[][..], &["--internal"][..]] {
        let net = format!("pier-dns-{}{}", a.run_label, flags.len());
        let t0 = Instant::now();
        ok(Command::new("docker")
            .args(["network", "create", "--label"])
            .arg(format!("pier.test-run={}", a.run_label))
            .args(flags)
            .arg(&net))?;
        let _guard = NetGuard(net.clone());
        let out = run(Command::new("docker")
            .args([
                "run",
                "--rm",
                "--pull",
                "never",
                "--network",
                &net,
                "--label",
            ])
            .arg(format!("pier.test-run={}", a.run_label))
            .arg("--dns")
            .arg(dns.to_string())
            .args([TEST_IMAGE, "sh", "-c"])
            .arg(format!("nslookup {NAME} && wget -qO- http://{NAME}:8080/")))?;
        let took = t0.elapsed();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        ensure!(
            out.status.success() && stdout.contains(&vip) && stdout.contains("web-"),
            "a container on {net} ({flags:?}), {took:?} after the network was created:\n{stdout}{stderr}\nagent log:\n{}",
            a.log_tail()
        );
        eprintln!("{flags:?}: network create → nslookup + wget done in {took:?}");
    }

    // 3. A docker-compose project: compose creates the project's network at
    //    `up` and its container looks the name up at start.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("compose.yaml");
    std::fs::write(
        &file,
        format!(
            r#"version: "3.8"
services:
  client:
    image: {TEST_IMAGE}
    dns: ["{dns}"]
    labels: {{ pier.test-run: "{label}" }}
    command: ["sh", "-c", "nslookup {NAME} && wget -qO- http://{NAME}:8080/"]
networks:
  default:
    labels: {{ pier.test-run: "{label}" }}
"#,
            label = a.run_label
        ),
    )?;
    let project = format!("pierdns{}", a.run_label.replace(['-', '_'], ""));
    let _compose = ComposeGuard {
        project: project.clone(),
        file: file.clone(),
    };
    let out = run(Command::new("docker-compose")
        .arg("-p")
        .arg(&project)
        .arg("-f")
        .arg(&file)
        .args([
            "up",
            "--abort-on-container-exit",
            "--exit-code-from",
            "client",
        ]))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(
        out.status.success() && stdout.contains(&vip) && stdout.contains("web-"),
        "docker-compose up ({}):\n{stdout}{stderr}\nagent log:\n{}",
        out.status,
        a.log_tail()
    );

    // 4. The host's resolver, as README documents it with dnsmasq: only
    //    *.pier.internal goes to pier, everything else stays where it was
    //    (here: a dead upstream on loopback, so nothing leaves the host).
    let port = pier_tests::free_port();
    let mut dnsmasq = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--server=/pier.internal/{dns}"))
        .arg("--server=127.0.0.1#9")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting dnsmasq (tests/run.sh installs dnsmasq-base)")?;
    let res = (|| -> Result<()> {
        let dig = |name: &str| {
            ok(Command::new("dig")
                .args(["-p", &port.to_string(), "@127.0.0.1", name, "A"])
                .args(["+time=1", "+tries=1"]))
        };
        let out = eventually(Duration::from_secs(5), "dnsmasq answers", || {
            Ok(dig(NAME).ok().filter(|s| s.contains(&vip)))
        })?;
        ensure!(out.contains("status: NOERROR"), "through dnsmasq:\n{out}");
        let before = dns_queries(&a)?;
        let _ = dig("example.org");
        let after = dns_queries(&a)?;
        ensure!(
            before == after,
            "a name outside the mesh reached pier ({before} -> {after} queries)"
        );
        Ok(())
    })();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    res
}

/// The agent's count of DNS queries answered, over every type and code.
fn dns_queries(a: &AgentProc) -> Result<u64> {
    let (code, body) = a.api_get("/metrics")?;
    ensure!(code == 200, "/metrics: {code}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with("pier_dns_queries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}
