//! From inside a container on an `--internal` Docker network, started with
//! `--dns <the network's gateway>`, busybox `nslookup` finds a service and a
//! pod served by a DnsServer bound on that gateway address.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use pier_dns::DnsServer;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::harness::*;

const IMAGE: &str = "pier-test/httpd:latest";

/// Removes the container and the network, even when the test fails.
struct DockerGuard {
    network: String,
    containers: Vec<String>,
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("run docker")?;
    if !out.status.success() {
        bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test]
async fn nslookup_in_a_container_finds_a_service_and_a_pod() -> Result<()> {
    docker(&["image", "inspect", IMAGE]).context("the test image is built by tests/run.sh")?;
    let run_id = format!(
        "dns{}x{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos()
    );
    let label = format!("pier.test-run={run_id}");
    let net = format!("pier-dns-{run_id}");
    let mut guard = DockerGuard {
        network: net.clone(),
        containers: Vec::new(),
    };
    docker(&["network", "create", "--internal", "--label", &label, &net])?;
    let cfg = docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}} {{(index .IPAM.Config 0).Subnet}}",
        &net,
    ])?;
    let (gw, subnet) = cfg.split_once(' ').context("gateway and subnet")?;

    // The server on the gateway address, the network as a container network.
    let (s, e) = base_snapshot();
    let (_snap_tx, snap_rx) = watch::channel(std::sync::Arc::new(snapshot(1, &s, &e)));
    let (_nets_tx, nets_rx) = watch::channel(vec![subnet.parse()?]);
    let mut registry = Registry::default();
    let srv = DnsServer::new(test_config(), snap_rx, nets_rx, &mut registry)?;
    let udp = tokio::net::UdpSocket::bind((gw, 53)).await?;
    let tcp = tokio::net::TcpListener::bind((gw, 53)).await?;
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    tokio::spawn(srv.serve(vec![udp], vec![tcp], cancel.clone()));

    for (i, (name, want)) in [
        ("web.default.svc.pier.internal", "10.96.0.10"),
        ("web-2.web.default.svc.pier.internal", "172.18.0.3"),
    ]
    .into_iter()
    .enumerate()
    {
        let cname = format!("{net}-{i}");
        guard.containers.push(cname.clone());
        let out = tokio::process::Command::new("docker")
            .args([
                "run", "--rm", "--pull", "never", "--name", &cname, "--label", &label,
            ])
            .args(["--network", &net, "--dns", gw, IMAGE, "nslookup", name])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), out).await??;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(want),
            "nslookup {name} in a container: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(guard);
    Ok(())
}
