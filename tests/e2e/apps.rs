//! Applications from Compose files (issue 14): `pier apply -f` brings a
//! two-service app up, reachable by node port from the host and by Compose
//! name from its pods; a second apply restarts nothing; a service removed
//! from the file is removed; a bad file is refused naming the key;
//! `pier delete -f` removes it all.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pier_tests::{AgentOpts, AgentProc, TEST_IMAGE, ensure_test_image, eventually, http_get};

use crate::demo::ONE_AT_A_TIME;

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
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ensure_test_image()?;
    let a = AgentProc::start(AgentOpts {
        store: "embedded".into(),
        node: "apps-1".into(),
        extra_toml: String::new(),
    })?;
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
