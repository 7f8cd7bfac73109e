//! The dashboard (issue 16) in a real headless Chromium: an agent with
//! real pods and a service, `pier dashboard --no-browser` for the login
//! link, the login (cookie, redirect, no code left in the URL), the live
//! views (hosts, placement, services with endpoints, replica sets,
//! traffic), no console errors, and a pod deleted with the CLI showing up
//! in the event feed, with its replacement, without a reload; then an
//! autoscaler decision and a supervisor problem, also live; last, an
//! agent restart ends the session and the page says so.
//!
//! Screenshots go to tests/artefacts/dashboard/ (gitignored); the paths
//! are printed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pier_tests::browser::Browser;
use pier_tests::{AgentOpts, AgentProc, TEST_IMAGE, ensure_test_image, eventually, http_get};
use serde_json::Value;

fn artefacts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artefacts/dashboard")
}

fn pod_names(a: &AgentProc) -> Result<BTreeSet<String>> {
    let (code, body) = a.api_get("/api/v1/namespaces/default/pods")?;
    ensure!(code == 200, "GET pods: HTTP {code}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v.as_array()
        .context("pods is not an array")?
        .iter()
        .filter(|p| p["replicaset"] == "web" && p["ready"] == true)
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

/// What the page shows, for a failure message.
const SHOW: &str = r#"JSON.stringify({
  url: location.href,
  live: document.querySelector('#live')?.textContent,
  hosts: document.querySelector('#hosts-body')?.innerText,
  services: document.querySelector('#services-body')?.innerText,
  placement: document.querySelector('#placement-map')?.innerText,
  events: document.querySelector('#events-list')?.innerText,
  body: document.body?.innerText?.slice(0, 400),
})"#;

#[test]
fn dashboard_in_a_real_browser() -> Result<()> {
    ensure_test_image()?;
    let a = AgentProc::start(AgentOpts {
        store: "embedded".into(),
        node: "dash-a".into(),
        extra_toml: String::new(),
    })?;
    a.cli_ok(&[
        "run",
        "web",
        "--image",
        TEST_IMAGE,
        "--port",
        "8080",
        "--replicas",
        "2",
        "--wait",
    ])?;
    a.cli_ok(&["expose", "rs", "web", "--port", "8080"])?;
    let svc = a.cli_json(&["get", "svc", "web"])?;
    let vip = svc[0]["vip"].as_str().context("no vip")?.to_owned();
    let vip_addr = SocketAddr::new(vip.parse()?, 8080);
    let pods = eventually(Duration::from_secs(20), "2 ready pods", || {
        Ok(Some(pod_names(&a)?).filter(|p| p.len() == 2))
    })?;

    // The login link: printed, one use.
    let out = a.cli_ok(&["dashboard", "--no-browser"])?;
    let url = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("http://"))
        .with_context(|| format!("no link in {out:?}"))?
        .to_owned();
    ensure!(url.contains("/ui/login?code="), "{url}");
    // Without a session the page is refused, with what to do.
    let (code, body) = http_get(&a.api_addr(), "/ui/")?;
    ensure!(
        code == 401 && body.contains("pier dashboard"),
        "/ui/ without a session: {code} {body}"
    );

    std::fs::create_dir_all(artefacts())?;
    let mut b = Browser::start(1280, 1500, &artefacts().join("chromium.log"))?;
    b.navigate(&url)?;
    b.wait_for(
        Duration::from_secs(15),
        "the dashboard, logged in and live",
        "location.pathname === '/ui/' && document.querySelector('#live')?.textContent === 'live'",
        SHOW,
    )?;
    // The code does not stay in the URL, and the cookie is not readable
    // by scripts.
    let href = b.eval("location.href")?;
    ensure!(
        !href.to_string().contains("code="),
        "the URL still has the code: {href}"
    );
    ensure!(
        b.eval("document.cookie")? == Value::String(String::new()),
        "the session cookie is readable by scripts"
    );
    // The link worked once.
    let path = url.trim_start_matches(&a.api);
    let (code, _) = http_get(&a.api_addr(), path)?;
    ensure!(code == 401, "a used login link answered {code}");

    // Hosts, services with their endpoints, the placement of the pods.
    let pod_list = pods.iter().cloned().collect::<Vec<_>>();
    let live_views = format!(
        r#"(() => {{
  const hosts = document.querySelector('#hosts-body').innerText;
  const svc = document.querySelector('#services-body [data-service="default/web"]');
  const eps = svc ? svc.querySelectorAll('.ep.ok').length : 0;
  const placed = [...document.querySelectorAll('#placement-map [data-pod]')].map(e => e.dataset.pod).sort();
  const rs = document.querySelector('#replicasets-body [data-replicaset="default/web"]');
  return hosts.includes('dash-a') && hosts.includes('fresh')
    && !!svc && svc.innerText.includes('{vip}') && svc.innerText.includes('web.default.svc.pier.internal')
    && eps === 2
    && JSON.stringify(placed) === JSON.stringify({pods})
    && !!rs && rs.innerText.includes('{image}');
}})()"#,
        vip = vip,
        pods = serde_json::to_string(&pod_list)?,
        image = TEST_IMAGE,
    );
    b.wait_for(
        Duration::from_secs(15),
        "hosts, services, endpoints and pods",
        &live_views,
        SHOW,
    )?;

    // Traffic through the VIP reaches the chart (stats records, then the
    // signals stream): a bounded loop of 60 requests.
    for _ in 0..60 {
        let (code, _) = http_get(&vip_addr, "/")?;
        ensure!(code == 200, "GET through the VIP: {code}");
    }
    b.wait_for(
        Duration::from_secs(20),
        "the traffic chart",
        r#"(() => { const t = document.querySelector('#traffic-charts [data-service="default/web"]');
  return !!t && t.querySelectorAll('svg path.line').length >= 2 && !t.innerText.includes('No traffic'); })()"#,
        "document.querySelector('#traffic-charts').innerText",
    )?;
    let shot = b.screenshot(&artefacts().join("1-live.png"))?;
    println!("dashboard screenshot: {}", shot.display());

    // Delete a pod: the feed says so and the replacement appears, all on
    // the same page (a reload would lose the marker).
    b.eval("window.__pierMarker = 42")?;
    let victim = pods.iter().next().context("a pod")?.clone();
    a.cli_ok(&["delete", "pod", &victim])?;
    let replaced = format!(
        r#"(() => {{
  const ev = document.querySelector('#events-list').innerText;
  const placed = [...document.querySelectorAll('#placement-map [data-pod]')].map(e => e.dataset.pod);
  const fresh = placed.filter(p => !{pods}.includes(p));
  return window.__pierMarker === 42
    && ev.includes('pod default/{victim} deleted')
    && ev.includes('replaces {victim}')
    && !placed.includes('{victim}') && fresh.length === 1;
}})()"#,
        pods = serde_json::to_string(&pod_list)?,
    );
    b.wait_for(
        Duration::from_secs(30),
        "the deletion event and the replacement pod",
        &replaced,
        SHOW,
    )?;
    let shot = b.screenshot(&artefacts().join("2-replaced.png"))?;
    println!("dashboard screenshot: {}", shot.display());

    // An autoscaler decision (the set is below its new minimum) and a
    // supervisor problem (a set no node can take) reach the feed and the
    // replica sets' rows.
    a.cli_ok(&[
        "autoscale",
        "rs",
        "web",
        "--min",
        "3",
        "--max",
        "4",
        "--max-active-per-pod",
        "50",
    ])?;
    a.cli_ok(&[
        "run",
        "blocked",
        "--image",
        TEST_IMAGE,
        "--constraint",
        "node.labels.zone==nowhere",
    ])?;
    b.wait_for(
        Duration::from_secs(30),
        "the autoscaler's decision and the problem",
        r#"(() => {
  const ev = document.querySelector('#events-list').innerText;
  const web = document.querySelector('#replicasets-body [data-replicaset="default/web"]')?.innerText || '';
  const blocked = document.querySelector('#replicasets-body [data-replicaset="default/blocked"]')?.innerText || '';
  return window.__pierMarker === 42
    && ev.includes('autoscaler: default/web: 2 → 3: outside min 3')
    && web.includes('3–4 pods') && web.includes('outside min 3')
    && ev.includes('replica set default/blocked: ') && blocked.includes('problem: ')
    && document.querySelectorAll('#placement-map [data-pod^="web-"]').length === 3
    && document.querySelector('#matrix-body [data-matrix="default/web"] td')?.textContent === '3';
})()"#,
        SHOW,
    )?;
    let shot = b.screenshot(&artefacts().join("3-autoscaled.png"))?;
    println!("dashboard screenshot: {}", shot.display());

    let errors = b.console_errors();
    ensure!(errors.is_empty(), "the page logged errors: {errors:#?}");

    // The agent restarts: sessions lived in its memory, so the page says
    // it is logged out and what to do, instead of failing silently. (The
    // refused connections while it is down are logged by the browser,
    // hence after the error check.)
    let mut a = a;
    a.stop()?;
    a.spawn()?;
    b.wait_for(
        Duration::from_secs(30),
        "the page to say the session ended",
        "document.querySelector('#live').textContent === 'logged out' && document.querySelector('#cluster').textContent.includes('pier dashboard')",
        SHOW,
    )?;
    Ok(())
}
