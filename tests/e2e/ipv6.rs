//! Dual stack as a user meets it: an agent with `[network] service_cidr6`,
//! `pier run` + `pier expose rs`, then `dig AAAA` and `curl -6` to the IPv6
//! VIP from the host, the same from a container on an IPv6 Docker network
//! created after the agent started (busybox nslookup and wget), and an IPv6
//! pod address behind a VIP (an IPv4 client to an IPv6 pod). Every address
//! is the test's own: the service CIDRs in 10.213.0.0/16 and
//! fd5e:7e57::/32 (both blackholed by tests/run.sh), and a Docker network in
//! fd5e:7e57::/32.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pier_tests::{AgentOpts, NetGuard, Scenario, TEST_IMAGE, docker, eventually};

struct ContainerGuard(String);
impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn dig(dns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("dig")
        .arg(format!("@{dns}"))
        .args(["+short", "+time=2", "+tries=1"])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn dual_stack_vips_aaaa_and_ipv6_clients_and_pods() -> Result<()> {
    let a = Scenario::start_dual_stack(AgentOpts {
        store: "embedded".into(),
        node: "v6-1".into(),
        // Upstreams: a dead loopback port, so no name leaves the host.
        extra_toml: "\n[dns]\nupstreams = [\"127.0.0.1:9\"]\nupstream_timeout_ms = 200\n".into(),
    })?;
    let cidr6: pier_model::Cidr = a
        .service_cidr6
        .as_deref()
        .context("a dual-stack agent")?
        .parse()?;
    a.cli_ok(&[
        "run",
        "web",
        "--image",
        TEST_IMAGE,
        "--port",
        "8080",
        "--replicas",
        "2",
        "--wait",
    ])?;
    let out = a.cli_ok(&[
        "expose",
        "rs",
        "web",
        "--port",
        "80",
        "--target-port",
        "8080",
    ])?;
    let svc = a.cli_json(&["get", "svc", "web"])?;
    let vip: IpAddr = svc[0]["vip"].as_str().context("no VIP")?.parse()?;
    let vip6: IpAddr = svc[0]["vip6"]
        .as_str()
        .with_context(|| format!("no vip6: {svc}"))?
        .parse()?;
    ensure!(
        vip.is_ipv4() && cidr6.contains(vip6),
        "{vip} {vip6} {cidr6}"
    );
    ensure!(
        out.contains(&format!("VIP {vip} and {vip6}")),
        "expose output: {out}"
    );
    let table = a.cli_ok(&["get", "svc"])?;
    ensure!(table.contains(&format!("{vip},{vip6}")), "{table}");

    // 1. dig from the host: A is the IPv4 VIP, AAAA the IPv6 one, and the
    //    IPv6 VIP's PTR names the service.
    let dns = format!(
        "{}.10",
        a.service_cidr.strip_suffix(".0/24").context("a /24")?
    );
    let name = "web.default.svc.pier.internal";
    let aaaa = eventually(Duration::from_secs(10), "the AAAA record", || {
        let s = dig(&dns, &[name, "AAAA"])?;
        Ok((!s.is_empty()).then_some(s))
    })?;
    ensure!(aaaa == vip6.to_string(), "AAAA {aaaa:?}, want {vip6}");
    ensure!(dig(&dns, &[name, "A"])? == vip.to_string(), "A");
    let ptr = dig(&dns, &["-x", &vip6.to_string()])?;
    ensure!(ptr == format!("{name}."), "PTR of {vip6}: {ptr:?}");

    // 2. curl -6 to the IPv6 VIP from the host (an IPv6 client, IPv4
    //    pods), and by name through pier's DNS.
    let url6 = format!("http://[{vip6}]:80/");
    let body = curl(&["-6", &url6])?;
    ensure!(body.starts_with("web-"), "curl -6 {url6}: {body:?}");
    let by_name = curl(&[
        "-6",
        "--resolve",
        &format!("{name}:80:[{vip6}]"),
        &format!("http://{name}/"),
    ])?;
    ensure!(by_name.starts_with("web-"), "{by_name:?}");

    // 3. A container on an IPv6 Docker network created after the agent
    //    started: its AAAA lookup through pier's DNS and its IPv6 request
    //    to the VIP.
    let net = format!("pier-v6-{}", a.run_label);
    let subnet6 = match cidr6.addr() {
        IpAddr::V6(v) => {
            let s = v.segments();
            format!("fd5e:7e57:1:{:x}::/64", s[3])
        }
        IpAddr::V4(_) => unreachable!("checked above"),
    };
    docker(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        &subnet6,
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
        &format!(
            "nslookup -type=AAAA {name} && wget -qO- 'http://[{vip6}]:80/' && echo && \
             ip=$(nslookup -type=AAAA {name} | awk '/^Address/ {{a=$2}} END {{print a}}') && \
             wget -qO- \"http://[$ip]:80/\""
        ),
    ])?;
    ensure!(
        from_container.contains(&vip6.to_string()) && from_container.matches("web-").count() == 2,
        "from a container: {from_container:?}"
    );

    // 4. An IPv6 pod address: a server on that network reached only at its
    //    IPv6 address (a static endpoint), through the service's IPv4 VIP
    //    (an IPv4 client to an IPv6 pod) and its IPv6 VIP.
    let srv = format!("pier-v6-srv-{}", a.run_label);
    docker(&[
        "run",
        "-d",
        "--pull",
        "never",
        "--name",
        &srv,
        "--network",
        &net,
        "--label",
        &format!("pier.test-run={}", a.run_label),
        TEST_IMAGE,
        "sh",
        "-c",
        "echo six > /www/index.html && exec httpd -f -p [::]:8080 -h /www",
    ])?;
    let _srv = ContainerGuard(srv.clone());
    let ip6: IpAddr = docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").GlobalIPv6Address}}}}"),
        &srv,
    ])?
    .trim()
    .parse()
    .context("the server's IPv6 address")?;
    a.cli_ok(&[
        "expose",
        "external",
        "six",
        "--port",
        "80",
        "--endpoint",
        &format!("[{ip6}]:8080"),
    ])?;
    let six = a.cli_json(&["get", "svc", "six"])?;
    let six_vip = six[0]["vip"].as_str().context("no VIP")?.to_owned();
    let six_vip6 = six[0]["vip6"].as_str().context("no vip6")?.to_owned();
    let got = eventually(
        Duration::from_secs(10),
        "the IPv6 endpoint via the VIP",
        || {
            Ok(curl(&[&format!("http://{six_vip}:80/")])
                .ok()
                .filter(|b| b == "six"))
        },
    )?;
    ensure!(got == "six");
    ensure!(curl(&["-6", &format!("http://[{six_vip6}]:80/")])? == "six");
    Ok(())
}
