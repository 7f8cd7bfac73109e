//! Hitless restarts (issue 18), with real clients: bounded loops of new
//! connections through a node port and a VIP, and `dig` at the DNS VIP,
//! run while the agent is upgraded (SIGHUP to the keeper: a new worker
//! takes the sockets, then the old one drains) and while its worker is
//! killed with SIGKILL (the keeper holds the sockets and starts another).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::load::{LoadReport, children, dns_loop, http_loop};
use pier_tests::{AgentProc, Scenario, eventually};

/// Per loop: 150 requests 20 ms apart, about 4 s; the event comes at 1 s.
pub(crate) const N: u32 = 150;
pub(crate) const GAP: Duration = Duration::from_millis(20);

pub(crate) struct Target {
    pub(crate) node_port: SocketAddr,
    pub(crate) vip: SocketAddr,
    pub(crate) dns: IpAddr,
    pub(crate) vip_ip: String,
}

/// Runs the three loops while `event` happens 1 s in.
pub(crate) fn under_load(
    t: &Target,
    event: impl FnOnce() -> Result<()>,
) -> Result<[LoadReport; 3]> {
    std::thread::scope(|s| {
        let np = s.spawn(|| http_loop(t.node_port, N, GAP));
        let vip = s.spawn(|| http_loop(t.vip, N, GAP));
        let dns = s.spawn(|| dns_loop(t.dns, "web.default.svc.pier.internal", &t.vip_ip, N, GAP));
        std::thread::sleep(Duration::from_secs(1));
        let r = event();
        let reps = [np, vip, dns].map(|h| h.join().expect("load thread"));
        r.map(|()| reps)
    })
}

pub(crate) fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(st.success(), "kill -{sig} {pid}: {st}");
    Ok(())
}

pub(crate) fn keeper_pid(a: &AgentProc) -> Result<u32> {
    Ok(a.child.as_ref().context("agent not running")?.id())
}

pub(crate) fn one_worker(a: &AgentProc) -> Result<u32> {
    let k = keeper_pid(a)?;
    eventually(Duration::from_secs(10), "exactly one worker", || {
        let c = children(k);
        Ok((c.len() == 1).then(|| c[0]))
    })
}

pub(crate) fn show(what: &str, reps: &[LoadReport; 3]) -> String {
    let mut s = String::new();
    for (name, r) in ["node port", "VIP", "DNS"].iter().zip(reps) {
        s.push_str(&format!(
            "{what} {name}: sent {} ok {} new failed {} cut {} longest {} ms {:?}\n",
            r.sent,
            r.ok,
            r.new_failed,
            r.cut,
            r.longest.as_millis(),
            r.errors
        ));
    }
    s
}

/// `web`, 2 replicas behind a node port, and the loops' targets, once
/// the node port answers.
pub(crate) fn web_target(a: &AgentProc) -> Result<Target> {
    let web = a.run_and_expose(
        "web",
        &["--replicas", "2", "--wait"],
        &["--type", "NodePort"],
    )?;
    let np = web.node_port.context("no node port")?;
    let vip_ip = web.vip.to_string();
    let net = a.service_cidr.strip_suffix(".0/24").context("a /24")?;
    let t = Target {
        node_port: SocketAddr::from(([127, 0, 0, 1], np)),
        vip: SocketAddr::new(vip_ip.parse()?, 8080),
        dns: format!("{net}.10").parse()?,
        vip_ip,
    };
    eventually(Duration::from_secs(20), "the node port to answer", || {
        Ok((http_loop(t.node_port, 1, Duration::ZERO).ok == 1).then_some(()))
    })
    .with_context(|| a.log_tail())?;

    Ok(t)
}

#[test]
fn upgrade_and_worker_crash_under_load() -> Result<()> {
    // No name leaves the host.
    let a = Scenario::embedded(
        "restart-1",
        "\n[dns]\nupstreams = [\"127.0.0.1:9\"]\nupstream_timeout_ms = 200\n",
    )?;
    let t = web_target(&a)?;
    let np = t.node_port.port();

    // 1. Upgrade: SIGHUP to the keeper. Not one request may fail, and the
    //    new worker is ready before the old one exits.
    let old = one_worker(&a)?;
    let keeper = keeper_pid(&a)?;
    let t0 = Instant::now();
    let reps = under_load(&t, || signal(keeper, "HUP"))?;
    let msg = show("upgrade", &reps);
    eprint!("{msg}");
    for r in &reps {
        ensure!(r.failed() == 0, "{msg}{}", a.log_tail());
    }
    let new = one_worker(&a)?;
    ensure!(new != old, "no new worker after SIGHUP:\n{}", a.log_tail());
    let log = std::fs::read_to_string(&a.log)?;
    let ready = log
        .find(&format!("worker ready (worker={new})"))
        .context("no ready line for the new worker")?;
    let gone = log
        .find(&format!("worker exited worker={old}"))
        .context("the old worker's exit is not logged")?;
    ensure!(
        ready < gone,
        "the old worker exited before the new one was ready"
    );
    eprintln!("upgrade done within {} ms", t0.elapsed().as_millis());

    // 2. Crash: SIGKILL to the worker. New connections and queries wait
    //    in the kernel's queues; only one in flight through the dead
    //    process may be cut (each loop has one at a time).
    let reps = under_load(&t, || signal(new, "KILL"))?;
    let msg = show("crash", &reps);
    eprint!("{msg}");
    for r in &reps {
        ensure!(r.new_failed == 0 && r.cut <= 1, "{msg}{}", a.log_tail());
    }
    let third = one_worker(&a)?;
    ensure!(third != new, "no new worker after the crash");

    // 3. A deleted service's node port is free again: the keeper's copy
    //    is closed, not kept.
    a.cli_ok(&["delete", "svc", "web"])?;
    eventually(Duration::from_secs(10), "the node port to be free", || {
        Ok(std::net::TcpListener::bind(("0.0.0.0", np))
            .ok()
            .map(|_| ()))
    })
    .with_context(|| a.log_tail())?;
    Ok(())
}
