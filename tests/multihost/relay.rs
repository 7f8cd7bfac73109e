//! Watch relays across three hosts (ARCHITECTURE "Watch relays"): h1
//! serves `[relay]`, h2 and h3 list and watch the store through it
//! (`store.relays`).
//!
//! - etcd holds one whole-prefix watcher for the three (the relay's), not
//!   three: counted on the members' own `/metrics`;
//! - a pod started on relayed h2 becomes an endpoint that relayed h3 and
//!   the relay host h1 see, and h3's client container reaches it by name;
//! - a client without a certificate of the mesh CA gets nothing from the
//!   relay: plaintext, and TLS with another CA's certificate, each logged
//!   with its address; h2's own certificate, the control, is served a list;
//! - h1's agent upgraded (SIGHUP): the old worker relays until the new one
//!   serves, which takes the relay's socket over through the keeper; h2
//!   and h3 move to it without going to etcd meanwhile, and see a pod
//!   started after;
//! - h1's agent killed with `kill -9` (keeper and worker): h3's client is
//!   still answered from the last snapshot, h2 and h3 watch etcd directly
//!   (one whole-prefix watcher each) and see a pod started after the kill.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pier_model::Name;
use pier_proxy::relay_tls::RelayDialer;
use pier_proxy::tls::MeshConfig;
use pier_store::relay::wire::{self, Frame, Op};
use pier_tests::{eventually, http_get};

use crate::cluster::{Cluster, Extra, POD_PORT, count, fqdn, run_ok, store_stale_since};
use crate::netns::{self, Topology};

/// The relay's port on h1.
const RELAY_PORT: u16 = 7444;
/// Every agent campaigns in two elections (the supervisor's and the
/// autoscaler's), each holding one etcd watch of one key; they do not go
/// through relays.
const ELECTION_WATCHES: usize = 2;

fn relay_addr(t: &Topology) -> String {
    format!("{}:{RELAY_PORT}", t.host(1).addr)
}

/// The relay topology's config: h1 serves `[relay]`, the others list and
/// watch through it (this test's, and the chaos run's with
/// `CHAOS_RELAYS=1`).
pub(crate) fn h1_relays(i: usize, t: &Topology) -> Extra {
    if i == 1 {
        Extra {
            sections: format!("\n[relay]\nlisten = \"{}\"\n", relay_addr(t)),
            ..Extra::default()
        }
    } else {
        Extra {
            store: format!("relays = [\"{}\"]\n", relay_addr(t)),
            ..Extra::default()
        }
    }
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

/// The value of the unlabelled metric `name` in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Host `i`'s metric `name` (unlabelled), which must be there.
fn counter(c: &Cluster, i: usize, name: &str) -> Result<f64> {
    let m = c.metrics(i)?;
    metric(&m, name).with_context(|| format!("no {name} on h{i}:\n{m}"))
}

/// etcd's watchers, summed over the members (each host's, on its own
/// loopback), and each member's.
fn etcd_watchers(c: &Cluster, hosts: &[usize]) -> Result<(usize, Vec<usize>)> {
    let mut each = Vec::new();
    for &i in hosts {
        let netns = c.topo.host(i).netns.clone();
        let (code, body) = netns::in_netns(&netns, || {
            http_get(&"127.0.0.1:2379".parse::<SocketAddr>()?, "/metrics")
        })?;
        ensure!(code == 200, "etcd /metrics on h{i}: HTTP {code}");
        let n = metric(&body, "etcd_debugging_mvcc_watcher_total")
            .with_context(|| format!("no etcd_debugging_mvcc_watcher_total on h{i}'s member"))?;
        each.push(n as usize);
    }
    Ok((each.iter().sum(), each))
}

/// From host `from`'s namespace, TLS to h1's relay with `identity`, ask
/// for a list, and return the first frame, or the error that ended the
/// stream before one.
fn ask_relay(c: &Cluster, from: usize, me: &str, identity: MeshConfig) -> Result<Result<Frame>> {
    let relay = relay_addr(&c.topo);
    let me = Name::new(me)?;
    c.topo.host(from).within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use tokio::io::AsyncWriteExt;
            let mut reg = prometheus_client::registry::Registry::default();
            let dialer = RelayDialer::new(&identity, me, &mut reg)?;
            let r: Result<Frame> = async {
                let (mut s, _) = dialer.dial(&relay).await?;
                let hello = Frame::Hello {
                    version: wire::VERSION,
                    op: Op::List,
                };
                s.write_all(&wire::encode(&hello)).await?;
                let f = tokio::time::timeout(Duration::from_secs(5), wire::read_frame(&mut s))
                    .await
                    .context("no answer within 5 s")??;
                Ok(f)
            }
            .await;
            Ok(r)
        })
    })
}

#[test]
fn watch_relays_fan_out_refuse_strangers_and_fail_over() -> Result<()> {
    let started = Instant::now();
    let mut c = Cluster::start_with(14, 3, h1_relays)?;
    eprintln!("cluster up in {:?}", started.elapsed());

    // --- One etcd watcher for three hosts ---------------------------------
    // h2's and h3's watches are on h1's relay.
    eventually(
        Duration::from_secs(20),
        "h1's relay serves h2 and h3",
        || {
            let m = c.metrics(1)?;
            Ok((metric(&m, "pier_relay_clients") == Some(2.0)).then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    let m = c.metrics(1)?;
    ensure!(
        metric(&m, "pier_relay_live") == Some(1.0)
            && metric(&m, "pier_relay_keys").is_some_and(|k| k > 0.0)
            && metric(&m, "pier_relay_revision").is_some_and(|r| r > 0.0),
        "h1's relay metrics: {:?}",
        m.lines()
            .filter(|l| l.starts_with("pier_relay_"))
            .collect::<Vec<_>>()
    );
    // etcd: the elections' watches of every agent, and one whole-prefix
    // watch (the relay's; h1's own reflector reads the relay in process).
    // Without relays it would be 3 whole-prefix watches.
    let with_relay = 3 * ELECTION_WATCHES + 1;
    let seen = eventually(Duration::from_secs(10), "etcd's watchers", || {
        let (n, each) = etcd_watchers(&c, &[1, 2, 3])?;
        Ok((n == with_relay).then_some(each))
    })
    .with_context(|| {
        format!(
            "etcd's watchers (want {with_relay}): {:?}{}",
            etcd_watchers(&c, &[1, 2, 3]),
            c.logs()
        )
    })?;
    eprintln!(
        "etcd watchers with the relay: {with_relay} ({seen:?} per member; without relays: {})",
        3 * ELECTION_WATCHES + 3
    );

    // --- A pod on a relayed host, seen everywhere ---------------------------
    c.run_pod(2, "web-h2", "web", POD_PORT)?;
    c.run_client(3)?;
    for i in [3, 1] {
        eventually(
            Duration::from_secs(20),
            &format!("h{i} sees web on h2"),
            || {
                let eps = c.ready_endpoints(i, "web")?;
                Ok((eps.len() == 1 && eps[0].0 == "h2").then_some(()))
            },
        )
        .with_context(|| c.logs())?;
    }
    let got = c.requests(3, &fqdn("web"), 5)?;
    ensure!(
        count(&got, "web-h2") == 5,
        "h3's client through DNS and the mesh: {got:?}{}",
        c.diagnose(3, "web")
    );

    // --- Strangers get nothing ----------------------------------------------
    let h2_addr = c.topo.host(2).addr;
    // Control: h2's own mesh certificate is served a list.
    let certs2 = c.topo.host(2).dir.join("certs");
    let own = MeshConfig::from_dir("0.0.0.0:0".parse()?, &certs2);
    match ask_relay(&c, 2, "h2", own)? {
        Ok(Frame::Kvs(_)) | Ok(Frame::ListEnd { .. }) => {}
        other => bail!("h2's own certificate: expected a list, got {other:?}"),
    }
    // Plaintext: a relay Hello straight at the port.
    let relay: SocketAddr = relay_addr(&c.topo).parse()?;
    let (port, reply) = c.topo.host(2).within(move || {
        let mut s = TcpStream::connect_timeout(&relay, Duration::from_secs(3))?;
        let port = s.local_addr()?.port();
        s.set_read_timeout(Some(Duration::from_secs(8)))?;
        s.write_all(&wire::encode(&Frame::Hello {
            version: wire::VERSION,
            op: Op::List,
        }))?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok((port, buf))
    })?;
    // At most a TLS alert record (type 21), never a relay frame.
    ensure!(
        reply.is_empty() || reply[0] == 21,
        "plaintext got an answer: {reply:?}"
    );
    // Another CA's certificate for "h2", the client trusting the real CA.
    let foreign = c.foreign_identity(2, "h2")?;
    if let Ok(f) = ask_relay(&c, 2, "h2", foreign)? {
        bail!("h1's relay answered a certificate of another CA: {f:?}");
    }
    eventually(Duration::from_secs(5), "h1 logs both refusals", || {
        let log = c.topo.host(1).agent_log();
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("relay: refused") && l.contains(&format!("{h2_addr}:")))
            .collect();
        let plain = refused
            .iter()
            .any(|l| l.contains(&format!("{h2_addr}:{port}")));
        let cert = refused.iter().any(|l| l.contains("client_cert"));
        Ok((plain && cert).then_some(()))
    })
    .with_context(|| c.topo.host(1).agent_log())?;

    // --- The relay agent upgraded ------------------------------------------
    // SIGHUP to h1's keeper: a new worker takes the relay's socket over
    // through the keeper, and h2 and h3 come back to the relay (not left
    // on etcd) and see what happens next through it.
    let keeper = c.agents[0];
    let before = pier_tests::load::children(keeper);
    ensure!(before.len() == 1, "h1's keeper has workers {before:?}");
    let fell_back = |i: usize| {
        log_lines(&c, i, &["every watch relay failed"]).len()
            + log_lines(&c, i, &["no watch relay has a live view"]).len()
    };
    let fell_back_before = [fell_back(2), fell_back(3)];
    // The old worker's relay says `Closing` and the watches move to the
    // successor's at once: no break, so no stale snapshot and no barrier
    // (the reflector's log, and the relayed store's counters).
    let broke = |i: usize| log_lines(&c, i, &["store disconnected"]).len();
    let breaks = |i: usize| counter(&c, i, "pier_store_relay_watch_breaks_total");
    let moves = |i: usize| counter(&c, i, "pier_store_relay_watch_moves_total");
    let broke_before = [broke(2), broke(3)];
    let breaks_before = [breaks(2)?, breaks(3)?];
    let moves_before = [moves(2)?, moves(3)?];
    let listening = || log_lines(&c, 1, &["relay: listening"]).len();
    ensure!(
        listening() == 1,
        "h1 listened for relay clients {} times",
        listening()
    );
    run_ok(
        std::process::Command::new("kill")
            .arg("-HUP")
            .arg(keeper.to_string()),
    )?;
    let upgraded = Instant::now();
    eventually(
        Duration::from_secs(40),
        "h1's new worker alone, relaying for h2 and h3, etcd with the relay's watcher only",
        || {
            // The new worker listening (through the keeper), the old one
            // gone: then the clients are the new one's.
            let now = pier_tests::load::children(keeper);
            if listening() < 2 || now.len() != 1 || before.contains(&now[0]) {
                return Ok(None);
            }
            let clients = metric(&c.metrics(1)?, "pier_relay_clients");
            let (n, _) = etcd_watchers(&c, &[1, 2, 3])?;
            Ok((clients == Some(2.0) && n == with_relay).then_some(()))
        },
    )
    .with_context(|| c.logs())?;
    eprintln!(
        "relay upgraded, clients on the new worker {:?} after the SIGHUP",
        upgraded.elapsed()
    );
    ensure!(
        [fell_back(2), fell_back(3)] == fell_back_before,
        "the upgrade sent h2 or h3 to etcd: {:?} -> {:?}{}",
        fell_back_before,
        [fell_back(2), fell_back(3)],
        c.logs()
    );
    ensure!(
        [broke(2), broke(3)] == broke_before,
        "the upgrade broke h2's or h3's watch: {:?} -> {:?}{}",
        broke_before,
        [broke(2), broke(3)],
        c.logs()
    );
    let (breaks_after, moves_after) = ([breaks(2)?, breaks(3)?], [moves(2)?, moves(3)?]);
    ensure!(
        breaks_after == breaks_before
            && moves_after[0] > moves_before[0]
            && moves_after[1] > moves_before[1],
        "h2's and h3's watches at the upgrade: breaks {breaks_before:?} -> {breaks_after:?}, \
         moves {moves_before:?} -> {moves_after:?} (want no break, a move each){}",
        c.logs()
    );
    c.run_pod(2, "echo-h2", "echo", POD_PORT)?;
    eventually(Duration::from_secs(20), "h3 sees echo on h2", || {
        let eps = c.ready_endpoints(3, "echo")?;
        Ok((eps.len() == 1 && eps[0].0 == "h2").then_some(()))
    })
    .with_context(|| c.logs())?;

    // --- The relay dies -------------------------------------------------------
    let keeper = c.agents[0];
    let workers = pier_tests::load::children(keeper);
    ensure!(workers.len() == 1, "h1's keeper has workers {workers:?}");
    // The keeper first: killed after its worker, it could start a new
    // worker in between (it restarts a crashed one at once), and that
    // worker would serve the relay on as an orphan (CI run of stop 27).
    c.kill_agent(1)?; // notes the worker as an orphan, for the clean-up
    run_ok(
        std::process::Command::new("kill")
            .arg("-KILL")
            .arg(workers[0].to_string()),
    )?;
    ensure!(
        log_lines(&c, 1, &["restarting"]).is_empty(),
        "h1's keeper restarted its worker:\n{}",
        c.topo.host(1).agent_log()
    );
    let killed = Instant::now();
    // Served from the last snapshot meanwhile.
    let got = c.requests(3, &fqdn("web"), 3)?;
    ensure!(
        count(&got, "web-h2") == 3,
        "h3's client right after the relay died: {got:?}"
    );
    // h2 and h3 watch etcd themselves: their elections' watches and one
    // whole-prefix watch each (h1's are gone with its connections).
    let fallback = 2 * ELECTION_WATCHES + 2;
    eventually(
        Duration::from_secs(20),
        "h2 and h3 watch etcd directly",
        || {
            let (n, _) = etcd_watchers(&c, &[1, 2, 3])?;
            let fresh = [2, 3]
                .iter()
                .all(|&i| store_stale_since(&c.topo.host(i).netns).is_ok_and(|s| s.is_none()));
            Ok((n == fallback && fresh).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "etcd's watchers (want {fallback}): {:?}{}",
            etcd_watchers(&c, &[1, 2, 3]),
            c.logs()
        )
    })?;
    eprintln!("h2 and h3 on etcd {:?} after the kill", killed.elapsed());
    for i in [2, 3] {
        let on_etcd = counter(&c, i, "pier_store_relay_watches_on_etcd")?;
        ensure!(
            on_etcd == 1.0,
            "h{i}: pier_store_relay_watches_on_etcd {on_etcd}, want 1"
        );
    }
    for i in [2, 3] {
        let log = c.topo.host(i).agent_log();
        ensure!(
            log.lines()
                .any(|l| l.contains("every watch relay failed") && l.contains(&relay_addr(&c.topo))),
            "h{i} does not say it left the relay for etcd:\n{log}"
        );
    }
    // And they converge on what happens next.
    c.run_pod(3, "api-h3", "api", POD_PORT)?;
    eventually(Duration::from_secs(20), "h2 sees api on h3", || {
        let eps = c.ready_endpoints(2, "api")?;
        Ok((eps.len() == 1 && eps[0].0 == "h3").then_some(()))
    })
    .with_context(|| c.logs())?;
    eprintln!("relay test: {:?} in all", started.elapsed());
    Ok(())
}
