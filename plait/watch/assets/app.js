// plait's live page: polls /api/state once a second and redraws. No libraries, no network
// beyond this server: the charts are plain SVG.
"use strict";

const POLL_MS = 1000;
const MAX_POINTS = 1200; // points drawn per series; longer runs are thinned evenly
const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 150, PAD_L = 48, PAD_R = 8, PAD_T = 8, PAD_B = 20;

const state = { rows: [], events: [], last: null, axis: "step", started: null, generation: null };

const CHARTS = [
  { id: "loss", title: "loss", series: [{ key: "loss", label: "train", color: "#1e88e5" },
                                        { key: "val_loss", label: "validation", color: "#e53935", dots: true }] },
  { id: "lr", title: "learning rate", series: [{ key: "lr", color: "#6d4c41" }] },
  { id: "tps", title: "tokens/s", series: [{ key: "tokens_per_s", color: "#43a047" }] },
  { id: "mfu", title: "MFU (%)", series: [{ key: "mfu", color: "#8e24aa", scale: 100 }] },
  { id: "mem", title: "peak memory (GiB)", series: [{ key: "mem_gib", color: "#00897b" }] },
  { id: "time", title: "step time (s)", series: [{ key: "step_s", label: "step", color: "#546e7a" },
                                                 { key: "comm_s", label: "in collectives", color: "#fb8c00" }] },
  { id: "balance", title: "batch balance (max/mean tokens per rank; padding share)", optional: true,
    meaningful: (key, v) => key === "imbalance" ? v > 1.0001 : v > 0,
    series: [{ key: "imbalance", label: "imbalance", color: "#3949ab" }, { key: "padding", label: "padding", color: "#c0ca33" }] },
  { id: "bubble", title: "pipeline bubble", optional: true, series: [{ key: "bubble", color: "#f4511e" }] },
  { id: "sync", title: "outer-sync bytes (low bandwidth)", optional: true,
    series: [{ key: "sync_bytes", label: "bytes", color: "#5e35b1" }] },
  { id: "moe", title: "MoE load", optional: true,
    series: [{ key: "moe_max_imbalance", label: "max/mean expert load", color: "#d81b60" },
             { key: "moe_dropped", label: "dropped share", color: "#757575" }] },
];

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  // Styles go through the CSSOM: the page's Content-Security-Policy refuses inline style attributes.
  for (const [k, v] of Object.entries(attrs)) k === "style" ? Object.assign(node.style, v) : node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

function bytes(v) {
  if (!isFinite(v)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (!isFinite(s)) return "–";
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function buildCharts() {
  const box = document.getElementById("charts");
  for (const c of CHARTS) {
    const card = el("div", { class: "chart" + (c.optional ? " hidden" : ""), id: `chart-${c.id}` });
    card.append(el("h3", {}, c.title));
    card.append(el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" }));
    const legend = el("div", { class: "legend" });
    for (const s of c.series) if (s.label) legend.append(el("span", { style: { color: s.color } }, `● ${s.label}  `));
    card.append(legend);
    box.append(card);
  }
}

function xOf(row) {
  if (state.axis === "time") return row.time !== undefined && row.time !== null ? (row.time - state.started) : null;
  return row.step;
}

function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const stride = points.length / MAX_POINTS, out = [];
  for (let i = 0; i < MAX_POINTS; i++) out.push(points[Math.floor(i * stride)]);
  out.push(points[points.length - 1]);
  return out;
}

function drawChart(c) {
  const card = document.getElementById(`chart-${c.id}`);
  const svg = card.querySelector("svg");
  const lines = c.series.map(s => state.rows
    .filter(r => typeof r[s.key] === "number" && isFinite(r[s.key]) && xOf(r) !== null)
    .map(r => [xOf(r), r[s.key] * (s.scale || 1)]));
  const any = lines.some(l => l.length > 0);
  if (c.optional) {
    const shown = c.meaningful || ((key, v) => v !== 0);
    const meaningful = lines.some((l, i) => l.some(p => shown(c.series[i].key, p[1])));
    card.classList.toggle("hidden", !meaningful);
    if (!meaningful) return;
  }
  card.dataset.points = String(lines[0].length);
  card.dataset.lastX = lines[0].length ? String(lines[0][lines[0].length - 1][0]) : "";
  svg.replaceChildren();
  if (!any) { svg.append(el("svg:text", { x: W / 2 - 40, y: H / 2 }, "waiting for data")); return; }
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const line of lines) for (const [x, y] of line) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
  const sx = x => PAD_L + (x - x0) / (x1 - x0) * (W - PAD_L - PAD_R);
  const sy = y => H - PAD_B - (y - y0) / (y1 - y0) * (H - PAD_T - PAD_B);
  svg.append(el("svg:line", { x1: PAD_L, y1: H - PAD_B, x2: W - PAD_R, y2: H - PAD_B, stroke: "#ccc" }));
  svg.append(el("svg:line", { x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B, stroke: "#ccc" }));
  svg.append(el("svg:text", { x: 2, y: PAD_T + 8 }, fmt(y1, 3)));
  svg.append(el("svg:text", { x: 2, y: H - PAD_B }, fmt(y0, 3)));
  const xl = state.axis === "time" ? seconds : v => String(Math.round(v));
  svg.append(el("svg:text", { x: PAD_L, y: H - 4 }, xl(x0)));
  svg.append(el("svg:text", { x: W - PAD_R - 50, y: H - 4 }, xl(x1)));
  c.series.forEach((s, i) => {
    const pts = thin(lines[i]);
    if (!pts.length) return;
    if (s.dots || pts.length === 1) {
      for (const [x, y] of pts) svg.append(el("svg:circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: s.color }));
    }
    if (pts.length > 1) {
      svg.append(el("svg:polyline", { points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
                                      fill: "none", stroke: s.color, "stroke-width": 1.5 }));
    }
  });
}

function lastWith(key) {
  for (let i = state.rows.length - 1; i >= 0; i--) if (typeof state.rows[i][key] === "number") return state.rows[i];
  return null;
}

function drawCounters(s) {
  const train = lastWith("loss"), val = lastWith("val_loss");
  document.getElementById("run-dir").textContent = s.run_dir;
  document.getElementById("step").textContent = train ? train.step : (state.rows.length ? "0" : "–");
  document.getElementById("steps-total").textContent = s.run.steps ? ` / ${s.run.steps}` : "";
  document.getElementById("loss").textContent = train ? fmt(train.loss) : "–";
  document.getElementById("val-loss").textContent = val ? fmt(val.val_loss) : "–";
  document.getElementById("tps").textContent = train ? fmt(train.tokens_per_s, 3) : "–";
  document.getElementById("mfu").textContent = train && isFinite(train.mfu) ? `${(train.mfu * 100).toFixed(2)}%` : "–";
  document.getElementById("attempt").textContent = s.health ? String(s.health.attempt) : "–";
  document.getElementById("layout").textContent = s.run.layout ? `${s.run.layout} · ${s.run.nproc} rank(s) · ${s.run.model}` : "–";
}

function drawStatus(s) {
  const badge = document.getElementById("status");
  const bad = s.health && s.health.ranks.some(r => ["hung", "crashed", "nan"].includes(r.state));
  const text = s.finished ? "finished" : bad ? "stalled" : state.rows.length ? "running" : "waiting";
  badge.textContent = text;
  badge.className = `badge ${text}`;
}

function drawRanks(s) {
  const body = document.querySelector("#ranks tbody");
  const note = document.getElementById("health-note");
  body.replaceChildren();
  if (!s.health) {
    note.textContent = "(no monitor for this run: a single process, or resilience.watch = false)";
    return;
  }
  const age = s.now - s.health.time;
  note.textContent = `(the monitor's verdicts, ${seconds(Math.max(0, age))} ago · attempt ${s.health.attempt}` +
    ` · hang bound ${seconds(s.health.hang_bound_s)})`;
  for (const r of s.health.ranks) {
    const tr = el("tr", { "data-rank": r.rank, "data-state": r.state, id: `rank-${r.rank}` });
    if (["hung", "crashed", "nan"].includes(r.state)) tr.className = "fault";
    const cell = el("td");
    cell.append(el("span", { class: `state ${r.state}` }, r.state));
    tr.append(el("td", {}, `rank ${r.rank}`), cell, el("td", {}, r.step ?? "–"), el("td", {}, r.phase ?? "–"),
              el("td", {}, r.heartbeat_age_s !== undefined && r.exit_code === null
                ? seconds(r.heartbeat_age_s + Math.max(0, age)) : "–"),
              el("td", {}, r.step_s ? seconds(r.step_s) : "–"), el("td", {}, r.compute_s ? seconds(r.compute_s) : "–"),
              el("td", {}, r.collective || ""), el("td", {}, r.pid ?? "–"), el("td", { class: "detail" }, r.detail || ""));
    body.append(tr);
  }
}

function drawComm(latest) {
  const body = document.querySelector("#comm tbody");
  body.replaceChildren();
  const wire = (latest && latest.comm_bytes) || {}, secs = (latest && latest.comm_dim_s) || {};
  const dims = [...new Set([...Object.keys(wire), ...Object.keys(secs)])].sort();
  if (!dims.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: 4 }, "no collectives counted"));
    body.append(tr);
    return;
  }
  const most = Math.max(...dims.map(d => secs[d] || 0), 1e-12);
  for (const d of dims) {
    const bar = el("div", { class: "bar", style: { width: `${(100 * (secs[d] || 0) / most).toFixed(1)}%` } });
    const cell = el("td", { class: "bar-cell" });
    cell.append(bar);
    const tr = el("tr", { "data-dim": d });
    tr.append(el("td", {}, d), el("td", {}, bytes(wire[d] || 0)), el("td", {}, seconds(secs[d] || 0)), cell);
    body.append(tr);
  }
}

const KIND_COLOURS = { F: "#42a5f5", B: "#ffa726", W: "#66bb6a" };

function drawPipeline(p) {
  const panel = document.getElementById("pipeline-panel");
  panel.classList.toggle("hidden", !p || !p.ranks || !p.ranks.length);
  if (!p || !p.ranks || !p.ranks.length) return;
  document.getElementById("pipeline-note").textContent = `(step ${p.step}, ${p.schedule}; F forward, B backward, W weight grads)`;
  const end = Math.max(...p.ranks.map(r => r.end), ...p.ranks.flatMap(r => r.intervals.map(iv => iv[4])), 1e-9);
  const rowH = 22, width = 600, left = 50, height = rowH * p.ranks.length + 18;
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, width: "100%" });
  p.ranks.forEach((r, i) => {
    svg.append(el("svg:text", { x: 2, y: i * rowH + 15 }, `stage ${r.rank}`));
    for (const [kind, stage, mb, a, b] of r.intervals) {
      const x = left + a / end * (width - left - 4), w = Math.max(1, (b - a) / end * (width - left - 4));
      const rect = el("svg:rect", { x, y: i * rowH + 2, width: w, height: rowH - 4, fill: KIND_COLOURS[kind] || "#999" });
      rect.append(el("svg:title", {}, `${kind} stage ${stage} micro-batch ${mb}: ${seconds(b - a)}`));
      svg.append(rect);
      if (w > 12) svg.append(el("svg:text", { x: x + 2, y: i * rowH + 15 }, `${kind}${mb}`));
    }
  });
  svg.append(el("svg:text", { x: left, y: height - 2 }, `0 … ${seconds(end)}`));
  document.getElementById("pipeline").replaceChildren(svg);
}

function drawExperts(latest) {
  const load = latest && latest.moe_tokens_per_expert;
  const panel = document.getElementById("moe-panel");
  panel.classList.toggle("hidden", !Array.isArray(load) || !load.length);
  if (!Array.isArray(load) || !load.length) return;
  const experts = load[0].length, cell = 22, left = 56, svg = el("svg:svg", { viewBox: `0 0 ${left + experts * cell} ${load.length * cell + 16}`, width: "100%" });
  load.forEach((row, layer) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    svg.append(el("svg:text", { x: 2, y: layer * cell + 15 }, `layer ${layer}`));
    row.forEach((n, e) => {
      const share = n / total, even = 1 / experts, heat = Math.min(1, share / (2 * even));
      const rect = el("svg:rect", { x: left + e * cell, y: layer * cell, width: cell - 2, height: cell - 2,
                                    fill: `rgba(216, 27, 96, ${0.1 + 0.9 * heat})` });
      rect.append(el("svg:title", {}, `layer ${layer}, expert ${e}: ${(100 * share).toFixed(1)}% of tokens`));
      svg.append(rect);
    });
  });
  document.getElementById("moe").replaceChildren(svg);
}

function drawEvents() {
  const body = document.querySelector("#events tbody");
  body.replaceChildren();
  for (const e of state.events.slice(-200).reverse()) {
    const when = new Date(e.time * 1000).toLocaleTimeString();
    const ranks = Array.isArray(e.ranks) && e.ranks.length ? e.ranks.join(", ") : (e.rank ?? "");
    const tr = el("tr", { "data-kind": e.kind });
    tr.append(el("td", {}, when), el("td", { class: `kind-${e.kind}` }, e.kind), el("td", {}, String(ranks)),
              el("td", {}, e.step ?? ""), el("td", {}, e.detail || ""));
    body.append(tr);
  }
}

function apply(s) {
  state.generation = s.generation;
  if (s.rows_from === 0) state.rows = [];
  state.rows = state.rows.concat(s.rows);
  if (s.events_from === 0) state.events = [];
  state.events = state.events.concat(s.events);
  const timed = state.rows.find(r => typeof r.time === "number");
  state.started = timed ? timed.time : null;
  state.last = s;
  drawCounters(s);
  drawStatus(s);
  if (s.rows.length || s.rows_from === 0) for (const c of CHARTS) drawChart(c); // charts change with rows only
  drawRanks(s);
  drawComm(s.latest);
  drawPipeline(s.pipeline);
  drawExperts(s.latest);
  drawEvents();
  document.body.dataset.loaded = String(state.rows.length);
}

async function poll() {
  if (document.hidden) { setTimeout(poll, POLL_MS); return; } // a tab nobody looks at costs nothing
  try {
    const gen = state.generation === null ? "" : `&gen=${state.generation}`;
    const res = await fetch(`/api/state?rows=${state.rows.length}&events=${state.events.length}${gen}`, { cache: "no-store" });
    if (!res.ok) throw new Error(res.statusText);
    apply(await res.json());
  } catch (err) {
    const badge = document.getElementById("status");
    badge.textContent = "offline";
    badge.className = "badge offline";
  }
  setTimeout(poll, POLL_MS);
}

for (const input of document.querySelectorAll("input[name=axis]")) {
  input.addEventListener("change", () => {
    state.axis = input.value;
    for (const c of CHARTS) drawChart(c);
  });
}
buildCharts();
poll();
