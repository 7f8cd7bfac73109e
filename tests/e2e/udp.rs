//! UDP services and session affinity as a user meets them: `pier run
//! --port 5353/udp`, `pier expose rs --port 53/udp --type NodePort`, a real
//! UDP server in the pods (the test image's /bin/udp-echo), clients on the
//! host (to the VIP and the node port) and in a container on a Docker
//! network created after the agent started, `dig` for the `_udp` SRV name,
//! and a pod killed under a live flow.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::{
    AgentOpts, NetGuard, Scenario, TEST_IMAGE, docker, eventually, http_get, udp_ask as ask,
    udp_flow_moves_off,
};

fn client(to: SocketAddr) -> Result<UdpSocket> {
    let c = UdpSocket::bind("0.0.0.0:0")?;
    c.connect(to)?;
    Ok(c)
}

/// The UDP idle timeout is the default 30 s: a flow that moves within a
/// few seconds of its pod's death was not waiting for it.
#[test]
fn udp_service_end_to_end_and_flows_move_off_a_killed_pod() -> Result<()> {
    let a = Scenario::start(AgentOpts {
        store: "embedded".into(),
        node: "udp-1".into(),
        // Inside [agent]; upstreams: a dead loopback port, so no name
        // leaves the host.
        extra_toml: "\n[dns]\nupstreams = [\"127.0.0.1:9\"]\nupstream_timeout_ms = 200\n".into(),
    })?;
    a.cli_ok(&[
        "run",
        "echo",
        "--image",
        TEST_IMAGE,
        "--port",
        "5353/udp",
        "--replicas",
        "2",
        "--wait",
        "--",
        "/bin/udp-echo",
        "5353",
    ])?;
    let out = a.cli_ok(&[
        "expose",
        "rs",
        "echo",
        "--port",
        "53/udp",
        "--target-port",
        "5353",
        "--type",
        "NodePort",
    ])?;
    ensure!(out.contains("53/udp"), "expose output: {out}");
    let svc = a.cli_json(&["get", "svc", "echo"])?;
    let port = &svc[0]["ports"][0];
    ensure!(port["protocol"] == "udp", "{svc}");
    let vip: std::net::IpAddr = svc[0]["vip"].as_str().context("no VIP")?.parse()?;
    let node_port = port["node_port"].as_u64().context("no node port")? as u16;
    let vip_addr = SocketAddr::new(vip, 53);

    // 1. The VIP from the host: answered by a pod, the reply from the VIP
    //    (the client's socket is connected to it).
    let c = client(vip_addr)?;
    let first = ask(&c, "hello", 100, Duration::from_millis(100))?
        .with_context(|| format!("no answer from {vip_addr}\n{}", a.log_tail()))?;
    ensure!(first.starts_with("echo-"), "answered by {first}");
    for i in 0..10 {
        let got = ask(&c, &format!("m{i}"), 3, Duration::from_millis(500))?;
        ensure!(
            got.as_deref() == Some(first.as_str()),
            "flow moved to {got:?}"
        );
    }

    // 2. The node port, from the host.
    let np = client(SocketAddr::from(([127, 0, 0, 1], node_port)))?;
    let got = ask(&np, "via-node-port", 20, Duration::from_millis(200))?;
    ensure!(
        got.as_ref().is_some_and(|h| h.starts_with("echo-")),
        "node port {node_port}: {got:?}"
    );

    // 3. SRV under _udp, with dig through pier's DNS.
    let dns = format!(
        "{}.10",
        a.service_cidr.strip_suffix(".0/24").context("a /24")?
    );
    let srv = eventually(Duration::from_secs(10), "the _udp SRV records", || {
        let out = Command::new("dig")
            .arg(format!("@{dns}"))
            .args([
                "+short",
                "_p5353-udp._udp.echo.default.svc.pier.internal",
                "SRV",
            ])
            .output()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((s.lines().count() == 2).then_some(s))
    })?;
    ensure!(
        srv.lines().all(|l| l.contains(" 5353 echo-")),
        "SRV answers: {srv}"
    );

    // 4. A container on a network created after the agent started: it
    //    looks the name up with busybox nslookup and asks with udp-echo's
    //    client mode (busybox nc has no UDP).
    let net = format!("pier-udp-{}", a.run_label);
    docker(&[
        "network",
        "create",
        "--label",
        &format!("pier.test-run={}", a.run_label),
        &net,
    ])?;
    let _net = NetGuard(net.clone());
    let from_container = docker(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--network",
        &net,
        "--label",
        &format!("pier.test-run={}", a.run_label),
        "--dns",
        &dns,
        TEST_IMAGE,
        "sh",
        "-c",
        "ip=$(nslookup echo.default.svc.pier.internal | awk '/^Address/ {a=$2} END {print a}') \
         && exec udp-echo --ask \"$ip\" 53 from-container",
    ])?;
    ensure!(
        from_container.contains("echo-") && from_container.contains(":from-container"),
        "from a container: {from_container:?}"
    );

    // 5. Kill the pod that holds the flow: the same client socket (the
    //    same 5-tuple) is answered by the other pod within seconds, long
    //    before the 30 s idle timeout.
    let killed_at = Instant::now();
    docker(&["kill", &format!("pier-default-{first}")])?;
    let (moved, took) = udp_flow_moves_off(&c, &first, killed_at, || a.log_tail())?;
    eprintln!("flow moved from {first} to {moved} {took:?} after docker kill");
    Ok(())
}

/// `pier expose rs --session-affinity ClientIP`: the host's connections
/// all go to one pod of three over many requests; when that pod is killed
/// they all go to one other pod and stay there.
#[test]
fn session_affinity_keeps_a_client_on_its_pod_until_it_dies() -> Result<()> {
    let a = Scenario::start(AgentOpts {
        store: "embedded".into(),
        node: "aff-1".into(),
        extra_toml: String::new(),
    })?;
    a.cli_ok(&[
        "run",
        "web",
        "--image",
        TEST_IMAGE,
        "--port",
        "8080",
        "--replicas",
        "3",
        "--wait",
    ])?;
    a.cli_ok(&[
        "expose",
        "rs",
        "web",
        "--port",
        "80",
        "--target-port",
        "8080",
        "--session-affinity",
        "ClientIP",
        "--affinity-timeout",
        "10m",
    ])?;
    let svc = a.cli_json(&["get", "svc", "web"])?;
    ensure!(
        svc[0]["session_affinity"]["timeout_s"] == 600,
        "stored: {svc}"
    );
    let vip: std::net::IpAddr = svc[0]["vip"].as_str().context("no VIP")?.parse()?;
    let addr = SocketAddr::new(vip, 80);
    let get = || -> Result<String> {
        let (code, body) = http_get(&addr, "/")?;
        ensure!(code == 200, "HTTP {code}");
        Ok(body.trim().to_owned())
    };
    let first = eventually(
        Duration::from_secs(10),
        "the VIP answers",
        || Ok(get().ok()),
    )?;
    for _ in 0..20 {
        ensure!(get()? == first, "left its pod while it lives");
    }
    docker(&["kill", &format!("pier-default-{first}")])?;
    let next = eventually(Duration::from_secs(10), "another pod answers", || {
        Ok(get().ok().filter(|h| *h != first))
    })?;
    for _ in 0..20 {
        let h = get()?;
        // The replacement pod may come up meanwhile: the client stays.
        ensure!(h == next, "moved again, to {h}, after settling on {next}");
    }
    Ok(())
}
