// pier's dashboard: plain JS, no build step. It follows the API's own
// `?watch=true` streams (JSON lines: ADDED, MODIFIED, DELETED) with the
// session cookie, keeps one map per kind, and re-renders the views from
// those maps. The event feed is the difference between what a stream said
// before and after. Every value is put in the page with textContent, never
// as HTML.
"use strict";

const API = "/api/v1";
const state = {
  node: "",
  domain: "",
  nodes: new Map(),
  pods: new Map(),
  replicasets: new Map(),
  services: new Map(),
  endpoints: new Map(),
  traffic: new Map(), // "ns/svc" -> [{t, active, rate, errors, p50, p99}]
  autoscale: new Map(), // "ns/rs" -> {decisions, total}
  signals: new Map(), // the signals stream's objects, by keyOf
  events: [],
  streams: {},
};
const TRAFFIC_WINDOW_MS = 5 * 60 * 1000;
const MAX_EVENTS = 200;

// ---- small helpers ---------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function keyOf(kind, o) {
  switch (kind) {
    case "nodes": return o.name;
    case "endpoints": return `${o.namespace}/${o.service}/${o.node}/${o.id}`;
    case "signals": return o.kind === "traffic" ? `traffic/${o.namespace}/${o.service}` : `autoscale/${o.namespace}/${o.replicaset}`;
    default: return `${o.namespace}/${o.name}`;
  }
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

// A fixed palette, picked for contrast on white; a replica set keeps its
// colour for the whole page.
const PALETTE = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#be185d", "#4d7c0f", "#475569"];
const colours = new Map();
function colourOf(rsKey) {
  if (!colours.has(rsKey)) colours.set(rsKey, PALETTE[colours.size % PALETTE.length]);
  return colours.get(rsKey);
}

// ---- the event feed ----------------------------------------------------

function addEvent(kind, text, level) {
  state.events.unshift({ at: Date.now(), kind, text, level: level || "info" });
  if (state.events.length > MAX_EVENTS) state.events.length = MAX_EVENTS;
  scheduleRender();
}

// What a change of one object means to a person, or null.
function describe(kind, type, o, old) {
  const id = kind === "nodes" ? o.name : `${o.namespace}/${o.name}`;
  if (kind === "pods") {
    const rsKey = `${o.namespace}/${o.replicaset}`;
    if (type === "ADDED") {
      const gone = recentlyDeleted.get(rsKey);
      if (gone && Date.now() - gone.at < 60000) {
        recentlyDeleted.delete(rsKey);
        return [`pod ${id} created on ${o.node} (replaces ${gone.name})`, "info"];
      }
      recentlyAdded.set(rsKey, { name: o.name, at: Date.now() });
      return [`pod ${id} created on ${o.node}`, "info"];
    }
    if (type === "DELETED") {
      // The replacement may be reported first (one snapshot held both).
      const added = recentlyAdded.get(rsKey);
      if (added && Date.now() - added.at < 5000 && added.name !== o.name) {
        recentlyAdded.delete(rsKey);
        return [`pod ${id} deleted from ${o.node}; pod ${o.namespace}/${added.name} replaces ${o.name}`, "warn"];
      }
      recentlyDeleted.set(rsKey, { name: o.name, at: Date.now() });
      return [`pod ${id} deleted from ${o.node}`, "warn"];
    }
    if (old && old.phase !== o.phase) {
      if (o.phase === "failed") return [`pod ${id} failed: ${o.message || "no message"}`, "error"];
      return [`pod ${id} is ${o.phase} on ${o.node}`, "info"];
    }
    if (old && old.ready !== o.ready) return [`pod ${id} is ${o.ready ? "ready" : "not ready"}`, o.ready ? "info" : "warn"];
    if (old && o.restarts > old.restarts) return [`pod ${id} restarted (${o.restarts} restarts)`, "warn"];
    return null;
  }
  if (kind === "nodes") {
    if (type === "ADDED") {
      const back = nodesSeen.has(o.name);
      nodesSeen.add(o.name);
      return [back ? `host ${id} is back (pier ${o.version})` : `host ${id} joined (pier ${o.version})`, "info"];
    }
    if (type === "DELETED") return [`host ${id} lost (its lease expired)`, "error"];
    if (old && old.ready !== o.ready) return [o.ready ? `host ${id} is fresh again` : `host ${id}: the store is unreachable (stale)`, o.ready ? "info" : "error"];
    return null;
  }
  if (kind === "replicasets") {
    if (type === "ADDED") return [`replica set ${id} created (${o.replicas} replicas of ${o.template.image})`, "info"];
    if (type === "DELETED") return [`replica set ${id} deleted`, "warn"];
    if (old && old.replicas !== o.replicas) return [`replica set ${id} scaled from ${old.replicas} to ${o.replicas}`, "info"];
    if (old && old.problem !== o.problem) {
      return o.problem ? [`replica set ${id}: ${o.problem}`, "error"] : [`replica set ${id}: the problem is gone`, "info"];
    }
    const ro = o.rollout, oro = old && old.rollout;
    if (ro && (!oro || oro.state !== ro.state || oro.revision !== ro.revision)) {
      const lvl = ro.state === "paused" || ro.state === "rolled_back" ? "error" : "info";
      return [`rollout of ${id} to revision ${ro.revision}: ${ro.state.replace("_", " ")}${ro.message ? ` (${ro.message})` : ""}`, lvl];
    }
    return null;
  }
  if (kind === "services") {
    if (type === "ADDED") return [`service ${id} created${o.vip ? ` on ${o.vip}` : ""}`, "info"];
    if (type === "DELETED") return [`service ${id} deleted`, "warn"];
    return null;
  }
  return null;
}
// Replica set → the last pod deleted / created, to pair replacements.
const recentlyDeleted = new Map();
const recentlyAdded = new Map();
// Hosts the page has seen, to tell a host coming back from a new one.
const nodesSeen = new Set();

// ---- streams -----------------------------------------------------------

// Follow `path?watch=true` for ever. After a (re)connect the stream starts
// with every current object as ADDED, then a blank line (the end of the
// current state; blank lines are also the idle heartbeat). That first
// batch is compared with what the page had, quietly, so a reconnect is
// not a burst of false events, and what did not come back is deleted at
// the blank line. Everything after it is news. (The end of the batch is
// the server's marker, not a timer: on a loaded machine a timer can fire
// after the first live events, which would then pass unannounced.)
async function follow(kind, path, onChange) {
  let backoff = 500;
  for (;;) {
    const map = state[kind];
    const before = new Map(map);
    // The page's very first batch is the cluster as it is, not news.
    const firstConnect = before.size === 0;
    let quiet = true;
    const seen = new Set();
    const endQuiet = () => {
      quiet = false;
      for (const [k, old] of before) {
        if (!seen.has(k)) { map.delete(k); change(kind, "DELETED", old, old, onChange); }
      }
    };
    try {
      const r = await fetch(`${path}?watch=true`, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { loggedOut(); return; }
      if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
      setLive(kind, true);
      backoff = 500;
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) { // the end of the first batch, or a heartbeat
            if (quiet) endQuiet();
            continue;
          }
          const ev = JSON.parse(line);
          const o = ev.object;
          const k = keyOf(kind, o);
          if (quiet && ev.type !== "DELETED") {
            seen.add(k);
            const old = before.get(k);
            map.set(k, o);
            if (!old) change(kind, "ADDED", o, null, onChange, firstConnect);
            else if (JSON.stringify(old) !== JSON.stringify(o)) change(kind, "MODIFIED", o, old, onChange);
          } else if (ev.type === "DELETED") {
            const old = map.get(k) || before.get(k) || o;
            seen.delete(k);
            before.delete(k);
            map.delete(k);
            change(kind, "DELETED", o, old, onChange);
          } else {
            const old = map.get(k) || null;
            map.set(k, o);
            // An object the page did not have is new to it, whatever the
            // stream called it.
            change(kind, old ? ev.type : "ADDED", o, old, onChange);
          }
        }
        scheduleRender();
      }
    } catch (e) {
      console.warn(`pier dashboard: the ${kind} stream broke, reconnecting:`, e.message || e);
    }
    setLive(kind, false);
    await new Promise((res) => setTimeout(res, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

// `first`: the page's very first batch, which is the cluster as it is,
// not news.
function change(kind, type, o, old, onChange, first) {
  if (onChange) onChange(type, o, old, first);
  if (kind === "nodes" && type === "ADDED" && first) nodesSeen.add(o.name);
  if (first) return;
  const d = describe(kind, type, o, old);
  if (d) addEvent(kind, d[0], d[1]);
}

function setLive(kind, up) {
  state.streams[kind] = up;
  const all = Object.values(state.streams);
  const live = all.length > 0 && all.every(Boolean);
  const b = document.getElementById("live");
  b.textContent = live ? "live" : "reconnecting";
  b.className = live ? "badge ok" : "badge bad";
}

function loggedOut() {
  const b = document.getElementById("live");
  b.textContent = "logged out";
  b.className = "badge bad";
  document.getElementById("cluster").textContent = "The session ended (the agent restarted, or the login expired). Run `pier dashboard` on the agent's host to log in again.";
}

// ---- traffic and autoscaler signals -------------------------------------

function onSignal(type, o, _old, first) {
  if (o.kind === "traffic") {
    const k = `${o.namespace}/${o.service}`;
    const series = state.traffic.get(k) || [];
    if (type !== "DELETED") {
      series.push({ t: o.at, active: o.active, rate: o.conn_rate, errors: o.connect_errors, p50: o.p50_first_byte_ms, p99: o.p99_first_byte_ms });
    }
    const cut = Date.now() - TRAFFIC_WINDOW_MS;
    while (series.length > 1 && series[1].t < cut) series.shift();
    state.traffic.set(k, series);
  } else if (o.kind === "autoscale") {
    const k = `${o.namespace}/${o.replicaset}`;
    const old = state.autoscale.get(k);
    if (type === "DELETED") { state.autoscale.delete(k); return; }
    state.autoscale.set(k, o);
    // New decisions since the page last saw the record (all of them for
    // a record made while the page is open).
    const seen = old ? old.total : first ? o.total : 0;
    if (o.total > seen) {
      for (const d of o.decisions.slice(-Math.min(o.total - seen, o.decisions.length))) {
        addEvent("autoscale", `autoscaler: ${k}: ${d.reason}`, "info");
      }
    }
  }
}

// ---- rendering ---------------------------------------------------------

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function replace(id, ...children) {
  const e = document.getElementById(id);
  e.replaceChildren(...children.flat());
}

function sorted(map) {
  return [...map.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map((e) => e[1]);
}

function render() {
  renderHosts();
  renderPlacement();
  renderServices();
  renderTraffic();
  renderReplicaSets();
  renderEvents();
}

function podsByNode() {
  const m = new Map();
  for (const p of sorted(state.pods)) {
    if (!m.has(p.node)) m.set(p.node, []);
    m.get(p.node).push(p);
  }
  return m;
}

function renderHosts() {
  const rows = sorted(state.nodes).map((n) =>
    el("tr", { "data-node": n.name },
      el("th", { scope: "row" }, n.name, n.name === state.node ? el("span", { class: "tag" }, "this host") : null),
      el("td", {}, el("span", { class: n.ready ? "state ok" : "state bad" }, n.ready ? "fresh" : "stale")),
      el("td", {}, n.version),
      el("td", {}, n.addr),
      el("td", {}, n.pods),
      el("td", {}, ago(n.started_at))));
  replace("hosts-body", rows.length ? rows : [el("tr", {}, el("td", { colspan: 6 }, "No hosts yet."))]);
}

function renderPlacement() {
  const byNode = podsByNode();
  const nodes = new Set([...state.nodes.keys(), ...byNode.keys()]);
  const cols = [...nodes].sort().map((node) =>
    el("div", { class: "host", role: "group", "aria-label": `pods on ${node}` },
      el("h3", {}, node, state.nodes.has(node) ? null : el("span", { class: "tag bad" }, "gone")),
      el("ul", {}, (byNode.get(node) || []).map((p) =>
        el("li", {
          class: `pod${p.ready ? "" : " notready"}`,
          "data-pod": p.name,
          "data-colour": colourOf(`${p.namespace}/${p.replicaset}`),
          title: `${p.namespace}/${p.name}: ${p.phase}${p.ready ? ", ready" : ""}`,
        }, p.name)))));
  replace("placement-map", cols.length ? cols : [el("p", {}, "No hosts yet.")]);
  // Colours go in through the CSSOM (the page's CSP allows no inline style).
  for (const li of document.querySelectorAll("#placement-map li.pod")) li.style.setProperty("--rs", li.dataset.colour);
  const sets = sorted(state.replicasets).map((rs) => {
    const li = el("li", {}, el("span", { class: "swatch", "aria-hidden": "true" }), `${rs.namespace}/${rs.name}`);
    li.style.setProperty("--rs", colourOf(`${rs.namespace}/${rs.name}`));
    return li;
  });
  replace("placement-legend", sets);
  // Replica sets × hosts: how many pods of each set run on each host.
  const hosts = [...nodes].sort();
  replace("matrix-head", el("tr", {}, el("th", { scope: "col" }, "Replica set"), hosts.map((h) => el("th", { scope: "col" }, h))));
  const rows = sorted(state.replicasets).map((rs) => {
    const k = `${rs.namespace}/${rs.name}`;
    const sw = el("span", { class: "swatch", "aria-hidden": "true" });
    sw.style.setProperty("--rs", colourOf(k));
    return el("tr", { "data-matrix": k }, el("th", { scope: "row" }, sw, k), hosts.map((h) => {
      const n = (byNode.get(h) || []).filter((p) => p.namespace === rs.namespace && p.replicaset === rs.name).length;
      return el("td", { class: n ? "count" : "count none" }, n);
    }));
  });
  replace("matrix-body", rows.length ? rows : [el("tr", {}, el("td", {}, "No replica sets yet."))]);
}

function renderServices() {
  const eps = new Map();
  for (const e of sorted(state.endpoints)) {
    const k = `${e.namespace}/${e.service}`;
    if (!eps.has(k)) eps.set(k, []);
    eps.get(k).push(e);
  }
  const rows = sorted(state.services).map((s) => {
    const k = `${s.namespace}/${s.name}`;
    const ports = s.ports.map((p) => `${p.port}→${p.target_port}${p.node_port ? ` (node port ${p.node_port})` : ""}`);
    const dns = state.domain ? `${s.name}.${s.namespace}.svc.${state.domain}` : "";
    const byHost = new Map();
    for (const e of eps.get(k) || []) {
      if (!byHost.has(e.node)) byHost.set(e.node, []);
      byHost.get(e.node).push(e);
    }
    const hosts = [...byHost.entries()].sort().map(([node, list]) =>
      el("li", {}, el("span", { class: "host-name" }, node),
        list.map((e) => {
          const route = e.static || e.node === state.node ? "direct" : "mesh";
          const ports = e.ports.map((p) => p.port).join(",");
          return el("span", { class: `ep ${e.ready ? "ok" : "bad"}`, "data-ep": e.id },
            `${e.pod || e.hostname || e.id} ${e.ip}${ports ? ":" + ports : ""}${e.addr ? ` (VIP ${e.addr})` : ""} · ${e.ready ? "ready" : "not ready"} · ${route}`);
        })));
    return el("tr", { "data-service": k },
      el("th", { scope: "row" }, k),
      el("td", {}, s.vip || "headless"),
      el("td", {}, ports.join(", ")),
      el("td", {}, el("code", {}, dns)),
      el("td", {}, hosts.length ? el("ul", { class: "eps" }, hosts) : "no endpoints"));
  });
  replace("services-body", rows.length ? rows : [el("tr", {}, el("td", { colspan: 5 }, "No services yet."))]);
}

// One small line chart: `series` of {t, v} (a value holds until the next
// record, so the line is drawn as steps, extended to now).
function chart(title, unit, lines) {
  const W = 260, H = 70, now = Date.now(), t0 = now - TRAFFIC_WINDOW_MS;
  let max = 0;
  for (const l of lines) for (const p of l.points) if (p.v !== null && p.v > max) max = p.v;
  const top = max > 0 ? max * 1.15 : 1;
  const x = (t) => ((Math.max(t, t0) - t0) / TRAFFIC_WINDOW_MS) * W;
  const y = (v) => H - (v / top) * H;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": `${title}, last 5 minutes` });
  s.append(svg("rect", { x: 0, y: 0, width: W, height: H, class: "plot" }));
  for (const l of lines) {
    let d = "";
    let last = null;
    for (const p of l.points) {
      if (p.v === null) continue;
      d += last === null ? `M${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}` : `H${x(p.t).toFixed(1)}V${y(p.v).toFixed(1)}`;
      last = p;
    }
    if (last !== null) d += `H${W}`;
    if (d) s.append(svg("path", { d, class: `line ${l.cls}` }));
  }
  const latest = lines.map((l) => {
    const p = [...l.points].reverse().find((q) => q.v !== null);
    return `${l.name} ${p ? fmt(p.v) : "–"}`;
  }).join(" · ");
  return el("figure", { class: "chart" }, s, el("figcaption", {}, el("strong", {}, title), ` (${unit}, max ${fmt(max)}): ${latest}`));
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

function renderTraffic() {
  const blocks = [];
  for (const s of sorted(state.services)) {
    const k = `${s.namespace}/${s.name}`;
    const series = state.traffic.get(k) || [];
    const pts = (f) => series.map((p) => ({ t: p.t, v: f(p) }));
    // Errors: connect failures per second, from the summed counters.
    const errs = series.map((p, i) => {
      if (i === 0) return { t: p.t, v: 0 };
      const q = series[i - 1];
      const dt = (p.t - q.t) / 1000;
      return { t: p.t, v: dt > 0 ? Math.max(0, p.errors - q.errors) / dt : 0 };
    });
    blocks.push(el("div", { class: "svc-traffic", "data-service": k },
      el("h3", {}, k),
      series.length === 0 ? el("p", { class: "note" }, "No traffic measured yet.") : [
        chart("New connections", "per second", [{ name: "rate", cls: "a", points: pts((p) => p.rate) }]),
        chart("Active connections", "open now", [{ name: "active", cls: "a", points: pts((p) => p.active) }]),
        chart("Errors", "failed connects per second", [{ name: "errors", cls: "bad", points: errs }]),
        chart("Time to first byte", "ms", [
          { name: "p50", cls: "a", points: pts((p) => p.p50) },
          { name: "p99", cls: "b", points: pts((p) => p.p99) },
        ]),
      ]));
  }
  replace("traffic-charts", blocks.length ? blocks : [el("p", {}, "No services yet.")]);
}

function renderReplicaSets() {
  const rows = sorted(state.replicasets).map((rs) => {
    const k = `${rs.namespace}/${rs.name}`;
    let auto = "off";
    if (rs.min_replicas !== undefined && rs.min_replicas !== null) {
      const sla = rs.sla || {};
      const targets = [];
      if (sla.max_active_per_pod) targets.push(`≤ ${sla.max_active_per_pod} open per pod`);
      if (sla.max_conn_rate_per_pod) targets.push(`≤ ${sla.max_conn_rate_per_pod} new/s per pod`);
      if (sla.p99_first_byte_ms) targets.push(`p99 first byte ≤ ${sla.p99_first_byte_ms} ms`);
      const st = state.autoscale.get(k);
      const ds = st ? st.decisions.slice(-3).reverse() : [];
      auto = el("div", {},
        el("div", {}, `${rs.min_replicas}–${rs.max_replicas} pods; ${targets.join(", ") || "no target"}`),
        ds.length ? el("ul", { class: "decisions" }, ds.map((d) => el("li", {}, `${clock(d.at)} ${d.reason}`))) : el("div", { class: "note" }, "no decisions yet"));
    }
    let ro = "none";
    if (rs.rollout) {
      const r = rs.rollout;
      const pct = rs.replicas > 0 ? Math.min(100, Math.round((rs.updated_ready / rs.replicas) * 100)) : 100;
      ro = el("div", {},
        el("div", {}, `revision ${r.revision}: ${r.state.replace("_", " ")}`),
        el("progress", { max: 100, value: pct, "aria-label": `rollout of ${k}: ${pct}% of pods updated and ready` }),
        el("span", { class: "note" }, ` ${rs.updated_ready}/${rs.replicas} updated and ready`),
        r.message ? el("div", { class: "note" }, r.message) : null);
    }
    const short = rs.ready < rs.replicas;
    const problem = rs.problem ? el("div", { class: "problem", role: "note" }, `problem: ${rs.problem}`) : null;
    return el("tr", { "data-replicaset": k },
      el("th", { scope: "row" }, el("span", { class: "swatch", "data-colour": colourOf(k), "aria-hidden": "true" }), k),
      el("td", {}, el("code", {}, rs.template.image), problem),
      el("td", {}, rs.replicas),
      el("td", {}, rs.current),
      el("td", {}, el("span", { class: short ? "state bad" : "state ok" }, rs.ready)),
      el("td", {}, auto),
      el("td", {}, ro));
  });
  replace("replicasets-body", rows.length ? rows : [el("tr", {}, el("td", { colspan: 7 }, "No replica sets yet."))]);
  for (const sw of document.querySelectorAll("#replicasets-body .swatch")) sw.style.setProperty("--rs", sw.dataset.colour);
}

function renderEvents() {
  const items = state.events.map((e) =>
    el("li", { class: `ev ${e.level}` }, el("time", { datetime: new Date(e.at).toISOString() }, clock(e.at)), ` ${e.text}`));
  replace("events-list", items.length ? items : [el("li", { class: "note" }, "Nothing has happened since the page opened.")]);
}

// ---- start -------------------------------------------------------------

async function start() {
  const r = await fetch(`${API}/version`, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { loggedOut(); return; }
  const v = await r.json();
  state.node = v.node;
  state.domain = v.domain;
  document.getElementById("cluster").textContent = `agent ${v.node} · pier ${v.version}`;
  follow("nodes", `${API}/nodes`);
  follow("pods", `${API}/pods`);
  follow("replicasets", `${API}/replicasets`);
  follow("services", `${API}/services`);
  follow("endpoints", `${API}/endpoints`);
  follow("signals", `${API}/signals`, onSignal);
  // Ages ("2 min ago") and the charts' time axis move with the clock.
  setInterval(scheduleRender, 5000);
  scheduleRender();
}

document.addEventListener("DOMContentLoaded", () => {
  start().catch((e) => {
    document.getElementById("cluster").textContent = `The dashboard could not start: ${e.message || e}`;
  });
});
