"""The live preview page of ``edgesqz run --serve``: HTML, CSS and vanilla JavaScript in one string.

Served from memory by :mod:`edgesqz.device.serve` (no file is read per request). The page shows the
MJPEG stream in an ``<img>``, follows ``/events`` with ``EventSource`` (one ``classification``
object per frame, ``event`` objects with ``--event``, then ``run_summary``) and polls ``/status``
once a second for FPS, dropped frames, viewers, the model and device facts and the recent events
(each with its snapshot from ``/snapshot/ID.jpg``). A ``?token=`` in the page's address is carried into those
URLs. Everything from the server is inserted with ``textContent`` (never as HTML).
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
:root { color-scheme: dark; --bg: #101214; --card: #1c1f23; --fg: #e8eaed; --muted: #9aa3ad; --good: #2f6b3a; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       background: var(--bg); color: var(--fg); }
header { display: flex; align-items: center; justify-content: space-between; gap: .5rem; flex-wrap: wrap;
         padding: .5rem 1rem; background: var(--card); }
h1 { font-size: 1.1rem; margin: 0; }
h1 span { color: #7fd48c; }
.state { font-size: .85rem; padding: .1rem .6rem; border-radius: 1rem; background: #333; }
.state.live { background: var(--good); }
.state.warn { background: #6b5512; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(17rem, 1fr); gap: 1rem; padding: 1rem;
       max-width: 1400px; margin: 0 auto; }
@media (max-width: 820px) { main { grid-template-columns: minmax(0, 1fr); padding: .5rem; gap: .5rem; } }
#stream { display: block; width: 100%; height: auto; min-height: 6rem; background: #000; border-radius: .3rem; }
.note { color: #f5c361; margin: .4rem 0; }
h2 { font-size: .9rem; margin: .8rem 0 .35rem; color: var(--muted); font-weight: 600; }
h2:first-child { margin-top: 0; }
h2 small { font-weight: 400; }
#top { list-style: none; margin: 0; padding: 0; }
#top li { position: relative; display: flex; justify-content: space-between; gap: .5rem; overflow: hidden;
          padding: .3rem .55rem; margin-bottom: .25rem; background: var(--card); border-radius: .3rem; }
#top li:first-child { font-size: 1.15rem; font-weight: 700; }
#top .label, #top .score { position: relative; z-index: 1; }
#top .label { overflow-wrap: anywhere; }
#top .score { white-space: nowrap; font-variant-numeric: tabular-nums; }
#top .bar { position: absolute; inset: 0 auto 0 0; background: var(--good); z-index: 0; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(6.5rem, 1fr)); gap: .4rem; margin: .6rem 0 0; }
.stats div { background: var(--card); padding: .35rem .55rem; border-radius: .3rem; }
dt { color: var(--muted); font-size: .8rem; }
dd { margin: 0; font-variant-numeric: tabular-nums; }
.stats dd { font-size: 1.15rem; }
.facts { display: grid; grid-template-columns: auto minmax(0, 1fr); gap: .15rem .8rem; margin: 0; font-size: .85rem; }
.facts dd { overflow-wrap: anywhere; }
#events { list-style: none; margin: 0; padding: 0; }
#events li { display: flex; gap: .55rem; align-items: center; padding: .3rem; margin-bottom: .3rem;
             background: var(--card); border-radius: .3rem; font-size: .85rem; }
#events img { width: 6rem; height: auto; border-radius: .2rem; flex: none; background: #000; }
#events .name { font-weight: 700; overflow-wrap: anywhere; }
#events .on { color: #7fd48c; }
#events .meta { color: var(--muted); }
"""

SCRIPT = """
"use strict";
const token = new URLSearchParams(location.search).get("token");
const url = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
const $ = (id) => document.getElementById(id);
const ms = (v) => (v == null ? "-" : `${v.toFixed(1)} ms`);
let latest = null;
let drawing = false;
let ended = false;

function setState(text, kind) {
  const el = $("state");
  el.textContent = text;
  el.className = `state ${kind}`;
}

function prediction(p) {
  const li = document.createElement("li");
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = p.label;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `${(p.score * 100).toFixed(1)} %`;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = `${(p.score * 100).toFixed(1)}%`;
  li.append(bar, label, score);
  return li;
}

const scopes = new Map();  // "camera/zone" -> its latest top-k (runs with several cameras or zones)

function draw() {
  drawing = false;
  const r = latest;
  const list = $("top");
  list.dataset.frame = r.frame;
  $("frame").textContent = r.camera ? `${r.camera}: frame ${r.frame}` : `frame ${r.frame}`;
  if (r.zones || r.camera) {
    if (r.zones) {
      for (const [z, v] of Object.entries(r.zones)) scopes.set(r.camera ? `${r.camera}/${z}` : z, v);
    } else {
      scopes.set(r.camera, { top_k: r.top_k, classified: true });
    }
    const items = [];
    for (const [name, v] of [...scopes.entries()].sort()) {
      const best = v.top_k[0] || { label: "(below threshold)", score: 0 };
      const li = prediction({ label: `${name}: ${best.label}${v.classified ? "" : " (still)"}`, score: best.score });
      li.dataset.zone = name;
      items.push(li);
    }
    list.replaceChildren(...items);
  } else {
    list.replaceChildren(...r.top_k.map(prediction));
    if (!r.top_k.length) list.append(prediction({ label: "(below threshold)", score: 0 }));
  }
  $("inference").textContent = ms(r.latency_ms.inference);
  $("e2e").textContent = ms(r.latency_ms.end_to_end);
}

function facts(dl, rows) {
  dl.replaceChildren();
  for (const [name, value] of rows) {
    if (value == null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dl.append(dt, dd);
  }
}

let eventsShown = "";

function eventItem(e) {
  const li = document.createElement("li");
  li.dataset.id = e.id;
  li.dataset.state = e.state;
  if (e.snapshot_url) {
    const img = document.createElement("img");
    img.alt = `${e.name} at ${e.label}`;
    img.src = url(e.snapshot_url.slice(1));
    li.append(img);
  }
  const text = document.createElement("div");
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = e.name;
  const state = document.createElement("span");
  state.className = e.state === "start" ? "on" : "";
  state.textContent = e.state === "start" ? " · now" : ` · ${e.duration_s.toFixed(1)} s`;
  name.append(state);
  const meta = document.createElement("div");
  meta.className = "meta";
  const when = new Date(e.start * 1000).toLocaleTimeString();
  meta.textContent = `${when} · ${e.label} ${(e.peak_score * 100).toFixed(0)} % · ${e.frames} frames`;
  text.append(name, meta);
  li.append(text);
  return li;
}

function showEvents(list) {
  const key = list.map((e) => `${e.id}:${e.state}:${e.snapshot_url}`).join(",");
  if (key === eventsShown) return;
  eventsShown = key;
  $("events-box").hidden = list.length === 0;
  $("events").replaceChildren(...list.map(eventItem));
}

function showStatus(s) {
  if (s.events) showEvents(s.events);
  $("fps").textContent = s.fps.toFixed(1);
  $("dropped").textContent = s.dropped;
  $("viewers").textContent = `${s.viewers.stream} / ${s.viewers.max}`;
  const m = s.model;
  const cov = m.coverage ? `${m.coverage.delegated_ops}/${m.coverage.total_ops} ops` : null;
  if (m.name) {
    facts($("model"), [["model", m.name], ["file", m.file], ["sha256", m.sha256], ["version", m.version],
      ["input", `${m.input_size}x${m.input_size} ${m.input_dtype}`],
      ["output", `${m.output_kind}, ${m.classes} classes`], ["runtime", `${m.backend} ${m.backend_version}`],
      ["threads", m.threads], ["delegate", m.delegate || "CPU (XNNPACK)"], ["coverage", cov]]);
  }
  const d = s.device;
  facts($("device"), [["board", d.board], ["cpu", d.cpu], ["cores", d.cores], ["machine", d.machine],
    ["temperature", d.temperature_c == null ? null : `${d.temperature_c.toFixed(1)} °C`],
    ["clock", d.mhz ? `${Math.round(d.mhz.current)} MHz` : null], ["python", d.python],
    ["source", s.source],
    ...(s.cameras || []).map((c) => [`camera ${c.name}`, `${c.state}, ${c.frames} frames` +
      (c.zones.length ? `, zones ${c.zones.join(", ")}` : "") + (c.error ? ` (${c.error})` : "")])]);
  if (s.collect) {
    $("collect").hidden = false;
    const known = s.collect.labels.join("|");
    if ($("collect-labels").dataset.known !== known) {
      $("collect-labels").dataset.known = known;
      const option = (value, text) => Object.assign(document.createElement("option"), { value, textContent: text });
      $("collect-labels").replaceChildren(...s.collect.labels.map((l) => option(l, l)));
    }
    const zones = [...scopes.keys()];
    const select = $("collect-zone");
    if (select.dataset.zones !== zones.join(",")) {
      select.dataset.zones = zones.join(",");
      const option = (value, text) => Object.assign(document.createElement("option"), { value, textContent: text });
      select.replaceChildren(...(zones.length ? zones.map((z) => option(z, z)) : [option("", "whole frame")]));
    }
  }
  if (!s.running && s.summary) finish(s.summary);
}

$("collect").addEventListener("submit", async (e) => {
  e.preventDefault();
  const label = $("collect-label").value.trim();
  const scope = $("collect-zone").value;
  const [camera, zone] = scope.includes("/") ? scope.split("/") : [scope, ""];
  const params = new URLSearchParams({ label });
  if (camera) params.set("camera", camera);
  if (zone) params.set("zone", zone);
  const target = `${url("collect")}${token ? "&" : "?"}${params}`;
  try {
    const res = await fetch(target, { method: "POST", headers: { "X-Edgesqz": "collect" } });
    $("collect-result").textContent = res.ok ? `saved ${(await res.json()).saved}` : `not saved: ${await res.text()}`;
  } catch (err) {
    $("collect-result").textContent = `not saved: ${err}`;
  }
});

async function poll() {
  try {
    const res = await fetch(url("status"), { cache: "no-store" });
    if (!res.ok) throw new Error(`status ${res.status}`);
    showStatus(await res.json());
  } catch (err) {
    if (!ended) setState("no connection", "warn");
  }
}

const events = new EventSource(url("events"));
const poller = setInterval(poll, 1000);

function finish(summary) {
  if (ended) return;
  ended = true;
  events.close();
  clearInterval(poller);
  const why = summary.stopped_by.replaceAll("_", " ");
  setState(`ended (${why}): ${summary.frames} frames, ${summary.fps_mean} FPS`, "ended");
}

events.onopen = () => { if (!ended) setState("live", "live"); };
events.onerror = () => { if (!ended) setState("reconnecting", "warn"); };
let runId = "";
events.onmessage = (e) => {
  const run = (e.lastEventId || "").split("-")[0];
  if (run !== runId) {  // a new run (the service restarted): its events replace the old list
    if (runId) poll();
    runId = run;
  }
  const r = JSON.parse(e.data);
  if (r.kind === "run_summary") {
    finish(r);
  } else if (r.kind === "event") {
    poll();
  } else if (r.kind === "classification") {
    latest = r;
    if (!drawing) {
      drawing = true;
      requestAnimationFrame(draw);
    }
  }
};

const img = $("stream");
img.onerror = () => {
  if (ended) return;
  const note = $("stream-note");
  note.textContent = "The stream is not available (viewer limit reached?); retrying in 5 s.";
  note.hidden = false;
  setTimeout(() => { note.hidden = true; img.src = `${url("stream.mjpg")}${token ? "&" : "?"}t=${Date.now()}`; }, 5000);
};
img.src = url("stream.mjpg");
poll();
"""

BODY = """
<header><h1>edgesqz <span>live</span></h1><span id="state" class="state">connecting</span></header>
<main>
  <section>
    <img id="stream" alt="live annotated camera stream">
    <p id="stream-note" class="note" hidden></p>
  </section>
  <section>
    <h2>Top classes <small id="frame"></small></h2>
    <ol id="top"></ol>
    <dl class="stats">
      <div><dt>FPS</dt><dd id="fps">-</dd></div>
      <div><dt>inference</dt><dd id="inference">-</dd></div>
      <div><dt>end-to-end</dt><dd id="e2e">-</dd></div>
      <div><dt>dropped</dt><dd id="dropped">-</dd></div>
      <div><dt>viewers</dt><dd id="viewers">-</dd></div>
    </dl>
    <div id="events-box" hidden>
      <h2>Events</h2>
      <ol id="events"></ol>
    </div>
    <form id="collect" hidden>
      <h2>Save this frame</h2>
      <input id="collect-label" list="collect-labels" placeholder="label" required maxlength="64" autocomplete="off">
      <datalist id="collect-labels"></datalist>
      <select id="collect-zone"></select>
      <button type="submit">Save as label</button>
      <p id="collect-result" class="note"></p>
    </form>
    <h2>Model</h2>
    <dl id="model" class="facts"></dl>
    <h2>Device</h2>
    <dl id="device" class="facts"></dl>
  </section>
</main>
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def render() -> tuple[bytes, str]:
    """The page (UTF-8) and its Content-Security-Policy (the inline style and script allowed by hash)."""
    html = ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n<title>edgesqz live</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>{BODY}<script>{SCRIPT}</script>\n</body>\n</html>\n")
    csp = (f"default-src 'none'; img-src 'self' data:; connect-src 'self'; style-src '{_sha256(STYLE)}'; "
           f"script-src '{_sha256(SCRIPT)}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp
