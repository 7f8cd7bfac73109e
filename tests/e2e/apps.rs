//! Applications from Compose files (issue 14): `pier apply -f` brings a
//! two-service app up, reachable by node port from the host and by Compose
//! name from its pods; a second apply restarts nothing; a service removed
//! from the file is removed; a bad file is refused naming the key;
//! `pier delete -f` removes it all.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pier_tests::{
    AgentOpts, AgentProc, NetGuard, Scenario, TEST_IMAGE, docker, eventually, http_get,
};

fn compose(node_port: u16, with_keyserver: bool) -> String {
    let mut s = format!(
        r#"name: shop
services:
  frontend:
    image: {TEST_IMAGE}
    command:
      - sh
      - -c
      - |
        mkdir -p /www/cgi-bin
        printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\nwget -qO- http://keyserver:9000/\n' > /www/cgi-bin/key
        chmod +x /www/cgi-bin/key
        hostname > /www/index.html
        exec httpd -f -p 8080 -h /www
    ports: ["{node_port}:8080"]
    deploy:
      replicas: 2
"#
    );
    if with_keyserver {
        s.push_str(&format!(
            r#"  keyserver:
    image: {TEST_IMAGE}
    command: ["sh", "-c", "echo key-$$(hostname) > /www/index.html && exec httpd -f -p 9000 -h /www"]
    expose: [9000]
    healthcheck:
      test: ["CMD", "wget", "-qO-", "http://127.0.0.1:9000/"]
      interval: 1s
      timeout: 1s
      retries: 2
"#
        ));
    }
    s
}

/// `(pod, container id)` of the namespace's pods.
fn containers(a: &AgentProc) -> Result<BTreeSet<(String, String)>> {
    let pods = a.cli_json(&["get", "pods", "-n", "shop"])?;
    Ok(pods
        .as_array()
        .context("pods JSON is not an array")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["container_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

#[test]
fn compose_app_applies_reapplies_prunes_and_deletes() -> Result<()> {
    let a = Scenario::embedded("apps-1", "")?;
    let np = a.node_port_min;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("compose.yaml");
    let f = file.to_str().context("temp path")?;
    std::fs::write(&file, compose(np, true))?;

    // 1. Apply: both services up; the front-end's CGI reaches the
    //    keyserver by its Compose name, and the host reaches the front-end
    //    by its published port.
    let out = a.cli_ok(&["apply", "-f", f, "--wait", "--timeout", "60s"])?;
    ensure!(
        out.contains("replicaset/keyserver created") && out.contains("all pods ready"),
        "{out}"
    );
    let addr = format!("127.0.0.1:{np}").parse()?;
    let body = eventually(
        Duration::from_secs(10),
        "the key through the front-end",
        || match http_get(&addr, "/cgi-bin/key") {
            Ok((200, b)) if b.trim().starts_with("key-keyserver-") => Ok(Some(b)),
            other => Err(anyhow::anyhow!("GET /cgi-bin/key: {other:?}")),
        },
    )?;
    ensure!(body.contains("key-keyserver-"), "{body}");
    let apps = a.cli_json(&["get", "apps"])?;
    ensure!(
        apps[0]["name"] == "shop" && apps[0]["ready"] == true,
        "{apps}"
    );
    let before = containers(&a)?;
    ensure!(before.len() == 3, "{before:?}");

    // 1b. A container on a Docker network created after the agent started
    //     (as Compose makes one), set up as README says (`--dns` and
    //     `--dns-search shop.svc.pier.internal`): the Compose names
    //     resolve and answer, and so does the node port at the network's
    //     gateway (the host).
    let net = format!("pier-apps-{}", a.run_label);
    docker(&[
        "network",
        "create",
        "--label",
        &format!("pier.test-run={}", a.run_label),
        &net,
    ])?;
    let _net = NetGuard(net.clone());
    let gw = docker(&[
        "network",
        "inspect",
        &net,
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
    ])?;
    let out = docker(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--network",
        &net,
        "--label",
        &format!("pier.test-run={}", a.run_label),
        "--dns",
        &a.dns_vip()?.to_string(),
        "--dns-search",
        "shop.svc.pier.internal",
        TEST_IMAGE,
        "sh",
        "-c",
        // busybox wget's -T crashes in this build; `timeout` bounds it.
        &format!(
            "timeout 10 wget -qO- http://frontend:8080/cgi-bin/key && echo \
             && timeout 10 wget -qO- http://keyserver:9000/ \
             && timeout 10 wget -qO- http://{}:{np}/",
            gw.trim()
        ),
    ])
    .with_context(|| a.log_tail())?;
    let lines: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(
        lines.len() == 3
            && lines[0].starts_with("key-keyserver-")
            && lines[1].starts_with("key-keyserver-")
            && lines[2].starts_with("frontend-"),
        "from a container on {net}: {out}"
    );

    // 2. The same file again: nothing written, nothing restarted.
    let out = a.cli_ok(&["apply", "-f", f])?;
    ensure!(
        out.contains("app/shop unchanged")
            && !out.contains("configured")
            && !out.contains("created"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(1));
    ensure!(containers(&a)? == before, "a second apply changed the pods");

    // 2b. An apply checked against a revision the app has moved past is a
    //     409 that says so, and writes nothing.
    let o = a.cli(&["apply", "-f", f, "--revision", "1"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(1) && err.contains("not 1") && err.contains("pier diff"),
        "{:?}: {err}",
        o.status
    );

    // 3. A bad file is refused naming the key, and changes nothing.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        compose(np, true).replace(
            "    deploy:\n",
            "    volumes: [\"data:/var/lib\"]\n    deploy:\n",
        ),
    )?;
    let o = a.cli(&["apply", "-f", bad.to_str().context("path")?])?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(2) && err.contains("services.frontend.volumes"),
        "{:?}: {err}",
        o.status
    );

    // 4. The keyserver leaves the file: the next apply removes it, and the
    //    front-end's pods stay.
    std::fs::write(&file, compose(np, false))?;
    let out = a.cli_ok(&["diff", "-f", f])?;
    ensure!(
        out.contains("- replicaset/keyserver") && out.contains("- service/keyserver"),
        "{out}"
    );
    let out = a.cli_ok(&["apply", "-f", f])?;
    ensure!(out.contains("replicaset/keyserver deleted"), "{out}");
    let rs = a.cli_json(&["get", "rs", "-n", "shop"])?;
    let names: Vec<&str> = rs
        .as_array()
        .context("rs JSON")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    ensure!(names == ["frontend"], "{names:?}");
    let svcs = a.cli_json(&["get", "svc", "-n", "shop"])?;
    ensure!(svcs.as_array().map(Vec::len) == Some(1), "{svcs}");
    let front: BTreeSet<_> = before
        .iter()
        .filter(|(p, _)| p.starts_with("frontend-"))
        .cloned()
        .collect();
    eventually(Duration::from_secs(10), "the keyserver pod gone", || {
        Ok((containers(&a)? == front).then_some(()))
    })?;

    // 5. Delete -f: the application and all it owns.
    let out = a.cli_ok(&["delete", "-f", f])?;
    ensure!(out.contains("app/shop deleted"), "{out}");
    ensure!(
        a.cli_json(&["get", "apps"])?.as_array().map(Vec::len) == Some(0),
        "an app is left"
    );
    eventually(Duration::from_secs(15), "every pod of shop gone", || {
        Ok(containers(&a)?.is_empty().then_some(()))
    })?;
    let (code, _) = http_get(&addr, "/").unwrap_or((0, String::new()));
    ensure!(code != 200, "the node port still answers after delete");
    Ok(())
}

/// A two-service app (no pods: the race is about the store) whose edit
/// `tag` sets both services' `RELEASE` and adds a service of its own.
fn race_compose(tag: &str) -> String {
    let mut s = String::from("name: race\nservices:\n");
    for svc in ["api", "worker", tag] {
        s.push_str(&format!(
            "  {svc}:\n    image: {TEST_IMAGE}\n    environment:\n      RELEASE: \"{tag}\"\n    expose: [8080]\n    deploy:\n      replicas: 0\n"
        ));
    }
    s
}

/// Each replica set's `RELEASE`, and the services.
type RaceState = (Vec<(String, String)>, Vec<String>);

/// What the store holds of the race app.
fn race_state(a: &AgentProc) -> Result<RaceState> {
    let rs = a.cli_json(&["get", "rs", "-n", "race"])?;
    let mut sets = Vec::new();
    for r in rs.as_array().context("rs JSON")? {
        let name = r["name"].as_str().unwrap_or_default().to_owned();
        let (code, body) = a.api_get(&format!("/api/v1/namespaces/race/replicasets/{name}"))?;
        ensure!(code == 200, "GET rs {name}: {code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let release = v["spec"]["template"]["env"]["RELEASE"]
            .as_str()
            .or_else(|| v["template"]["env"]["RELEASE"].as_str())
            .with_context(|| format!("no RELEASE in {body}"))?
            .to_owned();
        sets.push((name, release));
    }
    sets.sort();
    let svcs = a.cli_json(&["get", "svc", "-n", "race"])?;
    let mut names: Vec<String> = svcs
        .as_array()
        .context("svc JSON")?
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok((sets, names))
}

/// The state of edit `tag` applied in full.
fn race_expected(tag: &str) -> RaceState {
    let mut names = vec!["api".to_owned(), "worker".to_owned(), tag.to_owned()];
    names.sort();
    (
        names.iter().map(|n| (n.clone(), tag.to_owned())).collect(),
        names,
    )
}

/// Runs `pier apply -f` of both files at once; their outputs.
fn apply_both(a: &AgentProc, files: [&str; 2], extra: &[&str]) -> Result<[Output; 2]> {
    let start = std::sync::Barrier::new(2);
    let run = |f: &str| {
        let mut args = vec!["apply", "-f", f];
        args.extend(extra);
        start.wait();
        a.cli(&args)
    };
    std::thread::scope(|s| {
        let x = s.spawn(|| run(files[0]));
        let y = s.spawn(|| run(files[1]));
        Ok([
            x.join().expect("apply thread")?,
            y.join().expect("apply thread")?,
        ])
    })
}

/// Two `pier apply` of different edits of one app at once (issue 14): with
/// `--revision` exactly one wins and the other is refused with the
/// conflict, whichever of the checks (the plan's, or the transaction's
/// compare) catches it; without it each either applies in full or is
/// refused the same way. Never a mix of the two files in the store; the
/// loser re-applies once it has looked again.
#[test]
fn racing_applies_one_wins_the_other_is_refused_nothing_mixed() -> Result<()> {
    let a = AgentProc::start(AgentOpts {
        store: "embedded".into(),
        node: "race-1".into(),
        extra_toml: String::new(),
    })?;
    let dir = tempfile::tempdir()?;
    let path = |tag: &str| -> Result<String> {
        let p = dir.path().join(format!("{tag}.yaml"));
        std::fs::write(&p, race_compose(tag))?;
        Ok(p.to_str().context("temp path")?.to_owned())
    };
    let base = path("base")?;
    let out = a.cli_ok(&["apply", "-f", &base])?;
    ensure!(race_state(&a)? == race_expected("base"), "{out}");
    let revision = |out: &str| -> Result<String> {
        out.rsplit_once("(revision ")
            .and_then(|(_, r)| r.split(')').next())
            .map(str::to_owned)
            .with_context(|| format!("no revision in {out:?}"))
    };
    let mut rev = revision(&out)?;
    let mut winners = Vec::new();
    for round in 0..3 {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        let files = [path(&x)?, path(&y)?];
        let outs = apply_both(&a, [&files[0], &files[1]], &["--revision", &rev])?;
        let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        ensure!(
            won.len() == 1,
            "round {round}: exactly one apply at revision {rev} must win: {outs:?}"
        );
        let (w, l) = (won[0], 1 - won[0]);
        let err = String::from_utf8_lossy(&outs[l].stderr);
        ensure!(
            outs[l].status.code() == Some(1)
                && (err.contains(&format!("not {rev}")) || err.contains("changed while"))
                && err.contains("pier diff"),
            "round {round}: the loser must be told of the conflict: {:?}: {err}",
            outs[l].status
        );
        let tags = [&x, &y];
        ensure!(
            race_state(&a)? == race_expected(tags[w]),
            "round {round}: the store must hold {} in full: {:?}",
            tags[w],
            race_state(&a)?
        );
        winners.push(format!("{} ({})", tags[w], err.trim()));
        rev = revision(&String::from_utf8_lossy(&outs[w].stdout))?;
        // The loser looks again and re-applies at the new revision.
        let out = a.cli_ok(&["apply", "-f", &files[l], "--revision", &rev])?;
        ensure!(race_state(&a)? == race_expected(tags[l]), "{out}");
        rev = revision(&out)?;
    }
    eprintln!("--revision rounds: {winners:#?}");
    // Without --revision: each applies in full or is refused; never mixed.
    for round in 0..3 {
        let (x, y) = (format!("p{round}"), format!("q{round}"));
        let files = [path(&x)?, path(&y)?];
        let outs = apply_both(&a, [&files[0], &files[1]], &[])?;
        for o in &outs {
            let err = String::from_utf8_lossy(&o.stderr);
            ensure!(
                o.status.success() || (o.status.code() == Some(1) && err.contains("changed while")),
                "round {round}: {:?}: {err}",
                o.status
            );
        }
        ensure!(
            outs.iter().any(|o| o.status.success()),
            "round {round}: one of them must apply: {outs:?}"
        );
        let got = race_state(&a)?;
        ensure!(
            got == race_expected(&x) || got == race_expected(&y),
            "round {round}: the store mixes the two files: {got:?}"
        );
    }
    Ok(())
}
