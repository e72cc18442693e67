// latticaray dashboard: polls /api/snapshot and /api/history and draws them with plain DOM/SVG.
// Everything from the mesh (names, IDs, errors) is untrusted: it goes in as text, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PATHS = ["self", "unix", "direct", "punched", "relayed", "none"];
const PATH_LABEL = {
  self: "this node", unix: "Unix (same host)", direct: "direct QUIC/TCP",
  punched: "hole-punched", relayed: "relayed", none: "not connected",
};
const SERIES = [
  ["running", "running"], ["queued", "queued"], ["finished_rate", "finished / s"], ["failed", "failed"],
];
const POLL_MS = 2000;
let renders = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function shortId(id, n = 12) {
  id = String(id || "");
  return id.length > n ? id.slice(0, 4) + "…" + id.slice(-(n - 5)) : id;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n) || 0, i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}

function bar(used, total, label) {
  const share = total > 0 ? Math.min(1, used / total) : 0;
  const fill = el("span");
  fill.style.width = (share * 100).toFixed(1) + "%";
  return el("div", { class: "bar", title: label }, fill, el("em", {}, label));
}

function pathBadge(path) {
  return el("span", { class: "path path-" + (PATHS.includes(path) ? path : "none") }, path);
}

function fillTable(id, rows, cells) {
  const body = document.querySelector("#" + id + " tbody");
  const trs = rows.map((row) => {
    const tr = el("tr");
    for (const c of cells(row)) tr.append(c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c));
    return tr;
  });
  if (!trs.length) {
    const cols = document.querySelectorAll("#" + id + " thead th").length;
    trs.push(el("tr", {}, el("td", { colspan: cols, class: "muted" }, "none")));
  }
  body.replaceChildren(...trs);
}

function td(value, cls) { return el("td", { class: cls }, value); }

// --- the mesh graph -------------------------------------------------------------------------

function pathFromObserver(snap) {
  const out = {};
  for (const l of snap.links) if (l.src === snap.observer) out[l.dst] = l;
  return out;
}

function drawMesh(snap) {
  const root = document.getElementById("mesh");
  const W = 560, H = 400, cx = W / 2, cy = H / 2 + 4, R = 150;
  const byPath = pathFromObserver(snap);
  const order = (n) => PATHS.indexOf(n.node_id === snap.observer ? "self" : (byPath[n.node_id] || {}).path || "none");
  const others = snap.nodes.filter((n) => n.node_id !== snap.observer)
    .sort((a, b) => order(a) - order(b) || a.node_id.localeCompare(b.node_id));
  const pos = { [snap.observer]: [cx, cy] };
  others.forEach((n, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, others.length);
    pos[n.node_id] = [cx + R * Math.cos(a) * 1.25, cy + R * Math.sin(a)];
  });
  const links = svg("g", { class: "links" });
  const seen = new Set();
  const linkRows = snap.links.slice().sort((a, b) => (a.src === snap.observer ? -1 : 0) - (b.src === snap.observer ? -1 : 0));
  for (const l of linkRows) {
    const key = [l.src, l.dst].sort().join("|");
    if (seen.has(key) || !pos[l.src] || !pos[l.dst]) continue;
    seen.add(key);
    const [x1, y1] = pos[l.src], [x2, y2] = pos[l.dst];
    const line = svg("line", {
      class: "link path-" + l.path, x1, y1, x2, y2, "data-src": l.src, "data-dst": l.dst, "data-path": l.path,
    }, svg("title", {}, `${shortId(l.src)} → ${shortId(l.dst)}: ${l.path} over ${l.transport || "?"}`
      + (l.rtt_ms != null ? `, RTT ${l.rtt_ms.toFixed(1)} ms` : "")));
    links.append(line);
    if (l.rtt_ms != null) {
      links.append(svg("text", { class: "rtt", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4 }, l.rtt_ms.toFixed(1) + " ms"));
    }
  }
  const nodes = svg("g", { class: "nodes" });
  for (const n of snap.nodes) {
    const p = pos[n.node_id];
    if (!p) continue;
    const state = n.stale && n.state === "ALIVE" ? "KNOWN" : n.state;
    const g = svg("g", {
      class: `node role-${n.role} state-${n.state}` + (n.stale ? " stale" : ""),
      transform: `translate(${p[0].toFixed(1)},${p[1].toFixed(1)})`, "data-node-id": n.node_id,
    });
    const r = n.node_id === snap.observer ? 20 : 16;
    g.append(svg("circle", { r }), svg("title", {}, `${n.node_id}\n${n.node_name} (${n.role}) ${state}`));
    g.append(svg("text", { y: r + 13 }, n.node_name || shortId(n.node_id)));
    g.append(svg("text", { class: "sub", y: r + 25 }, shortId(n.node_id, 10)));
    const cpuT = (n.resources_total || {}).CPU || 0, cpuU = (n.resources_used || {}).CPU || 0;
    if (cpuT > 0) {
      g.append(svg("rect", { class: "cpu-bg", x: -18, y: r + 29, width: 36, height: 4 }));
      g.append(svg("rect", { class: "cpu", x: -18, y: r + 29, width: (36 * Math.min(1, cpuU / cpuT)).toFixed(1), height: 4 }));
    }
    g.append(svg("text", { y: 4, fill: "#fff", "font-size": 10 }, String(n.tasks_running || "")));
    nodes.append(g);
  }
  root.replaceChildren(links, nodes);
  const legend = document.getElementById("legend");
  if (!legend.childElementCount) {
    for (const p of PATHS.slice(1)) {
      const sample = svg("svg", { viewBox: "0 0 28 10" },
        svg("line", { class: "link path-" + p, x1: 0, y1: 5, x2: 28, y2: 5 }));
      legend.append(el("span", { class: "key" }, sample, PATH_LABEL[p]));
    }
  }
}

// --- tables ---------------------------------------------------------------------------------

function drawTables(snap) {
  const byPath = pathFromObserver(snap);
  fillTable("nodes", snap.nodes, (n) => {
    const link = byPath[n.node_id];
    const path = n.node_id === snap.observer ? "self" : link ? link.path : "none";
    const tot = n.resources_total || {}, used = n.resources_used || {};
    const state = n.stale && n.state === "ALIVE" ? "KNOWN" : n.state;
    return [
      td(shortId(n.node_id, 16), "mono"), n.node_name || "-", n.role, td(state, "state-" + state),
      el("td", {}, pathBadge(path)),
      td(link && link.rtt_ms != null ? link.rtt_ms.toFixed(1) + " ms" : "-", "num"),
      el("td", {}, tot.CPU ? bar(used.CPU || 0, tot.CPU, `${used.CPU || 0} / ${tot.CPU}`) : "-"),
      el("td", {}, tot.memory ? bar(used.memory || 0, tot.memory, `${bytes(used.memory || 0)} / ${bytes(tot.memory)}`) : "-"),
      el("td", {}, n.object_store_capacity
        ? bar(n.object_store_bytes, n.object_store_capacity, `${bytes(n.object_store_bytes)} (${n.objects})`)
        : `${bytes(n.object_store_bytes)} (${n.objects})`),
      td(`${n.tasks_running} / ${n.tasks_queued}`, "num"), td(n.actors, "num"),
    ];
  });
  fillTable("actors", snap.actors, (a) => [
    td(shortId(a.actor_id, 14), "mono"), a.class_name, a.name || "-", td(a.state, "state-" + a.state),
    td(shortId(a.node_id), "mono"), td(a.pid == null ? "-" : a.pid, "num"), td(a.num_restarts, "num"),
  ]);
  fillTable("transfers", snap.transfers, (t) => {
    const share = t.bytes_total ? t.bytes_done / t.bytes_total : 0;
    const progress = el("progress", { max: 1, value: share.toFixed(4), "data-object": t.object_id });
    return [
      td(shortId(t.object_id, 18), "mono"), td(shortId(t.node_id), "mono"),
      td((t.direction === "in" ? "from " : "to ") + shortId(t.peer), "mono"), el("td", {}, pathBadge(t.path)),
      el("td", {}, progress, ` ${(share * 100).toFixed(0)}% of ${bytes(t.bytes_total)}`),
    ];
  });
  const objects = snap.objects.slice().sort((a, b) => b.object_size - a.object_size).slice(0, 50);
  fillTable("objects", objects, (o) => [
    td(shortId(o.object_id, 20), "mono"), td(bytes(o.object_size), "num"), o.reference_type,
    td(shortId(o.node_id), "mono"), td(o.cid ? shortId(o.cid, 24) : "-", "mono"),
  ]);
  const problems = Object.entries(snap.errors || {});
  document.getElementById("problems-card").hidden = problems.length === 0;
  document.getElementById("problems").replaceChildren(
    ...problems.map(([id, why]) => el("li", {}, el("span", { class: "mono" }, shortId(id, 20)), ": " + why)));
  const reporting = snap.nodes.filter((n) => !n.stale).length;
  document.getElementById("observer").textContent = "seen from " + shortId(snap.observer, 20);
  document.getElementById("summary").textContent =
    `${snap.nodes.length} nodes, ${reporting} reporting · ${snap.actors.length} actors · ${snap.objects.length} objects`;
  document.getElementById("updated").textContent = "updated " + new Date(snap.taken_at * 1000).toLocaleTimeString();
}

// --- history chart --------------------------------------------------------------------------

function drawHistory(history) {
  const root = document.getElementById("history");
  const W = 560, H = 260, L = 40, B = 22, T = 10, Rm = 10;
  const samples = history.samples || [];
  const points = samples.map((s, i) => {
    const prev = samples[i - 1];
    const dt = prev ? Math.max(1e-3, s.t - prev.t) : 1;
    return { ...s, finished_rate: prev ? Math.max(0, (s.finished - prev.finished) / dt) : 0 };
  });
  const max = Math.max(1, ...points.flatMap((p) => SERIES.map(([k]) => p[k] || 0)));
  const t0 = points.length ? points[0].t : 0, t1 = points.length ? points[points.length - 1].t : 1;
  const x = (t) => L + ((t - t0) / Math.max(1e-3, t1 - t0)) * (W - L - Rm);
  const y = (v) => H - B - (v / max) * (H - B - T);
  const parts = [svg("line", { class: "axis", x1: L, y1: H - B, x2: W - Rm, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B })];
  for (const v of [0, max / 2, max]) {
    parts.push(svg("text", { class: "tick", x: L - 6, y: y(v) + 3, "text-anchor": "end" }, v >= 10 ? v.toFixed(0) : v.toFixed(1)));
  }
  if (points.length > 1) {
    parts.push(svg("text", { class: "tick", x: L, y: H - 6 }, `${Math.round(t1 - t0)} s`));
    parts.push(svg("text", { class: "tick", x: W - Rm, y: H - 6, "text-anchor": "end" }, "now"));
  }
  for (const [key] of SERIES) {
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key] || 0).toFixed(1)}`).join(" ");
    if (d) parts.push(svg("path", { class: "series series-" + key, d, "data-series": key, "data-points": points.length }));
  }
  root.replaceChildren(...parts);
  const legend = document.getElementById("history-legend");
  if (!legend.childElementCount) {
    for (const [key, label] of SERIES) {
      legend.append(el("span", { class: "key" },
        svg("svg", { viewBox: "0 0 28 10" }, svg("line", { class: "series series-" + key, x1: 0, y1: 5, x2: 28, y2: 5 })), label));
    }
  }
  const last = points[points.length - 1];
  document.getElementById("totals").textContent = last
    ? `${last.finished} finished, ${last.failed} failed, ${last.running} running, ${last.queued} queued since the nodes started`
    : "no samples yet";
}

// --- polling --------------------------------------------------------------------------------

async function fetchJSON(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 10000);
  try {
    const response = await fetch(url, { signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

async function refresh() {
  const banner = document.getElementById("banner");
  try {
    const [snap, history] = await Promise.all([fetchJSON("/api/snapshot"), fetchJSON("/api/history")]);
    drawMesh(snap);
    drawTables(snap);
    drawHistory(history);
    banner.hidden = true;
    renders += 1;
    document.body.dataset.renders = String(renders);
    document.body.dataset.historyPoints = String((history.samples || []).length);
    document.body.dataset.ready = "1";
  } catch (err) {
    banner.textContent = "cannot reach the node: " + err.message;
    banner.hidden = false;
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
