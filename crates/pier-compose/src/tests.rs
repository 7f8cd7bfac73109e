use super::*;
use crate::deploy::update_config;
use std::collections::BTreeMap;

use pier_model::app::ComponentSpec;
use pier_model::{
    FailureAction, HealthKind, LbPolicy, Protocol, Ratio, ServiceType, UpdateConfig, UpdateOrder,
    labels,
};
use serde_yaml_ng::Value;

fn opts() -> Options {
    let mut env = BTreeMap::new();
    env.insert("TAG".into(), "v2".into());
    env.insert("FROM_ENV".into(), "yes".into());
    Options {
        project: None,
        dir_name: Some("My_Dir".into()),
        env,
    }
}

fn files(name: &str) -> Result<String, String> {
    match name {
        "web.env" => Ok("# web settings\nMODE=prod\nLEVEL=info\n".into()),
        _ => Err("No such file or directory".into()),
    }
}

fn load_str(text: &str) -> Result<Loaded, Failed> {
    load_opts(text, opts())
}

fn load_opts(text: &str, o: Options) -> Result<Loaded, Failed> {
    load(
        &[Source {
            name: "compose.yaml".into(),
            text: text.into(),
        }],
        &o,
        &files,
    )
}

fn errors(text: &str) -> Vec<String> {
    load_str(text)
        .expect_err("the file should be refused")
        .errors
        .iter()
        .map(|d| d.to_string())
        .collect()
}

fn comp<'a>(l: &'a Loaded, name: &str) -> &'a ComponentSpec {
    l.spec
        .components
        .iter()
        .find(|c| c.name.as_str() == name)
        .expect("component")
}

const FULL: &str = r#"
name: shop
services:
  web:
    image: "shop/web:${TAG}"
    command: python3 -m http.server 8080
    entrypoint: ["/usr/bin/env"]
    environment:
      - DB=db
      - FROM_ENV
      - MISSING
    env_file: web.env
    labels:
      team: front
    ports:
      - "30080:8080"
      - target: 9000
    expose: ["9100"]
    healthcheck:
      test: ["CMD-SHELL", "wget -qO- http://localhost:8080/ || exit 1"]
      interval: 1m30s
      timeout: 10s
      retries: 3
      start_period: 500ms
    deploy:
      replicas: 3
      labels: {tier: web}
      resources:
        limits: {cpus: "0.5", memory: 512M}
      placement:
        constraints: ["node.labels.zone==a"]
        max_replicas_per_node: 2
    x-pier:
      prefer_local: true
      lb: round_robin
      sla: {min_replicas: 1, max_replicas: 4, max_active_per_pod: 50}
  db:
    image: postgres:15
    environment:
      POSTGRES_PASSWORD: secret
      LEVEL: 3
    expose: [5432]
    healthcheck:
      test: pg_isready
  worker:
    image: busybox
    command: ["sh", "-c", "sleep 1000"]
    restart: always
x-shared: &shared
  whatever: 1
"#;

#[test]
fn full_file_maps_onto_replica_sets_and_services() {
    let l = load_str(FULL).unwrap();
    assert_eq!(l.spec.namespace.as_str(), "shop");
    assert_eq!(l.spec.name.as_str(), "shop");
    assert_eq!(l.spec.components.len(), 3);

    let web = comp(&l, "web");
    let t = &web.replicaset.template;
    assert_eq!(t.image, "shop/web:v2");
    assert_eq!(t.cmd, ["python3", "-m", "http.server", "8080"]);
    assert_eq!(t.entrypoint, ["/usr/bin/env"]);
    assert_eq!(t.env["DB"], "db");
    assert_eq!(t.env["FROM_ENV"], "yes");
    assert!(!t.env.contains_key("MISSING"));
    assert_eq!(t.env["MODE"], "prod");
    assert_eq!(t.labels["team"], "front");
    assert_eq!(web.labels["tier"], "web");
    assert_eq!(web.replicaset.replicas.get(), 3);
    assert_eq!(t.resources.cpu_millis, 500);
    assert_eq!(t.resources.memory_mb, 512);
    assert_eq!(
        web.replicaset.placement.constraints[0].to_string(),
        "node.labels.zone==a"
    );
    assert_eq!(web.replicaset.placement.max_per_node, Some(2));
    let ch = t.container_health.as_ref().unwrap();
    assert_eq!(ch.test[0], "CMD-SHELL");
    assert_eq!(ch.interval_ms, 90_000);
    assert_eq!(ch.timeout_ms, 10_000);
    assert_eq!(ch.retries, 3);
    assert_eq!(ch.start_period_ms, 500);
    assert_eq!(t.health.as_ref().unwrap().kind, HealthKind::Docker);

    let svc = web.service.as_ref().unwrap();
    assert_eq!(svc.service_type, ServiceType::NodePort);
    let ports: Vec<(u16, Option<u16>)> = svc
        .ports
        .iter()
        .map(|p| (p.port.get(), p.node_port.map(|n| n.get())))
        .collect();
    assert_eq!(ports, [(8080, Some(30080)), (9000, None), (9100, None)]);
    assert_eq!(svc.selector[labels::REPLICASET], "web");
    assert!(svc.prefer_local);
    assert_eq!(svc.lb, LbPolicy::RoundRobin);
    assert_eq!(
        web.replicaset.sla.as_ref().unwrap().max_active_per_pod,
        Some(50)
    );
    assert_eq!(web.replicaset.max_replicas.map(|r| r.get()), Some(4));
    assert_eq!(t.ports.len(), 3);

    let db = comp(&l, "db");
    assert_eq!(db.replicaset.template.env["LEVEL"], "3");
    assert_eq!(
        db.replicaset
            .template
            .container_health
            .as_ref()
            .unwrap()
            .test,
        ["CMD-SHELL", "pg_isready"]
    );
    let dbs = db.service.as_ref().unwrap();
    assert_eq!(dbs.service_type, ServiceType::ClusterIP);
    assert_eq!(dbs.ports[0].port.get(), 5432);

    let worker = comp(&l, "worker");
    assert!(worker.service.is_none());
    assert!(
        l.warnings
            .iter()
            .any(|w| w.path == "services.worker" && w.message.contains("expose")),
        "{:?}",
        l.warnings
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.path == "services.web.deploy.resources.limits"),
        "{:?}",
        l.warnings
    );
}

#[test]
fn project_name_order() {
    let f = "services: {a: {image: x}}";
    // The directory "My_Dir" normalises to my_dir, which is no RFC 1123
    // label: the error says to pass -p.
    let e = load_str(f).unwrap_err();
    assert!(
        e.errors[0].to_string().contains("-p NAME"),
        "{}",
        e.errors[0]
    );
    let mut o = opts();
    o.dir_name = Some("Shop.Front".into());
    assert_eq!(
        load_opts(f, o).unwrap().spec.namespace.as_str(),
        "shopfront"
    );
    let named = "name: fromfile\nservices: {a: {image: x}}";
    assert_eq!(load_str(named).unwrap().spec.namespace.as_str(), "fromfile");
    let mut o = opts();
    o.project = Some("fromflag".into());
    assert_eq!(
        load_opts(named, o).unwrap().spec.namespace.as_str(),
        "fromflag"
    );
}

#[test]
fn ports_short_and_long_syntax() {
    let l = load_str(
        r#"
name: p
services:
  a:
    image: x
    ports:
      - 80
      - "30001:81"
      - "30010-30011:90-91"
      - target: 82
        published: "30002"
        protocol: tcp
        mode: ingress
      - "8443"
    expose: ["81", "7000/tcp"]
"#,
    )
    .unwrap();
    let s = comp(&l, "a").service.as_ref().unwrap();
    let got: Vec<(u16, Option<u16>)> = s
        .ports
        .iter()
        .map(|p| (p.port.get(), p.node_port.map(|n| n.get())))
        .collect();
    assert_eq!(
        got,
        [
            (80, None),
            (81, Some(30001)),
            (90, Some(30010)),
            (91, Some(30011)),
            (82, Some(30002)),
            (8443, None),
            (7000, None)
        ]
    );
    assert_eq!(s.ports[1].name.as_str(), "p81");
}

#[test]
fn udp_ports_share_a_number_with_tcp() {
    let l = load_str(
        r#"
name: p
services:
  dns:
    image: x
    ports:
      - "30053:53/udp"
      - "30053:53"
      - target: 5353
        protocol: udp
    expose: ["9999/udp"]
"#,
    )
    .unwrap();
    let c = comp(&l, "dns");
    let s = c.service.as_ref().unwrap();
    let got: Vec<(&str, u16, Option<u16>, Protocol)> = s
        .ports
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.port.get(),
                p.node_port.map(|n| n.get()),
                p.protocol,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("p53-udp", 53, Some(30053), Protocol::Udp),
            ("p53", 53, Some(30053), Protocol::Tcp),
            ("p5353-udp", 5353, None, Protocol::Udp),
            ("p9999-udp", 9999, None, Protocol::Udp),
        ]
    );
    // The pod template's container ports carry the protocol too.
    let tp: Vec<(u16, Protocol)> = c
        .replicaset
        .template
        .ports
        .iter()
        .map(|p| (p.port.get(), p.protocol))
        .collect();
    assert_eq!(
        tp,
        [
            (53, Protocol::Udp),
            (53, Protocol::Tcp),
            (5353, Protocol::Udp),
            (9999, Protocol::Udp)
        ]
    );
    // The same host port twice for one protocol is still refused.
    let e = errors(
        r#"
name: p
services:
  a:
    image: x
    ports: ["30053:53/udp", "30053:54/udp"]
"#,
    );
    assert!(
        e.iter().any(|m| m.contains("30053/udp is published twice")),
        "{e:?}"
    );
}

#[test]
fn bad_ports_name_their_path() {
    let e = errors(
        r#"
name: p
services:
  a:
    image: x
    ports:
      - "53:53/sctp"
      - "127.0.0.1:30005:80"
      - "30006:99999"
      - "30007:81"
      - "30007:82"
"#,
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.a.ports[0]") && m.contains("tcp and udp only")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.a.ports[1]") && m.contains("127.0.0.1")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.a.ports[2]") && m.contains("99999")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.a.ports[4]") && m.contains("published twice")),
        "{e:?}"
    );
}

#[test]
fn environment_list_and_map_forms() {
    let l = load_str(
        r#"
name: p
services:
  a: {image: x, environment: ["A=1", "B=x=y", "C="]}
  b: {image: x, environment: {A: 1, B: true, C: null, FROM_ENV: ~}}
"#,
    )
    .unwrap();
    let a = &comp(&l, "a").replicaset.template.env;
    assert_eq!(
        (a["A"].as_str(), a["B"].as_str(), a["C"].as_str()),
        ("1", "x=y", "")
    );
    let b = &comp(&l, "b").replicaset.template.env;
    assert_eq!((b["A"].as_str(), b["B"].as_str()), ("1", "true"));
    assert!(!b.contains_key("C"));
    assert_eq!(b["FROM_ENV"], "yes");
}

#[test]
fn env_file_forms() {
    let l = load_str(
        r#"
name: p
services:
  a: {image: x, env_file: [web.env, {path: optional.env, required: false}], environment: {LEVEL: debug}}
"#,
    )
    .unwrap();
    let env = &comp(&l, "a").replicaset.template.env;
    assert_eq!(env["MODE"], "prod");
    assert_eq!(env["LEVEL"], "debug", "environment wins over env_file");
    let e = errors("name: p\nservices: {a: {image: x, env_file: nope.env}}");
    assert!(
        e[0].starts_with("services.a.env_file: cannot read nope.env"),
        "{e:?}"
    );
}

#[test]
fn healthcheck_forms() {
    let l = load_str(
        r#"
name: p
services:
  cmd: {image: x, healthcheck: {test: ["CMD", "curl", "-f", "http://localhost"], interval: 1s}}
  none: {image: x, healthcheck: {test: ["NONE"]}}
  off: {image: x, healthcheck: {disable: true}}
"#,
    )
    .unwrap();
    let c = &comp(&l, "cmd").replicaset.template;
    assert_eq!(
        c.container_health.as_ref().unwrap().test,
        ["CMD", "curl", "-f", "http://localhost"]
    );
    assert_eq!(c.container_health.as_ref().unwrap().interval_ms, 1000);
    for n in ["none", "off"] {
        let t = &comp(&l, n).replicaset.template;
        assert_eq!(t.container_health.as_ref().unwrap().test, ["NONE"]);
        assert!(t.health.is_none(), "{n}: pier's default check applies");
    }
    let e =
        errors("name: p\nservices: {a: {image: x, healthcheck: {test: [curl, x], interval: 30}}}");
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.a.healthcheck.test") && m.contains("CMD")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.a.healthcheck.interval") && m.contains("no unit")),
        "{e:?}"
    );
}

#[test]
fn unsupported_keys_error_or_warn_by_meaning() {
    let f = Failed::clone(
        &load_str(
            r#"
name: p
services:
  a:
    image: x
    build: .
    volumes: ["data:/var/lib/data"]
    user: "1000"
    container_name: fixed
    depends_on: [b]
    networks: [back]
    privileged: true
    restart: "no"
    bogus: 1
  b:
    build: ./b
volumes: {data: {}}
networks: {back: {}}
"#,
        )
        .unwrap_err(),
    );
    let e: Vec<String> = f.errors.iter().map(|d| d.to_string()).collect();
    let w: Vec<String> = f.warnings.iter().map(|d| d.to_string()).collect();
    for p in [
        "services.a.volumes",
        "services.a.user",
        "services.a.privileged",
        "services.a.restart",
        "services.a.bogus",
        "services.b.build",
    ] {
        assert!(
            e.iter().any(|m| m.starts_with(&format!("{p}:"))),
            "{p} in {e:?}"
        );
    }
    for p in [
        "services.a.build",
        "services.a.container_name",
        "services.a.depends_on",
        "services.a.networks.back",
        "networks.back",
        "volumes",
    ] {
        assert!(
            w.iter().any(|m| m.starts_with(&format!("{p}:"))),
            "{p} in {w:?}"
        );
    }
    assert!(e.iter().any(|m| m.contains("docker build")), "{e:?}");
}

#[test]
fn interpolation_errors_and_warnings() {
    let e = errors("name: p\nservices: {a: {image: \"x:${NEED:?set NEED}\"}}");
    assert!(
        e[0].starts_with("services.a.image: required variable NEED"),
        "{e:?}"
    );
    let l =
        load_str("name: p\nservices: {a: {image: \"x:${UNSET}\", command: echo $$HOME}}").unwrap();
    assert_eq!(comp(&l, "a").replicaset.template.image, "x:");
    assert_eq!(comp(&l, "a").replicaset.template.cmd, ["echo", "$HOME"]);
    assert!(l.warnings.iter().any(|w| w.message.contains("UNSET")));
}

#[test]
fn files_merge_in_order() {
    let base = Source {
        name: "compose.yaml".into(),
        text: r#"
name: p
services:
  web:
    image: web:1
    command: ["serve"]
    environment: [A=1, B=1]
    ports: ["30080:80"]
"#
        .into(),
    };
    let over = Source {
        name: "compose.prod.yaml".into(),
        text: r#"
services:
  web:
    image: web:2
    command: ["serve", "--prod"]
    environment: {B: 2}
    ports: ["30443:443"]
    deploy: {replicas: 4}
"#
        .into(),
    };
    let l = load(&[base, over], &opts(), &files).unwrap();
    let web = comp(&l, "web");
    let t = &web.replicaset.template;
    assert_eq!(t.image, "web:2");
    assert_eq!(t.cmd, ["serve", "--prod"]);
    assert_eq!((t.env["A"].as_str(), t.env["B"].as_str()), ("1", "2"));
    assert_eq!(web.service.as_ref().unwrap().ports.len(), 2);
    assert_eq!(web.replicaset.replicas.get(), 4);
    assert_eq!(l.spec.files, ["compose.yaml", "compose.prod.yaml"]);
}

#[test]
fn placement_and_x_pier() {
    let e = errors(
        r#"
name: p
services:
  a:
    image: x
    deploy:
      mode: global
      placement:
        constraints: ["node.role==manager", "node.labels.zone!=b", "nonsense"]
    x-pier: {lb: random, bogus: 1}
"#,
    );
    for p in [
        "services.a.deploy.mode",
        "services.a.deploy.placement.constraints[2]",
        "services.a.x-pier.lb",
        "services.a.x-pier.bogus",
    ] {
        assert!(
            e.iter().any(|m| m.starts_with(&format!("{p}:"))),
            "{p} in {e:?}"
        );
    }
}

#[test]
fn update_config_is_read() {
    let mut cx = Ctx::default();
    let v: Value = serde_yaml_ng::from_str(
        "{parallelism: 2, delay: 10s, failure_action: rollback, monitor: 1m, max_failure_ratio: 0.2, order: start-first}",
    )
    .unwrap();
    let u = update_config(&v, "u", &mut cx);
    assert!(cx.errors.is_empty(), "{:?}", cx.errors);
    assert_eq!(
        u,
        UpdateConfig {
            parallelism: 2,
            delay_ms: 10_000,
            failure_action: FailureAction::Rollback,
            monitor_ms: 60_000,
            max_failure_ratio: Ratio::new(0.2).unwrap(),
            order: UpdateOrder::StartFirst,
            ..UpdateConfig::default()
        }
    );
    let v: Value = serde_yaml_ng::from_str("{order: sideways}").unwrap();
    update_config(&v, "u", &mut cx);
    assert!(cx.errors[0].to_string().contains("start-first"));
}

#[test]
fn placement_maps_onto_the_model() {
    let l = load_str(
        r#"
name: oauth
services:
  frontend:
    image: fe
    deploy:
      replicas: 2
      placement:
        constraints: ["node.hostname!=h9", "node.labels.zone==a"]
        preferences: [{spread: node.labels.rack}]
        max_replicas_per_node: 1
      update_config: {parallelism: 1, order: start-first, failure_action: rollback}
      rollback_config: {parallelism: 0}
    x-pier: {anti_affinity: [keyserver]}
  keyserver:
    image: ks
    x-pier: {anti_affinity: [frontend], affinity: [cache]}
  cache:
    image: c
"#,
    )
    .unwrap();
    let fe = &comp(&l, "frontend").replicaset;
    let c: Vec<String> = fe
        .placement
        .constraints
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(c, ["node.hostname!=h9", "node.labels.zone==a"]);
    assert_eq!(fe.placement.spread_by.as_deref(), Some("rack"));
    assert_eq!(fe.placement.max_per_node, Some(1));
    assert_eq!(fe.placement.anti_affinity[0].as_str(), "keyserver");
    assert_eq!(fe.update_config.order, UpdateOrder::StartFirst);
    assert_eq!(fe.update_config.failure_action, FailureAction::Rollback);
    assert_eq!(fe.rollback_config.parallelism, 0);
    let ks = &comp(&l, "keyserver").replicaset;
    assert_eq!(ks.placement.affinity[0].as_str(), "cache");
    let e = errors("name: p\nservices: {a: {image: x, x-pier: {anti_affinity: [a]}}}");
    assert!(
        e[0].starts_with("services.a.x-pier:") && e[0].contains("max_per_node"),
        "{e:?}"
    );
}

#[test]
fn names_must_be_dns_labels() {
    let e = errors("name: p\nservices: {My_Service: {image: x}}");
    assert!(
        e[0].starts_with("services.My_Service:") && e[0].contains("rename"),
        "{e:?}"
    );
    let e = errors("services: {a: {image: x}}\nname: Bad_Name");
    assert!(
        e[0].starts_with("name:") && e[0].contains("-p NAME"),
        "{e:?}"
    );
}

#[test]
fn not_yaml_or_not_compose() {
    let e = errors("services: [a");
    assert!(e[0].starts_with("compose.yaml: not valid YAML"), "{e:?}");
    let e = errors("- a\n- b");
    assert!(e[0].contains("mapping"), "{e:?}");
    let e = errors("name: p\nservice: {a: {image: x}}");
    assert!(e.iter().any(|m| m.starts_with("service:")), "{e:?}");
}

#[test]
fn the_shipped_oauth_example_loads_clean() {
    let l = load_str(include_str!("../../../examples/oauth/compose.yaml")).unwrap();
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(l.spec.namespace.as_str(), "oauth");
    let fe = &comp(&l, "frontend").replicaset;
    let ks = &comp(&l, "keyserver").replicaset;
    assert_eq!(fe.placement.anti_affinity[0].as_str(), "keyserver");
    assert_eq!(ks.placement.anti_affinity[0].as_str(), "frontend");
    assert!(ks.template.container_health.is_some());
}

#[test]
fn x_pier_headless_and_proxy_protocol() {
    let l = load_str(
        "name: p\nservices:\n  db:\n    image: x\n    expose: [5432]\n    x-pier: {headless: true, proxy_protocol: true}\n",
    )
    .unwrap();
    let s = comp(&l, "db").service.as_ref().expect("a service");
    assert!(s.headless && s.proxy_protocol && s.vip.is_none());
    // A headless service has no node ports to publish.
    let e = errors(
        "name: p\nservices:\n  db:\n    image: x\n    ports: [\"30432:5432\"]\n    x-pier: {headless: true}\n",
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services.db.x-pier.headless:") && m.contains("published")),
        "{e:?}"
    );
}

/// A misspelt autoscaler target is refused, named with its path (the
/// model's `Sla` accepts unknown fields in stored records, so the check is
/// the Compose reader's).
#[test]
fn sla_typo_is_refused() {
    let e = errors(
        "name: p\nservices:\n  a:\n    image: x\n    x-pier:\n      sla: {min_replicas: 1, max_replicas: 4, max_active_per_podd: 50}\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("x-pier.sla") && e[0].contains("unknown field `max_active_per_podd`"),
        "{e:?}"
    );
}
