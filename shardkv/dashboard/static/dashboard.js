// The shardkv dashboard: polls the proxy once a second and redraws, without a reload.
//
// Sources: /cluster (health, weights, shares, hints, the move's progress),
// /dashboard/ring.json (the ring's arcs; fetched again only when the map's
// epoch or its nodes change), /metrics (request rate and p99 per node, from
// the proxy's replica metrics; "-" where they are absent) and /explain for a
// typed key. Every value from the server reaches the page as text
// (textContent, attributes), never as HTML.
"use strict";

(function () {
  const POLL_MS = 1000;
  const P99_WINDOW_S = 10;
  const RADIUS = 128;
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = [
    "#2563eb", "#e11d48", "#16a34a", "#d97706", "#7c3aed",
    "#0891b2", "#db2777", "#65a30d", "#ea580c", "#4f46e5",
    "#0d9488", "#9333ea",
  ];
  const OPS = "shardkv_replica_operations_total";
  const LATENCY = "shardkv_replica_operation_duration_seconds_bucket";

  const colours = new Map();
  const state = {
    token: sessionStorage.getItem("shardkv-token") || "",
    ringKey: null,
    ring: null,
    history: [],
    metricsSeen: false,
    explained: null,
    cluster: null,
  };

  // -- Prometheus text format ----------------------------------------------------

  function parseValue(raw) {
    if (raw === "+Inf") return Infinity;
    if (raw === "-Inf") return -Infinity;
    if (raw === "NaN") return NaN;
    return Number(raw);
  }

  function parseLabels(text) {
    const labels = {};
    const re = /([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = re.exec(text)) !== null) {
      labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    return labels;
  }

  // The samples of a text exposition: [{name, labels, value}], comments skipped.
  function parseMetrics(text) {
    const samples = [];
    const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
    for (const raw of text.split("\n")) {
      const s = raw.trim();
      if (!s || s[0] === "#") continue;
      const m = line.exec(s);
      if (m) samples.push({ name: m[1], labels: parseLabels(m[2] || ""), value: parseValue(m[3]) });
    }
    return samples;
  }

  // Per node: operations so far, and the latency histogram's cumulative buckets (le -> count).
  function replicaSnapshot(samples, t) {
    const ops = {};
    const buckets = {};
    let seen = false;
    for (const s of samples) {
      const node = s.labels.node;
      if (node === undefined) continue;
      if (s.name === OPS) {
        ops[node] = (ops[node] || 0) + s.value;
        seen = true;
      } else if (s.name === LATENCY && s.labels.le !== undefined) {
        const le = parseValue(s.labels.le);
        const byLe = buckets[node] || (buckets[node] = new Map());
        byLe.set(le, (byLe.get(le) || 0) + s.value);
        seen = true;
      }
    }
    return { t: t, ops: ops, buckets: buckets, seen: seen };
  }

  // The q-quantile of cumulative buckets [[le, count], ...], as Prometheus estimates it.
  function histogramQuantile(q, buckets) {
    const sorted = buckets.slice().sort((a, b) => a[0] - b[0]);
    if (!sorted.length) return null;
    const total = sorted[sorted.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    for (let i = 0; i < sorted.length; i++) {
      const [le, count] = sorted[i];
      if (count < rank) continue;
      const lower = i > 0 ? sorted[i - 1][0] : 0;
      const below = i > 0 ? sorted[i - 1][1] : 0;
      if (le === Infinity) return i > 0 ? lower : null;
      if (count === below) return le;
      return lower + ((le - lower) * (rank - below)) / (count - below);
    }
    return null;
  }

  function rate(node) {
    const h = state.history;
    if (h.length < 2) return null;
    const now = h[h.length - 1];
    const before = h[h.length - 2];
    if (now.ops[node] === undefined) return null;
    let delta = now.ops[node] - (before.ops[node] || 0);
    if (delta < 0) delta = now.ops[node]; // the proxy restarted: its counters began again
    return delta / Math.max(0.001, now.t - before.t);
  }

  function p99(node) {
    const h = state.history;
    if (h.length < 2) return null;
    const now = h[h.length - 1];
    const base = h.find((s) => s !== now && now.t - s.t <= P99_WINDOW_S + 0.5) || null;
    const current = now.buckets[node];
    if (!current || !base) return null;
    const old = base.buckets[node] || new Map();
    const delta = [];
    for (const [le, count] of current) delta.push([le, count - (old.get(le) || 0)]);
    if (delta.some(([, c]) => c < 0)) return null;
    return histogramQuantile(0.99, delta);
  }

  // -- formatting ---------------------------------------------------------------

  function formatSeconds(s) {
    if (s === null || !isFinite(s)) return "-";
    if (s < 0.001) return (s * 1000).toFixed(2) + " ms";
    if (s < 1) return (s * 1000).toFixed(1) + " ms";
    return s.toFixed(2) + " s";
  }

  function formatRate(r) {
    if (r === null || !isFinite(r)) return "-";
    return r < 10 ? r.toFixed(1) : Math.round(r).toString();
  }

  function percent(x) {
    return (x * 100).toFixed(1) + " %";
  }

  function colourOf(node) {
    if (!colours.has(node)) colours.set(node, PALETTE[colours.size % PALETTE.length]);
    return colours.get(node);
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  // -- talking to the proxy -------------------------------------------------------

  class Refused extends Error {}

  async function get(path, asText) {
    const headers = {};
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const reply = await fetch(path, { headers: headers, cache: "no-store" });
    if (reply.status === 401 || reply.status === 403) {
      document.getElementById("token-form").hidden = false;
      throw new Refused(path + " needs a token (HTTP " + reply.status + ")");
    }
    if (!reply.ok) throw new Error(path + ": HTTP " + reply.status);
    return asText ? reply.text() : reply.json();
  }

  // -- drawing ------------------------------------------------------------------

  function point(fraction, r) {
    const a = fraction * 2 * Math.PI;
    return [(r * Math.sin(a)).toFixed(3), (-r * Math.cos(a)).toFixed(3)];
  }

  function arcPath(start, end) {
    if (end - start >= 0.9999) {
      // An SVG arc cannot close on itself: a whole circle is two halves.
      return arcPath(start, start + 0.5) + " " + arcPath(start + 0.5, end);
    }
    const [x1, y1] = point(start, RADIUS);
    const [x2, y2] = point(end, RADIUS);
    const large = end - start > 0.5 ? 1 : 0;
    return `M${x1} ${y1}A${RADIUS} ${RADIUS} 0 ${large} 1 ${x2} ${y2}`;
  }

  function drawRing(ring) {
    const arcs = document.getElementById("arcs");
    arcs.replaceChildren();
    const paths = new Map(ring.nodes.map((n) => [n.node, []]));
    for (const s of ring.segments) {
      if (s.end > s.start && paths.has(s.node)) paths.get(s.node).push(arcPath(s.start, s.end));
    }
    ring.nodes.forEach((n, i) => {
      const g = svg("g", { id: "arcs-" + i, class: "node-arcs", "data-node": n.node });
      const title = svg("title");
      title.textContent = `${n.node}: share ${percent(n.share)}, weight ${n.weight}`;
      g.appendChild(title);
      g.appendChild(svg("path", { d: paths.get(n.node).join(" "), stroke: colourOf(n.node) }));
      arcs.appendChild(g);
    });
    document.getElementById("ring-epoch").textContent =
      `epoch ${ring.epoch}${ring.provisional ? " (provisional)" : ""}` +
      ` · ${ring.segments.length} arcs`;
  }

  function healthOf(cluster, node) {
    const n = cluster.nodes.find((x) => x.node === node);
    return n ? n.health.status : "unknown";
  }

  function drawNodes(cluster) {
    const tbody = document.querySelector("#nodes tbody");
    const members = new Map((cluster.members || []).map((m) => [m.id, m]));
    const rows = [];
    for (const n of cluster.nodes) {
      const status = n.health.status;
      const member = members.get(n.node);
      const tr = el("tr", { "data-node": n.node, "data-status": status });
      const swatch = el("span", { class: "swatch" });
      swatch.style.backgroundColor = colourOf(n.node);
      const first = el("td");
      first.appendChild(swatch);
      tr.appendChild(first);
      tr.appendChild(el("td", { class: "node" }, n.node));
      const health = el("td", { class: "health" }, status);
      if (n.health.error) health.title = n.health.error;
      tr.appendChild(health);
      tr.appendChild(el("td", { class: "member-state" }, member ? member.state : "-"));
      tr.appendChild(el("td", { class: "num weight" }, String(n.weight)));
      tr.appendChild(el("td", { class: "num share" }, percent(n.share)));
      tr.appendChild(el("td", { class: "num rate" }, formatRate(rate(n.node))));
      tr.appendChild(el("td", { class: "num p99" }, formatSeconds(p99(n.node))));
      tr.appendChild(el("td", { class: "num hints" }, String(n.hints_waiting)));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    for (const g of document.querySelectorAll("#arcs g.node-arcs")) {
      const status = healthOf(cluster, g.getAttribute("data-node"));
      g.setAttribute("data-status", status);
      g.classList.toggle("down", status === "down");
    }
    document.getElementById("undelivered").textContent = String(cluster.undelivered);
    const up = cluster.nodes.filter((n) => n.health.status === "up").length;
    document.getElementById("summary").textContent =
      `${up}/${cluster.nodes.length} nodes up · N=${cluster.replicas} R=${cluster.r} W=${cluster.w}` +
      (cluster.epoch !== undefined ? ` · epoch ${cluster.epoch}` : "");
    document.getElementById("ring-centre").textContent = `${cluster.nodes.length} nodes`;
  }

  function drawMove(cluster) {
    const box = document.getElementById("move");
    const text = document.getElementById("move-text");
    const bar = document.getElementById("move-bar");
    const rateText = document.getElementById("move-rate");
    const r = cluster.rebalance;
    if (!r) {
      box.setAttribute("data-state", "idle");
      text.textContent = "moves are not tracked by this proxy";
      rateText.textContent = "";
      return;
    }
    if (r.state === "idle") {
      box.setAttribute("data-state", "idle");
      text.textContent = "no move in progress";
      rateText.textContent = "";
      bar.style.width = "0";
      return;
    }
    box.setAttribute("data-state", r.error ? "error" : "moving");
    const done = r.keys_total > 0 ? r.keys_moved / r.keys_total : r.phase === "copying" ? 0 : 1;
    bar.style.width = (Math.min(1, done) * 100).toFixed(1) + "%";
    text.textContent =
      `epoch ${r.epoch} ${r.state}${r.aborted ? " (aborted)" : ""}: ` +
      `${r.keys_moved}/${r.keys_total} keys (${percent(done)})` +
      (r.error ? ` · ${r.error}` : "");
    const parts = [];
    parts.push(r.keys_per_s === null ? "rate -" : `${r.keys_per_s} keys/s`);
    if (r.eta_s !== null && r.eta_s !== undefined) parts.push(`eta ${r.eta_s} s`);
    if (r.waiting_for && r.waiting_for.length) parts.push("waiting for " + r.waiting_for.join(", "));
    rateText.textContent = parts.join(" · ");
  }

  function drawExplain() {
    const box = document.getElementById("explain");
    const marker = document.getElementById("marker");
    const x = state.explained;
    if (!x) {
      box.hidden = true;
      marker.setAttribute("hidden", "");
      return;
    }
    box.hidden = false;
    box.replaceChildren();
    if (x.error) {
      box.appendChild(el("div", { class: "error" }, x.error));
      marker.setAttribute("hidden", "");
      return;
    }
    const degrees = (x.fraction * 360).toFixed(3);
    marker.setAttribute("transform", `rotate(${degrees})`);
    marker.setAttribute("data-key", x.body.key);
    marker.setAttribute("data-owner", x.body.owner);
    marker.removeAttribute("hidden");
    document.getElementById("marker-dot").setAttribute("stroke", colourOf(x.body.owner));
    const head = el("div");
    head.appendChild(el("code", {}, x.body.key));
    head.appendChild(
      document.createTextNode(
        ` hashes to ${x.hash} (${percent(x.fraction)} round the ring); ` +
          `its replicas at ${x.at.toLocaleTimeString()}:`,
      ),
    );
    box.appendChild(head);
    const list = el("ol", { id: "explain-replicas" });
    for (const r of x.body.replicas) {
      const version = r.version ? `version ${r.version}` : r.error ? r.error : "not stored";
      const item = el("li", { "data-node": r.node }, `${r.node} (${r.status}) · ${version}`);
      item.style.color = colourOf(r.node);
      list.appendChild(item);
    }
    box.appendChild(list);
  }

  async function explain(key) {
    try {
      const text = await get("/explain?key=" + encodeURIComponent(key), true);
      const body = JSON.parse(text);
      // The hash is a 64-bit integer: read its digits, not the float JSON.parse makes of it.
      const digits = (/"hash"\s*:\s*(\d+)/.exec(text) || [])[1] || String(body.hash);
      const fraction = Number(BigInt(digits) >> 11n) / 2 ** 53;
      state.explained = { body: body, hash: digits, fraction: fraction, at: new Date() };
    } catch (e) {
      state.explained = { error: `cannot explain ${JSON.stringify(key)}: ${e.message}` };
    }
    drawExplain();
  }

  // -- the loop -------------------------------------------------------------------

  function ringKeyOf(cluster) {
    return `${cluster.epoch}|${cluster.nodes.map((n) => n.node + "=" + n.weight).join(",")}`;
  }

  async function pollMetrics() {
    let snapshot;
    try {
      snapshot = replicaSnapshot(parseMetrics(await get("/metrics", true)), performance.now() / 1000);
    } catch (e) {
      snapshot = null; // no /metrics, or not for us: the columns show "-"
    }
    if (!snapshot || !snapshot.seen) {
      state.history = [];
      return;
    }
    state.history.push(snapshot);
    const now = snapshot.t;
    while (state.history.length > 2 && now - state.history[0].t > P99_WINDOW_S + 1) {
      state.history.shift();
    }
  }

  async function poll() {
    const badge = document.getElementById("connection");
    try {
      const [cluster] = await Promise.all([get("/cluster"), pollMetrics()]);
      const key = ringKeyOf(cluster);
      if (key !== state.ringKey) {
        const ring = await get("/dashboard/ring.json");
        ring.nodes.forEach((n) => colourOf(n.node));
        state.ring = ring;
        state.ringKey = key;
        drawRing(ring);
      }
      state.cluster = cluster;
      drawNodes(cluster);
      drawMove(cluster);
      badge.setAttribute("data-state", "live");
      badge.textContent = "live · " + new Date().toLocaleTimeString();
      document.body.setAttribute("data-polls", String(Number(document.body.dataset.polls || 0) + 1));
    } catch (e) {
      badge.setAttribute("data-state", "error");
      badge.textContent = e instanceof Refused ? "token needed" : "proxy unreachable";
      badge.title = e.message;
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function start() {
    document.getElementById("explain-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = document.getElementById("explain-key").value;
      if (key) explain(key);
    });
    document.getElementById("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.token = document.getElementById("token").value.trim();
      sessionStorage.setItem("shardkv-token", state.token);
      document.getElementById("token-form").hidden = true;
    });
    poll();
  }

  // For tests driving the page: the pure parts, callable on sample input.
  window.shardkvDashboard = {
    parseMetrics: parseMetrics,
    replicaSnapshot: replicaSnapshot,
    histogramQuantile: histogramQuantile,
    arcPath: arcPath,
    drawMove: drawMove,
    explain: explain,
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
