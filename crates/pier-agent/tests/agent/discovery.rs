//! Discovery, registration and health against the real dockerd and a real
//! embedded store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_model::{Name, Namespace, Service, keys};
use pier_store::writes::create_service;

use crate::harness::*;

fn web_endpoint(s: &pier_model::Snapshot, svc: &str, id: &str) -> Option<pier_model::Endpoint> {
    endpoints(s, svc).get(&short(id)).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_container_is_ready_within_1s_of_its_check_and_kill_removes_it_within_1s()
-> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));

    let id = d.run_container(&[("pier.service", "web"), ("pier.port", "8080")], &[])?;
    let ip = d.ip(&id)?;
    let passed = tcp_until_open(ip, 8080, Duration::from_secs(10)).await?;
    let ep = wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "a ready endpoint",
        |s| web_endpoint(s, "web", &id).filter(|e| e.ready),
    )
    .await?;
    let lag = passed.elapsed();
    ensure!(
        lag <= Duration::from_secs(1),
        "ready {lag:?} after the check passed"
    );
    ensure!(ep.ip == ip, "endpoint ip {} != container ip {ip}", ep.ip);
    ensure!(ep.node.as_str() == "n1");
    ensure!(ep.ports.len() == 1 && ep.ports[0].port.get() == 8080);
    ensure!(ep.ports[0].name.as_str() == "p8080", "{:?}", ep.ports);
    ensure!(!ep.is_static);

    // The missing service was created once, with a VIP and the same port.
    let svc = wait_snap(
        &mut snap,
        Duration::from_secs(5),
        "the auto-created service",
        |s| {
            s.service(&Namespace::default(), &Name::new("web").ok()?)
                .cloned()
        },
    )
    .await?;
    let vip = svc.vip.context("auto-created service has no VIP")?;
    ensure!(
        alloc().service_cidr.contains(vip),
        "VIP {vip} outside the service CIDR"
    );
    ensure!(svc.ports.len() == 1);
    ensure!(svc.ports[0].port.get() == 8080 && svc.ports[0].target_port.get() == 8080);
    ensure!(svc.ports[0].name.as_str() == "p8080");

    // The node record is there, and Docker's subnets were published.
    ensure!(
        snap.borrow().nodes.contains_key("n1"),
        "node not registered"
    );
    let subnet = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        &d.net,
    ])?;
    let nets = agent.networks.borrow().clone();
    ensure!(
        nets.iter().any(|c| c.to_string() == subnet),
        "published networks {nets:?} miss {subnet}"
    );

    d.ok(&["kill", &id])?;
    let killed = Instant::now();
    wait_snap(
        &mut snap,
        Duration::from_secs(5),
        "the endpoint to go",
        |s| web_endpoint(s, "web", &id).is_none().then_some(()),
    )
    .await?;
    let gone = killed.elapsed();
    ensure!(
        gone <= Duration::from_secs(1),
        "endpoint removed {gone:?} after docker kill"
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_removed_when_container_killed_while_agent_down_and_added_when_started()
-> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    // 60 s: the old lease must not expire during the test, so only the
    // restarted agent can remove the stale endpoint.
    let env = StoreEnv::embedded(60).await?;
    let mut snap = env.snapshot();
    let a1 = InProcAgent::start(&env, "n1", agent_config(&d));
    let labels = [("pier.service", "web"), ("pier.port", "8080")];
    let stays = d.run_container(&labels, &[])?;
    let dies = d.run_container(&labels, &[])?;
    wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "both endpoints ready",
        |s| {
            let e = endpoints(s, "web");
            (e.get(&short(&stays)).is_some_and(|e| e.ready)
                && e.get(&short(&dies)).is_some_and(|e| e.ready))
            .then_some(())
        },
    )
    .await?;

    // Crash: no deregistration, and the old lease lives on.
    a1.abort().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.ok(&["rm", "-f", &dies])?;
    let born = d.run_container(&labels, &[])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        web_endpoint(&snap.borrow(), "web", &dies).is_some(),
        "the stale endpoint vanished without an agent; the test proves nothing"
    );

    // Restart with a new lease, as a restarted process gets.
    let keeper2_cancel = tokio_util::sync::CancellationToken::new();
    let keeper2 = pier_store::lease::LeaseKeeper::start(
        env.store.clone(),
        pier_store::Ttl::from_secs(60)?,
        keeper2_cancel.clone(),
    )
    .await?;
    let a2 = InProcAgent::start_with(&env, "n1", agent_config(&d), keeper2.subscribe());
    wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "registry to match docker",
        |s| {
            let e = endpoints(s, "web");
            (!e.contains_key(&short(&dies))
                && e.get(&short(&born)).is_some_and(|e| e.ready)
                && e.get(&short(&stays)).is_some_and(|e| e.ready))
            .then_some(())
        },
    )
    .await?;
    // The survivor's endpoint moved to the new lease.
    let lease2 = (*keeper2.subscribe().borrow()).context("no lease")?;
    let key = keys::endpoint(
        &Namespace::default(),
        &Name::new("web")?,
        &Name::new("n1")?,
        &Name::new(&short(&stays))?,
    );
    let kv = env
        .store
        .get(&key)
        .await?
        .context("survivor endpoint missing")?;
    ensure!(
        kv.lease == Some(lease2),
        "endpoint lease {:?} != new lease {lease2:?}",
        kv.lease
    );
    a2.stop().await?;
    keeper2_cancel.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_http_check_flips_ready_and_back() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let id = d.run_container(
        &[
            ("pier.service", "web"),
            ("pier.port", "8080"),
            ("pier.health", "http:/healthz"),
            ("pier.health.interval-ms", "100"),
        ],
        &[],
    )?;
    // /healthz is a 404 at first: registered, not ready.
    wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "an unready endpoint",
        |s| web_endpoint(s, "web", &id).filter(|e| !e.ready),
    )
    .await?;
    tcp_until_open(d.ip(&id)?, 8080, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        web_endpoint(&snap.borrow(), "web", &id).is_some_and(|e| !e.ready),
        "ready although /healthz is a 404"
    );
    for round in 0..2 {
        d.ok(&["exec", &id, "sh", "-c", "echo ok > /www/healthz"])?;
        wait_snap(
            &mut snap,
            Duration::from_secs(3),
            "ready after /healthz appears",
            |s| web_endpoint(s, "web", &id).filter(|e| e.ready),
        )
        .await
        .with_context(|| format!("round {round}"))?;
        d.ok(&["exec", &id, "rm", "/www/healthz"])?;
        wait_snap(
            &mut snap,
            Duration::from_secs(3),
            "unready after /healthz goes",
            |s| web_endpoint(s, "web", &id).filter(|e| !e.ready),
        )
        .await
        .with_context(|| format!("round {round}"))?;
    }
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_labels_warn_with_container_and_label_and_skip_only_that_container() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let bad: [Case<'_>; 4] = [
        (
            "badport",
            &[("pier.service", "web"), ("pier.port", "http")],
            "pier.port",
        ),
        (
            "badhealth",
            &[
                ("pier.service", "web"),
                ("pier.port", "8080"),
                ("pier.health", "grpc"),
            ],
            "pier.health",
        ),
        (
            "badname",
            &[("pier.service", "Web_1"), ("pier.port", "8080")],
            "pier.service",
        ),
        (
            "badports",
            &[("pier.service", "web"), ("pier.ports", "http:99999")],
            "pier.ports",
        ),
    ];
    let mut names = Vec::new();
    for (what, labels, label) in bad {
        let name = format!("{what}-{}", d.run);
        d.run_container(labels, &["--name", &name])?;
        names.push((name, label));
    }
    let good = d.run_container(&[("pier.service", "web"), ("pier.port", "8080")], &[])?;
    wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "the good endpoint",
        |s| web_endpoint(s, "web", &good).filter(|e| e.ready),
    )
    .await?;
    // Give the agent a resync round over the bad ones too.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = snap.borrow().clone();
    let total: usize = s.endpoints.values().map(|m| m.len()).sum();
    ensure!(
        total == 1,
        "only the good container is an endpoint, got {total}"
    );
    let logs = log_text();
    for (name, label) in &names {
        let line = logs
            .lines()
            .find(|l| l.contains(name.as_str()) && l.contains("bad label"))
            .with_context(|| format!("no warning about {name}"))?;
        ensure!(
            line.contains(label),
            "warning about {name} does not name {label}: {line}"
        );
        ensure!(line.contains("WARN"), "not a warning: {line}");
        // Once per container, not once per resync.
        let n = logs
            .lines()
            .filter(|l| l.contains(name.as_str()) && l.contains("bad label"))
            .count();
        ensure!(n == 1, "{n} warnings for {name}");
    }
    ensure!(agent.is_running(), "the agent stopped");
    agent.stop().await?;
    Ok(())
}

/// A selector service takes a labelled container (one pier did not start)
/// only when it opts in with `accept_labelled`; until then the container is
/// refused, and the refusal is on the node's record with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_service_takes_a_labelled_container_only_when_it_opts_in() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let app = format!("app-{}", d.run);
    let id = d.run_container(&[("app", &app), ("pier.port", "8080")], &[])?;
    tcp_until_open(d.ip(&id)?, 8080, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total: usize = snap.borrow().endpoints.values().map(|m| m.len()).sum();
    ensure!(total == 0, "a container with no service became an endpoint");

    let svc = |name: &str, accept: bool| -> Result<Service> {
        Ok(serde_json::from_value(serde_json::json!({
            "name": name,
            "ports": [{"name": "http", "port": 80, "target_port": 8080}],
            "selector": {"app": app},
            "accept_labelled": accept,
        }))?)
    };
    // The attack: a container that merely carries a selector's labels.
    create_service(&*env.store, &alloc(), svc("closed", false)?, true).await?;
    let refusal = wait_snap(
        &mut snap,
        Duration::from_secs(5),
        "the refusal on the node record",
        |s| {
            s.nodes
                .get("n1")?
                .refused
                .iter()
                .find(|r| r.id == short(&id))
                .cloned()
        },
    )
    .await?;
    ensure!(
        refusal.service.as_ref().map(|s| s.as_str()) == Some("closed")
            && refusal.reason.contains("accept_labelled"),
        "{refusal:?}"
    );
    ensure!(
        web_endpoint(&snap.borrow(), "closed", &id).is_none(),
        "a refused container became an endpoint"
    );

    // A service that opts in takes it.
    create_service(&*env.store, &alloc(), svc("open", true)?, true).await?;
    let ep = wait_snap(
        &mut snap,
        Duration::from_secs(5),
        "the selected endpoint",
        |s| web_endpoint(s, "open", &id).filter(|e| e.ready),
    )
    .await?;
    ensure!(
        ep.ports[0].name.as_str() == "http",
        "port named after the service port: {:?}",
        ep.ports
    );
    ensure!(
        web_endpoint(&snap.borrow(), "closed", &id).is_none(),
        "the closed service took it after all"
    );
    agent.stop().await?;
    Ok(())
}

/// The label policy (issue 12, M3): another namespace, a container that
/// names a pod-backed service, a `pier.health=none` container, and a
/// container that copies a pier pod's labels are all refused, none becomes
/// an endpoint or creates a service, and each refusal is on the node
/// record; with the policy opened, the same containers join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_policy_refuses_what_a_container_may_not_claim() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    // A pod-backed service, as `pier expose rs api` makes it.
    let api: Service = serde_json::from_value(serde_json::json!({
        "name": "api",
        "ports": [{"name": "http", "port": 80, "target_port": 8080}],
        "selector": {"pier.replicaset": "api"},
    }))?;
    create_service(&*env.store, &alloc(), api, true).await?;

    let other_ns = d.run_container(
        &[
            ("pier.service", "db"),
            ("pier.namespace", "prod"),
            ("pier.port", "8080"),
        ],
        &[],
    )?;
    let names_api = d.run_container(&[("pier.service", "api"), ("pier.port", "8080")], &[])?;
    let unchecked = d.run_container(
        &[
            ("pier.service", "fast"),
            ("pier.port", "8080"),
            ("pier.health", "none"),
        ],
        &[],
    )?;
    let forged = d.run_container(
        &[
            ("pier.replicaset", "api"),
            ("pier.pod", "api-zz9"),
            ("pier.node", "n1"),
            ("pier.port", "8080"),
        ],
        &[],
    )?;
    let expect = [
        (&other_ns, "namespace prod"),
        (&names_api, "takes only pier's own pods"),
        (&unchecked, "pier.health=none"),
        (&forged, "takes only pier's own pods"),
    ];
    let refused = wait_snap(&mut snap, Duration::from_secs(10), "four refusals", |s| {
        let r = &s.nodes.get("n1")?.refused;
        expect
            .iter()
            .all(|(id, why)| {
                r.iter()
                    .any(|x| x.id == short(id) && x.reason.contains(why))
            })
            .then(|| r.clone())
    })
    .await?;
    let s = snap.borrow().clone();
    let eps: usize = s.endpoints.values().map(|m| m.len()).sum();
    ensure!(
        eps == 0,
        "a refused container became an endpoint: {:?}",
        s.endpoints
    );
    for (ns, name) in [("prod", "db"), ("default", "fast")] {
        ensure!(
            s.service(&Namespace::new(ns)?, &Name::new(name)?).is_none(),
            "a refused container created {ns}/{name}"
        );
    }
    ensure!(refused.len() == 4, "{refused:?}");
    // The forged pod container was neither adopted nor removed.
    ensure!(
        d.ok(&["inspect", "-f", "{{.State.Running}}", &forged])? == "true",
        "the agent removed a container it does not own"
    );
    agent.stop().await?;

    // The same containers with the policy opened: prod and unchecked join.
    let cfg = pier_agent::AgentConfig {
        label_namespaces: vec!["*".into()],
        allow_health_none: true,
        ..agent_config(&d)
    };
    let agent = InProcAgent::start(&env, "n1", cfg);
    wait_snap(
        &mut snap,
        Duration::from_secs(10),
        "prod/db and fast",
        |s| {
            let db = s
                .endpoints_of(&Namespace::new("prod").ok()?, &Name::new("db").ok()?)
                .any(|e| e.ready);
            (db && web_endpoint(s, "fast", &unchecked).is_some_and(|e| e.ready)).then_some(())
        },
    )
    .await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_endpoints_are_checked_and_registered_by_the_node() -> Result<()> {
    init_tracing();
    let env = StoreEnv::embedded(5).await?;
    let d = TestDocker::new()?;
    let mut snap = env.snapshot();
    // The fixtures listen on loopback, which only an allowlist lets through.
    allow_static(&["127.0.0.0/8"]);
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let open_port = open.local_addr()?.port();
    // Bound but never listening: a connect is refused, and the port stays
    // ours, so no listener started meanwhile (another test's etcd picks its
    // ports the same way) can take it and make the endpoint ready.
    let closed = tokio::net::TcpSocket::new_v4()?;
    closed.bind("127.0.0.1:0".parse()?)?;
    let closed_port = closed.local_addr()?.port();
    let accept = tokio::spawn(async move {
        loop {
            if open.accept().await.is_err() {
                break;
            }
        }
    });
    let svc: Service = serde_json::from_value(serde_json::json!({
        "name": "ext",
        "ports": [{"name": "db", "port": 5432, "target_port": 5432}],
        "static_endpoints": [
            {"ip": "127.0.0.1", "port": open_port},
            {"ip": "127.0.0.1", "port": closed_port},
        ],
    }))?;
    create_service(&*env.store, &alloc(), svc, true).await?;
    let (up, down) = wait_snap(&mut snap, Duration::from_secs(5), "static endpoints", |s| {
        let e = endpoints(s, "ext");
        let up = e.get("static-0")?.clone();
        let down = e.get("static-1")?.clone();
        up.ready.then_some((up, down))
    })
    .await?;
    ensure!(up.is_static && down.is_static);
    ensure!(!down.ready, "a closed port is ready");
    ensure!(up.ports[0].name.as_str() == "db" && up.ports[0].port.get() == open_port);
    accept.abort();
    agent.stop().await?;
    drop(closed);
    Ok(())
}

/// The attack of issue 12 (A2) past the API: a service whose static
/// endpoints name this host's loopback, link-local metadata address and a
/// VIP, written straight into the store. The agent neither health-checks
/// nor registers them (so no proxy connects there); a static endpoint at an
/// ordinary address beside them is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_endpoints_that_reach_the_host_are_ignored() -> Result<()> {
    init_tracing();
    let env = StoreEnv::embedded(5).await?;
    let d = TestDocker::new()?;
    let mut snap = env.snapshot();
    allow_static(&[]);
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let host_svc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = host_svc.local_addr()?.port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    let accept = tokio::spawn(async move {
        while host_svc.accept().await.is_ok() {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let vip = alloc().service_cidr.nth(200).context("a VIP")?;
    let attack: Service = serde_json::from_value(serde_json::json!({
        "name": "sneaky",
        "ports": [{"name": "p", "port": 80, "target_port": port}],
        "static_endpoints": [
            {"ip": "127.0.0.1", "port": port},
            {"ip": "::ffff:127.0.0.1", "port": port},
            {"ip": "169.254.169.254", "port": 80},
            {"ip": vip.to_string(), "port": 80},
        ],
    }))?;
    create_service(&*env.store, &alloc(), attack, true).await?;
    // The control: an ordinary address, unchecked (`none`), so that no
    // packet is sent to it.
    let plain: Service = serde_json::from_value(serde_json::json!({
        "name": "plain",
        "ports": [{"name": "p", "port": 80, "target_port": 80}],
        "static_endpoints": [{"ip": "10.214.99.7", "port": 80}],
        "health": {"kind": "none"},
    }))?;
    create_service(&*env.store, &alloc(), plain, true).await?;
    wait_snap(
        &mut snap,
        Duration::from_secs(5),
        "the plain static endpoint",
        |s| endpoints(s, "plain").get("static-0").map(|_| ()),
    )
    .await?;
    // Give health checks, had any started, time to connect.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = snap.borrow().clone();
    ensure!(
        endpoints(&s, "sneaky").is_empty(),
        "refused static endpoints were registered: {:?}",
        endpoints(&s, "sneaky")
    );
    let got = accepted.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(
        got == 0,
        "the agent connected to the host's loopback {got} times"
    );
    accept.abort();
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_deregisters_endpoints_and_leaves_containers_running() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(30).await?;
    let mut snap = env.snapshot();
    let agent = InProcAgent::start(&env, "n1", agent_config(&d));
    let id = d.run_container(&[("pier.service", "web"), ("pier.port", "8080")], &[])?;
    wait_snap(&mut snap, Duration::from_secs(10), "endpoint", |s| {
        web_endpoint(s, "web", &id).filter(|e| e.ready)
    })
    .await?;
    agent.stop().await?;
    // Endpoints go at once (the lease, 30 s, is still alive).
    wait_snap(
        &mut snap,
        Duration::from_secs(2),
        "endpoint deregistered",
        |s| web_endpoint(s, "web", &id).is_none().then_some(()),
    )
    .await?;
    let running = d.ok(&["inspect", "-f", "{{.State.Running}}", &id])?;
    ensure!(running == "true", "container stopped with the agent");
    Ok(())
}

/// The DNS ACL follows Docker's network events: a network's subnets are
/// published at its `create` and withdrawn at its `destroy`, with the
/// periodic resync set far beyond the test, for a plain, an `--internal`
/// and a dual-stack network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_follow_docker_events_without_a_resync() -> Result<()> {
    init_tracing();
    let d = TestDocker::new()?;
    let env = StoreEnv::embedded(5).await?;
    let cfg = pier_agent::AgentConfig {
        resync_interval_ms: 600_000,
        ..agent_config(&d)
    };
    let mut agent = InProcAgent::start(&env, "n1", cfg);
    // The start-up resync has run once the test network is published.
    let first = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        &d.net,
    ])?;
    wait_nets(&mut agent, "the start-up list", |n| n.contains(&first)).await?;

    let cases: [(&str, &[&str]); 3] = [
        ("plain", &[]),
        ("internal", &["--internal"]),
        ("v6", &["--ipv6", "--subnet", "fd42:7e57:2b::/64"]),
    ];
    for (kind, flags) in cases {
        let name = format!("{}-{kind}", d.net);
        let mut args = vec![
            "network".to_owned(),
            "create".into(),
            "--label".into(),
            format!("pier.test-run={}", d.run),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        args.push(name.clone());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        d.ok(&a)?;
        let subnets = d.ok(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            &name,
        ])?;
        let subnets: Vec<String> = subnets.split_whitespace().map(str::to_owned).collect();
        ensure!(!subnets.is_empty(), "{name} has no subnet");
        if kind == "v6" {
            ensure!(
                subnets.iter().any(|s| s == "fd42:7e57:2b::/64"),
                "{subnets:?}"
            );
        }
        wait_nets(&mut agent, &format!("{kind} network in"), |n| {
            subnets.iter().all(|s| n.contains(s))
        })
        .await?;
        d.ok(&["network", "rm", &name])?;
        wait_nets(&mut agent, &format!("{kind} network out"), |n| {
            subnets.iter().all(|s| !n.contains(s))
        })
        .await?;
    }
    ensure!(
        agent
            .networks
            .borrow()
            .iter()
            .any(|c| c.to_string() == first),
        "removing the other networks took the test network out too"
    );
    agent.stop().await?;
    Ok(())
}

/// Wait (5 s at most; the resync is 10 minutes away) until the published
/// subnets, as strings, satisfy `f`.
async fn wait_nets(
    agent: &mut InProcAgent,
    what: &str,
    f: impl Fn(&[String]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Vec<String> = agent
            .networks
            .borrow_and_update()
            .iter()
            .map(|c| c.to_string())
            .collect();
        if f(&now) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero()
            || tokio::time::timeout(left, agent.networks.changed())
                .await
                .is_err()
        {
            anyhow::bail!("{what}: not published within 5 s; published: {now:?}");
        }
    }
}
