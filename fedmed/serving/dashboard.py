"""A live web dashboard for one run directory: what a consortium operator watches during a study.

The federation already rewrites RUN_DIR/live.json atomically after every round and writes
metrics.json once at the end, so the dashboard is a read-only view of those files: it never
talks to the SuperLink or the sites, needs no database, and can be started before round 1
finishes (the page then says it is waiting) or pointed at a finished run long afterwards.

The page is a single self-contained HTML document (inline CSS, vanilla JS, charts drawn as
inline SVG): hospital networks and CI have no internet, so nothing may come from a CDN.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from fedmed.serving.server import serve, start_in_thread

RUN_FILES = ("metrics.json", "live.json")  # preferred first: metrics.json is written last
NO_STORE = {"Cache-Control": "no-store"}  # polling must never be answered from a cache


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """The run's JSON: metrics.json when the run finished, else live.json; None before round 1.

    NaN/Infinity (should a writer ever emit them) become null, because the browser's JSON.parse
    rejects them and a single bad metric must not blank the whole page.
    """
    for name in RUN_FILES:
        path = run_dir / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        return json.loads(text, parse_constant=lambda _: None)
    return None


def create_dashboard_app(run_dir: Path) -> FastAPI:
    """The dashboard for ``run_dir``: ``/`` (the page), ``/api/run`` (its data) and ``/health``.

    The files are re-read on every request (they are small), so the same app serves a run that
    is still going, one that just finished, and one that has not written anything yet.
    """
    run_dir = Path(run_dir)
    app = FastAPI(
        title="fedmed dashboard",
        description=f"Live view of the run in {run_dir}",
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        """The page; it fetches /api/run itself, so the HTML never goes stale."""
        return HTMLResponse(PAGE, headers=NO_STORE)

    @app.get("/api/run")
    def run() -> JSONResponse:
        """metrics.json if present, else live.json; 404 with a hint if the run has not started."""
        try:
            payload = read_run(run_dir)
        except json.JSONDecodeError as exc:
            return JSONResponse(
                {"detail": f"the run JSON in {run_dir} is not valid JSON ({exc}); was it edited?"},
                status_code=500,
                headers=NO_STORE,
            )
        if payload is None:
            return JSONResponse(
                {"detail": f"no metrics.json or live.json in {run_dir} yet: is the run started?"},
                status_code=404,
                headers=NO_STORE,
            )
        return JSONResponse(payload, headers=NO_STORE)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness for scripts and tests; also says whether the run has written anything yet."""
        return {
            "status": "ok",
            "run_dir": str(run_dir),
            "has_data": any((run_dir / name).is_file() for name in RUN_FILES),
        }

    return app


def serve_dashboard(run_dir: Path, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the dashboard in the foreground until Ctrl-C (``fedmed dashboard RUN_DIR``).

    127.0.0.1 by default: the page shows per-hospital results, so exposing it on the network
    has to be a deliberate choice (``host="0.0.0.0"``).
    """
    serve(create_dashboard_app(run_dir), host, port)


def start_dashboard_thread(
    run_dir: Path, host: str = "127.0.0.1", port: int = 8050, timeout: float = 15.0
) -> tuple[uvicorn.Server, threading.Thread]:
    """Serve the dashboard from a daemon thread, so the coordinator can show a run LIVE.

    Returns once the socket accepts connections, or raises RuntimeError naming host:port if it
    cannot (the port is taken, say): a dashboard that silently failed would leave the operator
    staring at a dead URL. ``port=0`` picks a free port; read it back from
    ``server.config.port``. Stop it with :func:`stop_dashboard_thread`.
    """
    handle = start_in_thread(create_dashboard_app(run_dir), host, port or None, timeout)
    return handle.server, handle.thread


def stop_dashboard_thread(
    server: uvicorn.Server, thread: threading.Thread, timeout: float = 10.0
) -> None:
    """Ask uvicorn to exit and wait for its thread, so no server outlives the run or test."""
    server.should_exit = True
    thread.join(timeout=timeout)


# The page. Kept here (not in a separate .html) so it ships inside the module with no package
# data to configure. DOM hooks for tests: svg.chart[data-metric][data-rounds][data-series],
# path[data-site][data-points], table#replies tr[data-round] td[data-site][data-status], and on
# <body> data-state (loading|waiting|rendered), data-status (running|finished), data-round.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedmed dashboard</title>
<link rel="icon" href="data:,">
<style>
  :root { --ink: #1d2733; --muted: #5b6b7c; --line: #dde3ea; --bg: #f4f6f9; --card: #fff;
          --ok: #1a7f37; --bad: #c62828; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--ink);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
  header { background: #17324d; color: #fff; padding: 14px 24px; display: flex;
           flex-wrap: wrap; align-items: center; gap: 10px 18px; }
  header h1 { font-size: 20px; margin: 0 12px 0 0; font-weight: 600; }
  .pill { border-radius: 999px; padding: 2px 10px; font-size: 13px;
          background: rgba(255,255,255,.14); white-space: nowrap; }
  .pill b { font-weight: 600; }
  .status-running { background: #ffb300; color: #2b1d00; }
  .status-finished { background: #43a047; color: #fff; }
  .status-failed { background: #c62828; color: #fff; }
  .status-waiting { background: #90a4ae; color: #fff; }
  #updated { margin-left: auto; font-size: 12px; opacity: .8; }
  main { padding: 16px 24px 32px; max-width: 1400px; margin: 0 auto; }
  #notice { display: none; margin: 0 0 14px; padding: 10px 14px; border-radius: 6px;
            background: #fff4e5; border: 1px solid #ffcc80; }
  #notice.show { display: block; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
          padding: 12px 16px 10px; }
  .card h2 { font-size: 15px; margin: 0 0 4px; font-weight: 600; }
  .card p.sub { margin: 0 0 6px; color: var(--muted); font-size: 12px; }
  #legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 0 0 12px; padding: 8px 14px; }
  #legend span { display: inline-flex; align-items: center; gap: 6px; font-size: 13px; }
  #legend i { display: inline-block; width: 22px; height: 0; border-top: 3px solid; }
  #legend i.avg { border-top-width: 5px; }
  #legend i.dash { border-top-style: dashed; }
  #charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr));
            gap: 14px; }
  svg.chart { width: 100%; height: auto; display: block; }
  svg.chart text { font-size: 11px; fill: var(--muted); }
  svg.chart .grid { stroke: var(--line); }
  svg.chart .axis { stroke: #9aa7b4; }
  svg.chart path.series { fill: none; stroke-width: 2; stroke-linejoin: round; }
  svg.chart path.series.avg { stroke-width: 4; }
  svg.chart .budget { stroke: var(--bad); stroke-dasharray: 6 4; stroke-width: 1.5; }
  svg.chart text.budget-label { fill: var(--bad); }
  svg.chart text.empty { font-size: 13px; }
  .row2 { display: grid; grid-template-columns: minmax(300px, 1fr) minmax(420px, 1.6fr);
          gap: 14px; margin-top: 14px; align-items: start; }
  @media (max-width: 1000px) { .row2 { grid-template-columns: 1fr; } }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  th { font-weight: 600; color: var(--muted); font-size: 12px; }
  #replies td, #replies th { text-align: center; }
  #replies td:first-child, #replies th:first-child { text-align: left; }
  #replies td[data-status="ok"] { color: var(--ok); font-weight: 700; }
  #replies td[data-status="failed"] { color: #fff; background: var(--bad); font-weight: 700;
                                      cursor: help; }
  #replies td.partial { background: #ef9a9a; color: #7f0000; }
  .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
            margin-right: 6px; vertical-align: 0; }
  tr.avg td { font-weight: 700; border-top: 2px solid var(--ink); }
  tr.missing td { color: var(--muted); font-style: italic; }
  #failures { margin: 10px 0 0; padding-left: 18px; font-size: 12.5px; }
  #failures li { margin: 2px 0; }
  footer { color: var(--muted); font-size: 12px; margin-top: 16px; }
</style>
</head>
<body data-state="loading">
<header>
  <h1 id="study">fedmed</h1>
  <span class="pill status-waiting" id="status">loading</span>
  <span class="pill" id="mode"></span>
  <span class="pill" id="round"></span>
  <span class="pill" id="privacy"></span>
  <span id="updated"></span>
</header>
<main>
  <div id="notice"></div>
  <div class="card" id="legend"></div>
  <div id="charts"></div>
  <div class="row2">
    <section class="card">
      <h2>Replies by round</h2>
      <p class="sub">&#10003; the site replied; &#10007; it failed or refused (hover for why);
        light red: it answered one phase (train or evaluate) but not the other.</p>
      <table id="replies"><thead></thead><tbody></tbody></table>
      <ul id="failures"></ul>
    </section>
    <section class="card">
      <h2 id="final-title">Per-site results</h2>
      <p class="sub" id="final-sub"></p>
      <table id="final"><thead></thead><tbody></tbody></table>
    </section>
  </div>
  <footer id="footer"></footer>
</main>
<script>
"use strict";
const POLL_MS = 2000;
const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                 "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
// A metric's chart (and its column in the results table) appears when the run reports it, so
// every task shows its own metrics: accuracy and ROC-AUC for tables, images and series,
// macro-F1 for text, the C-index for survival.
const CHARTS = [
  {metric: "accuracy", title: "Accuracy", sub: "global model on each site's test split",
   bounded: true},
  {metric: "macro_f1", title: "Macro-F1", sub: "global model on each site's test split",
   bounded: true},
  {metric: "roc_auc", title: "ROC-AUC", sub: "global model on each site's test split",
   bounded: true},
  {metric: "c_index", title: "C-index (Harrell)", sub: "global model on each site's test split",
   bounded: true},
  {metric: "loss", title: "Loss", sub: "test loss of the global model (lower is better)",
   bounded: false, always: true},
  {metric: "epsilon", title: "Privacy spent (\\u03b5)",
   sub: "cumulative \\u03b5 per site; dashed red = each site's target budget", bounded: false,
   always: true},
];
const COLUMNS = [["c_index", "C-index"], ["accuracy", "accuracy"], ["macro_f1", "macro-F1"],
                 ["roc_auc", "ROC-AUC"], ["f1", "F1"], ["precision", "precision"],
                 ["recall", "recall"], ["loss", "loss"]];
let lastText = null;

function el(tag, attrs, ...children) {
  const svg = ["svg", "path", "line", "text", "circle", "g", "title", "rect"].includes(tag);
  const node = svg ? document.createElementNS(SVGNS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
  return Number(v).toFixed(digits === undefined ? 3 : digits);
}

function fmtSmall(v) {
  return isNum(v) && v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential() : v;
}

function isNum(v) { return typeof v === "number" && Number.isFinite(v); }

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function colorOf(sites, site) { return PALETTE[sites.indexOf(site) % PALETTE.length]; }

// One {name, values[round-1], ...} per line of a chart.
function seriesFor(run, metric) {
  const sites = run.sites || [];
  const hist = run.history || [];
  const out = [];
  if (metric === "epsilon") {
    for (const s of sites) {
      out.push({site: s, color: colorOf(sites, s),
                values: hist.map(h => isNum((h.epsilon || {})[s]) ? h.epsilon[s] : null)});
    }
    if (hist.some(h => isNum(h.central_epsilon))) {
      out.push({site: "central", label: "central \\u03b5", color: "#000", dash: true,
                values: hist.map(h => isNum(h.central_epsilon) ? h.central_epsilon : null)});
    }
    return out;
  }
  for (const s of sites) {
    out.push({site: s, color: colorOf(sites, s), values: hist.map(h => {
      const ev = ((h.sites || {})[s] || {}).evaluate || {};
      return isNum(ev[metric]) ? ev[metric] : null;
    })});
  }
  out.push({site: "average", label: "average", color: "#000", avg: true,
            values: hist.map(h => isNum((h.average || {})[metric]) ? h.average[metric] : null)});
  return out;
}

function drawChart(run, spec) {
  const W = 560, H = 270, L = 54, R = 16, T = 12, B = 38;
  const hist = run.history || [];
  const rounds = hist.map(h => h.round);
  const series = seriesFor(run, spec.metric);
  const svg = el("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
                         "data-metric": spec.metric, "data-rounds": hist.length,
                         "data-series": series.length, "aria-label": spec.title});
  const maxRound = Math.max(run.rounds_planned || 0, ...rounds, 1);
  let budget = null;
  const priv = (run.config || {}).privacy || {};
  if (spec.metric === "epsilon" && priv.enabled && isNum(priv.target_epsilon)) {
    budget = priv.target_epsilon;
  }
  const vals = series.flatMap(s => s.values).filter(isNum);
  if (budget !== null) vals.push(budget);
  let lo = vals.length ? Math.min(...vals) : 0, hi = vals.length ? Math.max(...vals) : 1;
  if (spec.metric === "epsilon") lo = 0;
  const pad = (hi - lo) * 0.08 || 0.05;
  lo -= pad; hi += pad;
  if (spec.bounded) { lo = Math.max(0, lo); hi = Math.min(1, hi); }
  if (spec.metric === "epsilon" || spec.metric === "loss") lo = Math.max(0, lo);
  const step = niceStep(hi - lo, 5);
  lo = Math.floor(lo / step) * step; hi = Math.ceil(hi / step) * step;
  if (hi <= lo) hi = lo + step;
  const x = r => maxRound === 1 ? L + (W - L - R) / 2 : L + (r - 1) / (maxRound - 1) * (W - L - R);
  const y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  let digits = 0;  // as many decimals as the tick step needs (2.5 -> 1, 0.05 -> 2)
  while (digits < 6 && Math.abs(step * 10 ** digits - Math.round(step * 10 ** digits)) > 1e-9) {
    digits += 1;
  }
  for (let v = lo; v <= hi + step / 1e6; v += step) {
    svg.append(el("line", {class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
    svg.append(el("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, v.toFixed(digits)));
  }
  const xStep = maxRound <= 12 ? 1 : Math.ceil(niceStep(maxRound - 1, 8));
  for (let r = 1; r <= maxRound; r += xStep) {
    svg.append(el("line", {class: "axis", x1: x(r), x2: x(r), y1: H - B, y2: H - B + 4}));
    svg.append(el("text", {x: x(r), y: H - B + 16, "text-anchor": "middle"}, r));
  }
  svg.append(el("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  svg.append(el("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, "round"));
  if (budget !== null) {
    svg.append(el("line", {class: "budget", x1: L, x2: W - R, y1: y(budget), y2: y(budget)}));
    svg.append(el("text", {class: "budget-label", x: W - R - 4, y: y(budget) - 5,
                           "text-anchor": "end"}, `site target \\u03b5 = ${budget}`));
  }
  // Sites first, average (or central) last so it is drawn on top.
  for (const s of series) {
    let d = "", pen = false, points = 0;
    const dots = [];
    s.values.forEach((v, i) => {
      if (!isNum(v)) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(rounds[i]).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true; points += 1;
      dots.push(el("circle", {cx: x(rounds[i]), cy: y(v), r: s.avg ? 4 : 3, fill: s.color},
                   el("title", {}, `${s.label || s.site}, round ${rounds[i]}: ${fmt(v)}`)));
    });
    const cls = "series" + (s.avg ? " avg" : "");
    const g = el("g", {"data-site": s.site});
    g.append(el("path", {class: cls, d: d || null, stroke: s.color, "data-site": s.site,
                         "data-points": points, "stroke-dasharray": s.dash ? "7 4" : null}));
    dots.forEach(c => g.append(c));
    svg.append(g);
  }
  if (!hist.length) {
    svg.append(el("text", {class: "empty", x: (L + W - R) / 2, y: (T + H - B) / 2,
                           "text-anchor": "middle"}, "waiting for round 1\\u2026"));
  }
  let sub = spec.sub;
  const idle = series.filter(s => s.site !== "central" && !s.values.some(isNum));
  if (spec.metric === "epsilon" && hist.length && idle.length) {
    sub += ` \u00b7 nothing spent by ${idle.map(s => s.site).join(", ")} (never trained)`;
  }
  return el("section", {class: "card"}, el("h2", {}, spec.title),
            el("p", {class: "sub"}, sub), svg);
}

function drawLegend(run) {
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  const sites = run.sites || [];
  for (const s of sites) {
    legend.append(el("span", {"data-site": s}, el("i", {style: `color:${colorOf(sites, s)}`}), s));
  }
  legend.append(el("span", {"data-site": "average"}, el("i", {class: "avg", style: "color:#000"}),
                   "average over sites"));
  if ((run.history || []).some(h => isNum(h.central_epsilon))) {
    legend.append(el("span", {"data-site": "central"},
                     el("i", {class: "dash", style: "color:#000"}), "central \\u03b5"));
  }
}

// A site "failed" in a round when a failure names it, or when it sent nothing at all.
function replyStatus(h, site) {
  const mine = (h.failures || []).filter(f => f.site === site);
  const entry = (h.sites || {})[site] || {};
  const parts = Object.keys(entry);
  if (mine.length) {
    const why = mine.map(f => `${f.phase}: ${f.reason}`);
    if (parts.length) why.push(`(${parts.join(" and ")} replied)`);
    return {status: "failed", why: why.join("\\n"), partial: parts.length > 0};
  }
  if (!parts.length) return {status: "failed", why: "no reply from this site", partial: false};
  return {status: "ok", why: `${parts.join(" and ")} replied`, partial: false};
}

function drawReplies(run) {
  const sites = run.sites || [];
  const table = document.getElementById("replies");
  const head = el("tr", {}, el("th", {}, "round"));
  for (const s of sites) {
    const sw = el("span", {class: "swatch", style: `background:${colorOf(sites, s)}`});
    head.append(el("th", {}, sw, s));
  }
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  const other = document.getElementById("failures");
  other.replaceChildren();
  const why = new Map();  // "site|phase|reason" -> rounds, so a refusal every round is one line
  for (const h of run.history || []) {
    const tr = el("tr", {"data-round": h.round}, el("td", {}, h.round));
    for (const s of sites) {
      const r = replyStatus(h, s);
      tr.append(el("td", {"data-site": s, "data-status": r.status, title: r.why,
                          class: r.partial ? "partial" : null},
                   r.status === "ok" ? "\\u2713" : "\\u2717"));
    }
    body.append(tr);
    for (const f of h.failures || []) {
      const key = `${f.site}|${f.phase}|${f.reason}`;
      if (!why.has(key)) why.set(key, {f: f, rounds: []});
      why.get(key).rounds.push(h.round);
    }
  }
  for (const {f, rounds} of why.values()) {
    const label = rounds.length > 1 ? `rounds ${rounds.join(", ")}` : `round ${rounds[0]}`;
    other.append(el("li", {"data-site": f.site}, el("b", {}, f.site),
                    ` ${f.phase} failed in ${label}: ${f.reason}`));
  }
}

function drawFinal(run) {
  const fin = run.final || {};
  const sites = run.sites || [];
  const given = [fin.average || {}, ...Object.values(fin.sites || {})];
  let cols = COLUMNS.filter(([k]) => given.some(m => isNum(m[k])));
  if (!cols.length) cols = [["loss", "loss"]];
  const running = run.status !== "finished";
  document.getElementById("final-title").textContent =
    running ? "Per-site results (latest round)" : "Final per-site results";
  document.getElementById("final-sub").textContent = fin.round ?
    `Global model after round ${fin.round}, evaluated on each site's own test split. ` +
    "The average is unweighted over the sites that reported; \\u03b5 is what each site " +
    "has spent so far." : "No round has finished yet.";
  const table = document.getElementById("final");
  const head = el("tr", {}, el("th", {}, "site"));
  for (const [, label] of cols) head.append(el("th", {}, label));
  head.append(el("th", {}, "test rows"), el("th", {}, "\\u03b5 spent"));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  const missing = new Set(fin.missing_sites || []);
  for (const s of sites) {
    const m = (fin.sites || {})[s] || {};
    const tr = el("tr", {"data-site": s, class: missing.has(s) ? "missing" : null},
                  el("td", {}, el("span", {class: "swatch",
                                           style: `background:${colorOf(sites, s)}`}), s));
    if (missing.has(s) && !isNum(m[cols[0][0]])) {
      tr.append(el("td", {colspan: cols.length + 1}, `no result in round ${fin.round}`));
    } else {
      for (const [k] of cols) tr.append(el("td", {}, fmt(m[k])));
      tr.append(el("td", {}, isNum(m["num-examples"]) ? Math.round(m["num-examples"]) : "n/a"));
    }
    tr.append(el("td", {}, isNum(m.epsilon) ? fmt(m.epsilon, 2) : "\\u2014"));
    body.append(tr);
  }
  const avgRow = (label, avg, central) => {
    const tr = el("tr", {class: "avg", "data-site": label}, el("td", {}, label));
    for (const [k] of cols) tr.append(el("td", {}, fmt((avg || {})[k])));
    tr.append(el("td", {}, ""), el("td", {},
      central && isNum(fin.central_epsilon) ? `central ${fmt(fin.central_epsilon, 2)}` : ""));
    return tr;
  };
  if (fin.average) body.append(avgRow("average", fin.average, true));
  if (fin.weighted_average) {
    const tr = avgRow("weighted by test rows", fin.weighted_average, false);
    tr.className = "";
    body.append(tr);
  }
}

function drawHeader(run) {
  const hist = run.history || [];
  const last = hist.length ? hist[hist.length - 1].round : 0;
  const status = run.status || "running";
  document.title = `${run.name || "fedmed"} \\u2014 ${status} \\u2014 fedmed dashboard`;
  document.getElementById("study").textContent = run.name || "fedmed run";
  const st = document.getElementById("status");
  st.textContent = status;
  st.className = `pill status-${["finished", "failed"].includes(status) ? status : "running"}`;
  const mode = document.getElementById("mode");
  mode.replaceChildren("mode ", el("b", {}, run.mode || "?"),
                       run.engine && run.engine !== "-" ? ` \\u00b7 ${run.engine}` : "");
  const round = document.getElementById("round");
  round.replaceChildren("round ", el("b", {}, last), ` of ${run.rounds_planned ?? "?"}`);
  const cfg = run.config || {};
  const priv = cfg.privacy || {};
  const pv = document.getElementById("privacy");
  pv.textContent = priv.enabled ?
    `DP target \\u03b5 ${priv.target_epsilon}, \\u03b4 ${fmtSmall(priv.delta)}` : "no local DP";
  const strategy = (cfg.strategy || {}).name;
  const parts = [`${(run.sites || []).length} sites`];
  if (strategy) parts.push(`strategy ${strategy}`);
  if (isNum(run.wall_seconds)) parts.push(`took ${run.wall_seconds.toFixed(1)} s`);
  if (run.fedmed_version) parts.push(`fedmed ${run.fedmed_version}`);
  document.getElementById("footer").textContent = parts.join(" \\u00b7 ");
}

function reports(run, metric) {
  return (run.history || []).some(h => isNum((h.average || {})[metric]) ||
    Object.values(h.sites || {}).some(r => isNum((r.evaluate || {})[metric])));
}

function render(run) {
  drawHeader(run);
  drawLegend(run);
  const charts = document.getElementById("charts");
  const shown = CHARTS.filter(spec => spec.always || reports(run, spec.metric));
  charts.replaceChildren(...shown.map(spec => drawChart(run, spec)));
  drawReplies(run);
  drawFinal(run);
  document.body.dataset.state = "rendered";
  document.body.dataset.status = run.status || "running";
  const hist = run.history || [];
  document.body.dataset.round = hist.length ? hist[hist.length - 1].round : 0;
}

function notice(text) {
  const n = document.getElementById("notice");
  n.textContent = text || "";
  n.className = text ? "show" : "";
}

async function poll() {
  let again = true;
  try {
    const resp = await fetch("api/run", {cache: "no-store"});
    const text = await resp.text();
    if (resp.status === 404) {
      let msg = "waiting for the run to write its first round";
      try { msg = JSON.parse(text).detail || msg; } catch (e) { /* keep default */ }
      notice(msg);
      document.body.dataset.state = "waiting";
      const st = document.getElementById("status");
      st.textContent = "waiting"; st.className = "pill status-waiting";
    } else if (!resp.ok) {
      notice(`the dashboard server answered ${resp.status}: ${text.slice(0, 300)}`);
    } else {
      notice("");
      if (text !== lastText) {
        lastText = text;
        render(JSON.parse(text));
      }
      again = !["finished", "failed"].includes(document.body.dataset.status);
    }
  } catch (err) {
    notice(`cannot reach the dashboard server (${err}); retrying every ${POLL_MS / 1000} s`);
  }
  document.getElementById("updated").textContent =
    `${again ? "updated" : "final, loaded"} ${new Date().toLocaleTimeString()}`;
  if (again) setTimeout(poll, POLL_MS);
}

poll();
</script>
</body>
</html>
"""
