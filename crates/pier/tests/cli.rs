//! The built `pier` binary against a real API server (pier-api over an
//! EmbeddedStore in a temp dir, with a real Reflector) on 127.0.0.1:0.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pier_api::{ApiConfig, ApiState, Problems, serve};
use pier_model::{
    Name, Namespace, Pod, PodPhase, PodStatus, ReplicaSet, Rollout, RolloutState, encode, keys,
};
use pier_store::alloc::AllocConfig;
use pier_store::{EmbeddedStore, Store};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PIER: &str = env!("CARGO_BIN_EXE_pier");

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

struct Agent {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
    url: String,
    token: Option<String>,
    snap: watch::Receiver<Arc<pier_model::Snapshot>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Agent {
    /// `token`: `None` serves without one (`insecure_no_auth`).
    async fn start(token: Option<&str>) -> Agent {
        Self::start_in(tempfile::tempdir().unwrap(), token).await
    }

    async fn start_in(dir: tempfile::TempDir, token: Option<&str>) -> Agent {
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
        let cancel = CancellationToken::new();
        let reflector =
            pier_store::reflector::Reflector::spawn(store.clone(), cancel.child_token());
        reflector.synced().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let cfg = ApiConfig {
            listen: addr,
            token: token.map(str::to_owned),
            insecure_no_auth: token.is_none(),
            ..ApiConfig::default()
        };
        let (_problems_tx, problems_rx) = watch::channel(Problems::default());
        let state = ApiState {
            store: store.clone(),
            snapshot: reflector.subscribe(),
            alloc: AllocConfig {
                service_cidr: "10.213.0.0/16".parse().unwrap(),
                service_cidr6: None,
                node_port_min: 30000,
                node_port_max: 30010,
            },
            node: n("n1"),
            registry: Arc::new(Default::default()),
            readiness: vec![],
            problems: vec![problems_rx],
            host_names: vec![],
            static_endpoint_allow: vec![],
            dns_domain: "pier.internal".into(),
        };
        tokio::spawn(serve(cfg, listener, state, cancel.child_token()));
        Agent {
            _dir: dir,
            store,
            cancel,
            url: format!("http://{addr}"),
            token: token.map(str::to_owned),
            snap: reflector.subscribe(),
        }
    }

    async fn pier(&self, args: &[&str]) -> Out {
        pier_at(&self.url, self.token.as_deref(), args).await
    }

    /// A pod of `rs` as the supervisor writes it, with a status as the
    /// node's agent writes it.
    async fn put_pod(&self, rs: &str, pod: &str, ready: bool) {
        let kv = self
            .store
            .get(&keys::replicaset(&Namespace::default(), &n(rs)))
            .await
            .unwrap()
            .unwrap();
        let r: ReplicaSet = pier_model::decode(&kv.key, &kv.value).unwrap();
        let p = Pod {
            name: n(pod),
            namespace: Namespace::default(),
            replicaset: n(rs),
            node: n("n1"),
            template_hash: r.template.hash(),
            template: r.template.clone(),
            created_at: 1,
        };
        self.store
            .put(&keys::pod(&p.namespace, &p.name), encode(&p), None)
            .await
            .unwrap();
        let st = PodStatus {
            name: Some(n(pod)),
            node: Some(n("n1")),
            phase: PodPhase::Running,
            ready,
            container_id: Some(format!("{pod}-container")),
            ip: Some("172.17.0.7".parse().unwrap()),
            ..Default::default()
        };
        let rev = self
            .store
            .put(&keys::pod_status(&p.namespace, &p.name), encode(&st), None)
            .await
            .unwrap();
        // The CLI reads the agent's snapshot: wait until it has both writes.
        let mut rx = self.snap.clone();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.revision >= rev))
            .await
            .expect("the snapshot catches up within 5 s")
            .unwrap();
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn pier_at(url: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(PIER);
    cmd.arg("--server")
        .arg(url)
        .args(args)
        .env_remove("PIER_SERVER")
        .env("PIER_CONFIG", no_agent_config());
    match token {
        Some(t) => cmd.env("PIER_TOKEN", t),
        None => cmd.env_remove("PIER_TOKEN"),
    };
    let o = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("pier finished within 30 s")
        .expect("pier ran");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A config whose data dir holds no token, so that the CLI never finds a
/// token of an agent running on this host.
fn no_agent_config() -> &'static std::path::Path {
    static P: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    let (_, p) = P.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pier.toml");
        let data = d.path().join("no-agent");
        std::fs::write(&p, format!("[network]\ndata_dir = {:?}\n", data)).unwrap();
        (d, p)
    });
    p
}

/// A failure is exactly one line on stderr, starting with `error: `.
fn one_error_line(o: &Out) -> &str {
    assert_ne!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {o:?}");
    assert!(lines[0].starts_with("error: "), "{o:?}");
    lines[0]
}

#[tokio::test]
async fn unknown_resource_lists_the_valid_ones() {
    let o = pier_at("http://127.0.0.1:9", None, &["get", "deployments"]).await;
    let l = one_error_line(&o);
    assert_eq!(o.code, 2);
    assert!(
        l.contains("\"deployments\"")
            && l.contains("nodes")
            && l.contains("rs")
            && l.contains("pods")
            && l.contains("svc")
            && l.contains("endpoints"),
        "{l}"
    );
    let o = pier_at("http://127.0.0.1:9", None, &["delete", "node", "n1"]).await;
    // A node is a resource but cannot be deleted; refused before any request.
    assert!(one_error_line(&o).contains("pod, rs or svc"), "{o:?}");
}

#[tokio::test]
async fn usage_errors_are_one_line() {
    let o = pier_at("http://127.0.0.1:9", None, &["run", "web"]).await;
    assert_eq!(o.code, 2, "{o:?}");
    assert!(one_error_line(&o).contains("--image"), "{o:?}");
    let o = pier_at("http://127.0.0.1:9", None, &["get", "pods", "--bogus"]).await;
    assert!(one_error_line(&o).contains("--bogus"), "{o:?}");
}

#[tokio::test]
async fn names_that_are_not_rfc_1123_are_refused() {
    for args in [
        &["run", "Web_1", "--image", "x"][..],
        &["get", "pods", "Bad.Name"][..],
        &["delete", "svc", "x-"][..],
        &["run", "web", "--image", "x", "-n", "Prod"][..],
    ] {
        let o = pier_at("http://127.0.0.1:9", None, args).await;
        let l = one_error_line(&o);
        assert_eq!(o.code, 2, "{o:?}");
        assert!(
            l.contains("RFC 1123") || l.contains("start and end"),
            "{args:?}: {l}"
        );
    }
}

#[tokio::test]
async fn unreachable_agent_names_the_address_and_how_to_start_it() {
    // A port bound but never listening, held for the whole test: a connect
    // is refused, and nothing else can start listening on it meanwhile.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = closed.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let o = pier_at(&url, None, &["get", "pods"]).await;
    assert_eq!(o.code, 1, "{o:?}");
    assert_eq!(
        one_error_line(&o),
        format!(
            "error: cannot reach the pier agent at {url}: connection refused; start it with `pier agent --node NAME`"
        )
    );
    let o = pier_at(&url, None, &["version"]).await;
    assert!(o.stdout.contains("client: pier"), "{o:?}");
    assert!(one_error_line(&o).contains("cannot reach"), "{o:?}");
    drop(closed);
}

#[tokio::test]
async fn replica_counts_out_of_range_are_refused() {
    for args in [
        &["scale", "rs", "web", "--replicas", "5000"][..],
        &["scale", "rs", "web", "--replicas", "-1"][..],
        &["run", "web", "--image", "x", "--replicas", "1001"][..],
        &["scale", "rs", "web", "--replicas", "three"][..],
    ] {
        let o = pier_at("http://127.0.0.1:9", None, args).await;
        let l = one_error_line(&o);
        assert_eq!(o.code, 2, "{o:?}");
        assert!(
            l.contains("--replicas") && l.contains("0 to 1000"),
            "{args:?}: {l}"
        );
    }
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &["scale", "pods", "web", "--replicas", "2"],
    )
    .await;
    assert!(one_error_line(&o).contains("only rs"), "{o:?}");
}

#[tokio::test]
async fn the_demo_flow_with_tables_and_json() {
    let a = Agent::start(None).await;
    let o = a
        .pier(&[
            "run",
            "kube-demo",
            "--image",
            "pier-test/httpd:latest",
            "--port",
            "8080",
        ])
        .await;
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, "replicaset/kube-demo created"),
        "{o:?}"
    );
    let o = a.pier(&["run", "kube-demo", "--image", "x"]).await;
    assert!(one_error_line(&o).contains("already exists"), "{o:?}");

    // get rs: a table, then JSON, then YAML.
    let o = a.pier(&["get", "rs"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<Vec<&str>> = o
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["NAME", "DESIRED", "CURRENT", "READY", "MIN", "MAX", "AGE"],
        "{}",
        o.stdout
    );
    assert_eq!(
        lines[1][..6],
        ["kube-demo", "1", "0", "0", "-", "-"],
        "{}",
        o.stdout
    );
    let o = a.pier(&["get", "rs", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(j.as_array().unwrap().len(), 1);
    assert_eq!(j[0]["name"], "kube-demo");
    assert_eq!(j[0]["replicas"], 1);
    assert_eq!(j[0]["template"]["ports"][0]["port"], 8080);
    let o = a.pier(&["get", "rs", "kube-demo", "-o", "yaml"]).await;
    let y: serde_json::Value = serde_yaml_ng::from_str(&o.stdout).expect("YAML");
    assert_eq!(y[0]["name"], "kube-demo");

    // Pods as the supervisor and the node's agent write them.
    a.put_pod("kube-demo", "kube-demo-x1z9a", true).await;
    let o = a.pier(&["get", "pods"]).await;
    let lines: Vec<Vec<&str>> = o
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "NODE", "IP"],
        "{o:?}"
    );
    assert_eq!(lines.len(), 2, "{o:?}");
    assert_eq!(
        lines[1][..4],
        ["kube-demo-x1z9a", "1/1", "Running", "0"],
        "{o:?}"
    );
    assert_eq!(lines[1][5..], ["n1", "172.17.0.7"], "{o:?}");
    let o = a.pier(&["get", "pods", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    let p = &j[0];
    assert_eq!(
        (
            &p["name"],
            &p["namespace"],
            &p["replicaset"],
            &p["node"],
            &p["phase"],
            &p["ip"],
            &p["container_id"]
        ),
        (
            &serde_json::json!("kube-demo-x1z9a"),
            &serde_json::json!("default"),
            &serde_json::json!("kube-demo"),
            &serde_json::json!("n1"),
            &serde_json::json!("Running"),
            &serde_json::json!("172.17.0.7"),
            &serde_json::json!("kube-demo-x1z9a-container"),
        )
    );
    let o = a.pier(&["get", "pods", "-o", "wide", "-A"]).await;
    assert!(o.stdout.starts_with("NAMESPACE"), "{o:?}");
    assert!(
        o.stdout.contains("REPLICASET") && o.stdout.contains("kube-demo-x1 "),
        "{o:?}"
    );

    // expose, then the service's JSON shows the VIP and the node port.
    let o = a
        .pier(&[
            "expose",
            "rs",
            "kube-demo",
            "--port",
            "8080",
            "--type",
            "NodePort",
        ])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout
            .starts_with("service/kube-demo exposed: VIP 10.213."),
        "{o:?}"
    );
    let o = a.pier(&["get", "svc", "kube-demo", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    let vip: std::net::IpAddr = j[0]["vip"].as_str().unwrap().parse().unwrap();
    assert!(
        "10.213.0.0/16"
            .parse::<pier_model::Cidr>()
            .unwrap()
            .contains(vip)
    );
    let np = j[0]["ports"][0]["node_port"].as_u64().unwrap();
    assert!((30000..=30010).contains(&np), "{j}");
    assert_eq!(j[0]["ports"][0]["name"], "p8080");
    assert_eq!(j[0]["ports"][0]["target_port"], 8080);
    assert_eq!(j[0]["prefer_local"], false, "{j}");
    // --prefer-local reaches the stored service.
    let o = a
        .pier(&[
            "expose",
            "rs",
            "kube-demo",
            "--port",
            "9090",
            "--name",
            "near",
            "--prefer-local",
        ])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    let o = a.pier(&["get", "svc", "near", "-o", "json"]).await;
    let near: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(near[0]["prefer_local"], true, "{near}");
    let o = a.pier(&["get", "svc"]).await;
    let lines: Vec<Vec<&str>> = o
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["NAME", "TYPE", "VIP", "PORT(S)", "AGE"], "{o:?}");
    assert_eq!(
        lines[1][..4],
        [
            "kube-demo",
            "NodePort",
            &vip.to_string(),
            &format!("8080:{np}/TCP")
        ],
        "{o:?}"
    );
    let o = a
        .pier(&[
            "expose",
            "external",
            "db",
            "--port",
            "5432",
            "--endpoint",
            "198.51.100.10:5432",
            "--endpoint",
            "198.51.100.11:5433",
        ])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    // The cloud metadata service is not an endpoint (A2).
    let o = a
        .pier(&[
            "expose",
            "external",
            "meta",
            "--port",
            "80",
            "--endpoint",
            "169.254.169.254:80",
        ])
        .await;
    let e = one_error_line(&o);
    assert!(
        e.contains("static_endpoints[0].ip: 169.254.169.254 is a link-local address"),
        "{o:?}"
    );
    // An address is not resolved, so there is no note about resolving.
    assert!(!o.stderr.contains("note:"), "{o:?}");
    // A UDP service in front of a fixed endpoint.
    let o = a
        .pier(&[
            "expose",
            "external",
            "ns",
            "--port",
            "53/udp",
            "--endpoint",
            "198.51.100.53:53",
        ])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    let o = a.pier(&["get", "svc", "ns", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert!(
        j[0]["ports"][0]["protocol"] == "udp" && j[0]["ports"][0]["name"] == "p53-udp",
        "{j}"
    );
    // A bare name is refused: the agents look names up again through
    // their DNS upstreams, with no search domains (tests/e2e/resolve.rs
    // shows a full name followed as its record changes).
    let o = a
        .pier(&[
            "expose",
            "external",
            "local",
            "--port",
            "80",
            "--endpoint",
            "localhost:80",
        ])
        .await;
    let e = one_error_line(&o);
    assert!(
        e.contains("\"localhost\" is a bare name") && e.contains("db.example.com:80"),
        "{o:?}"
    );
    let o = a.pier(&["get", "svc", "db", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(j[0]["static_endpoints"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j[0]["selector"], serde_json::json!({}));

    // Headless (no VIP), PROXY protocol, and an ExternalName (a CNAME).
    let o = a
        .pier(&[
            "expose",
            "rs",
            "kube-demo",
            "--port",
            "8080",
            "--name",
            "peers",
            "--headless",
            "--proxy-protocol",
        ])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    let o = a.pier(&["get", "svc", "peers", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert!(
        j[0]["vip"].is_null() && j[0]["headless"] == true && j[0]["proxy_protocol"] == true,
        "{j}"
    );
    let o = a
        .pier(&[
            "expose",
            "rs",
            "kube-demo",
            "--port",
            "8080",
            "--name",
            "np",
            "--headless",
            "--type",
            "NodePort",
        ])
        .await;
    assert!(one_error_line(&o).contains("--headless"), "{o:?}");
    let o = a
        .pier(&["expose", "external", "olddb", "--cname", "db.example.com."])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("CNAME to db.example.com"), "{o:?}");
    let o = a.pier(&["get", "svc", "olddb", "-o", "json"]).await;
    let j: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert!(
        j[0]["external_name"] == "db.example.com" && j[0]["vip"].is_null(),
        "{j}"
    );
    let o = a
        .pier(&["expose", "external", "bad", "--cname", "localhost"])
        .await;
    assert!(one_error_line(&o).contains("--cname"), "{o:?}");

    // scale (with --wait: the pods are there and ready).
    a.put_pod("kube-demo", "kube-demo-b2c3d", true).await;
    a.put_pod("kube-demo", "kube-demo-e4f5g", true).await;
    let o = a
        .pier(&[
            "scale",
            "rs",
            "kube-demo",
            "--replicas",
            "3",
            "--wait",
            "--timeout",
            "10s",
        ])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout.contains("scaled to 3") && o.stdout.contains("3/3 pods ready"),
        "{o:?}"
    );
    // --wait gives up and says what is missing.
    let o = a
        .pier(&[
            "scale",
            "rs",
            "kube-demo",
            "--replicas",
            "5",
            "--wait",
            "--timeout",
            "1s",
        ])
        .await;
    let l = one_error_line(&o);
    assert!(
        l.contains("timed out after 1s")
            && l.contains("3 of 5 pods ready")
            && l.contains("2 pod(s) not created"),
        "{l}"
    );

    // describe
    let o = a.pier(&["describe", "rs", "kube-demo"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout.contains("pier-test/httpd:latest") && o.stdout.contains("kube-demo-b2c3d"),
        "{o:?}"
    );
    let o = a.pier(&["describe", "svc", "kube-demo"]).await;
    assert!(o.stdout.contains(&vip.to_string()), "{o:?}");
    let o = a.pier(&["describe", "pod", "kube-demo-x1z9a"]).await;
    assert!(o.stdout.contains("Running"), "{o:?}");

    // delete
    let o = a.pier(&["delete", "pod", "kube-demo-x1z9a"]).await;
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, "pod/kube-demo-x1z9a deleted"),
        "{o:?}"
    );
    assert!(
        a.store
            .get(&keys::pod(&Namespace::default(), &n("kube-demo-x1z9a")))
            .await
            .unwrap()
            .is_none()
    );
    let o = a.pier(&["delete", "pod", "kube-demo-x1z9a"]).await;
    assert!(one_error_line(&o).contains("not found"), "{o:?}");
    let o = a.pier(&["delete", "rs", "kube-demo"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    let o = a.pier(&["get", "svc", "kube-demo"]).await;
    assert_eq!(
        o.code, 0,
        "the service stays after its replica set goes: {o:?}"
    );
    let o = a.pier(&["delete", "svc", "kube-demo"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    let o = a.pier(&["get", "svc", "kube-demo"]).await;
    assert!(one_error_line(&o).contains("not found"), "{o:?}");
    let o = a.pier(&["get", "rs"]).await;
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{o:?}");
    assert!(o.stderr.contains("No replicasets found"), "{o:?}");
    let o = a.pier(&["version"]).await;
    assert!(o.stdout.contains("on node n1"), "{o:?}");
}

#[tokio::test]
async fn token_comes_from_pier_token() {
    let a = Agent::start(Some("t0ken")).await;
    let o = a.pier(&["get", "pods", "-o", "json"]).await;
    assert_eq!((o.code, o.stdout.trim()), (0, "[]"), "{o:?}");
    let o = pier_at(&a.url, None, &["get", "pods"]).await;
    let e = one_error_line(&o);
    assert!(
        e.contains("needs its API token")
            && e.contains("no-agent/api-token")
            && e.contains("PIER_TOKEN"),
        "{o:?}"
    );
}

/// An agent as `pier agent` makes it: the token made in its data dir, the
/// config naming the data dir and the API address.
async fn agent_with_token_file(group: Option<u32>) -> (Agent, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Others may read the config (as /etc/pier/pier.toml), not the data dir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let token = pier_api::token::ensure(&data, group).unwrap();
    let cfg = dir.path().join("pier.toml");
    let a = Agent::start_in(dir, Some(&token)).await;
    std::fs::write(
        &cfg,
        format!(
            "[network]\ndata_dir = {:?}\n[api]\nlisten = {:?}\n",
            data,
            a.url.trim_start_matches("http://")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    (a, cfg)
}

/// `pier --config FILE` (or PIER_CONFIG): the CLI finds the agent's
/// address and reads its token from the data dir, with no PIER_TOKEN.
async fn pier_as(user: Option<u32>, cfg: &std::path::Path, args: &[&str]) -> Out {
    let mut cmd = match user {
        Some(uid) => {
            let mut c = tokio::process::Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(PIER);
            c
        }
        None => tokio::process::Command::new(PIER),
    };
    cmd.arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("PIER_SERVER")
        .env_remove("PIER_TOKEN")
        .env_remove("PIER_CONFIG");
    let o = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("pier finished within 30 s")
        .expect("pier ran");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// 65534: `nobody`, and `nogroup` as its group.
const NOBODY: u32 = 65534;

#[tokio::test]
async fn the_cli_reads_the_token_from_the_agents_data_dir() {
    let (_a, cfg) = agent_with_token_file(None).await;
    let o = pier_as(None, &cfg, &["get", "pods", "-o", "json"]).await;
    assert_eq!((o.code, o.stdout.trim()), (0, "[]"), "{o:?}");
    // PIER_CONFIG works as --config does.
    let o = tokio::process::Command::new(PIER)
        .args(["get", "pods", "-o", "json"])
        .env("PIER_CONFIG", &cfg)
        .env_remove("PIER_TOKEN")
        .env_remove("PIER_SERVER")
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

/// A1: another local user (nobody) runs the CLI against the agent: it
/// cannot read the token (data dir 0700, file 0600), the agent answers 401,
/// and the CLI says exactly why and what to do.
#[tokio::test]
async fn attack_another_local_user_cannot_use_the_api() {
    if !rustix::process::geteuid().is_root() {
        panic!("this test runs the CLI as nobody with setpriv: run it as root (tests/run.sh does)");
    }
    let (a, cfg) = agent_with_token_file(None).await;
    let o = pier_as(Some(NOBODY), &cfg, &["run", "web", "--image", "x"]).await;
    let e = one_error_line(&o);
    assert!(
        e.contains("permission denied")
            && e.contains("token_group")
            && e.contains("PIER_TOKEN")
            && e.contains("/data/api-token"),
        "{o:?}"
    );
    assert!(
        a.store
            .get(&keys::replicaset(&Namespace::default(), &n("web")))
            .await
            .unwrap()
            .is_none()
    );
}

/// `[api] token_group`: members of the group may use the CLI.
#[tokio::test]
async fn token_group_members_can_use_the_cli() {
    if !rustix::process::geteuid().is_root() {
        panic!("this test runs the CLI as nobody with setpriv: run it as root (tests/run.sh does)");
    }
    let (_a, cfg) = agent_with_token_file(Some(NOBODY)).await;
    let o = pier_as(Some(NOBODY), &cfg, &["get", "pods", "-o", "json"]).await;
    assert_eq!((o.code, o.stdout.trim()), (0, "[]"), "{o:?}");
}

/// A node's refusals (written by its agent under the label policy) are
/// shown by `describe node`, and those naming a service by `describe svc`.
#[tokio::test]
async fn describe_shows_the_containers_an_agent_refused() {
    let a = Agent::start(None).await;
    let o = a
        .pier(&["run", "api", "--image", "img", "--port", "8080"])
        .await;
    assert_eq!(o.code, 0, "{o:?}");
    let o = a.pier(&["expose", "rs", "api", "--port", "80"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    let node: pier_model::Node = serde_json::from_value(serde_json::json!({
        "name": "n1", "addr": "127.0.0.1",
        "refused": [
            {"container": "intruder", "id": "07244df1807f", "namespace": "default",
             "service": "api", "reason": "service default/api takes only pier's own pods"},
            {"container": "other", "id": "8549bc81d87d", "namespace": "prod",
             "reason": "namespace prod is closed to labelled containers"},
        ],
    }))
    .unwrap();
    let rev = a
        .store
        .put(&keys::node(&node.name), encode(&node), None)
        .await
        .unwrap();
    let mut rx = a.snap.clone();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.revision >= rev))
        .await
        .expect("the snapshot catches up within 5 s")
        .unwrap();
    let o = a.pier(&["describe", "node", "n1"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout.contains("Refused containers:")
            && o.stdout
                .contains("n1/intruder (07244df1807f): service default/api")
            && o.stdout.contains("n1/other (8549bc81d87d): namespace prod"),
        "{}",
        o.stdout
    );
    let o = a.pier(&["describe", "svc", "api"]).await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout.contains("n1/intruder") && !o.stdout.contains("n1/other"),
        "{}",
        o.stdout
    );
    let o = a.pier(&["get", "nodes", "-o", "json"]).await;
    assert!(o.stdout.contains("\"refused\""), "{}", o.stdout);
}

#[tokio::test]
async fn get_watch_prints_changes() {
    let a = Agent::start(None).await;
    a.pier(&["run", "web", "--image", "x"]).await;
    let mut child = tokio::process::Command::new(PIER)
        .args(["--server", &a.url, "get", "pods", "-w", "-o", "json"])
        .env_remove("PIER_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Give the watch time to open before the change, then expect it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.put_pod("web", "web-aaaaa", false).await;
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a watch line within 10 s")
        .unwrap()
        .expect("a line");
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["type"], "ADDED", "{ev}");
    assert_eq!(ev["object"]["name"], "web-aaaaa", "{ev}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn ca_init_and_issue() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = dir.path().join("n1");
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &["ca", "init", ca.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(ca.join("ca.pem").exists() && ca.join("ca-key.pem").exists());
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &["ca", "init", ca.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.code, 1, "refuses to overwrite: {o:?}");
    one_error_line(&o);
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &[
            "ca",
            "issue",
            "n1",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--days",
            "30",
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{o:?}");
    for f in ["node.pem", "node-key.pem", "ca.pem"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &["ca", "issue", "N1", "--ca", "x", "--out", "y"],
    )
    .await;
    assert_eq!(o.code, 2, "{o:?}");

    // Revocation: the CA's crl.pem lists n1's certificate.
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &["ca", "revoke", "n1", "--ca", ca.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("revoked 1 certificate"), "{o:?}");
    assert!(ca.join("crl.pem").exists());
    // A node the CA never issued for: one line saying what to do.
    let o = pier_at(
        "http://127.0.0.1:9",
        None,
        &["ca", "revoke", "n9", "--ca", ca.to_str().unwrap()],
    )
    .await;
    assert_eq!(o.code, 1, "{o:?}");
    one_error_line(&o);
    assert!(o.stderr.contains("--cert FILE"), "{o:?}");
}

/// `pier run --wait` gives up as soon as the new set's first rollout stops
/// (its pods failed: an image the host does not have), with the
/// supervisor's reason, instead of waiting out `--timeout` in silence. A
/// stopped rollout left by a deleted set of the same name (its record not
/// removed yet) does not count.
#[tokio::test]
async fn run_wait_gives_up_when_the_first_rollout_stops() {
    let a = Agent::start(None).await;
    let ns = Namespace::default();
    let rs_key = keys::replicaset(&ns, &n("web"));
    let paused = |started_at: u64, set_created_at: u64| Rollout {
        revision: 1,
        hash: String::new(),
        target: 1,
        from: None,
        state: RolloutState::Paused,
        message:
            "rollout of revision 1 paused: pod web-abcde failed: image nope:v1 not found locally"
                .into(),
        failures: 1,
        steps: 1,
        step_done_at: None,
        started_at,
        finished_at: Some(started_at),
        set_created_at,
    };
    let run = ["run", "web", "--image", "nope:v1", "--wait"];

    // 1. Only a stale record: --wait waits it out. One written before
    //    set_created_at (told by its start), and one of another set
    //    started "later" by a clock ahead of this one.
    for stale in [paused(1, 0), paused(u64::MAX / 2, 7)] {
        a.store
            .put(&keys::rollout(&ns, &n("web")), encode(&stale), None)
            .await
            .unwrap();
        let args = [&run[..], &["--timeout", "1s"]].concat();
        let o = a.pier(&args).await;
        let l = one_error_line(&o);
        assert!(
            l.contains("timed out after 1s") && !l.contains("rollout stopped"),
            "{stale:?}: {l}"
        );
        assert_eq!(a.pier(&["delete", "rs", "web"]).await.code, 0);
    }

    // 2. The new set's own rollout pauses: --wait says so and why. The
    //    timeout is longer than the test waits (pier_at: 30 s at most).
    let supervisor = async {
        loop {
            if let Some(kv) = a.store.get(&rs_key).await.unwrap() {
                let rs: ReplicaSet = pier_model::decode(&kv.key, &kv.value).unwrap();
                a.store
                    .put(
                        &keys::rollout(&ns, &n("web")),
                        encode(&paused(rs.created_at, rs.created_at)),
                        None,
                    )
                    .await
                    .unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let args = [&run[..], &["--timeout", "120s"]].concat();
    let (o, ()) = tokio::join!(a.pier(&args), supervisor);
    let l = one_error_line(&o);
    assert!(
        l.contains("replicaset/web: 0 of 1 pods ready, and its rollout stopped (paused)")
            && l.contains("image nope:v1 not found locally"),
        "{l}"
    );
}
