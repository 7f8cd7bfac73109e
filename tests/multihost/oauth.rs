//! The article's OAuth example (issue 14, section 5) on three hosts, one
//! cluster for every step: `examples/oauth/compose.yaml` as shipped puts
//! its 2 front-ends and its keyserver on 3 different hosts, and a
//! front-end reaches the keyserver by name; a third front-end stays Pending
//! with the rule that blocks it; with the keyserver's host cut off, the
//! keyserver is not placed beside a front-end; after the heal it is placed
//! again; a rolling update of the front-ends (start-first, one per host,
//! so each step replaces a pod in place) under a request loop from a
//! container on the keyserver's host fails no request.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pier_tests::eventually;

use crate::cluster::{Cluster, count};

const NS: &str = "oauth";

/// One of the app's pods as host `i` sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct AppPod {
    rs: String,
    name: String,
    node: String,
    ready: bool,
}

fn app_pods(c: &Cluster, i: usize) -> Result<Vec<AppPod>> {
    let mut v: Vec<AppPod> = c
        .cli_json(i, &["get", "pods", "-n", NS])?
        .iter()
        .map(|p| AppPod {
            rs: p["replicaset"].as_str().unwrap_or_default().to_owned(),
            name: p["name"].as_str().unwrap_or_default().to_owned(),
            node: p["node"].as_str().unwrap_or_default().to_owned(),
            ready: p["phase"] == "Running" && p["ready"] == true,
        })
        .collect();
    v.sort();
    Ok(v)
}

fn ready_of<'a>(pods: &'a [AppPod], rs: &str) -> Vec<&'a AppPod> {
    pods.iter().filter(|p| p.rs == rs && p.ready).collect()
}

/// The `Problems:` part of `pier describe rs <rs> -n oauth` on host `i`.
fn problems(c: &Cluster, i: usize, rs: &str) -> Result<String> {
    let out = c.cli(i, &["describe", "rs", rs, "-n", NS])?;
    Ok(out
        .split_once("Problems:")
        .map(|x| x.1.to_owned())
        .unwrap_or_default())
}

fn host_index(node: &str) -> Result<usize> {
    node.strip_prefix('h')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("node {node:?} is not h<i>"))
}

#[test]
fn oauth_example_across_three_hosts() -> Result<()> {
    let c = Cluster::start(6, 3)?;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/oauth/compose.yaml");
    let example = example.to_str().context("example path")?;

    // --- 1. Apply the example as shipped: three hosts, three roles --------
    c.cli(1, &["apply", "-f", example, "--wait", "--timeout", "90s"])
        .with_context(|| c.logs())?;
    let pods = eventually(
        Duration::from_secs(30),
        "2 front-ends and the keyserver ready",
        || {
            let p = app_pods(&c, 1)?;
            let ok = ready_of(&p, "frontend").len() == 2 && ready_of(&p, "keyserver").len() == 1;
            Ok(ok.then_some(p))
        },
    )
    .with_context(|| c.logs())?;
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    ensure!(
        pods.len() == 3 && nodes.len() == 3,
        "the 3 pods must be on 3 different hosts: {pods:?}"
    );
    let ks_node = ready_of(&pods, "keyserver")[0].node.clone();
    let k = host_index(&ks_node)?;
    let f = host_index(&ready_of(&pods, "frontend")[0].node)?;
    // A front-end reaches the keyserver by its Compose name (the CGI runs
    // `wget http://keyserver:9000/` inside the front-end's pod), asked
    // from a container on the keyserver's host through the mesh.
    c.run_client(k)?;
    let front = format!("frontend.{NS}.svc.pier.internal");
    let key = eventually(
        Duration::from_secs(20),
        "the key through a front-end",
        || {
            let out = c.topo.host(k).docker(&[
                "exec",
                "client",
                "wget",
                "-qO-",
                &format!("http://{front}:8080/cgi-bin/key"),
            ])?;
            let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Ok(body.starts_with("key-keyserver-").then_some(body))
        },
    )
    .with_context(|| c.logs())?;
    eprintln!("keyserver on {ks_node}; a front-end answered {key:?}");

    // --- 2. A third front-end has nowhere to go: Pending, with the rule ---
    c.cli(1, &["scale", "rs", "frontend", "--replicas", "3", "-n", NS])?;
    let why = eventually(
        Duration::from_secs(30),
        "frontend's problem names the rules",
        || {
            let p = problems(&c, f, "frontend")?;
            Ok(p.contains("cannot place 1 of 3").then_some(p))
        },
    )
    .with_context(|| c.logs())?;
    ensure!(
        why.contains("run a pod of keyserver") && why.contains("max_per_node=1"),
        "the problem must name anti-affinity and max per node: {why}"
    );
    eprintln!("a third front-end:{why}");
    let p = app_pods(&c, 1)?;
    ensure!(
        p.iter().filter(|x| x.rs == "frontend").count() == 2 && p.len() == 3,
        "no pod may be placed against the rules: {p:?}"
    );
    c.cli(1, &["scale", "rs", "frontend", "--replicas", "2", "-n", NS])?;
    eventually(Duration::from_secs(30), "frontend's problem gone", || {
        Ok((!problems(&c, f, "frontend")?.contains("cannot place")).then_some(()))
    })
    .with_context(|| c.logs())?;

    // --- 3. Cut the keyserver's host: not placed beside a front-end --------
    c.topo.cut(k)?;
    let cut_at = Instant::now();
    let why = eventually(
        Duration::from_secs(60),
        "the keyserver's replacement is blocked",
        || {
            let p = problems(&c, f, "keyserver")?;
            Ok(p.contains("cannot place 1 of 1").then_some(p))
        },
    )
    .with_context(|| c.logs())?;
    eprintln!(
        "keyserver unplaceable {:?} after the cut:{why}",
        cut_at.elapsed()
    );
    ensure!(
        why.contains("frontend"),
        "the problem must name the front-ends: {why}"
    );
    // Held for a few seconds of the supervisor's reconciles: no keyserver
    // pod anywhere but on the cut host.
    for _ in 0..3 {
        let p = app_pods(&c, f)?;
        ensure!(
            p.iter().all(|x| x.rs != "keyserver" || x.node == ks_node),
            "the keyserver was placed beside a front-end: {p:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // --- 4. Heal: the keyserver is placed again, on the healed host -------
    c.topo.heal(k)?;
    let heal_at = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the keyserver ready after the heal",
        || {
            let p = app_pods(&c, f)?;
            let ks = ready_of(&p, "keyserver");
            Ok(
                (ks.len() == 1 && p.iter().filter(|x| x.rs == "keyserver").count() == 1)
                    .then(|| ks[0].node.clone()),
            )
        },
    )
    .and_then(|node| {
        ensure!(node == ks_node, "keyserver on {node}, not {ks_node}");
        Ok(())
    })
    .with_context(|| c.logs())?;
    eprintln!("keyserver ready {:?} after the heal", heal_at.elapsed());
    eventually(Duration::from_secs(20), "keyserver's problem gone", || {
        Ok((!problems(&c, f, "keyserver")?.contains("cannot place")).then_some(()))
    })
    .with_context(|| c.logs())?;

    // --- 5. A rolling update of the front-ends under load, 0 failures -----
    let before: BTreeSet<String> = ready_of(&app_pods(&c, 1)?, "frontend")
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let what = format!("h{k} reaches both front-ends");
    eventually(Duration::from_secs(30), &what, || {
        let got = c.requests(k, &front, 20)?;
        ensure!(count(&got, "FAIL") == 0, "before the update: {got:?}");
        let seen: BTreeSet<String> = got.into_iter().collect();
        Ok((seen == before).then_some(()))
    })
    .with_context(|| c.logs())?;
    let dir = tempfile::tempdir()?;
    let edited = dir.path().join("compose.yaml");
    let text = std::fs::read_to_string(example)?;
    let published = r#"    ports: ["30080:8080"]"#;
    ensure!(
        text.contains(published),
        "the example's front-end port moved"
    );
    std::fs::write(
        &edited,
        text.replace(
            published,
            &format!("{published}\n    environment:\n      RELEASE: \"2\""),
        ),
    )?;
    let edited = edited.to_str().context("temp path")?;
    let started = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let (status, got) = std::thread::scope(|s| -> Result<_> {
        let load = s.spawn(|| -> Result<Vec<String>> {
            // Bounded: 30 requests a batch, until the rollout is done, at
            // most 180 s.
            let mut got = Vec::new();
            let until = Instant::now() + Duration::from_secs(180);
            loop {
                got.extend(c.requests(k, &front, 30)?);
                started.store(true, SeqCst);
                if done.load(SeqCst) || Instant::now() > until {
                    return Ok(got);
                }
            }
        });
        while !started.load(SeqCst) && !load.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let applied = c.cli(1, &["apply", "-f", edited]);
        let status = applied.and_then(|_| {
            c.cli(
                1,
                &[
                    "rollout",
                    "status",
                    "rs",
                    "frontend",
                    "-n",
                    NS,
                    "--timeout",
                    "150s",
                ],
            )
        });
        done.store(true, SeqCst);
        let got = load.join().expect("load thread")?;
        Ok((status, got))
    })?;
    let status = status.with_context(|| c.logs())?;
    eprintln!("pier rollout status rs frontend:\n{status}");
    // One front-end per host and none beside the keyserver: no node has
    // room to start a new one first, so each step replaced one in place.
    ensure!(
        status.contains("in place (stop-first)"),
        "rollout status must say the steps went in place: {status}"
    );
    let failed = count(&got, "FAIL");
    eprintln!(
        "rolling update under load from h{k}: {} requests, {failed} failed",
        got.len()
    );
    let after = eventually(Duration::from_secs(30), "2 new front-ends", || {
        let p = app_pods(&c, 1)?;
        let fe: Vec<AppPod> = p.iter().filter(|x| x.rs == "frontend").cloned().collect();
        Ok((fe.len() == 2 && fe.iter().all(|x| x.ready && !before.contains(&x.name))).then_some(p))
    })
    .with_context(|| c.logs())?;
    let fe_nodes: BTreeSet<&str> = after
        .iter()
        .filter(|x| x.rs == "frontend")
        .map(|x| x.node.as_str())
        .collect();
    ensure!(
        fe_nodes.len() == 2 && !fe_nodes.contains(ks_node.as_str()),
        "after the update the front-ends must still be on 2 hosts without the keyserver: {after:?}"
    );
    let served: BTreeSet<&str> = got.iter().map(String::as_str).collect();
    ensure!(
        failed == 0 && got.len() >= 30,
        "{failed} of {} requests failed during the rolling update (served by {served:?}){}",
        got.len(),
        c.logs()
    );
    Ok(())
}
