//! The API server on 127.0.0.1:0 over a real EmbeddedStore (temp dir) and a
//! real Reflector, driven by the typed Client and by raw HTTP.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pier_api::{ApiConfig, ApiError, ApiState, Client, Problems, serve};
use pier_model::api::{ExposeRequest, PodView, Resource, ScaleRequest, WatchEventType};
use pier_model::{
    ContainerPort, Endpoint, EndpointPort, Name, Namespace, Node, Pod, PodPhase, PodStatus,
    PodTemplate, PortNum, ReplicaSet, Replicas, Service, ServicePort, ServiceType, encode, keys,
};
use pier_store::alloc::AllocConfig;
use pier_store::{EmbeddedStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn ns() -> Namespace {
    Namespace::default()
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
    addr: SocketAddr,
    client: Client,
    ready_tx: watch::Sender<bool>,
    problems_tx: watch::Sender<Problems>,
    server: Option<tokio::task::JoinHandle<Result<(), ApiError>>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut ApiConfig)) -> Harness {
        Self::start_full(tune, vec![]).await
    }

    /// `allow`: `[network] static_endpoint_allow`. The config is the
    /// development one (`insecure_no_auth`) unless `tune` sets a token.
    async fn start_full(
        tune: impl FnOnce(&mut ApiConfig),
        allow: Vec<pier_model::Cidr>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
        let cancel = CancellationToken::new();
        let reflector =
            pier_store::reflector::Reflector::spawn(store.clone(), cancel.child_token());
        reflector.synced().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = ApiConfig {
            listen: addr,
            ..ApiConfig::default()
        };
        tune(&mut cfg);
        cfg.insecure_no_auth = cfg.token.is_none();
        let token = cfg.token.clone();
        let (ready_tx, ready_rx) = watch::channel(true);
        let (problems_tx, problems_rx) = watch::channel(Problems::default());
        let mut registry = prometheus_client::registry::Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        counter.inc();
        registry.register("pier_test_things", "Things counted by the test", counter);
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
            registry: Arc::new(registry),
            readiness: vec![("test", ready_rx)],
            problems: vec![problems_rx],
            host_names: vec!["n1".into()],
            static_endpoint_allow: allow,
            dns_domain: "pier.internal".into(),
        };
        let server = tokio::spawn(serve(cfg, listener, state, cancel.child_token()));
        let client = Client::new(&format!("http://{addr}"), token).unwrap();
        Harness {
            _dir: dir,
            store,
            cancel,
            addr,
            client,
            ready_tx,
            problems_tx,
            server: Some(server),
        }
    }
}

/// Polls `f` until it returns `Some`, for up to 5 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One raw HTTP/1.1 request with `Connection: close`; returns the status and
/// the body.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let text = raw_text(addr, method, path, headers, body).await;
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One raw request; the whole answer, head and body. `Host` defaults to
/// the address, and a POST or PUT with no `Content-Type` sends JSON's; a
/// header given with an empty value is left out.
async fn raw_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !has("host") {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("content-type") && matches!(method, "POST" | "PUT") {
        head.push_str("Content-Type: application/json\r\n");
    }
    let chunked = has("transfer-encoding");
    for (k, v) in headers {
        if !v.is_empty() {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if !chunked {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) and close before the body is all sent.
    if chunked {
        for c in body.chunks(1000) {
            if s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                .await
                .is_err()
                || s.write_all(c).await.is_err()
                || s.write_all(b"\r\n").await.is_err()
            {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    } else {
        let _ = s.write_all(body).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn rs(name: &str, replicas: u32) -> ReplicaSet {
    ReplicaSet {
        name: n(name),
        namespace: ns(),
        template: PodTemplate {
            image: "pier-test/httpd:latest".into(),
            ports: vec![ContainerPort {
                name: n("http"),
                port: PortNum::new(8080).unwrap(),
                protocol: Default::default(),
            }],
            ..Default::default()
        },
        replicas: Replicas::new(replicas).unwrap(),
        placement: Default::default(),
        min_replicas: None,
        max_replicas: None,
        sla: None,
        created_at: 0,
        update_config: Default::default(),
        rollback_config: Default::default(),
        revision: 0,
        history: Vec::new(),
    }
}

async fn put_pod(store: &dyn Store, rs: &ReplicaSet, pod: &str, status: Option<PodStatus>) {
    let p = Pod {
        name: n(pod),
        namespace: ns(),
        replicaset: rs.name.clone(),
        node: n("n1"),
        template_hash: rs.template.hash(),
        template: rs.template.clone(),
        created_at: 1,
    };
    store
        .put(&keys::pod(&ns(), &p.name), encode(&p), None)
        .await
        .unwrap();
    if let Some(st) = status {
        store
            .put(&keys::pod_status(&ns(), &p.name), encode(&st), None)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn replicaset_crud() {
    let h = Harness::start().await;
    let c = &h.client;
    let v = c.create_replicaset(&rs("web", 2)).await.unwrap();
    assert_eq!(
        (
            v.spec.name.as_str(),
            v.spec.replicas.get(),
            v.current,
            v.ready
        ),
        ("web", 2, 0, 0)
    );
    assert!(v.spec.created_at > 0);
    // Read-your-write: the list right after the create shows it.
    let all = c.list_replicasets(None).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(c.list_replicasets(Some(&ns())).await.unwrap().len(), 1);
    let other = Namespace::new("other").unwrap();
    assert!(c.list_replicasets(Some(&other)).await.unwrap().is_empty());
    assert_eq!(
        c.get_replicaset(&ns(), &n("web"))
            .await
            .unwrap()
            .spec
            .template
            .image,
        "pier-test/httpd:latest"
    );
    // The stored object is the model's.
    let kv = h
        .store
        .get(&keys::replicaset(&ns(), &n("web")))
        .await
        .unwrap()
        .unwrap();
    let stored: ReplicaSet = pier_model::decode(&kv.key, &kv.value).unwrap();
    assert_eq!(stored.replicas.get(), 2);

    let e = c.create_replicaset(&rs("web", 3)).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");

    let s = c
        .scale_replicaset(
            &ns(),
            &n("web"),
            &ScaleRequest {
                replicas: Some(Replicas::new(5).unwrap()),
                delta: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(s.spec.replicas.get(), 5);
    assert_eq!(
        c.get_replicaset(&ns(), &n("web"))
            .await
            .unwrap()
            .spec
            .replicas
            .get(),
        5
    );

    c.delete_replicaset(&ns(), &n("web")).await.unwrap();
    assert!(
        h.store
            .get(&keys::replicaset(&ns(), &n("web")))
            .await
            .unwrap()
            .is_none()
    );
    let e = c.get_replicaset(&ns(), &n("web")).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(e.to_string().contains("\"web\" not found"), "{e}");
    assert_eq!(
        c.delete_replicaset(&ns(), &n("web"))
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    let e = c
        .scale_replicaset(
            &ns(),
            &n("web"),
            &ScaleRequest {
                replicas: Some(Replicas::new(1).unwrap()),
                delta: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
}

#[tokio::test]
async fn pods_merge_their_status_and_delete_removes_the_key() {
    let h = Harness::start().await;
    let c = &h.client;
    let r = rs("web", 2);
    c.create_replicaset(&r).await.unwrap();
    put_pod(
        &*h.store,
        &r,
        "web-aaaaa",
        Some(PodStatus {
            name: Some(n("web-aaaaa")),
            namespace: ns(),
            node: Some(n("n1")),
            phase: PodPhase::Running,
            ready: true,
            container_id: Some("c0ffee".into()),
            ip: Some("172.17.0.5".parse().unwrap()),
            started_at: Some(2),
            restarts: 1,
            message: String::new(),
        }),
    )
    .await;
    put_pod(&*h.store, &r, "web-bbbbb", None).await;
    let pods = eventually("both pods", || async {
        let p = c.list_pods(Some(&ns())).await.unwrap();
        (p.len() == 2).then_some(p)
    })
    .await;
    let a = &pods[0];
    assert_eq!(
        (
            a.name.as_str(),
            a.replicaset.as_str(),
            a.node.as_str(),
            a.phase,
            a.ready,
            a.restarts
        ),
        ("web-aaaaa", "web", "n1", PodPhase::Running, true, 1)
    );
    assert_eq!(a.ip, Some("172.17.0.5".parse().unwrap()));
    assert_eq!(a.container_id.as_deref(), Some("c0ffee"));
    let b = &pods[1];
    assert_eq!((b.phase, b.ready, b.ip), (PodPhase::Pending, false, None));
    // The JSON carries the contract's field names and Kubernetes' spelling.
    let j: serde_json::Value = serde_json::to_value(&pods).unwrap();
    for f in [
        "name",
        "namespace",
        "replicaset",
        "node",
        "phase",
        "ip",
        "container_id",
        "ready",
        "restarts",
    ] {
        assert!(j[0].get(f).is_some(), "missing {f} in {j}");
    }
    assert_eq!(j[0]["phase"], "Running");
    let view = c.get_replicaset(&ns(), &n("web")).await.unwrap();
    assert_eq!((view.current, view.ready), (2, 1));

    let got: PodView = c.get_pod(&ns(), &n("web-aaaaa")).await.unwrap();
    assert_eq!(got.name.as_str(), "web-aaaaa");
    c.delete_pod(&ns(), &n("web-aaaaa")).await.unwrap();
    assert!(
        h.store
            .get(&keys::pod(&ns(), &n("web-aaaaa")))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        c.get_pod(&ns(), &n("web-aaaaa"))
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert_eq!(c.list_pods(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn expose_can_prefer_local_endpoints() {
    let h = Harness::start().await;
    let c = &h.client;
    c.create_replicaset(&rs("near", 1)).await.unwrap();
    let req = |name: &str, prefer_local: bool| ExposeRequest {
        name: Some(n(name)),
        port: PortNum::new(8080).unwrap(),
        target_port: None,
        service_type: ServiceType::ClusterIP,
        node_port: None,
        prefer_local,
        headless: false,
        proxy_protocol: false,
        protocol: Default::default(),
        port_name: None,
        more_ports: Vec::new(),
        session_affinity: None,
    };
    let near = c
        .expose_replicaset(&ns(), &n("near"), &req("near", true))
        .await
        .unwrap();
    assert!(near.prefer_local);
    let any = c
        .expose_replicaset(&ns(), &n("near"), &req("any", false))
        .await
        .unwrap();
    assert!(!any.prefer_local);
    // Stored as such: what every node's proxy reads.
    let listed = c.list_services(None).await.unwrap();
    let flags: Vec<(String, bool)> = listed
        .iter()
        .map(|s| (s.name.to_string(), s.prefer_local))
        .collect();
    assert!(flags.contains(&("near".into(), true)), "{flags:?}");
    assert!(flags.contains(&("any".into(), false)), "{flags:?}");
}

#[tokio::test]
async fn services_expose_external_endpoints_and_delete() {
    let h = Harness::start().await;
    let c = &h.client;
    c.create_replicaset(&rs("kube-demo", 1)).await.unwrap();
    let svc = c
        .expose_replicaset(
            &ns(),
            &n("kube-demo"),
            &ExposeRequest {
                name: None,
                port: PortNum::new(8080).unwrap(),
                target_port: None,
                service_type: ServiceType::NodePort,
                node_port: None,
                prefer_local: false,
                headless: false,
                proxy_protocol: false,
                protocol: Default::default(),
                port_name: None,
                more_ports: Vec::new(),
                session_affinity: None,
            },
        )
        .await
        .unwrap();
    let vip = svc.vip.expect("a VIP");
    assert!(
        AllocConfig::dns_vip(&AllocConfig {
            service_cidr: "10.213.0.0/16".parse().unwrap(),
            service_cidr6: None,
            node_port_min: 1,
            node_port_max: 2
        }) != Some(vip)
    );
    assert!(
        "10.213.0.0/16"
            .parse::<pier_model::Cidr>()
            .unwrap()
            .contains(vip)
    );
    assert_eq!(svc.ports.len(), 1);
    let p = &svc.ports[0];
    // The replica set's port is named http; the service port takes its name.
    assert_eq!(
        (p.name.as_str(), p.port.get(), p.target_port.get()),
        ("http", 8080, 8080)
    );
    let np = p.node_port.expect("a node port").get();
    assert!((30000..=30010).contains(&np));
    assert_eq!(
        svc.selector.get("pier.replicaset").map(String::as_str),
        Some("kube-demo")
    );
    // JSON fields of the contract.
    let j = serde_json::to_value(c.list_services(None).await.unwrap()).unwrap();
    assert_eq!(j[0]["vip"], vip.to_string());
    assert_eq!(j[0]["ports"][0]["node_port"], np);
    assert_eq!(j[0]["ports"][0]["target_port"], 8080);

    // A port that no container port matches is named p<port>.
    let svc2 = c
        .expose_replicaset(
            &ns(),
            &n("kube-demo"),
            &ExposeRequest {
                name: Some(n("demo-alt")),
                port: PortNum::new(80).unwrap(),
                target_port: Some(PortNum::new(9090).unwrap()),
                service_type: ServiceType::ClusterIP,
                node_port: None,
                prefer_local: false,
                headless: false,
                proxy_protocol: false,
                protocol: Default::default(),
                port_name: None,
                more_ports: Vec::new(),
                session_affinity: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(svc2.ports[0].name.as_str(), "p80");
    assert_ne!(svc2.vip, Some(vip));
    let e = c
        .expose_replicaset(
            &ns(),
            &n("kube-demo"),
            &ExposeRequest {
                name: None,
                port: PortNum::new(8080).unwrap(),
                target_port: None,
                service_type: ServiceType::ClusterIP,
                node_port: None,
                prefer_local: false,
                headless: false,
                proxy_protocol: false,
                protocol: Default::default(),
                port_name: None,
                more_ports: Vec::new(),
                session_affinity: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let e = c
        .expose_replicaset(
            &ns(),
            &n("nope"),
            &ExposeRequest {
                name: None,
                port: PortNum::new(8080).unwrap(),
                target_port: None,
                service_type: ServiceType::ClusterIP,
                node_port: None,
                prefer_local: false,
                headless: false,
                proxy_protocol: false,
                protocol: Default::default(),
                port_name: None,
                more_ports: Vec::new(),
                session_affinity: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");

    // Endpoints of the service, as an agent registers them.
    assert!(
        c.endpoints_of(&ns(), &n("kube-demo"))
            .await
            .unwrap()
            .is_empty()
    );
    let ep = Endpoint {
        service: n("kube-demo"),
        namespace: ns(),
        node: n("n1"),
        id: n("abc123abc123"),
        pod: Some(n("kube-demo-aaaaa")),
        hostname: None,
        ip: "172.17.0.9".parse().unwrap(),
        ports: vec![EndpointPort {
            name: n("http"),
            port: PortNum::new(8080).unwrap(),
            protocol: Default::default(),
        }],
        ready: true,
        is_static: false,
        addr: None,
    };
    h.store
        .put(
            &keys::endpoint(&ns(), &ep.service, &ep.node, &ep.id),
            encode(&ep),
            None,
        )
        .await
        .unwrap();
    let eps = eventually("the endpoint", || async {
        let e = c.endpoints_of(&ns(), &n("kube-demo")).await.unwrap();
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(eps, vec![ep.clone()]);
    assert_eq!(c.list_endpoints(None).await.unwrap().len(), 1);
    let j = serde_json::to_value(&eps).unwrap();
    for f in [
        "service",
        "namespace",
        "node",
        "pod",
        "ip",
        "ports",
        "ready",
    ] {
        assert!(j[0].get(f).is_some(), "missing {f} in {j}");
    }
    assert_eq!(
        c.endpoints_of(&ns(), &n("nope"))
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );

    // An external service: static endpoints, no selector.
    let ext = Service {
        name: n("db"),
        namespace: ns(),
        vip: None,
        vip6: None,
        headless: false,
        external_name: None,
        service_type: ServiceType::ClusterIP,
        ports: vec![ServicePort {
            name: n("p5432"),
            port: PortNum::new(5432).unwrap(),
            target_port: PortNum::new(5432).unwrap(),
            node_port: None,
            protocol: Default::default(),
        }],
        selector: Default::default(),
        static_endpoints: vec![
            "198.51.100.10:5432".parse().unwrap(),
            "198.51.100.11:5432".parse().unwrap(),
        ],
        lb: Default::default(),
        proxy_protocol: false,
        prefer_local: false,
        drain_timeout_ms: None,
        health: None,
        sla: None,
        session_affinity: None,
        created_at: 0,
        accept_labelled: false,
    };
    let got = c.create_service(&ext).await.unwrap();
    assert!(got.vip.is_some() && got.selector.is_empty());
    assert_eq!(
        c.get_service(&ns(), &n("db"))
            .await
            .unwrap()
            .static_endpoints
            .len(),
        2
    );

    // Delete frees the allocations.
    c.delete_service(&ns(), &n("kube-demo")).await.unwrap();
    assert_eq!(
        c.get_service(&ns(), &n("kube-demo"))
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert!(h.store.get(&keys::vip_alloc(vip)).await.unwrap().is_none());
    assert!(
        h.store
            .get(&keys::node_port_alloc(PortNum::new(np).unwrap()))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        c.delete_service(&ns(), &n("kube-demo"))
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert_eq!(c.list_services(Some(&ns())).await.unwrap().len(), 2);
}

#[tokio::test]
async fn nodes_are_listed_with_their_pods() {
    let h = Harness::start().await;
    let c = &h.client;
    let node = Node {
        name: n("n1"),
        addr: "10.0.0.1".parse().unwrap(),
        mesh_port: 7371,
        dns_addr: None,
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        capacity: Default::default(),
        version: "0.1.0".into(),
        started_at: 5,
        refused: Vec::new(),
        runtime_down_since: None,
    };
    h.store
        .put(&keys::node(&node.name), encode(&node), None)
        .await
        .unwrap();
    let r = rs("web", 1);
    put_pod(&*h.store, &r, "web-aaaaa", None).await;
    let nodes = eventually("the node with its pod", || async {
        let l = c.list_nodes().await.unwrap();
        (l.len() == 1 && l[0].pods == 1).then_some(l)
    })
    .await;
    assert!(nodes[0].ready);
    assert_eq!(nodes[0].addr.to_string(), "10.0.0.1");
    let j = serde_json::to_value(&nodes).unwrap();
    for f in ["name", "addr", "ready", "labels"] {
        assert!(j[0].get(f).is_some(), "missing {f} in {j}");
    }
    assert_eq!(c.get_node(&n("n1")).await.unwrap().labels["zone"], "a");
    assert_eq!(c.get_node(&n("n2")).await.unwrap_err().status(), Some(404));
    let v = c.version().await.unwrap();
    assert_eq!(v.node.as_str(), "n1");
}

#[tokio::test]
async fn validation_errors_are_400_and_name_the_field() {
    let h = Harness::start().await;
    let path = "/api/v1/namespaces/default/replicasets";
    let cases: &[(&str, &str)] = &[
        (
            r#"{"name":"Web","template":{"image":"x"},"replicas":1}"#,
            "name",
        ),
        (
            r#"{"name":"web","template":{"image":"x"},"replicas":5000}"#,
            "replicas",
        ),
        (
            r#"{"name":"web","template":{"image":"x","ports":[{"name":"http","port":0}]},"replicas":1}"#,
            "template.ports[0].port",
        ),
        (
            r#"{"name":"web","template":{"image":"x"},"replicas":1,"bogus":1}"#,
            "unknown field `bogus`",
        ),
        // Nested in the model's types (which accept unknown fields in
        // stored records, for older agents): refused here, with the path.
        (
            r#"{"name":"web","template":{"image":"x","imagee":"y"},"replicas":1}"#,
            "unknown field `template.imagee`",
        ),
        (
            r#"{"name":"web","template":{"image":"x"},"replicas":1,"placement":{"max_per_nod":1}}"#,
            "`placement.max_per_nod`",
        ),
        (
            r#"{"name":"web","template":{"image":""},"replicas":1}"#,
            "template.image",
        ),
        (
            r#"{"name":"web","template":{"image":"x"},"replicas":"three"}"#,
            "replicas",
        ),
        (
            r#"{"name":"web","namespace":"other","template":{"image":"x"},"replicas":1}"#,
            "namespace",
        ),
        (r#"not json"#, "expected"),
    ];
    for (body, field) in cases {
        let (status, text) = raw(
            h.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{body} -> {text}");
        let e: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg:?} does not name {field}");
    }
    let (status, text) = raw(h.addr, "GET", "/api/v1/namespaces/Bad_NS/pods", &[], b"").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("namespace"), "{text}");
    let (status, text) = raw(h.addr, "GET", "/api/v1/deployments", &[], b"").await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("replicasets"), "{text}");
    // Scale and expose bodies too.
    let (_, _) = raw(
        h.addr,
        "POST",
        path,
        &[],
        br#"{"name":"web","template":{"image":"x"},"replicas":1}"#,
    )
    .await;
    let (status, text) = raw(
        h.addr,
        "PUT",
        "/api/v1/namespaces/default/replicasets/web/scale",
        &[],
        br#"{"replicas":1001}"#,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("replicas"), "{text}");
    let (status, text) = raw(
        h.addr,
        "POST",
        "/api/v1/namespaces/default/replicasets/web/expose",
        &[],
        br#"{"port":8080,"type":"LoadBalancer"}"#,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("type"), "{text}");
    let e = h
        .client
        .scale_replicaset(
            &ns(),
            &n("web"),
            &ScaleRequest {
                replicas: None,
                delta: Some(-5),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("delta"), "{e}");
}

#[tokio::test]
async fn token_is_required_off_loopback_and_checked_when_set() {
    // Off loopback without auth: refused before serving.
    let cfg = ApiConfig {
        listen: "0.0.0.0:7370".parse().unwrap(),
        insecure_no_auth: true,
        ..ApiConfig::default()
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("insecure_no_auth") && e.contains("loopback"),
        "{e}"
    );

    // A listener off loopback is refused too, whatever the config says;
    // serve returns before accepting anything.
    let wide = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let (_tx, snap) = watch::channel(Arc::new(pier_model::Snapshot::default()));
    let state = ApiState {
        store,
        snapshot: snap,
        alloc: AllocConfig {
            service_cidr: "10.213.0.0/16".parse().unwrap(),
            service_cidr6: None,
            node_port_min: 30000,
            node_port_max: 30010,
        },
        node: n("n1"),
        registry: Arc::new(Default::default()),
        readiness: vec![],
        problems: vec![],
        host_names: vec![],
        static_endpoint_allow: vec![],
        dns_domain: "pier.internal".into(),
    };
    let insecure = ApiConfig {
        insecure_no_auth: true,
        ..ApiConfig::default()
    };
    let e = serve(insecure, wide, state, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("token") && e.contains("not loopback"), "{e}");

    let h = Harness::start_with(|c| c.token = Some("s3cret-token".into())).await;
    assert_eq!(h.client.list_pods(None).await.unwrap().len(), 0);
    let anon = Client::new(&format!("http://{}", h.addr), None).unwrap();
    let e = anon.list_pods(None).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("PIER_TOKEN"), "{e}");
    let wrong = Client::new(&format!("http://{}", h.addr), Some("s3cret-tokem".into())).unwrap();
    assert_eq!(wrong.list_pods(None).await.unwrap_err().status(), Some(401));
    assert_eq!(wrong.metrics().await.unwrap_err().status(), Some(401));
    // Probes stay open.
    assert!(anon.healthz().await.unwrap());
    assert!(anon.readyz().await.unwrap().ready);
    let (status, _) = raw(
        h.addr,
        "GET",
        "/api/v1/pods",
        &[("Authorization", "Bearer s3cret-token")],
        b"",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let h = Harness::start_with(|c| c.max_body_bytes = 1024).await;
    let big = format!(
        r#"{{"name":"web","template":{{"image":"x","env":{{"A":"{}"}}}},"replicas":1}}"#,
        "a".repeat(4096)
    );
    let path = "/api/v1/namespaces/default/replicasets";
    let (status, text) = raw(h.addr, "POST", path, &[], big.as_bytes()).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1024"), "{text}");
    // Without a Content-Length the limit holds while reading.
    let (status, text) = raw(
        h.addr,
        "POST",
        path,
        &[("Transfer-Encoding", "chunked")],
        big.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{text}");
    // A small one passes.
    let (status, text) = raw(
        h.addr,
        "POST",
        path,
        &[],
        br#"{"name":"web","template":{"image":"x"},"replicas":1}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clients_scaling_at_once_lose_no_update() {
    let h = Harness::start().await;
    h.client.create_replicaset(&rs("web", 1)).await.unwrap();
    let a = Client::new(&format!("http://{}", h.addr), None).unwrap();
    let b = Client::new(&format!("http://{}", h.addr), None).unwrap();
    const EACH: usize = 25;
    let bump = |c: Client| async move {
        let mut ok = 0;
        for _ in 0..EACH {
            c.scale_replicaset(
                &ns(),
                &n("web"),
                &ScaleRequest {
                    replicas: None,
                    delta: Some(1),
                },
            )
            .await
            .unwrap();
            ok += 1;
        }
        ok
    };
    let (x, y) = tokio::join!(tokio::spawn(bump(a)), tokio::spawn(bump(b)));
    assert_eq!(x.unwrap() + y.unwrap(), 2 * EACH);
    let kv = h
        .store
        .get(&keys::replicaset(&ns(), &n("web")))
        .await
        .unwrap()
        .unwrap();
    let stored: ReplicaSet = pier_model::decode(&kv.key, &kv.value).unwrap();
    assert_eq!(stored.replicas.get() as usize, 1 + 2 * EACH);
    // Every scale was one write.
    assert_eq!(kv.version as usize, 1 + 2 * EACH);
}

async fn next<T: serde::de::DeserializeOwned>(
    w: &mut pier_api::Watch<T>,
) -> pier_model::api::WatchEvent<T> {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("a watch event within 5 s")
        .expect("the stream is open")
        .expect("the event parses")
}

#[tokio::test]
async fn watch_streams_changes() {
    let h = Harness::start().await;
    let r = rs("web", 1);
    h.client.create_replicaset(&r).await.unwrap();
    put_pod(&*h.store, &r, "web-aaaaa", None).await;
    eventually("the first pod", || async {
        (h.client.list_pods(None).await.unwrap().len() == 1).then_some(())
    })
    .await;
    let mut w = h
        .client
        .watch::<PodView>(Resource::Pods, Some(&ns()), None)
        .await
        .unwrap();
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.object.name.as_str()),
        (WatchEventType::Added, "web-aaaaa")
    );
    put_pod(&*h.store, &r, "web-bbbbb", None).await;
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.object.name.as_str()),
        (WatchEventType::Added, "web-bbbbb")
    );
    h.store
        .put(
            &keys::pod_status(&ns(), &n("web-bbbbb")),
            encode(&PodStatus {
                phase: PodPhase::Running,
                ready: true,
                ..Default::default()
            }),
            None,
        )
        .await
        .unwrap();
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.object.phase, e.object.ready),
        (WatchEventType::Modified, PodPhase::Running, true)
    );
    h.client.delete_pod(&ns(), &n("web-aaaaa")).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.object.name.as_str()),
        (WatchEventType::Deleted, "web-aaaaa")
    );

    // A watch of one name sees only it; the server's shutdown ends it.
    let mut one = h
        .client
        .watch::<serde_json::Value>(Resource::ReplicaSets, Some(&ns()), Some(&n("web")))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), one.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.object["name"], "web");
    h.cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), one.next())
        .await
        .unwrap();
    assert!(end.is_none() || end.unwrap().is_err());
}

#[tokio::test]
async fn probes_metrics_and_problems() {
    let mut h = Harness::start().await;
    let c = &h.client;
    assert!(c.healthz().await.unwrap());
    assert!(c.readyz().await.unwrap().ready);
    h.ready_tx.send(false).unwrap();
    let r = c.readyz().await.unwrap();
    assert!(
        !r.ready && !r.checks["test"] && r.checks["snapshot"],
        "{r:?}"
    );
    let (status, _) = raw(h.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 503);
    let m = c.metrics().await.unwrap();
    assert!(m.contains("pier_test_things_total 1"), "{m}");
    h.problems_tx
        .send(Arc::new(BTreeMap::from([(
            (ns(), n("web")),
            "image nope:1 does not exist".to_owned(),
        )])))
        .unwrap();
    let p = c.problems().await.unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].message, "image nope:1 does not exist");
    // Graceful stop: serve returns once cancelled.
    h.cancel.cancel();
    let server = h.server.take().unwrap();
    tokio::time::timeout(Duration::from_secs(6), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn slow_requests_are_answered_504() {
    // A snapshot that never syncs: reads wait for it, and the request
    // timeout answers first.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let (_snap_tx, snap_rx) = watch::channel(Arc::new(pier_model::Snapshot::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ApiConfig {
        listen: addr,
        request_timeout_ms: 200,
        insecure_no_auth: true,
        ..ApiConfig::default()
    };
    let state = ApiState {
        store,
        snapshot: snap_rx,
        alloc: AllocConfig {
            service_cidr: "10.213.0.0/16".parse().unwrap(),
            service_cidr6: None,
            node_port_min: 30000,
            node_port_max: 30010,
        },
        node: n("n1"),
        registry: Arc::new(Default::default()),
        readiness: vec![],
        problems: vec![],
        host_names: vec![],
        static_endpoint_allow: vec![],
        dns_domain: "pier.internal".into(),
    };
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    tokio::spawn(serve(cfg, listener, state, cancel.child_token()));
    let c = Client::new(&format!("http://{addr}"), None).unwrap();
    let start = std::time::Instant::now();
    let e = c.list_pods(None).await.unwrap_err();
    assert_eq!(e.status(), Some(504), "{e}");
    assert!(e.to_string().contains("request_timeout_ms"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // Not ready either: the snapshot has not synced.
    let r = c.readyz().await.unwrap();
    assert!(!r.ready && !r.checks["snapshot"], "{r:?}");
}

#[tokio::test]
async fn writes_with_the_store_down_are_503() {
    let mut etcd = pier_store::testing::EtcdServer::start().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        pier_store::EtcdStore::connect(&[etcd.endpoint.clone()])
            .await
            .unwrap(),
    );
    let cancel = CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let reflector = pier_store::reflector::Reflector::spawn(store.clone(), cancel.child_token());
    reflector.synced().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = ApiState {
        store,
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
        problems: vec![],
        host_names: vec![],
        static_endpoint_allow: vec![],
        dns_domain: "pier.internal".into(),
    };
    let cfg = ApiConfig {
        listen: addr,
        insecure_no_auth: true,
        ..ApiConfig::default()
    };
    tokio::spawn(serve(cfg, listener, state, cancel.child_token()));
    let c = Client::new(&format!("http://{addr}"), None).unwrap();
    c.create_replicaset(&rs("web", 1)).await.unwrap();
    etcd.kill();
    let e = c.create_replicaset(&rs("web2", 1)).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains("store unavailable"), "{e}");
    // Reads still answer from the last snapshot.
    assert_eq!(c.list_replicasets(None).await.unwrap().len(), 1);
}

// ---- attacks (issue 12: A1, A2, P1, P2) ----------------------------------
//
// Each `attack_*` test tries one attack against a real server and shows the
// refusal: the status, the message naming what was wrong, and that nothing
// was written.

fn service(name: &str) -> Service {
    Service {
        name: n(name),
        namespace: ns(),
        vip: None,
        vip6: None,
        headless: false,
        external_name: None,
        service_type: ServiceType::ClusterIP,
        ports: vec![ServicePort {
            name: n("http"),
            port: PortNum::new(80).unwrap(),
            target_port: PortNum::new(8080).unwrap(),
            node_port: None,
            protocol: Default::default(),
        }],
        selector: Default::default(),
        static_endpoints: vec![],
        lb: Default::default(),
        proxy_protocol: false,
        prefer_local: false,
        drain_timeout_ms: None,
        health: None,
        sla: None,
        session_affinity: None,
        created_at: 0,
        accept_labelled: false,
    }
}

async fn nothing_stored(store: &dyn Store) {
    let l = store.list(keys::prefix::SERVICES).await.unwrap();
    assert!(l.kvs.is_empty(), "{:?}", l.kvs);
    let l = store.list(keys::prefix::REPLICASETS).await.unwrap();
    assert!(l.kvs.is_empty(), "{:?}", l.kvs);
}

/// A1: a server started with the default config (no token, no opt-out)
/// refuses to serve at all, rather than serve an open API.
#[tokio::test]
async fn attack_default_config_without_a_token_serves_nothing() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let (_tx, snap) = watch::channel(Arc::new(pier_model::Snapshot::default()));
    let state = ApiState {
        store,
        snapshot: snap,
        alloc: AllocConfig {
            service_cidr: "10.213.0.0/16".parse().unwrap(),
            service_cidr6: None,
            node_port_min: 30000,
            node_port_max: 30010,
        },
        node: n("n1"),
        registry: Arc::new(Default::default()),
        readiness: vec![],
        problems: vec![],
        host_names: vec![],
        static_endpoint_allow: vec![],
        dns_domain: "pier.internal".into(),
    };
    let cfg = ApiConfig {
        listen: addr,
        ..ApiConfig::default()
    };
    let e = serve(cfg, listener, state, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no token") && e.contains("--insecure-no-auth"),
        "{e}"
    );
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// The development opt-out is visible: /readyz says so.
#[tokio::test]
async fn insecure_no_auth_is_shown_by_readyz() {
    let h = Harness::start().await;
    let (status, body) = raw(h.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["insecure_no_auth"], true, "{body}");
    let t = Harness::start_with(|c| c.token = Some("t0ken".into())).await;
    let r = t.client.readyz().await.unwrap();
    assert!(!r.insecure_no_auth);
}

/// A1, DNS rebinding: a page on evil.example whose name now resolves to
/// 127.0.0.1 makes the browser send `Host: evil.example`. Refused 421, even
/// with no token to steal (the development mode) and even for reads.
#[tokio::test]
async fn attack_dns_rebinding_host_is_421() {
    let h = Harness::start().await;
    let body = serde_json::to_vec(&rs("web", 1)).unwrap();
    for host in [
        "evil.example:7370",
        "evil.example",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
        "n1.evil.example",
    ] {
        for (method, path, b) in [
            ("GET", "/api/v1/pods", &b""[..]),
            ("POST", "/api/v1/namespaces/default/replicasets", &body[..]),
        ] {
            let (status, text) = raw(h.addr, method, path, &[("Host", host)], b).await;
            assert_eq!(status, 421, "{method} Host {host}: {text}");
            assert!(
                text.contains("Host header")
                    && text.contains(host)
                    && text.contains("allowed_hosts"),
                "{text}"
            );
        }
    }
    nothing_stored(&*h.store).await;
    // The names the API does answer to.
    for host in [
        h.addr.to_string(),
        format!("localhost:{}", h.addr.port()),
        format!("[::1]:{}", h.addr.port()),
        format!("n1:{}", h.addr.port()),
    ] {
        let (status, text) = raw(h.addr, "GET", "/api/v1/pods", &[("Host", &host)], b"").await;
        assert_eq!(status, 200, "Host {host}: {text}");
    }
    // Probes answer whatever the Host.
    let (status, _) = raw(h.addr, "GET", "/healthz", &[("Host", "evil.example")], b"").await;
    assert_eq!(status, 200);
}

/// `[api] allowed_hosts` adds names.
#[tokio::test]
async fn allowed_hosts_are_accepted() {
    let h = Harness::start_with(|c| c.allowed_hosts = vec!["pier.example.org".into()]).await;
    let (status, text) = raw(
        h.addr,
        "GET",
        "/api/v1/pods",
        &[("Host", "pier.example.org:7370")],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{text}");
}

/// A1, CSRF: a page on another site posts to the API from the user's
/// browser. The Origin header gives it away: refused 403, nothing written,
/// and reads too; the API's own origin is fine.
#[tokio::test]
async fn attack_cross_site_origin_is_403() {
    let h = Harness::start().await;
    let body = serde_json::to_vec(&rs("web", 1)).unwrap();
    let path = "/api/v1/namespaces/default/replicasets";
    for origin in [
        "http://evil.example",
        "https://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
        "https://127.0.0.1:7370",
    ] {
        let (status, text) = raw(h.addr, "POST", path, &[("Origin", origin)], &body).await;
        assert_eq!(status, 403, "Origin {origin}: {text}");
        assert!(
            text.contains("Origin header") && text.contains("cross-site"),
            "{text}"
        );
        let (status, _) = raw(
            h.addr,
            "DELETE",
            "/api/v1/namespaces/default/replicasets/web",
            &[("Origin", origin)],
            b"",
        )
        .await;
        assert_eq!(status, 403, "DELETE with Origin {origin}");
        let (status, _) = raw(h.addr, "GET", "/api/v1/pods", &[("Origin", origin)], b"").await;
        assert_eq!(status, 403, "GET with Origin {origin}");
    }
    nothing_stored(&*h.store).await;
    let own = format!("http://{}", h.addr);
    let (status, text) = raw(h.addr, "POST", path, &[("Origin", &own)], &body).await;
    assert_eq!(status, 201, "{text}");
}

/// A1, CSRF without preflight: an HTML form can post `text/plain`,
/// `application/x-www-form-urlencoded` or `multipart/form-data` (with a
/// JSON-looking body) to any site with no preflight. Writes need
/// `Content-Type: application/json`: refused 415, nothing written.
#[tokio::test]
async fn attack_form_posts_are_415() {
    let h = Harness::start().await;
    let body = serde_json::to_vec(&rs("web", 1)).unwrap();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ] {
        for (method, path) in [
            ("POST", "/api/v1/namespaces/default/replicasets"),
            ("PUT", "/api/v1/namespaces/default/replicasets/web/scale"),
        ] {
            let (status, text) = raw(h.addr, method, path, &[("Content-Type", ct)], &body).await;
            assert_eq!(status, 415, "{method} {ct:?}: {text}");
            assert!(
                text.contains("Content-Type") && text.contains("application/json"),
                "{text}"
            );
        }
    }
    nothing_stored(&*h.store).await;
}

/// No CORS: a preflight gets no `Access-Control-Allow-*`, so a browser
/// never lets another site's script send a JSON write or read an answer.
#[tokio::test]
async fn attack_cors_preflight_gets_no_allow_headers() {
    let h = Harness::start().await;
    for headers in [
        vec![
            ("Origin", "http://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        vec![("Access-Control-Request-Method", "POST")],
    ] {
        let text = raw_text(
            h.addr,
            "OPTIONS",
            "/api/v1/namespaces/default/replicasets",
            &headers,
            b"",
        )
        .await;
        let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(status == 403 || status == 405, "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("access-control-"),
            "{text}"
        );
    }
    let text = raw_text(h.addr, "GET", "/api/v1/pods", &[], b"").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("access-control-"),
        "{text}"
    );
}

/// A1 with a token: no token or a wrong one is 401, whatever the Host and
/// content are right.
#[tokio::test]
async fn attack_writes_without_the_token_are_401() {
    let h = Harness::start_with(|c| c.token = Some("the-real-token".into())).await;
    let body = serde_json::to_vec(&rs("web", 1)).unwrap();
    let path = "/api/v1/namespaces/default/replicasets";
    for auth in [
        "",
        "Bearer guess",
        "Bearer the-real-tokeN",
        "Basic dGhlLXJlYWwtdG9rZW4=",
    ] {
        let (status, text) = raw(h.addr, "POST", path, &[("Authorization", auth)], &body).await;
        assert_eq!(status, 401, "{auth:?}: {text}");
    }
    nothing_stored(&*h.store).await;
}

/// The JSON lines of a chunked body read so far, up to the last whole
/// line (the chunk framing removed; a partial last chunk is left out).
fn watch_lines(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    let Some((_, mut rest)) = text.split_once("\r\n\r\n") else {
        return Vec::new();
    };
    let mut data = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        data.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    let whole = data.rfind('\n').map_or("", |i| &data[..i + 1]);
    whole.split_terminator('\n').map(str::to_owned).collect()
}

/// A watch sends the objects as they are, then one blank line, then the
/// changes: a client (the dashboard) can tell what was there from what
/// came after without guessing from timing.
#[tokio::test]
async fn watch_marks_the_end_of_the_current_state() {
    let h = Harness::start().await;
    let r = rs("web", 2);
    h.client.create_replicaset(&r).await.unwrap();
    put_pod(&*h.store, &r, "web-aaaaa", None).await;
    put_pod(&*h.store, &r, "web-bbbbb", None).await;
    eventually("the two pods", || async {
        (h.client.list_pods(None).await.unwrap().len() == 2).then_some(())
    })
    .await;
    let (status, mut s, head) = open_watch(h.addr, "127.0.0.1").await;
    assert_eq!(status, 200, "{head}");
    let mut raw = head.into_bytes();
    // Reads until the body has `n` whole lines (bounded: 5 s).
    async fn read_lines(s: &mut tokio::net::TcpStream, raw: &mut Vec<u8>, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut chunk = [0u8; 4096];
        loop {
            let lines = watch_lines(raw);
            if lines.len() >= n {
                return lines;
            }
            let got = tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{n} lines within 5 s; got {lines:?}"))
                .unwrap();
            assert!(got > 0, "the watch closed; got {lines:?}");
            raw.extend_from_slice(&chunk[..got]);
        }
    }
    let lines = read_lines(&mut s, &mut raw, 3).await;
    let names = |ls: &[String]| -> Vec<(String, String)> {
        ls.iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["type"].as_str().unwrap().to_owned(),
                    v["object"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        names(&lines[..2]),
        [
            ("ADDED".into(), "web-aaaaa".into()),
            ("ADDED".into(), "web-bbbbb".into())
        ]
    );
    assert_eq!(
        lines[2], "",
        "the blank line after the current objects: {lines:?}"
    );
    // What comes after is news, and no second marker follows it.
    put_pod(&*h.store, &r, "web-ccccc", None).await;
    let lines = read_lines(&mut s, &mut raw, 4).await;
    assert_eq!(names(&lines[3..]), [("ADDED".into(), "web-ccccc".into())]);
}

/// Opens a watch from `src` and returns the stream once its head has
/// arrived, with the status.
async fn open_watch(addr: SocketAddr, src: &str) -> (u16, tokio::net::TcpStream, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET /api/v1/pods?watch=true HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("the watch's head within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, s, text)
}

/// P2: one client opening watches without end is capped per client
/// address (429), and all clients together are capped too; a closed watch
/// gives its place back.
#[tokio::test]
async fn attack_unbounded_watches_are_429() {
    let h = Harness::start_with(|c| {
        c.max_watches = 3;
        c.max_watches_per_client = 2;
    })
    .await;
    let (s1, w1, _) = open_watch(h.addr, "127.0.0.1").await;
    let (s2, _w2, _) = open_watch(h.addr, "127.0.0.1").await;
    assert_eq!((s1, s2), (200, 200));
    let (s3, mut w3, text) = open_watch(h.addr, "127.0.0.1").await;
    assert_eq!(s3, 429, "{text}");
    let mut rest = text;
    let _ = tokio::time::timeout(Duration::from_secs(2), w3.read_to_string(&mut rest)).await;
    assert!(
        rest.contains("max_watches_per_client 2") && rest.contains("127.0.0.1"),
        "{rest}"
    );
    // Another client address gets one, then the global cap is reached.
    let (s4, _w4, _) = open_watch(h.addr, "127.0.0.2").await;
    assert_eq!(s4, 200);
    let (s5, mut w5, text) = open_watch(h.addr, "127.0.0.3").await;
    assert_eq!(s5, 429, "{text}");
    let mut rest = text;
    let _ = tokio::time::timeout(Duration::from_secs(2), w5.read_to_string(&mut rest)).await;
    assert!(rest.contains("max_watches 3"), "{rest}");
    // Closing one gives its place back (noticed when the server next writes
    // to it or reads EOF; poll, bounded).
    drop(w1);
    eventually("a watch slot to come back", || async {
        let (s, w, _) = open_watch(h.addr, "127.0.0.1").await;
        (s == 200).then_some(w)
    })
    .await;
}

/// P1: through the API, an explicit node port outside the range (:22,
/// :80 on every host) and a VIP outside the service CIDR are 400s naming
/// the field; nothing is stored.
#[tokio::test]
async fn attack_node_port_and_vip_outside_their_ranges_are_400() {
    let h = Harness::start().await;
    for port in [22u16, 80, 443, 29999, 30011] {
        let mut s = service("grab");
        s.service_type = ServiceType::NodePort;
        s.ports[0].node_port = Some(PortNum::new(port).unwrap());
        let e = h.client.create_service(&s).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("ports[0].node_port") && m.contains(&format!("{port} is outside")),
            "{m}"
        );
    }
    for vip in ["10.214.0.5", "127.0.0.1", "192.0.2.1", "10.213.0.10"] {
        let mut s = service("grab");
        s.vip = Some(vip.parse().unwrap());
        let e = h.client.create_service(&s).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.to_string().starts_with("vip: "), "{e}");
    }
    nothing_stored(&*h.store).await;
}

/// A2: static endpoints that every host's proxy would connect to on its
/// own side (loopback, link-local and the cloud metadata service,
/// unspecified, multicast, broadcast, a VIP, the host's own addresses) are
/// 400s naming the field; nothing is stored.
#[tokio::test]
async fn attack_static_endpoints_into_the_host_are_400() {
    let h = Harness::start().await;
    let own = pier_api::host_addrs()
        .into_iter()
        // One refused only for being the host's: not loopback, not
        // link-local, not in the service CIDR (a pier0 may hold VIPs).
        .find(|ip| {
            !ip.is_loopback()
                && !matches!(ip, std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
                && !"10.213.0.0/16"
                    .parse::<pier_model::Cidr>()
                    .unwrap()
                    .contains(*ip)
        })
        .expect("this host has an address outside loopback, link-local and 10.213.0.0/16");
    let own = match own {
        std::net::IpAddr::V4(a) => format!("{a}:7370"),
        std::net::IpAddr::V6(a) => format!("[{a}]:7370"),
    };
    let attacks = [
        ("127.0.0.1:7370", "loopback"),
        ("127.0.0.53:53", "loopback"),
        ("[::1]:2379", "loopback"),
        ("[::ffff:127.0.0.1]:2379", "loopback"),
        ("169.254.169.254:80", "link-local"),
        ("[fe80::1]:80", "link-local"),
        ("0.0.0.0:22", "unspecified"),
        ("[::]:22", "unspecified"),
        ("224.0.0.1:80", "multicast"),
        ("255.255.255.255:80", "broadcast"),
        ("10.213.0.10:53", "service CIDR"),
        (own.as_str(), "this host's own"),
    ];
    for (ep, why) in attacks {
        let mut s = service("ext");
        s.static_endpoints = vec!["198.51.100.7:80".parse().unwrap(), ep.parse().unwrap()];
        let e = h.client.create_service(&s).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{ep}: {e}");
        let m = e.to_string();
        assert!(
            m.starts_with("static_endpoints[1].ip: ")
                && m.contains(why)
                && m.contains("static_endpoint_allow"),
            "{ep}: {m}"
        );
    }
    // A name that is not a full host name (the agents look it up again).
    let mut s = service("ext");
    let mut ep: pier_model::StaticEndpoint = "198.51.100.7:80".parse().unwrap();
    ep.name = Some("db".into());
    s.static_endpoints = vec![ep];
    let e = h.client.create_service(&s).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        e.to_string()
            .starts_with("static_endpoints[0].name: \"db\" needs a domain"),
        "{e}"
    );
    nothing_stored(&*h.store).await;
    // An ordinary address is fine, and so is one with its name.
    let mut s = service("ext");
    let mut named: pier_model::StaticEndpoint = "198.51.100.8:80".parse().unwrap();
    named.name = Some("db.example.com".into());
    s.static_endpoints = vec!["198.51.100.7:80".parse().unwrap(), named];
    h.client.create_service(&s).await.unwrap();
}

/// The allowlist lets a refused address through, and only it.
#[tokio::test]
async fn static_endpoint_allowlist_lets_them_through() {
    let h = Harness::start_full(|_| {}, vec!["127.0.0.0/8".parse().unwrap()]).await;
    let mut s = service("local-db");
    s.static_endpoints = vec!["127.0.0.1:5432".parse().unwrap()];
    h.client.create_service(&s).await.unwrap();
    let mut s = service("meta");
    s.static_endpoints = vec!["169.254.169.254:80".parse().unwrap()];
    let e = h.client.create_service(&s).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
}

/// `pier autoscale`'s endpoint: bad SLAs are 400 naming the field; a set
/// autoscaled refuses a manual scale with what to do instead; the view
/// sums every node's stats of the services that select the set (one
/// service's p99 over both nodes' traffic); off again, scale works.
#[tokio::test]
async fn autoscale_sets_bounds_refuses_manual_scale_and_shows_measurements() {
    use pier_model::Sla;
    use pier_model::api::AutoscaleRequest;
    use pier_model::sketch::{BUCKETS, Sketch, bucket};
    let h = Harness::start().await;
    let c = &h.client;
    c.create_replicaset(&rs("web", 1)).await.unwrap();
    let path = "/api/v1/namespaces/default/replicasets/web/autoscale";
    for (body, want) in [
        (r#"{"min":1,"max":4,"sla":{}}"#, "sla: no target"),
        (
            r#"{"min":5,"max":4,"sla":{"max_active_per_pod":5}}"#,
            "min: 5 is above max 4",
        ),
        (
            r#"{"min":1,"max":4,"sla":{"max_active_per_pod":0}}"#,
            "sla.max_active_per_pod",
        ),
        (
            r#"{"min":1,"max":4,"sla":{"max_active_per_pod":5,"scale_down_window_ms":99999999}}"#,
            "sla.scale_down_window_ms",
        ),
        (
            r#"{"min":1,"max":4,"sla":{"max_actve_per_pod":5}}"#,
            "max_actve_per_pod",
        ),
    ] {
        let (status, text) = raw(h.addr, "PUT", path, &[], body.as_bytes()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
    }
    let req = AutoscaleRequest {
        min: Replicas::new(1).unwrap(),
        max: Replicas::new(4).unwrap(),
        sla: Sla {
            max_active_per_pod: Some(5),
            p99_first_byte_ms: Some(50),
            ..Default::default()
        },
    };
    let v = c
        .autoscale_replicaset(&ns(), &n("web"), Some(&req))
        .await
        .unwrap();
    assert_eq!(v.spec.min_replicas.map(|r| r.get()), Some(1));
    assert_eq!(v.spec.sla.as_ref().unwrap().max_active_per_pod, Some(5));
    let e = c
        .scale_replicaset(
            &ns(),
            &n("web"),
            &ScaleRequest {
                replicas: Some(Replicas::new(3).unwrap()),
                delta: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(
        e.to_string().contains("autoscaled between 1 and 4")
            && e.to_string().contains("pier autoscale rs web --off"),
        "{e}"
    );
    // No service yet: nothing measured.
    let a = c.get_autoscale(&ns(), &n("web")).await.unwrap();
    assert!(a.services.is_empty() && a.measured.nodes == 0, "{a:?}");
    // Exposed, with two nodes' stats: 100 fast first bytes on one, 100
    // slow ones on the other; the p99 is the slow node's.
    c.expose_replicaset(
        &ns(),
        &n("web"),
        &ExposeRequest {
            name: None,
            port: PortNum::new(80).unwrap(),
            target_port: None,
            service_type: ServiceType::ClusterIP,
            node_port: None,
            prefer_local: false,
            headless: false,
            proxy_protocol: false,
            protocol: Default::default(),
            port_name: None,
            more_ports: Vec::new(),
            session_affinity: None,
        },
    )
    .await
    .unwrap();
    let fb = |us: u64| {
        let mut d = vec![0u64; BUCKETS];
        d[bucket(us)] = 100;
        Sketch::from_counts(&d)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (node, active, us) in [("h1", 10, 1_000), ("h2", 6, 80_000)] {
        let st = pier_model::Stats {
            active,
            new_conns: 20,
            window_ms: 1000,
            first_byte: fb(us),
            at: now,
            ..Default::default()
        };
        h.store
            .put(&keys::stats(&ns(), &n("web"), &n(node)), encode(&st), None)
            .await
            .unwrap();
    }
    let a = c.get_autoscale(&ns(), &n("web")).await.unwrap();
    assert_eq!(a.services, vec![n("web")]);
    assert_eq!((a.measured.nodes, a.measured.active), (2, 16), "{a:?}");
    assert_eq!(a.measured.conn_rate, 40.0);
    let p99 = a.measured.p99_first_byte_us.unwrap();
    assert!((75_000..=85_000).contains(&p99), "{p99}");
    // Off: the count is the user's again.
    let v = c
        .autoscale_replicaset(&ns(), &n("web"), None)
        .await
        .unwrap();
    assert!(v.spec.sla.is_none() && v.spec.min_replicas.is_none());
    c.scale_replicaset(
        &ns(),
        &n("web"),
        &ScaleRequest {
            replicas: Some(Replicas::new(3).unwrap()),
            delta: None,
        },
    )
    .await
    .unwrap();
}

/// The dashboard's login: a code made with the token, spent once for an
/// HttpOnly, SameSite=Strict cookie and a redirect; the cookie reads the
/// API and the pages and does nothing else.
#[tokio::test]
async fn attack_dashboard_sessions_read_only_and_codes_once() {
    let h = Harness::start_with(|c| c.token = Some("the-real-token".into())).await;
    let bearer = [("Authorization", "Bearer the-real-token")];
    // No code without the token.
    let (status, _) = raw(h.addr, "POST", "/api/v1/dashboard/logins", &[], b"{}").await;
    assert_eq!(status, 401);
    let login = h.client.dashboard_login().await.unwrap();
    assert!(login.path.starts_with("/ui/login?code="), "{login:?}");
    // A page without a session says what to do; so does a wrong code.
    let (status, body) = raw(h.addr, "GET", "/ui/", &[], b"").await;
    assert!(status == 401 && body.contains("pier dashboard"), "{body}");
    let (status, _) = raw(h.addr, "GET", "/ui/login?code=00ff", &[], b"").await;
    assert_eq!(status, 401);
    // A rebinding page cannot spend a code.
    let (status, _) = raw(h.addr, "GET", &login.path, &[("Host", "evil.example")], b"").await;
    assert_eq!(status, 421);
    // The code: a cookie and a redirect, once.
    let head = raw_text(h.addr, "GET", &login.path, &[], b"").await;
    assert!(head.starts_with("HTTP/1.1 303"), "{head}");
    assert!(head.contains("location: /ui/\r\n"), "{head}");
    let set = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let (status, _) = raw(h.addr, "GET", &login.path, &[], b"").await;
    assert_eq!(status, 401, "a code works once");
    let c = [("Cookie", cookie.as_str())];
    // Reads: the page, its assets, the API's lists and watches.
    for path in [
        "/ui/",
        "/ui/app.js",
        "/ui/app.css",
        "/api/v1/nodes",
        "/api/v1/version",
        "/api/v1/signals",
    ] {
        let (status, body) = raw(h.addr, "GET", path, &c, b"").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let page = raw_text(h.addr, "GET", "/ui/", &c, b"").await;
    assert!(
        page.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{page}"
    );
    // Nothing else: no writes, no metrics, no new codes.
    let body = serde_json::to_vec(&rs("web", 1)).unwrap();
    let (status, _) = raw(
        h.addr,
        "POST",
        "/api/v1/namespaces/default/replicasets",
        &c,
        &body,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = raw(h.addr, "POST", "/api/v1/dashboard/logins", &c, b"{}").await;
    assert_eq!(status, 401);
    let (status, _) = raw(
        h.addr,
        "DELETE",
        "/api/v1/namespaces/default/pods/x",
        &c,
        b"",
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = raw(h.addr, "GET", "/metrics", &c, b"").await;
    assert_eq!(status, 401);
    nothing_stored(&*h.store).await;
    // A forged or ended session is nothing.
    assert!(cookie.starts_with(&format!("pier_session_{}=", h.addr.port())));
    let forged = format!("pier_session_{}=00ff", h.addr.port());
    let (status, _) = raw(
        h.addr,
        "GET",
        "/api/v1/nodes",
        &[("Cookie", forged.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = raw(h.addr, "GET", "/ui/logout", &c, b"").await;
    assert_eq!(status, 200);
    let (status, _) = raw(h.addr, "GET", "/api/v1/nodes", &c, b"").await;
    assert_eq!(status, 401, "the session ended");
    // The token still works as before.
    let (status, _) = raw(h.addr, "GET", "/api/v1/nodes", &bearer, b"").await;
    assert_eq!(status, 200);
}
