//! UDP across hosts, and a headless service of hand-started containers.
//!
//! Host 2 runs two containers started with `docker run` and pier's labels
//! (`pier.service=echo`, `pier.port=5353/udp`) serving the test image's
//! `udp-echo`; host 2's agent creates the service, with a VIP. From host
//! 1, which has no pod of it, every datagram crosses the mTLS mesh:
//! `dig` of the `_udp` SRV name and a flow from host 1's own namespace, a
//! container on a network created after host 1's agent started (by name,
//! and by each SRV target's pod name), then the pod holding the flow is
//! killed and the same socket (the same 5-tuple) is answered by the other
//! pod on its next datagrams, long before the 30 s idle timeout.
//!
//! One container per host labelled `pier.service=peers`,
//! `pier.headless=true`: the service the agent creates has no VIP, its
//! name answers one endpoint VIP per container (`dig` from host 1), and
//! each reaches its own container from a container on host 1, host 2's
//! over the mesh.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::{TEST_IMAGE, eventually, udp_ask, udp_flow_moves_off};

use crate::cluster::{Cluster, POD_PORT, fqdn};
use crate::netns;

#[test]
fn udp_through_the_mesh_and_labelled_headless() -> Result<()> {
    let c = Cluster::start(12, 2)?;
    let dns = format!("10.213.{}.10", c.octet);
    let cidr = format!("10.213.{}.", c.octet);
    let udp = [("pier.service", "echo"), ("pier.port", "5353/udp")];
    for name in ["echo-a", "echo-b"] {
        c.run_labelled(2, name, &udp, &["/bin/udp-echo", "5353"])?;
    }
    let headless = [
        ("pier.service", "peers"),
        ("pier.port", "8080"),
        ("pier.headless", "true"),
    ];
    for i in [1, 2] {
        c.run_labelled(i, &format!("peer-{i}"), &headless, &[])?;
    }
    // Host 1 sees echo's two endpoints, both on host 2, and peers' two.
    for (svc, want) in [("echo", ["h2", "h2"]), ("peers", ["h1", "h2"])] {
        eventually(
            Duration::from_secs(30),
            &format!("{svc}'s endpoints on h1"),
            || {
                let mut nodes: Vec<String> = c
                    .ready_endpoints(1, svc)?
                    .into_iter()
                    .map(|e| e.0)
                    .collect();
                nodes.sort();
                Ok((nodes == want).then_some(()))
            },
        )
        .with_context(|| c.logs())?;
    }
    let svcs = c.cli_json(1, &["get", "svc", "echo"])?;
    let echo = svcs.first().context("echo listed")?;
    ensure!(
        echo["ports"][0]["protocol"] == "udp" && echo["ports"][0]["port"] == 5353,
        "the created service: {echo}"
    );
    let vip: IpAddr = echo["vip"].as_str().context("echo has a VIP")?.parse()?;
    let svcs = c.cli_json(1, &["get", "svc", "peers"])?;
    let peers = svcs.first().context("peers listed")?;
    ensure!(
        peers["vip"].is_null() && peers["headless"] == true,
        "pier.headless=true: the created service has no VIP: {peers}"
    );

    // dig from host 1's namespace: the headless name answers one endpoint
    // VIP per container.
    let dig = |name: &str, ty: &str| -> Result<String> {
        let out = c.topo.host(1).exec(&[
            "dig",
            &format!("@{dns}"),
            name,
            ty,
            "+short",
            "+time=2",
            "+tries=1",
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let a = eventually(Duration::from_secs(10), "2 A records of peers", || {
        let a = dig(&fqdn("peers"), "A")?;
        Ok((a.lines().count() == 2).then_some(a))
    })?;
    ensure!(
        a.lines().all(|l| l.starts_with(&cidr)),
        "peers A from h1: endpoint VIPs in {cidr}0/24: {a:?}"
    );

    // dig from host 1's namespace: the _udp SRV name lists both pods, each
    // by its DNS name: a container pier did not start is named by its short
    // container id.
    let short_id = |name: &str| -> Result<String> {
        let out = c.topo.host(2).docker(&["inspect", "-f", "{{.Id}}", name])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .chars()
            .take(12)
            .collect())
    };
    let pod_names: Vec<(String, &str)> = ["echo-a", "echo-b"]
        .into_iter()
        .map(|n| Ok((format!("{}.{}", short_id(n)?, fqdn("echo")), n)))
        .collect::<Result<_>>()?;
    let srv = dig(&format!("_p5353-udp._udp.{}", fqdn("echo")), "SRV")?;
    let targets: BTreeSet<String> = srv
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|t| t.trim_end_matches('.').to_owned())
        .collect();
    ensure!(
        targets == pod_names.iter().map(|p| p.0.clone()).collect()
            && srv.lines().count() == 2
            && srv.lines().all(|l| l.contains(" 5353 ")),
        "SRV from h1: {srv:?}, want targets {pod_names:?}"
    );

    // A flow from host 1's own namespace to the VIP: one pod answers, and
    // keeps answering.
    let to = SocketAddr::new(vip, 5353);
    let (sock, first) = netns::in_netns(&c.topo.host(1).netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        let first = udp_ask(&s, "hello", 100, Duration::from_millis(100))?;
        Ok((s, first))
    })?;
    let first = first.with_context(|| format!("no answer from {to} on h1{}", c.logs()))?;
    ensure!(first.starts_with("echo-"), "answered by {first}");
    for i in 0..10 {
        let got = udp_ask(&sock, &format!("m{i}"), 3, Duration::from_millis(500))?;
        ensure!(
            got.as_deref() == Some(first.as_str()),
            "the flow left {first} for {got:?} while it lives"
        );
    }
    let metrics = c.metrics(1)?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("pier_proxy_endpoint_connections_total{")
                && l.contains(r#"service="default/echo""#)
                && l.contains(r#"route="mesh""#)
                && !l.ends_with(" 0")),
        "h1's flows to echo are not counted as mesh flows:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("default/echo"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A container on a network created after host 1's agent started: the
    // service name, then each pod name (an SRV target: its endpoint VIP),
    // answered by that pod on host 2.
    let h1 = c.topo.host(1);
    let net = "udp-late";
    h1.docker(&[
        "network",
        "create",
        "--label",
        &format!("pier.test-run={}", c.label),
        net,
    ])?;
    let in_container = |script: &str| -> Result<String> {
        let out = h1.docker(&[
            "run",
            "--rm",
            "--pull",
            "never",
            "--network",
            net,
            "--label",
            &format!("pier.test-run={}", c.label),
            "--dns",
            &dns,
            TEST_IMAGE,
            "sh",
            "-c",
            script,
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let lookup =
        r#"$(nslookup "$n" 2>/dev/null | awk '/^Name:/{f=1} f&&/^Address/{print $2; exit}')"#;
    let script = format!(
        "for n in {} {} {}; do ip={lookup}; echo \"$n $ip $(udp-echo --ask \"$ip\" 5353 late)\"; done",
        fqdn("echo"),
        pod_names[0].0,
        pod_names[1].0,
    );
    let out = in_container(&script)?;
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    ensure!(lines.len() == 3, "from a container on h1: {out:?}");
    ensure!(
        lines[0].get(1) == Some(&vip.to_string().as_str())
            && lines[0]
                .get(2)
                .is_some_and(|a| a.starts_with("echo-") && a.ends_with(":late")),
        "echo by name from a container on h1: {out:?}{}",
        c.logs()
    );
    for (l, (_, pod)) in lines[1..].iter().zip(&pod_names) {
        ensure!(
            l.get(1)
                .is_some_and(|ip| ip.starts_with(&cidr) && *ip != vip.to_string())
                && l.get(2) == Some(&format!("{pod}:late").as_str()),
            "{pod}'s name from a container on h1: its own endpoint VIP, answered by it: {out:?}"
        );
    }

    // The headless name from the same kind of container: one endpoint VIP
    // per container, each answered by its own (peer-2's over the mesh).
    let script = format!(
        r#"for ip in $(nslookup {} 2>/dev/null | awk '/^Name:/{{f=1}} f&&/^Address/{{print $2}}'); do
  echo "$ip $(printf 'GET / HTTP/1.0\r\nHost: t\r\n\r\n' | nc -w 3 "$ip" {POD_PORT} 2>/dev/null | tail -n 1)"
done"#,
        fqdn("peers")
    );
    let out = in_container(&script)?;
    let seen: BTreeSet<&str> = out.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    ensure!(
        out.lines().count() == 2
            && out.lines().all(|l| l.starts_with(&cidr))
            && seen == BTreeSet::from(["peer-1", "peer-2"]),
        "peers (headless) from a container on h1: {out:?}"
    );

    // Kill the pod that holds the host's flow: the same socket is answered
    // by the other pod within seconds, and stays there.
    let killed_at = Instant::now();
    c.topo.host(2).docker(&["kill", &first])?;
    let (moved, took) = udp_flow_moves_off(&sock, &first, killed_at, || c.logs())?;
    eprintln!("h1's flow moved from {first} to {moved} {took:?} after docker kill on h2");
    Ok(())
}
