//! `pier doctor` against real failures: a dockerd that is not running
//! (DOCKER_HOST at a socket nobody listens on), and port 53 taken (in a
//! network namespace this test makes, where it binds 0.0.0.0:53 itself).
//! Each must print the named failure and its fix, and exit non-zero. And
//! for contrast, what passes: the same namespace without the holder, and
//! the dockerd that tests/run.sh runs.
//!
//! And `store.relays`: a relay that serves and an address that does not.
//!
//! Needs root (a network namespace, port 53) and, for the last test, a
//! running dockerd: tests/run.sh provides both.

use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Output};

const PIER: &str = env!("CARGO_BIN_EXE_pier");

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}stderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The line that starts with `prefix`, and the line after it.
fn line_and_next(o: &Output, prefix: &str) -> (String, String) {
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", text(o)));
    (
        lines[i].to_owned(),
        lines.get(i + 1).copied().unwrap_or("").to_owned(),
    )
}

/// `pier doctor` with a temp data dir, so that the store check never
/// depends on /var/lib.
fn doctor(dir: &std::path::Path, extra: &[&str], docker_host: Option<&str>) -> Output {
    let mut c = Command::new(PIER);
    c.arg("doctor").arg("--data-dir").arg(dir).args(extra);
    if let Some(h) = docker_host {
        c.env("DOCKER_HOST", h);
    }
    c.output().expect("running pier doctor")
}

#[test]
fn a_stopped_dockerd_is_named_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file that nothing listens on any more: what a dockerd that
    // died leaves behind.
    let sock = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let host = format!("unix://{}", sock.display());
    let o = doctor(dir.path(), &[], Some(&host));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (line, fix) = line_and_next(&o, "FAIL  dockerd:");
    assert_eq!(
        line,
        format!(
            "FAIL  dockerd: cannot reach dockerd at {host}: nothing listens on {} (connection refused: dockerd is not running)",
            sock.display()
        ),
        "{}",
        text(&o)
    );
    assert!(
        fix.starts_with("      fix: ")
            && fix.contains("start dockerd")
            && fix.contains("DOCKER_HOST"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("checks failed"),
        "{}",
        text(&o)
    );

    // No socket at all: the same check, saying so.
    let gone = dir.path().join("gone.sock");
    let o = doctor(dir.path(), &[], Some(&format!("unix://{}", gone.display())));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (line, _) = line_and_next(&o, "FAIL  dockerd:");
    assert!(
        line.ends_with(&format!(
            "no socket at {} (dockerd is not running)",
            gone.display()
        )),
        "{}",
        text(&o)
    );
}

/// Runs `f` on a thread of its own in a new network namespace (loopback
/// down, no routes): sockets it makes and processes it starts live there,
/// and the namespace goes when the thread and those are gone.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): this test needs root");
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn a_taken_port_53_is_named_with_its_holder_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let (free, taken) = in_new_netns(move || {
        // Port 53 free first: the check passes.
        let free = doctor(&data, &[], None);
        // Then held on every address, UDP and TCP, by this process.
        let udp = UdpSocket::bind("0.0.0.0:53").expect("bind udp 0.0.0.0:53 in the new netns");
        let tcp = TcpListener::bind("0.0.0.0:53").expect("bind tcp 0.0.0.0:53 in the new netns");
        let taken = doctor(&data, &[], None);
        drop((udp, tcp));
        (free, taken)
    });
    let (line, _) = line_and_next(&free, "ok    port 53 (DNS VIP):");
    assert_eq!(
        line,
        "ok    port 53 (DNS VIP): free (udp 10.213.0.10:53, tcp 10.213.0.10:53)",
        "{}",
        text(&free)
    );

    assert_eq!(taken.status.code(), Some(1), "{}", text(&taken));
    let (line, fix) = line_and_next(&taken, "FAIL  port 53 (DNS VIP):");
    let me = format!("(pid {})", std::process::id());
    assert!(
        line.contains("udp 10.213.0.10:53 is taken: udp 0.0.0.0:53 is held by")
            && line.contains("tcp 10.213.0.10:53 is taken: tcp 0.0.0.0:53 is held by")
            && line.contains(&me),
        "{}",
        text(&taken)
    );
    assert!(
        fix.starts_with("      fix: stop ")
            && fix.contains(&me)
            && fix.contains("network.serve_dns_vip = false")
            && fix.contains("dns_listen"),
        "{}",
        text(&taken)
    );
    // The API port is another line, and free.
    let (line, _) = line_and_next(&taken, "ok    port 7370 (API):");
    assert!(line.contains("tcp 127.0.0.1:7370"), "{}", text(&taken));
}

#[test]
fn a_running_dockerd_passes_with_its_api_version() {
    let dir = tempfile::tempdir().unwrap();
    let o = doctor(dir.path(), &[], None);
    let (line, _) = line_and_next(&o, "ok    dockerd:");
    let api = line
        .split("API ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no API version in {line:?}"));
    let (major, minor) = api.split_once('.').expect("MAJOR.MINOR");
    assert_eq!(major, "1", "{line}");
    assert!(minor.parse::<u32>().unwrap() >= 41, "{line}");
    // What the other checks say on this host is printed, one line each.
    for name in [
        "ip:",
        "iptables:",
        "splice:",
        "network namespaces:",
        "port 53 (DNS VIP):",
        "port 7370 (API):",
        "service CIDR:",
        "store:",
    ] {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.lines().any(|l| l.starts_with(&format!("ok    {name}"))
                || l.starts_with(&format!("FAIL  {name}"))),
            "no {name} line:\n{}",
            text(&o)
        );
    }
}

#[test]
fn a_bad_config_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pier.toml");
    std::fs::write(&cfg, "[network]\nservice_cidr = \"10.213.0.0/30\"\n").unwrap();
    let o = doctor(dir.path(), &["--config", cfg.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let (line, fix) = line_and_next(&o, "FAIL  config:");
    assert!(line.contains("network.service_cidr"), "{}", text(&o));
    assert!(fix.contains("fix:"), "{}", text(&o));
}

#[test]
fn version_names_the_git_revision() {
    let o = Command::new(PIER).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    // Built from this checkout (tests/run.sh, CI): a 12-digit revision.
    let rev = v
        .strip_prefix(concat!("pier ", env!("CARGO_PKG_VERSION"), " (git "))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("pier --version: {v:?}"));
    assert!(
        rev.len() == 12 && rev.chars().all(|c| c.is_ascii_hexdigit()),
        "{v:?}"
    );
}

#[test]
fn completions_come_from_the_clap_definitions() {
    for (shell, marker) in [
        ("bash", "_pier()"),
        ("zsh", "#compdef pier"),
        ("fish", "complete -c pier"),
    ] {
        let o = Command::new(PIER)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.contains(marker), "{shell}: no {marker:?}");
        // Subcommands and flags of the real CLI, not a hand-made list.
        for word in ["doctor", "agent", "service-cidr", "scale"] {
            assert!(s.contains(word), "{shell} completions lack {word}");
        }
    }
    let o = Command::new(PIER)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn the_store_check_reaches_etcd_or_names_it() {
    let dir = tempfile::tempdir().unwrap();
    // A real etcd (started for this test, killed by PID when dropped).
    let etcd =
        pier_store::testing::EtcdServer::start().expect("start etcd (apt-get install etcd-server)");
    let url = format!("etcd://{}", etcd.endpoint);
    let o = doctor(dir.path(), &["--store", &url], None);
    let (line, _) = line_and_next(&o, "ok    store:");
    assert_eq!(
        line,
        format!("ok    store: etcd at {} answers", etcd.endpoint),
        "{}",
        text(&o)
    );
    // The same endpoint once etcd is gone: the failure, and what to do.
    let endpoint = etcd.endpoint.clone();
    drop(etcd);
    let o = doctor(dir.path(), &["--store", &url], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (line, fix) = line_and_next(&o, "FAIL  store:");
    assert!(
        line.starts_with(&format!("FAIL  store: etcd at {endpoint}")),
        "{}",
        text(&o)
    );
    assert!(
        fix.contains("start etcd") && fix.contains("store.url"),
        "{}",
        text(&o)
    );
}

/// `store.relays`: a relay that serves (a real `Relay` on a real etcd,
/// behind the agent's TLS listener, started here) is named with its node;
/// an address nobody listens on fails with the fix. Both asked with the
/// node certificate of the config's `[mesh]`, as the agent asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_check_asks_each_relay_for_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let etcd =
        pier_store::testing::EtcdServer::start().expect("start etcd (apt-get install etcd-server)");
    let ca = dir.path().join("ca");
    pier_ca::ca_init(&ca).unwrap();
    for n in ["r1", "h2"] {
        pier_ca::ca_issue(
            &pier_model::Name::new(n).unwrap(),
            &ca,
            &dir.path().join(n),
            1,
        )
        .unwrap();
    }
    // The relay: as `[relay]` runs it, on loopback.
    let upstream: std::sync::Arc<dyn pier_store::Store> = std::sync::Arc::new(
        pier_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = pier_store::relay::Relay::start(upstream, Default::default(), cancel.clone());
    let mesh = pier_proxy::tls::MeshConfig::from_dir(
        "127.0.0.1:0".parse().unwrap(),
        &dir.path().join("r1"),
    );
    let acceptor = pier_proxy::relay_tls::RelayAcceptor::new(
        &mesh,
        pier_model::Name::new("r1").unwrap(),
        &mut prometheus_client::registry::Registry::default(),
    )
    .unwrap();
    // Synced first: an unsynced relay answers an error (checked apart).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !relay.stats().synced {
        assert!(std::time::Instant::now() < deadline, "relay not synced");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = listener.local_addr().unwrap();
    tokio::spawn(acceptor.run(listener, cancel.clone(), move |s, peer| {
        relay.clone().serve(s, peer)
    }));
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h2 = dir.path().join("h2");
    let cfg = dir.path().join("pier.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"h2\"\n[store]\nurl = \"etcd://{}\"\nrelays = [\"{serving}\", \"{dead}\"]\n[network]\ndata_dir = \"{}\"\n[mesh]\nlisten = \"127.0.0.1:0\"\nca = \"{h}/ca.pem\"\ncert = \"{h}/node.pem\"\nkey = \"{h}/node-key.pem\"\n",
            etcd.endpoint,
            dir.path().join("data").display(),
            h = h2.display(),
        ),
    )
    .unwrap();
    let o = tokio::task::spawn_blocking(move || {
        Command::new(PIER)
            .arg("doctor")
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (line, _) = line_and_next(&o, &format!("ok    watch relay {serving}:"));
    assert_eq!(
        line,
        format!("ok    watch relay {serving}: node r1 serves the store"),
        "{}",
        text(&o)
    );
    let (line, fix) = line_and_next(&o, &format!("FAIL  watch relay {dead}:"));
    assert!(line.contains("Connection refused"), "{}", text(&o));
    assert!(
        fix.contains("[relay] listen") && fix.contains(&format!("open TCP {}", dead.port())),
        "{}",
        text(&o)
    );
    cancel.cancel();
}
