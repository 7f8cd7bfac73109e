//! Several hosts on one machine, with real isolation (see `netns.rs`): each
//! host is a network namespace with its own dockerd, etcd member and
//! `pier agent`, all joined by a bridge in a "switch" namespace.
//!
//! - `remote_pods_security_and_host_cut`: a client container on host 1
//!   reaches, by DNS name and VIP, a service whose pods run only on hosts 2
//!   and 3 (through the mTLS mesh), and the load is spread over both; a
//!   service that prefers local endpoints stays on host 1's pod while it is
//!   ready and falls back to host 2's; `dig` from host 1's own namespace
//!   and a container on a network created after host 1's agent are
//!   answered at once; the
//!   mesh refuses a foreign certificate, plaintext, and targets that are not
//!   ready endpoints of its node, logging each with the peer's address;
//!   host 3 is cut off the switch, its endpoints leave host 1's snapshot,
//!   then a request loop sees no failure; after the heal host 3 rejoins by
//!   itself and gets traffic again.
//! - `store_unreachable_serves_last_snapshot`: etcd is made unreachable
//!   from host 1 (packets dropped, as in a partition); host 1 reports itself
//!   stale and keeps answering DNS and proxying with its last snapshot; a
//!   service created meanwhile on host 2 reaches host 1 after the heal.
//! - `replicas_spread_and_move_off_a_cut_host`: `pier run --replicas 3`
//!   puts one pod on each host; a cut host's pod is replaced on the others
//!   and the service keeps answering; after the heal the cut host removes
//!   its orphaned container and the set stays at 3.
//!
//! - `upgrade_and_crash_across_hosts`: a client container on host 1 loops
//!   requests (DNS name, VIP, mesh) to a pod on host 2 while host 2's agent
//!   is upgraded (SIGHUP to its keeper), its worker is killed with SIGKILL,
//!   and then the same on host 1: no failed request on an upgrade, at most
//!   the one in flight through a killed worker; then each host's keeper is
//!   killed (`kill -9`) and the agent started again: its worker serves on
//!   as an orphan and is adopted, with no failed request.
//!
//! - `oauth_example_across_three_hosts` (in `oauth.rs`): the article's
//!   OAuth example, `examples/oauth/compose.yaml`, placed, blocked, cut,
//!   healed and rolled under load.
//! - `pod_names_srv_and_headless_across_hosts`: a pod on each of 2 hosts;
//!   from host 2, SRV targets and pod names resolve to endpoint VIPs that a
//!   container reaches (host 1's pod over the mesh), and a headless
//!   service answers one such address per pod, with no VIP.
//! - `udp_through_the_mesh_and_labelled_headless` (in `udp.rs`): a UDP
//!   service of labelled containers on host 2, reached from host 1 (its
//!   namespace, and a container on a network made after its agent) through
//!   the mesh, with the flow moving off a killed pod; and a service created
//!   headless by the label `pier.headless=true`.
//!
//! - `watch_relays_fan_out_refuse_strangers_and_fail_over` (in
//!   `relay.rs`): h1 serves `[relay]`, h2 and h3 list and watch through
//!   it: one whole-prefix watcher on etcd for the three, a pod on h2 seen
//!   by h1 and h3 and reached from h3, clients without a mesh certificate
//!   refused, and after `kill -9` of h1's agent h2 and h3 watch etcd and
//!   keep converging.
//!
//! - `chaos_run` (in `chaos.rs`, ignored: run with `--ignored`): 60 s of
//!   random faults (pod kills, agent kill -9, dockerd restarts, etcd member
//!   kills, host cuts) under request loops and API writes, with a checker
//!   (RELIABILITY.md); `chaos_ten_minutes` is the 10-minute run.
//!
//! Traffic is only ever sent from inside the host namespaces (threads that
//! `setns` into them, or containers), never from the root namespace.

mod chaos;
mod cluster;
mod netns;
mod oauth;
mod relay;
mod udp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cluster::{Cluster, LEASE_TTL, MESH_PORT, POD_PORT, count, fqdn, run_ok, store_stale_since};
use pier_model::Name;
use pier_proxy::mesh::{MeshConnector, RELOAD_POLL, RefusalCode};
use pier_proxy::tls::MeshConfig;
use pier_tests::{eventually, http_get};
use serde_json::Value;

/// Bounds of the timings after a cut or a heal, in lease TTLs
/// ([`LEASE_TTL`], 2 s: the node leases and the supervisor's election
/// lease). Each is the terms that follow from the design, plus slack for a
/// loaded 2-core machine; the times seen there (load average 10 to 16,
/// three runs of the three tests side by side) are noted with each.
/// A regression (a lease no longer kept or no longer leased keys, a stale
/// check that waits for a timeout, a reconnect that waits for a resync)
/// fails them. Where the pieces come from: etcd's election timeout is
/// 1 s (its default) and a new etcd leader re-arms every lease to its full
/// TTL; the lease keeper renews every TTL/3 and calls the store down when a
/// keepalive gets no answer within a TTL (`pier_store::lease`); reconnects
/// and relists back off to at most 2 s (`RELIST_BACKOFF_MAX`,
/// `WATCH_BACKOFF_MAX`, `REGRANT_BACKOFF_MAX`); the test polls every 50 ms
/// (`eventually`), each poll a request into a host's namespace.
mod bound {
    /// A cut host's endpoint leaves the others' snapshots: its lease runs
    /// out (1 TTL after its last keepalive), once more if the cut host's
    /// etcd member led and a new leader re-armed the leases after its 1 s
    /// election (1.5 TTLs), the watch delivers the delete (< 0.5 TTL);
    /// 2 TTLs slack. Seen: 1.8 to 4.4 s.
    pub const CUT_NOTICED: u32 = 5;
    /// A host cut off from the store reports itself stale: the next
    /// keepalive (TTL/3) gets no answer within a TTL (1.33 TTLs). After a
    /// host cut the test asks only once [`CUT_NOTICED`] held, so that wait
    /// is in it too: 5 + 1 TTLs. Seen: 2.1 s (store cut), 2.9 to 4.7 s
    /// (host cut).
    pub const STALE: u32 = 6;
    /// A healed host is back in the others' view, or has caught up: one
    /// backed-off retry (at most 1 TTL), a relist or a new lease and the
    /// node's and endpoints' writes, the watch delivery (< 1 TTL together);
    /// 2 TTLs slack. Seen: 0.14 to 1.3 s.
    pub const HEALED: u32 = 4;
    /// A cut host's pod is replaced and ready elsewhere: the node's lease
    /// (and the supervisor's election lease, if it led there) runs out, as
    /// in [`CUT_NOTICED`] (2.5 TTLs), then the new pod is placed, started
    /// by the other host's dockerd and passes its readiness check (about
    /// 1 TTL on a loaded machine); 4.5 TTLs slack for container starts
    /// under load. Seen: 2.8 to 5.4 s.
    pub const REPLACED: u32 = 8;
}

/// Asserts that `what` took at most `ttls` lease TTLs.
fn within_ttls(what: &str, took: Duration, ttls: u32) -> Result<()> {
    let bound = LEASE_TTL * ttls;
    eprintln!("{what}: {took:?} (bound: {ttls} × the {LEASE_TTL:?} lease = {bound:?})");
    ensure!(
        took <= bound,
        "{what} took {took:?}, more than {ttls} × the {LEASE_TTL:?} lease ({bound:?})"
    );
    Ok(())
}

/// Dial host `to`'s mesh port from host `from`'s namespace with the given
/// identity, ask for `target`, and on success send one HTTP request and
/// return the body. `Err` carries the connector's error.
fn mesh_request(
    c: &Cluster,
    from: usize,
    to: usize,
    identity: MeshConfig,
    target: SocketAddr,
) -> Result<std::result::Result<String, pier_proxy::mesh::MeshError>> {
    mesh_request_as(c, from, &format!("h{from}"), to, identity, target)
}

/// [`mesh_request`] from host `from`'s namespace with an identity issued
/// for node `me` (which need not be host `from`'s).
fn mesh_request_as(
    c: &Cluster,
    from: usize,
    me: &str,
    to: usize,
    identity: MeshConfig,
    target: SocketAddr,
) -> Result<std::result::Result<String, pier_proxy::mesh::MeshError>> {
    let peer = SocketAddr::new(c.topo.host(to).addr.into(), MESH_PORT);
    let peer_node = Name::new(&format!("h{to}"))?;
    let me = Name::new(me)?;
    c.topo.host(from).within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut reg = prometheus_client::registry::Registry::default();
            let conn = MeshConnector::with_pool_size(&identity, me, &mut reg, 0)?;
            let r = match conn.connect(peer, &peer_node, target).await {
                Ok(mut s) => {
                    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n").await?;
                    let mut buf = Vec::new();
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
                        .await
                        .context("reading through the mesh")??;
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
                    Ok(body.trim().to_owned())
                }
                Err(e) => Err(e),
            };
            conn.close().await;
            Ok(r)
        })
    })
}

/// Lines of host `i`'s agent log that contain every one of `needles`.
fn log_lines(c: &Cluster, i: usize, needles: &[&str]) -> Vec<String> {
    c.topo
        .host(i)
        .agent_log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn remote_pods_security_and_host_cut() -> Result<()> {
    let c = Cluster::start(1, 3)?;
    let h1_addr = c.topo.host(1).addr;

    // --- Remote pods through the VIP --------------------------------------
    c.run_pod(2, "web-h2", "web", POD_PORT)?;
    c.run_pod(3, "web-h3", "web", POD_PORT)?;
    c.run_client(1)?;
    eventually(Duration::from_secs(30), "h1 sees web on h2 and h3", || {
        let mut nodes: Vec<String> = c
            .ready_endpoints(1, "web")?
            .into_iter()
            .map(|e| e.0)
            .collect();
        nodes.sort();
        Ok((nodes == ["h2", "h3"]).then_some(()))
    })
    .with_context(|| c.logs())?;
    let got = c.requests(1, &fqdn("web"), 60)?;
    let (h2, h3) = (count(&got, "web-h2"), count(&got, "web-h3"));
    ensure!(
        h2 + h3 == 60,
        "every request must succeed through the mesh: {got:?}{}",
        c.diagnose(1, "web")
    );
    // Spread: each of the two remote pods gets at least a quarter.
    ensure!(
        h2 >= 15 && h3 >= 15,
        "load not spread over hosts 2 and 3: h2 {h2}, h3 {h3}"
    );
    // As the README shows a user: a container whose resolver is pier's, a
    // short name through the search path, wget.
    let out = c.topo.host(1).docker(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--label",
        &format!("pier.test-run={}", c.label),
        "--dns",
        &format!("10.213.{}.10", c.octet),
        "--dns-search",
        "default.svc.pier.internal",
        pier_tests::TEST_IMAGE,
        "wget",
        "-qO-",
        "http://web:8080/",
    ])?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        body == "web-h2" || body == "web-h3",
        "wget http://web:8080/ from a container on h1: {body:?}"
    );
    // From host 1 itself: `dig` in its namespace is answered (the query
    // leaves from the DNS VIP's own address, one of the host's), and a
    // container on a network created now, after the agent, is answered on
    // its first query and reaches the VIP.
    let dns = format!("10.213.{}.10", c.octet);
    let svc = c.cli_json(1, &["get", "svc", "web"])?;
    let vip = svc
        .first()
        .and_then(|s| s["vip"].as_str())
        .context("web has no VIP")?
        .to_owned();
    let out = c.topo.host(1).exec(&[
        "dig",
        &format!("@{dns}"),
        &fqdn("web"),
        "A",
        "+time=2",
        "+tries=1",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("status: NOERROR") && text.contains(&vip),
        "dig from host 1's namespace:\n{text}"
    );
    let net = format!("late-{}", c.label);
    c.topo.host(1).docker(&[
        "network",
        "create",
        "--label",
        &format!("pier.test-run={}", c.label),
        &net,
    ])?;
    let out = c.topo.host(1).docker(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--network",
        &net,
        "--label",
        &format!("pier.test-run={}", c.label),
        "--dns",
        &dns,
        pier_tests::TEST_IMAGE,
        "sh",
        "-c",
        &format!(
            "nslookup {} && wget -qO- http://{}:8080/",
            fqdn("web"),
            fqdn("web")
        ),
    ]);
    let _ = c.topo.host(1).docker(&["network", "rm", &net]);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains(&vip) && (text.contains("web-h2") || text.contains("web-h3")),
        "a container on a network created after host 1's agent:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let m = c.metrics(1)?;
    ensure!(
        m.lines()
            .any(|l| l.contains("mesh_client_connects") && l.contains("result=\"ok\"")),
        "the mesh hop is not visible in h1's metrics:\n{m}"
    );

    // --- Prefer local endpoints -------------------------------------------
    // `near` has a pod on h1 and one on h2, and prefers local endpoints:
    // h1's clients stay on h1 while its pod is ready, then go to h2.
    for (i, pod) in [(1, "near-h1"), (2, "near-h2")] {
        c.run_labelled(
            i,
            pod,
            &[
                ("pier.service", "near"),
                ("pier.port", "8080"),
                ("pier.prefer-local", "true"),
            ],
            &[],
        )?;
    }
    eventually(Duration::from_secs(30), "h1 sees near on h1 and h2", || {
        Ok((c.ready_endpoints(1, "near")?.len() == 2).then_some(()))
    })
    .with_context(|| c.logs())?;
    let got = c.requests(1, &fqdn("near"), 20)?;
    ensure!(
        count(&got, "near-h1") == 20,
        "a service that prefers local endpoints must stay on h1: {got:?}"
    );
    c.topo.host(1).docker(&["stop", "-t", "1", "near-h1"])?;
    eventually(Duration::from_secs(20), "near falls back to h2", || {
        let got = c.requests(1, &fqdn("near"), 10)?;
        Ok((count(&got, "near-h2") == 10).then_some(()))
    })
    .with_context(|| c.logs())?;

    // --- Security: the mesh is not an open relay -------------------------
    let certs1 = c.topo.host(1).dir.join("certs");
    let ours = MeshConfig::from_dir("0.0.0.0:0".parse()?, &certs1);
    let web_h2 = SocketAddr::new(c.pod_ip(2, "web-h2")?, POD_PORT);
    let web_h3 = SocketAddr::new(c.pod_ip(3, "web-h3")?, POD_PORT);
    // Positive control: a ready endpoint of host 2, asked by host 1.
    let body = mesh_request(&c, 1, 2, ours.clone(), web_h2)?
        .map_err(|e| anyhow::anyhow!("mesh request to a ready endpoint failed: {e}"))?;
    ensure!(body == "web-h2", "through the mesh: {body:?}");

    // A pod that never becomes ready (nothing listens on its port).
    c.run_pod(2, "idle-h2", "idle", 8081)?;
    let idle = SocketAddr::new(c.pod_ip(2, "idle-h2")?, 8081);
    eventually(
        Duration::from_secs(30),
        "h2 registers idle (not ready)",
        || {
            let eps = c.cli_json(2, &["get", "endpoints", "idle"])?;
            Ok((!eps.is_empty()).then_some(()))
        },
    )?;
    let refused = [
        ("127.0.0.1:22".parse()?, RefusalCode::NotLocalEndpoint),
        (
            SocketAddr::new(c.topo.host(2).addr.into(), 2379),
            RefusalCode::NotLocalEndpoint,
        ),
        (web_h3, RefusalCode::NotLocalEndpoint),
        (idle, RefusalCode::NotReady),
    ];
    for (target, want) in refused {
        match mesh_request(&c, 1, 2, ours.clone(), target)? {
            Ok(body) => bail!("h2's mesh relayed to {target}: {body:?}"),
            Err(e) => ensure!(
                e.refusal() == Some(want),
                "target {target}: expected refusal {want}, got {e}"
            ),
        }
        let lines = log_lines(
            &c,
            2,
            &[
                "mesh: refused",
                &format!("{h1_addr}:"),
                &format!("target={target}"),
            ],
        );
        ensure!(
            !lines.is_empty(),
            "h2 did not log the refusal of {target} with the peer's address:\n{}",
            c.topo.host(2).agent_log()
        );
    }

    // A client certificate from another CA (the client trusts the real CA).
    let foreign = c.foreign_identity(1, "h1")?;
    let before = log_lines(&c, 2, &["TLS handshake failed", &format!("{h1_addr}:")]).len();
    match mesh_request(&c, 1, 2, foreign, web_h2)? {
        Ok(body) => bail!("h2's mesh accepted a certificate from another CA: {body:?}"),
        Err(e) => ensure!(e.refusal().is_none(), "expected a handshake failure: {e}"),
    }
    eventually(
        Duration::from_secs(5),
        "h2 logs the foreign certificate",
        || {
            let n = log_lines(&c, 2, &["TLS handshake failed", &format!("{h1_addr}:")]).len();
            Ok((n > before).then_some(()))
        },
    )
    .with_context(|| c.topo.host(2).agent_log())?;

    // An endpoint forged in the store (as anyone with write access to etcd
    // could): node=h2, ip=127.0.0.1, port 2379 (h2's own etcd on its
    // loopback), ready. The store says so; h2's agent never found it, so
    // h2's mesh refuses to relay to it.
    let forged_key = pier_model::keys::endpoint(
        &pier_model::Namespace::default(),
        &Name::new("web")?,
        &Name::new("h2")?,
        &Name::new("forged")?,
    );
    let forged = serde_json::json!({
        "service": "web", "node": "h2", "id": "forged", "ip": "127.0.0.1",
        "ports": [{"name": "http", "port": 2379}], "ready": true,
    })
    .to_string();
    let etcdctl = |args: &[&str]| -> Result<()> {
        let mut a = vec!["etcdctl", "--endpoints", "http://127.0.0.1:2379"];
        a.extend_from_slice(args);
        let out = c.topo.host(1).exec(&a)?;
        ensure!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    etcdctl(&["put", &forged_key, &forged])?;
    let loopback_etcd: SocketAddr = "127.0.0.1:2379".parse()?;
    let tried = (|| {
        eventually(
            Duration::from_secs(10),
            "h2's snapshot has the forged endpoint",
            || {
                let eps = c.cli_json(2, &["get", "endpoints", "web"])?;
                Ok(eps
                    .iter()
                    .any(|e| e.to_string().contains("forged"))
                    .then_some(()))
            },
        )?;
        match mesh_request(&c, 1, 2, ours.clone(), loopback_etcd)? {
            Ok(body) => bail!("h2's mesh relayed to its loopback etcd: {body:?}"),
            Err(e) => ensure!(
                e.refusal() == Some(RefusalCode::NotLocalEndpoint),
                "forged endpoint: expected not_local_endpoint, got {e}"
            ),
        }
        eventually(Duration::from_secs(5), "h2 logs not_in_local_view", || {
            let n = log_lines(
                &c,
                2,
                &[
                    "mesh: refused",
                    "target=127.0.0.1:2379",
                    "not_in_local_view",
                ],
            )
            .len();
            Ok((n > 0).then_some(()))
        })
        .with_context(|| c.topo.host(2).agent_log())
    })();
    // Removed even when the check failed.
    etcdctl(&["del", &forged_key])?;
    tried?;

    // A certificate the real CA issued for a node that is not in the
    // cluster: handshake fine, then refused before any header.
    let ghost = c.topo.host(1).dir.join("ghost-certs");
    run_ok(
        std::process::Command::new(&c.pier)
            .args(["ca", "issue", "h9", "--ca"])
            .arg(&c.ca)
            .arg("--out")
            .arg(&ghost),
    )?;
    let ghost_id = MeshConfig::from_dir("0.0.0.0:0".parse()?, &ghost);
    match mesh_request_as(&c, 1, "h9", 2, ghost_id, web_h2)? {
        Ok(body) => bail!("h2's mesh served a node not in the cluster: {body:?}"),
        Err(e) => ensure!(
            e.refusal() == Some(RefusalCode::PeerNotAllowed),
            "unknown node: expected peer_not_allowed, got {e}"
        ),
    }

    // Plaintext: an HTTP request straight at the mesh port.
    let mesh2 = SocketAddr::new(c.topo.host(2).addr.into(), MESH_PORT);
    let (local_port, reply) = c.topo.host(1).within(move || {
        let mut s = TcpStream::connect_timeout(&mesh2, Duration::from_secs(3))?;
        let port = s.local_addr()?.port();
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {web_h2}\r\n\r\n").as_bytes())?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok((port, buf))
    })?;
    ensure!(
        !String::from_utf8_lossy(&reply).contains("web-h2") && !reply.starts_with(b"HTTP"),
        "plaintext got an answer: {:?}",
        String::from_utf8_lossy(&reply)
    );
    eventually(Duration::from_secs(5), "h2 logs the plaintext peer", || {
        let n = log_lines(
            &c,
            2,
            &["mesh: refused", &format!("{h1_addr}:{local_port}")],
        )
        .len();
        Ok((n > 0).then_some(()))
    })
    .with_context(|| c.topo.host(2).agent_log())?;

    // --- Cut host 3 ---------------------------------------------------------
    c.topo.cut(3)?;
    let cut_at = Instant::now();
    eventually(
        Duration::from_secs(30),
        "h3's endpoint leaves h1's snapshot",
        || {
            let eps = c.ready_endpoints(1, "web")?;
            Ok((!eps.iter().any(|e| e.0 == "h3")).then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    within_ttls(
        "h3's endpoint left h1's snapshot after the cut",
        cut_at.elapsed(),
        bound::CUT_NOTICED,
    )?;
    let got = c.requests(1, &fqdn("web"), 40)?;
    ensure!(
        count(&got, "web-h2") == 40,
        "after the cut was noticed, every request must reach h2: {got:?}"
    );

    // The others keep their leases whichever etcd member their client was
    // on: h1 and h2 stay registered, h3 is gone.
    let nodes = c.nodes(2)?;
    ensure!(
        nodes.contains_key("h1") && nodes.contains_key("h2") && !nodes.contains_key("h3"),
        "during h3's cut, h2 must see h1 and h2 only: {nodes:?}{}",
        c.logs()
    );
    // Host 3, cut off with its etcd member (no quorum there), says so.
    let h3 = c.topo.host(3).netns.clone();
    eventually(Duration::from_secs(60), "h3 reports itself stale", || {
        Ok(store_stale_since(&h3)?.is_some().then_some(()))
    })
    .with_context(|| c.logs())?;
    within_ttls(
        "h3 reported itself stale after the cut",
        cut_at.elapsed(),
        bound::STALE,
    )?;

    c.topo.heal(3)?;
    let heal_at = Instant::now();
    eventually(
        Duration::from_secs(60),
        "h3 rejoins: its endpoint is back in h1's snapshot",
        || {
            let eps = c.ready_endpoints(1, "web")?;
            Ok(eps.iter().any(|e| e.0 == "h3").then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    within_ttls(
        "h3 rejoined h1's view after the heal",
        heal_at.elapsed(),
        bound::HEALED,
    )?;
    eventually(Duration::from_secs(30), "h3 fresh again", || {
        Ok(store_stale_since(&h3)?.is_none().then_some(()))
    })
    .with_context(|| c.logs())?;
    eventually(
        Duration::from_secs(30),
        "h3 a ready node in h1's view",
        || Ok((c.nodes(1)?.get("h3") == Some(&true)).then_some(())),
    )
    .with_context(|| c.logs())?;
    eventually(Duration::from_secs(20), "traffic reaches h3 again", || {
        let got = c.requests(1, &fqdn("web"), 10)?;
        ensure!(
            count(&got, "FAIL") == 0,
            "requests failed after the heal: {got:?}"
        );
        Ok((count(&got, "web-h3") > 0).then_some(()))
    })?;

    // --- Revoke host 3 -------------------------------------------------------
    // h3 is revoked and the list copied to every host (as an operator
    // does): h1 sends nothing more to h3, and h3's identity gets no tunnel
    // into h2. (The cut of open tunnels within RELOAD_POLL is timed in
    // crates/pier-proxy/tests/mesh.rs.)
    run_ok(
        std::process::Command::new(&c.pier)
            .args(["ca", "revoke", "h3", "--ca"])
            .arg(&c.ca),
    )?;
    for i in 1..=3 {
        std::fs::copy(
            c.ca.join("crl.pem"),
            c.topo.host(i).dir.join("certs/crl.pem"),
        )?;
    }
    let landed = Instant::now();
    eventually(Duration::from_secs(10), "h1 stops using h3", || {
        let got = c.requests(1, &fqdn("web"), 10)?;
        ensure!(count(&got, "FAIL") == 0, "requests failed: {got:?}");
        Ok((count(&got, "web-h2") == 10).then_some(()))
    })?;
    eprintln!(
        "h1 sent only to h2 {:?} after the list landed",
        landed.elapsed()
    );
    let got = c.requests(1, &fqdn("web"), 30)?;
    ensure!(
        count(&got, "web-h2") == 30,
        "a revoked host must get no traffic: {got:?}"
    );
    // h3's files without the list (which would stop this connector at
    // start, as it stops h3's own reload): the attacker's copy.
    let certs3 = c.topo.host(3).dir.join("certs");
    let stolen = c.topo.host(3).dir.join("stolen-certs");
    std::fs::create_dir_all(&stolen)?;
    for f in ["ca.pem", "node.pem", "node-key.pem"] {
        std::fs::copy(certs3.join(f), stolen.join(f))?;
    }
    // h2's listener re-reads its files every RELOAD_POLL, on its own
    // clock: the list is in force there within one poll of landing (h1's
    // connector, above, re-reads on its next connect, so it can be first).
    let stolen_identity = || MeshConfig::from_dir("0.0.0.0:0".parse().expect("addr"), &stolen);
    eventually(
        RELOAD_POLL + Duration::from_secs(1),
        "h2's mesh refuses revoked h3",
        || match mesh_request(&c, 3, 2, stolen_identity(), web_h2)? {
            Ok(_) => Ok(None),
            Err(e) => {
                ensure!(
                    e.refusal().is_none() || e.refusal() == Some(RefusalCode::PeerNotAllowed),
                    "revoked: expected a refused handshake, got {e}"
                );
                Ok(Some(()))
            }
        },
    )?;
    eprintln!("h2 refused h3 {:?} after the list landed", landed.elapsed());
    // And it stays refused.
    for _ in 0..3 {
        if let Ok(body) = mesh_request(&c, 3, 2, stolen_identity(), web_h2)? {
            bail!("h2's mesh served revoked h3 after refusing it: {body:?}");
        }
    }
    Ok(())
}

#[test]
fn store_unreachable_serves_last_snapshot() -> Result<()> {
    let c = Cluster::start(2, 3)?;
    c.run_pod(2, "web-h2", "web", POD_PORT)?;
    c.run_pod(3, "web-h3", "web", POD_PORT)?;
    c.run_client(1)?;
    eventually(Duration::from_secs(30), "h1 sees web on h2 and h3", || {
        Ok((c.ready_endpoints(1, "web")?.len() == 2).then_some(()))
    })
    .with_context(|| c.logs())?;
    let got = c.requests(1, &fqdn("web"), 10)?;
    ensure!(count(&got, "FAIL") == 0, "before the cut: {got:?}");

    // etcd unreachable from host 1: its packets to any member's client
    // port, and the members' packets back, are dropped (silence, as in a
    // partition; not a refusal). Both ways: with only the way out dropped,
    // a member's watch events could still arrive on the open connection
    // (a few KB, until its unacknowledged window is full), and h1 saw the
    // service made below while "cut off" (CI, session 10).
    let h1 = c.topo.host(1);
    let etcd_rules = |op: &str| -> Result<()> {
        for (chain, port) in [("OUTPUT", "--dport"), ("INPUT", "--sport")] {
            h1.exec(&[
                "iptables",
                "-w",
                op,
                chain,
                "-p",
                "tcp",
                port,
                "2379",
                "-j",
                "DROP",
                "-m",
                "comment",
                "--comment",
                &c.label,
            ])?;
        }
        Ok(())
    };
    etcd_rules("-I")?;
    let cut_at = Instant::now();
    let stale = eventually(Duration::from_secs(60), "h1 reports itself stale", || {
        let (code, body) = netns::in_netns(&h1.netns, || http_get(&Cluster::api(), "/readyz"))?;
        let v: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        Ok(v["store"]["stale_since_ms"].as_u64().map(|s| (code, s, v)))
    })
    .with_context(|| c.logs())?;
    eprintln!("h1's readiness when stale: {}", stale.2);
    within_ttls(
        "h1 reported itself stale after the store was cut off",
        cut_at.elapsed(),
        bound::STALE,
    )?;
    // Still serving: it keeps answering /readyz with 200 (it serves), the
    // CLI's node view says its data is stale.
    ensure!(stale.0 == 200, "a stale agent still serves: {}", stale.2);
    let nodes = c.nodes(1)?;
    ensure!(
        nodes.values().all(|r| !r),
        "h1's node view must say its data is not live: {nodes:?}"
    );

    // DNS and proxying from the last snapshot: every request succeeds.
    let got = c.requests(1, &fqdn("web"), 30)?;
    ensure!(
        count(&got, "web-h2") + count(&got, "web-h3") == 30,
        "while the store is unreachable, requests must go on: {got:?}{}",
        c.logs()
    );

    // A change made meanwhile elsewhere.
    c.run_pod(2, "api-h2", "api", POD_PORT)?;
    eventually(Duration::from_secs(30), "h2 sees api", || {
        Ok((c.ready_endpoints(2, "api")?.len() == 1).then_some(()))
    })
    .with_context(|| c.logs())?;
    ensure!(
        c.cli_json(1, &["get", "svc", "api"])
            .map(|v| v.is_empty())
            .unwrap_or(true),
        "h1 cannot have seen api while cut off"
    );

    // Heal: h1 catches up by itself.
    etcd_rules("-D")?;
    let heal_at = Instant::now();
    eventually(
        Duration::from_secs(60),
        "h1 fresh again and sees api",
        || {
            let fresh = store_stale_since(&h1.netns)?.is_none();
            Ok((fresh && c.ready_endpoints(1, "api")?.len() == 1).then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    within_ttls(
        "h1 caught up after the heal",
        heal_at.elapsed(),
        bound::HEALED,
    )?;
    let got = c.requests(1, &fqdn("api"), 5)?;
    ensure!(
        count(&got, "api-h2") == 5,
        "h1 resolves and reaches the new service: {got:?}"
    );
    // And h1 is back in the others' view (its lease expired meanwhile).
    eventually(Duration::from_secs(30), "h2 sees h1 again", || {
        Ok((c.nodes(2)?.get("h1") == Some(&true)).then_some(()))
    })
    .with_context(|| c.logs())?;
    Ok(())
}

/// Host `i`'s view of replica set `rs`'s pods that are Running and ready:
/// (pod, node).
fn ready_pods(c: &Cluster, i: usize, rs: &str) -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = c
        .cli_json(i, &["get", "pods"])?
        .iter()
        .filter(|p| p["replicaset"] == rs && p["phase"] == "Running" && p["ready"] == true)
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["node"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    Ok(v)
}

/// `pier run` on a 3-host cluster spreads the pods over the hosts; when a
/// host is cut off, its pod is replaced on the others and the service keeps
/// answering; after the heal, the cut host removes its orphaned container
/// by itself, and the set, left crowded on two hosts, is spread over the
/// three again at its count; a host whose dockerd is down gets no new pod.
#[test]
fn replicas_spread_and_move_off_a_cut_host() -> Result<()> {
    let mut c = Cluster::start(3, 3)?;
    c.run_client(1)?;
    c.cli(
        1,
        &[
            "run",
            "web",
            "--image",
            pier_tests::TEST_IMAGE,
            "--port",
            "8080",
            "--replicas",
            "3",
            "--wait",
            "--timeout",
            "60s",
        ],
    )?;
    c.cli(1, &["expose", "rs", "web", "--port", "8080"])?;
    let pods = eventually(Duration::from_secs(30), "3 ready pods", || {
        let p = ready_pods(&c, 1, "web")?;
        Ok((p.len() == 3).then_some(p))
    })
    .with_context(|| c.logs())?;
    let mut nodes: Vec<&str> = pods.iter().map(|p| p.1.as_str()).collect();
    nodes.sort();
    ensure!(
        nodes == ["h1", "h2", "h3"],
        "pods not spread over the hosts: {pods:?}"
    );
    let names = |v: &[(String, String)]| -> std::collections::BTreeSet<String> {
        v.iter().map(|p| p.0.clone()).collect()
    };
    let all = names(&pods);
    eventually(Duration::from_secs(20), "every pod answers", || {
        let got = c.requests(1, &fqdn("web"), 30)?;
        ensure!(count(&got, "FAIL") == 0, "requests failed: {got:?}");
        let seen: std::collections::BTreeSet<String> = got.into_iter().collect();
        Ok((seen == all).then_some(()))
    })
    .with_context(|| c.logs())?;
    let on_h3 = pods
        .iter()
        .find(|p| p.1 == "h3")
        .map(|p| p.0.clone())
        .context("a pod on h3")?;

    // Cut host 3: its pod is replaced on host 1 or 2.
    c.topo.cut(3)?;
    let cut_at = Instant::now();
    let after = eventually(
        Duration::from_secs(60),
        "3 ready pods again, none on h3",
        || {
            let p = ready_pods(&c, 1, "web")?;
            Ok((p.len() == 3 && p.iter().all(|x| x.1 != "h3")).then_some(p))
        },
    )
    .with_context(|| c.logs())?;
    eprintln!("after the cut: {after:?}");
    within_ttls(
        &format!("a replacement for {on_h3} ready after the cut"),
        cut_at.elapsed(),
        bound::REPLACED,
    )?;
    let now = names(&after);
    ensure!(!now.contains(&on_h3), "{on_h3} still listed: {after:?}");
    eventually(Duration::from_secs(20), "the new set answers", || {
        let got = c.requests(1, &fqdn("web"), 30)?;
        ensure!(count(&got, "FAIL") == 0, "requests failed: {got:?}");
        let seen: std::collections::BTreeSet<String> = got.into_iter().collect();
        Ok((seen == now).then_some(()))
    })
    .with_context(|| c.logs())?;

    // Heal: host 3 finds its pod gone from the store and removes the
    // container it kept running while cut off; the set stays at 3.
    c.topo.heal(3)?;
    let orphan_gone = |c: &Cluster| -> Result<bool> {
        let out = c.topo.host(3).docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=pier.pod={on_h3}"),
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().is_empty())
    };
    eventually(
        Duration::from_secs(60),
        "h3 removes its orphaned container",
        || Ok(orphan_gone(&c)?.then_some(())),
    )
    .with_context(|| c.logs())?;
    // And the set, crowded on two hosts, is spread again over the three
    // (an extra pod on h3, then one removed from the crowded host), back
    // at exactly 3 pods.
    let healed_at = Instant::now();
    let spread = eventually(
        Duration::from_secs(30),
        "h3 back, the set re-spread over the 3 hosts",
        || {
            let nodes = c.nodes(1)?;
            let p = ready_pods(&c, 1, "web")?;
            let all = c.cli_json(1, &["get", "pods"])?;
            let web = all.iter().filter(|p| p["replicaset"] == "web").count();
            let mut on: Vec<&str> = p.iter().map(|x| x.1.as_str()).collect();
            on.sort();
            Ok(
                (nodes.get("h3") == Some(&true) && web == 3 && on == ["h1", "h2", "h3"])
                    .then_some(p),
            )
        },
    )
    .with_context(|| c.logs())?;
    eprintln!(
        "re-spread {:.1} s after the heal: {spread:?}",
        healed_at.elapsed().as_secs_f64()
    );
    let log = (1..=3)
        .map(|i| c.topo.host(i).agent_log())
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(
        log.contains("re-spreading: an extra pod"),
        "the leader did not log the re-spread"
    );

    // h2's dockerd stops: its agent says so in its node record, `describe
    // node` shows it, and no new pod goes there (a scale up to 5 places
    // every new pod on h1 or h3); a pod still pending there (its pod,
    // stopped by dockerd's shutdown, was replaced on h2 before the agent
    // saw dockerd go) is replaced elsewhere after the grace; h2 takes pods
    // again when dockerd is back.
    c.topo.host_mut(2).stop_dockerd();
    let stopped = (|| -> Result<()> {
        let out = eventually(
            Duration::from_secs(20),
            "h2 shown without its dockerd",
            || {
                let out = c.cli(1, &["describe", "node", "h2"])?;
                Ok(out.contains("dockerd unreachable").then_some(out))
            },
        )?;
        eprintln!("h1: pier describe node h2\n{out}");
        let before: std::collections::BTreeSet<String> = c
            .cli_json(1, &["get", "pods"])?
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        c.cli(1, &["scale", "rs", "web", "--replicas", "5"])?;
        let placed = eventually(Duration::from_secs(30), "5 pods of web", || {
            let all = c.cli_json(1, &["get", "pods"])?;
            let web: Vec<(String, String)> = all
                .iter()
                .filter(|p| p["replicaset"] == "web")
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_owned(),
                        p["node"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            Ok((web.len() == 5).then_some(web))
        })?;
        let on_h2: Vec<_> = placed
            .iter()
            .filter(|(name, node)| node == "h2" && !before.contains(name))
            .collect();
        ensure!(
            on_h2.is_empty(),
            "new pods placed on h2 while its dockerd is down: {on_h2:?} (all: {placed:?})"
        );
        let secs = pier_model::Node::RUNTIME_DOWN_GRACE_MS / 1000 + 20;
        let ready = eventually(
            Duration::from_secs(secs),
            "5 ready pods of web, none on h2",
            || {
                let p = ready_pods(&c, 1, "web")?;
                let all = c.cli_json(1, &["get", "pods"])?;
                let web = all.iter().filter(|p| p["replicaset"] == "web").count();
                Ok((web == 5 && p.len() == 5 && p.iter().all(|x| x.1 != "h2")).then_some(p))
            },
        )?;
        eprintln!("h2's dockerd down: {ready:?}");
        Ok(())
    })();
    c.topo.host_mut(2).start_dockerd()?;
    stopped.with_context(|| c.logs())?;
    eventually(Duration::from_secs(20), "h2 back with its dockerd", || {
        let out = c.cli(1, &["describe", "node", "h2"])?;
        Ok((!out.contains("dockerd unreachable")).then_some(()))
    })
    .with_context(|| c.logs())?;
    c.cli(1, &["scale", "rs", "web", "--replicas", "3"])?;

    // A set that cannot run (its image is on no host): whichever host leads
    // the supervisor, every host's `describe` shows the problem.
    c.cli(
        1,
        &[
            "run",
            "ghost",
            "--image",
            "pier-test/absent:latest",
            "--replicas",
            "1",
        ],
    )?;
    for i in 1..=3 {
        let out = eventually(
            Duration::from_secs(30),
            &format!("h{i} describes ghost's problem"),
            || {
                let out = c.cli(i, &["describe", "rs", "ghost"])?;
                let problems = out.split_once("Problems:").map(|x| x.1).unwrap_or("");
                Ok(problems.contains("absent").then_some(out))
            },
        )
        .with_context(|| c.cli(i, &["describe", "rs", "ghost"]).unwrap_or_default())?;
        if i == 1 {
            eprintln!("h1: pier describe rs ghost\n{out}");
        }
    }
    Ok(())
}

/// Hitless restarts across hosts (issue 18): the mesh's server side (host
/// 2) and the client's side (host 1: DNS and the proxy) are each upgraded
/// and crashed under a bounded request loop from a container on host 1.
#[test]
fn upgrade_and_crash_across_hosts() -> Result<()> {
    use pier_tests::load::children;
    let mut c = Cluster::start(4, 2)?;
    c.run_pod(2, "web-h2", "web", POD_PORT)?;
    c.run_client(1)?;
    eventually(Duration::from_secs(30), "h1 sees web on h2", || {
        let eps = c.ready_endpoints(1, "web")?;
        Ok((eps.len() == 1 && eps[0].0 == "h2").then_some(()))
    })
    .with_context(|| c.logs())?;
    let warm = c.requests(1, &fqdn("web"), 10)?;
    ensure!(count(&warm, "web-h2") == 10, "before any restart: {warm:?}");
    for (host, sig) in [(2, "HUP"), (2, "KILL"), (1, "HUP"), (1, "KILL")] {
        let keeper = c.agents[host - 1];
        let before = children(keeper);
        ensure!(before.len() == 1, "h{host}'s keeper has workers {before:?}");
        let target = if sig == "HUP" { keeper } else { before[0] };
        let got = std::thread::scope(|s| {
            let load = s.spawn(|| c.requests(1, &fqdn("web"), 80));
            std::thread::sleep(Duration::from_secs(1));
            run_ok(
                std::process::Command::new("kill")
                    .arg(format!("-{sig}"))
                    .arg(target.to_string()),
            )?;
            load.join().expect("load thread")
        })?;
        let failed = got.len() - count(&got, "web-h2");
        eprintln!("h{host} {sig}: {} requests, {failed} failed", got.len());
        let allowed = if sig == "HUP" { 0 } else { 1 };
        ensure!(
            got.len() == 80 && failed <= allowed,
            "h{host} {sig}: {failed} of {} failed (allowed {allowed}): {got:?}{}",
            got.len(),
            c.logs()
        );
        eventually(Duration::from_secs(30), "a new worker, alone", || {
            let now = children(keeper);
            Ok((now.len() == 1 && now != before).then_some(()))
        })
        .with_context(|| c.logs())?;
    }
    // `kill -9` of each keeper in turn: its worker serves on (an orphan)
    // and the agent started again adopts it. Not one request fails, while
    // orphaned nor during the adoption.
    for host in [2, 1] {
        let keeper = c.agents[host - 1];
        let orphan = children(keeper);
        ensure!(orphan.len() == 1, "h{host}'s keeper has workers {orphan:?}");
        c.topo.host_mut(host).note_orphans(&orphan);
        let got = std::thread::scope(|s| {
            let load = s.spawn(|| c.requests(1, &fqdn("web"), 80));
            std::thread::sleep(Duration::from_secs(1));
            run_ok(
                std::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(keeper.to_string()),
            )?;
            load.join().expect("load thread")
        })?;
        c.kill_agent(host)?; // reaps it
        let failed = got.len() - count(&got, "web-h2");
        eprintln!(
            "h{host} keeper KILL: {} requests, {failed} failed",
            got.len()
        );
        ensure!(
            got.len() == 80 && failed == 0,
            "h{host} keeper killed: {failed} of {} failed: {got:?}{}",
            got.len(),
            c.logs()
        );
        c.restart_agent(host)?;
        let got = c.requests(1, &fqdn("web"), 80)?;
        let failed = got.len() - count(&got, "web-h2");
        eprintln!("h{host} adoption: {} requests, {failed} failed", got.len());
        ensure!(
            got.len() == 80 && failed == 0,
            "h{host} adoption: {failed} of {} failed: {got:?}{}",
            got.len(),
            c.logs()
        );
        let keeper = c.agents[host - 1];
        eventually(
            Duration::from_secs(30),
            "the orphan adopted and gone",
            || {
                let now = children(keeper);
                // Gone, or a zombie nobody has reaped yet.
                let gone = std::fs::read_to_string(format!("/proc/{}/stat", orphan[0]))
                    .map(|st| {
                        st.rsplit_once(')')
                            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(true);
                Ok((now.len() == 1 && gone).then_some(()))
            },
        )
        .with_context(|| c.logs())?;
        ensure!(
            c.topo
                .host(host)
                .agent_log()
                .contains("adopting the orphaned worker"),
            "h{host}: no adoption in the log{}",
            c.logs()
        );
    }
    Ok(())
}

/// Load that enters through two hosts counts as one service's load (issue
/// 15): 8 connections held from a container on each host (each host alone
/// would ask for 2 pods at 5 per pod) take the set to 4; the autoscaler's
/// view sums both hosts' stats.
#[test]
fn autoscale_sums_the_load_of_two_hosts() -> Result<()> {
    let c = Cluster::start(5, 2)?;
    c.run_client(1)?;
    c.run_client(2)?;
    c.cli(
        1,
        &[
            "run",
            "asx",
            "--image",
            pier_tests::TEST_IMAGE,
            "--port",
            "8080",
        ],
    )?;
    c.cli(1, &["expose", "rs", "asx", "--port", "8080"])?;
    c.cli(
        1,
        &[
            "autoscale",
            "rs",
            "asx",
            "--min",
            "1",
            "--max",
            "4",
            "--max-active-per-pod",
            "5",
            "--scale-down-delay",
            "60s",
        ],
    )?;
    eventually(Duration::from_secs(30), "1 ready pod answering", || {
        let got = c.requests(1, &fqdn("asx"), 1)?;
        Ok((ready_pods(&c, 1, "asx")?.len() == 1 && count(&got, "FAIL") == 0).then_some(()))
    })
    .with_context(|| c.logs())?;
    // 8 connections per host, each a request begun and held for 40 s
    // (bounded; busybox httpd waits 60 s for the rest of the headers).
    let name = fqdn("asx");
    let hold = format!(
        r#"ip=$(nslookup {name} 2>/dev/null | awk '/^Name:/{{n=1}} n&&/^Address/{{print $2; exit}}')
for i in 1 2 3 4 5 6 7 8; do (printf 'GET / HTTP/1.0\r\n'; sleep 40) | nc "$ip" {POD_PORT} >/dev/null 2>&1 & done; wait"#
    );
    for i in [1, 2] {
        c.topo
            .host(i)
            .docker(&["exec", "-d", "client", "sh", "-c", &hold])?;
    }
    eventually(
        Duration::from_secs(20),
        "4 replicas on both hosts' load",
        || {
            let rs = c.cli_json(1, &["get", "rs", "asx"])?;
            Ok((rs.first().and_then(|r| r["replicas"].as_u64()) == Some(4)).then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    // Read after the count: the decision is written with it.
    let view = c.cli(1, &["describe", "rs", "asx"])?;
    eprintln!("h1: pier describe rs asx\n{view}");
    // The last decision rests on both hosts' 16 connections (the first one
    // may have seen one host's 8 alone: the two clients start apart).
    ensure!(
        view.contains("on 2 nodes")
            && view.contains("open connections 16 over")
            && view.contains("→ 4"),
        "the decision should rest on both hosts' stats: {view}"
    );
    Ok(())
}

/// A replica set with a pod on each of 2 hosts. From host 2, the SRV
/// records of its service and of a headless service over the same pods
/// name both pods; each pod name (an SRV target) resolves to an endpoint
/// VIP in the service CIDR, never a bridge address, and a container on
/// host 2 reaches each pod through it, host 1's over the mesh. The headless
/// service has no VIP and its name resolves to one address per pod, each
/// answering with its own pod.
#[test]
fn pod_names_srv_and_headless_across_hosts() -> Result<()> {
    let c = Cluster::start(11, 2)?;
    let dns = format!("10.213.{}.10", c.octet);
    let cidr = format!("10.213.{}.", c.octet);
    c.run_client(2)?;
    c.cli(
        1,
        &[
            "run",
            "web",
            "--image",
            pier_tests::TEST_IMAGE,
            "--port",
            "8080",
            "--replicas",
            "2",
            "--wait",
            "--timeout",
            "60s",
        ],
    )?;
    c.cli(1, &["expose", "rs", "web", "--port", "8080"])?;
    let out = c.cli(
        1,
        &[
            "expose",
            "rs",
            "web",
            "--name",
            "webh",
            "--port",
            "8080",
            "--headless",
        ],
    )?;
    ensure!(out.contains("webh"), "expose --headless said: {out}");
    let pods = eventually(Duration::from_secs(30), "2 ready pods", || {
        let p = ready_pods(&c, 2, "web")?;
        Ok((p.len() == 2).then_some(p))
    })
    .with_context(|| c.logs())?;
    let mut nodes: Vec<&str> = pods.iter().map(|p| p.1.as_str()).collect();
    nodes.sort();
    ensure!(nodes == ["h1", "h2"], "pods not spread: {pods:?}");
    let names: std::collections::BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();

    let svcs = c.cli_json(2, &["get", "svc", "webh"])?;
    let webh = svcs.first().context("webh listed")?;
    ensure!(
        webh["vip"].is_null() && webh["headless"] == true,
        "a headless service has no VIP: {webh}"
    );
    let port_name = webh["ports"][0]["name"]
        .as_str()
        .context("webh's port name")?
        .to_owned();

    // dig from host 2's own namespace: SRV of both services, then A of the
    // headless name.
    let dig = |name: &str, ty: &str| -> Result<Vec<String>> {
        let out = c.topo.host(2).exec(&[
            "dig",
            &format!("@{dns}"),
            name,
            ty,
            "+short",
            "+time=2",
            "+tries=1",
        ])?;
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().trim_end_matches('.').to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        Ok(v)
    };
    let mut targets = std::collections::BTreeSet::new();
    for svc in ["web", "webh"] {
        let srv_name = format!("_{port_name}._tcp.{}", fqdn(svc));
        let srv = eventually(Duration::from_secs(20), "2 SRV records", || {
            let v = dig(&srv_name, "SRV")?;
            Ok((v.len() == 2).then_some(v))
        })
        .with_context(|| c.logs())?;
        for line in &srv {
            // "0 10 8080 <pod>.<svc>.default.svc.pier.internal"
            let f: Vec<&str> = line.split_whitespace().collect();
            ensure!(f.len() == 4 && f[2] == "8080", "SRV {srv_name}: {line:?}");
            let pod = f[3].split('.').next().unwrap_or_default();
            ensure!(
                names.contains(pod) && f[3] == format!("{pod}.{}", fqdn(svc)),
                "SRV target {} is not a pod name of {svc}: {srv:?}",
                f[3]
            );
            targets.insert((pod.to_owned(), f[3].to_owned()));
        }
    }
    ensure!(targets.len() == 4, "SRV targets: {targets:?}");
    let headless_a = dig(&fqdn("webh"), "A")?;
    ensure!(
        headless_a.len() == 2 && headless_a.iter().all(|a| a.starts_with(&cidr)),
        "webh A: one endpoint VIP per pod, in the service CIDR: {headless_a:?}"
    );

    // From a container on host 2: each SRV target (a pod name) resolves to
    // an endpoint VIP, not the pod's bridge address, and answers with its
    // own pod, the one on host 1 included.
    let fetch = |name: &str| -> Result<(String, String)> {
        let script = format!(
            r#"ip=$(nslookup {name} 2>/dev/null | awk '/^Name:/{{n=1}} n&&/^Address/{{print $2; exit}}')
b=$(printf 'GET / HTTP/1.0\r\nHost: t\r\n\r\n' | nc -w 3 "$ip" {POD_PORT} 2>/dev/null | tail -n 1)
echo "$ip $b""#
        );
        let out = c
            .topo
            .host(2)
            .docker(&["exec", "client", "sh", "-c", &script])?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (ip, body) = s.split_once(' ').unwrap_or((&s, ""));
        Ok((ip.to_owned(), body.trim().to_owned()))
    };
    for (pod, target) in &targets {
        let (ip, body) = fetch(target)?;
        eprintln!("from h2: {target} -> {ip} -> {body}");
        ensure!(
            ip.starts_with(&cidr),
            "{target} resolved to {ip:?} in a container on h2, not an endpoint VIP in {cidr}0/24"
        );
        ensure!(
            &body == pod,
            "{target} ({ip}) from a container on h2 answered {body:?}, not {pod}{}",
            c.diagnose(2, "web")
        );
    }
    // The headless name from the container: every address it resolves to
    // reaches its own pod, so both pods answer.
    let script = format!(
        r#"for ip in $(nslookup {} 2>/dev/null | awk '/^Name:/{{n=1}} n&&/^Address/{{print $2}}'); do
  printf 'GET / HTTP/1.0\r\nHost: t\r\n\r\n' | nc -w 3 "$ip" {POD_PORT} 2>/dev/null | tail -n 1; echo
done"#,
        fqdn("webh")
    );
    let out = c
        .topo
        .host(2)
        .docker(&["exec", "client", "sh", "-c", &script])?;
    let seen: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(
        seen == names,
        "the headless name's addresses from a container on h2 answered {seen:?}, not {names:?}"
    );
    Ok(())
}
