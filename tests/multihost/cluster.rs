//! A running multi-host cluster on one machine: the topology of
//! `netns.rs` plus, on each host, an etcd member and a `pier agent` with
//! mesh certificates; and the ways a test drives it (CLI, Docker, requests
//! from a client container, `/readyz`, `/metrics`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use pier_tests::{
    TEST_IMAGE, ensure_test_image, eventually, http_get, http_get_auth, pier_bin, run_id,
};
use serde_json::Value;

use crate::netns::{self, Topology};

/// Every agent's API, inside its own namespace.
pub const API: &str = "127.0.0.1:7370";
pub const MESH_PORT: u16 = 7443;
/// Every agent's node lease and supervisor election lease, in seconds: what
/// the timings after a cut are bounded by (`LEASE_TTL`).
const LEASE_TTL_SECS: u64 = 2;
pub const LEASE_TTL: Duration = Duration::from_secs(LEASE_TTL_SECS);
/// The pods' port (the test image serves its hostname there).
pub const POD_PORT: u16 = 8080;

/// What a test adds to one host's agent config ([`Cluster::start_with`]).
#[derive(Debug, Default)]
pub struct Extra {
    /// Lines in `[store]`.
    pub store: String,
    /// Sections after the others (`[relay]`, …).
    pub sections: String,
}

/// A running multi-host cluster: the topology plus one agent per host.
pub struct Cluster {
    pub topo: Topology,
    pub pier: PathBuf,
    /// `pier.test-run` value of everything this cluster starts.
    pub label: String,
    pub ca: PathBuf,
    /// The service CIDR is `10.213.<octet>.0/24` (guarded by tests/run.sh's
    /// blackhole route for 10.213.0.0/16 in the root namespace).
    pub octet: u8,
    /// The agents' PIDs, host 1 first.
    pub agents: Vec<u32>,
}

impl Cluster {
    /// `n` hosts on `10.214.<k>.0/24`, a 3-member etcd cluster (one member
    /// per host), mesh certificates, and an agent per host named `h<i>`.
    pub fn start(k: u8, n: usize) -> Result<Cluster> {
        Self::start_with(k, n, |_, _| Extra::default())
    }

    /// [`Cluster::start`] with `extra(i, topology)` added to host `i`'s
    /// config. A host whose extra has a `[relay]` section is started, and
    /// ready, before the hosts after it (relays first, as an operator
    /// would: the others then list through it from their first start).
    pub fn start_with(
        k: u8,
        n: usize,
        extra: impl Fn(usize, &Topology) -> Extra,
    ) -> Result<Cluster> {
        ensure!((1..=20).contains(&k), "k must be 1..=20");
        ensure_test_image()?;
        let pier = pier_bin()?;
        let mut topo = Topology::new(n, k)?;
        for h in &topo.hosts {
            h.load_image(TEST_IMAGE)?;
        }
        let etcd = topo.start_etcd_cluster()?;
        let ca = topo.mesh_ca(&pier)?;
        let c = Cluster {
            label: format!("{}-mh{k}", run_id()),
            octet: 230 + k,
            topo,
            pier,
            ca,
            agents: Vec::new(),
        };
        let mut c = c;
        for i in 1..=n {
            let h = c.topo.host(i);
            let certs = h.issue_certs(&c.pier, &c.ca, &format!("h{i}"))?;
            let more = extra(i, &c.topo);
            let cfg = h.dir.join("pier.toml");
            let toml = format!(
                r#"
[node]
name = "h{i}"
addr = "{addr}"

[store]
url = "etcd://{etcd}"
lease_ttl_secs = {LEASE_TTL_SECS}
{store_extra}
[network]
service_cidr = "10.213.{octet}.0/24"
data_dir = "{data}"

[api]
listen = "{API}"

[agent]
filter_labels = {{ "pier.test-run" = "{label}" }}
pod_labels = {{ "pier.test-run" = "{label}" }}

[supervisor]
lease_ttl_secs = {LEASE_TTL_SECS}

[mesh]
listen = "{addr}:{MESH_PORT}"
ca = "{certs}/ca.pem"
cert = "{certs}/node.pem"
key = "{certs}/node-key.pem"
{sections}"#,
                addr = h.addr,
                octet = c.octet,
                data = h.dir.join("pier-data").display(),
                label = c.label,
                certs = certs.display(),
                store_extra = more.store,
                sections = more.sections,
            );
            std::fs::write(&cfg, toml).context("writing the agent config")?;
            let cfg = cfg.to_string_lossy().into_owned();
            let pier = c.pier.clone();
            let pid = c.topo.host_mut(i).spawn_agent(&pier, &["--config", &cfg])?;
            c.agents.push(pid);
            if more.sections.contains("[relay]") {
                c.wait_ready(i)?;
            }
        }
        for i in 1..=n {
            c.wait_ready(i)?;
        }
        for i in 1..=n {
            eventually(Duration::from_secs(30), "every node visible", || {
                Ok((c.nodes(i)?.len() == n).then_some(()))
            })
            .with_context(|| c.logs())?;
        }
        Ok(c)
    }

    /// `kill -9` host `i`'s agent (the keeper, the process a user
    /// starts): no graceful stop. Its worker serves on as an orphan until
    /// [`Cluster::restart_agent`] adopts it (or the teardown stops it).
    /// A mesh identity for `node` issued by a CA of its own (made with
    /// the real CLI under host `i`'s dir), trusting host `i`'s real CA: a
    /// stranger whose certificate looks right but is not of the cluster.
    pub fn foreign_identity(&self, i: usize, node: &str) -> Result<pier_proxy::tls::MeshConfig> {
        let dir = &self.topo.host(i).dir;
        let other_ca = dir.join("other-ca");
        run_ok(
            std::process::Command::new(&self.pier)
                .args(["ca", "init"])
                .arg(&other_ca),
        )?;
        let other = dir.join("other-certs");
        run_ok(
            std::process::Command::new(&self.pier)
                .args(["ca", "issue", node, "--ca"])
                .arg(&other_ca)
                .arg("--out")
                .arg(&other),
        )?;
        Ok(pier_proxy::tls::MeshConfig {
            ca: dir.join("certs").join("ca.pem"),
            ..pier_proxy::tls::MeshConfig::from_dir("0.0.0.0:0".parse()?, &other)
        })
    }

    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let pid = self.agents[i - 1];
        let workers = pier_tests::load::children(pid);
        self.topo.host_mut(i).note_orphans(&workers);
        run_ok(
            std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string()),
        )?;
        // Reaps it (it is dead already: no SIGTERM grace is waited for).
        self.topo.host_mut(i).stop(pid);
        Ok(())
    }

    /// Start host `i`'s agent again with its config (after `kill_agent`);
    /// it logs to the same `agent.log`, after the earlier lines.
    pub fn restart_agent(&mut self, i: usize) -> Result<()> {
        let cfg = self.topo.host(i).dir.join("pier.toml");
        let cfg = cfg.to_string_lossy().into_owned();
        let pier = self.pier.clone();
        let pid = self
            .topo
            .host_mut(i)
            .spawn_agent(&pier, &["--config", &cfg])?;
        self.agents[i - 1] = pid;
        Ok(())
    }

    pub fn api() -> SocketAddr {
        API.parse().expect("API address")
    }

    /// Wait for host `i`'s agent to answer `/readyz` with 200.
    pub fn wait_ready(&self, i: usize) -> Result<()> {
        let h = self.topo.host(i);
        let netns = h.netns.clone();
        eventually(
            Duration::from_secs(30),
            &format!("agent h{i} ready"),
            || {
                let code = netns::in_netns(&netns, || Ok(http_get(&Self::api(), "/readyz")?.0))?;
                Ok((code == 200).then_some(()))
            },
        )
        .with_context(|| h.agent_log())
    }

    /// The agents' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.topo.hosts {
            let log = h.agent_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            s.push_str(&format!("\n--- agent h{} (last 40 lines) ---\n", h.index));
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// `pier <args…>` against host `i`'s agent; stdout on success.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self
            .topo
            .host(i)
            .command(&self.pier)
            // As a user on the host would: the config names the API and
            // the data dir, where the CLI reads the agent's token.
            .arg("--config")
            .arg(self.topo.host(i).dir.join("pier.toml"))
            .args(args)
            .output()
            .context("running the pier CLI")?;
        ensure!(
            out.status.success(),
            "pier {args:?} on h{i} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn cli_json(&self, i: usize, args: &[&str]) -> Result<Vec<Value>> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.cli(i, &a)?;
        let v: Value = serde_json::from_str(&out).with_context(|| format!("JSON of {out:?}"))?;
        Ok(match v {
            Value::Array(a) => a,
            Value::Object(m) => m.into_iter().map(|(_, v)| v).collect(),
            other => vec![other],
        })
    }

    /// Host `i`'s view of the nodes: name → ready.
    pub fn nodes(&self, i: usize) -> Result<BTreeMap<String, bool>> {
        Ok(self
            .cli_json(i, &["get", "nodes"])?
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or_default().to_owned(),
                    n["ready"].as_bool().unwrap_or(false),
                )
            })
            .collect())
    }

    /// Host `i`'s view of service `svc`'s ready endpoints: (node, ip).
    pub fn ready_endpoints(&self, i: usize, svc: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .cli_json(i, &["get", "endpoints", svc])?
            .iter()
            .filter(|e| e["ready"].as_bool() == Some(true))
            .map(|e| {
                (
                    e["node"].as_str().unwrap_or_default().to_owned(),
                    e["ip"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// Start a pod of `svc` on host `i` the way a Docker user would: a plain
    /// `docker run` with pier's labels. Its hostname is `name`, which the
    /// test image serves on `port`… when `port` is 8080; any other port has
    /// no listener, so the pod never becomes ready.
    pub fn run_pod(&self, i: usize, name: &str, svc: &str, port: u16) -> Result<()> {
        self.run_labelled(
            i,
            name,
            &[("pier.service", svc), ("pier.port", &port.to_string())],
            &[],
        )
    }

    /// `docker run -d` of the test image on host `i`, named and with the
    /// hostname `name`, with this cluster's run label plus `labels`, and
    /// `cmd` (the image's own when empty).
    pub fn run_labelled(
        &self,
        i: usize,
        name: &str,
        labels: &[(&str, &str)],
        cmd: &[&str],
    ) -> Result<()> {
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--pull",
            "never",
            "--name",
            name,
            "--hostname",
            name,
            "--label",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("pier.test-run={}", self.label));
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push(TEST_IMAGE.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.topo.host(i).docker(&args)?;
        Ok(())
    }

    /// The PID of container `name` on host `i` (its network namespace is
    /// `/proc/<pid>/ns/net`).
    pub fn container_pid(&self, i: usize, name: &str) -> Result<u32> {
        let out = self
            .topo
            .host(i)
            .docker(&["inspect", "-f", "{{.State.Pid}}", name])?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        s.parse().with_context(|| format!("PID of {name}: {s:?}"))
    }

    /// The IP of container `name` on host `i`'s Docker bridge.
    pub fn pod_ip(&self, i: usize, name: &str) -> Result<IpAddr> {
        let out =
            self.topo
                .host(i)
                .docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        s.parse().with_context(|| format!("IP of {name}: {s:?}"))
    }

    /// A client container on host `i` whose resolver is pier's DNS VIP.
    pub fn run_client(&self, i: usize) -> Result<()> {
        self.topo.host(i).docker(&[
            "run",
            "-d",
            "--pull",
            "never",
            "--name",
            "client",
            "--label",
            &format!("pier.test-run={}", self.label),
            "--dns",
            &format!("10.213.{}.10", self.octet),
            TEST_IMAGE,
            "sleep",
            "3600",
        ])?;
        Ok(())
    }

    /// `n` sequential HTTP GETs of `http://<name>:8080/` from the client
    /// container on host `i`: each resolves `name` with the container's
    /// resolver (pier's DNS VIP) with `nslookup`, then sends the request
    /// with `nc -w 3` (busybox's `wget -T` crashes). The bodies, with
    /// `FAIL` for a failed request. One `docker exec`, bounded by `n`.
    pub fn requests(&self, i: usize, name: &str, n: u32) -> Result<Vec<String>> {
        let script = format!(
            r#"i=0; while [ $i -lt {n} ]; do
  ip=$(nslookup {name} 2>/dev/null | awk '/^Name:/{{n=1}} n&&/^Address/{{print $2; exit}}')
  b=$(printf 'GET / HTTP/1.0\r\nHost: t\r\n\r\n' | nc -w 3 "$ip" {POD_PORT} 2>/dev/null | tail -n 1)
  case "$b" in ""|*" "*) echo FAIL;; *) echo "$b";; esac
  i=$((i+1))
done"#
        );
        let out = self
            .topo
            .host(i)
            .docker(&["exec", "client", "sh", "-c", &script])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// What a failed request from host `i`'s client looks like up close.
    pub fn diagnose(&self, i: usize, svc: &str) -> String {
        let name = fqdn(svc);
        let script = format!("cat /etc/resolv.conf; nslookup {name} 2>&1; ip route 2>&1");
        let out = match self
            .topo
            .host(i)
            .docker(&["exec", "client", "sh", "-c", &script])
        {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("{e:#}"),
        };
        let svcs = self
            .cli(i, &["get", "svc", "-o", "wide"])
            .unwrap_or_default();
        let eps = self.cli(i, &["get", "endpoints"]).unwrap_or_default();
        format!(
            "\n--- from h{i}'s client ---\n{out}\n{svcs}\n{eps}{}",
            self.logs()
        )
    }

    /// Host `i`'s agent's API token, from its data dir.
    pub fn token(&self, i: usize) -> Result<String> {
        let p = self.topo.host(i).dir.join("pier-data").join("api-token");
        let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(t.trim().to_owned())
    }

    /// Host `i`'s agent metrics (Prometheus text).
    pub fn metrics(&self, i: usize) -> Result<String> {
        let netns = self.topo.host(i).netns.clone();
        let token = self.token(i)?;
        let (code, body) = netns::in_netns(&netns, move || {
            http_get_auth(&Self::api(), "/metrics", Some(&token))
        })?;
        ensure!(code == 200, "/metrics on h{i}: HTTP {code}");
        Ok(body)
    }
}

pub fn count(v: &[String], what: &str) -> usize {
    v.iter().filter(|l| *l == what).count()
}

pub fn fqdn(svc: &str) -> String {
    format!("{svc}.default.svc.pier.internal")
}

/// `store.stale_since_ms` of the `/readyz` of the agent in `netns`.
pub fn store_stale_since(netns: &str) -> Result<Option<u64>> {
    let (_, body) = netns::in_netns(netns, || http_get(&Cluster::api(), "/readyz"))?;
    let v: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
    Ok(v["store"]["stale_since_ms"].as_u64())
}

pub fn run_ok(cmd: &mut std::process::Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
