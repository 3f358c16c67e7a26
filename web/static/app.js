// pmx web: the dashboard. Plain JavaScript, no build step, no dependencies.
//
// The token: taken from the address (#token=... or ?token=...) at once, kept in this
// browser's localStorage, and sent in the Authorization header of every API request.
// The live view is one server-sent event stream (/api/stream), read with fetch so that it
// can carry that header; it is re-opened after any break.
"use strict";

const TOKEN_KEY = "pmx-token";
(function takeTokenFromAddress() {
  const query = new URLSearchParams(location.search);
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token") || query.get("token");
  if (token) {
    localStorage.setItem(TOKEN_KEY, token);
    query.delete("token");
    const rest = query.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : ""));
  }
})();

const VERBS = { restart: "restarted", reload: "reloaded", stop: "stopped", start: "started" };
const DOING = { restart: "restarting", reload: "reloading", stop: "stopping", start: "starting",
                scale: "scaling" };
const HISTORY = 90;

const model = {
  daemon: { reachable: false, why: "connecting" }, apps: [], history: {}, events: [], logs: {},
  receivedAt: performance.now(), streamUp: false, pending: {}, progress: {},
};
const cards = new Map();  // app name -> its DOM parts

// ------------------------------------------------------------------ helpers

const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}
function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
}
function duration(s) {
  s = Math.max(0, Math.floor(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}
function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "";
}
function elapsed() { return (performance.now() - model.receivedAt) / 1000; }
const RUNNING = new Set(["starting", "launching", "online", "stopping"]);

function toast(text, kind) {
  const node = el("div", { class: "toast " + (kind || "") }, text);
  $("toasts").append(node);
  setTimeout(() => node.remove(), kind === "bad" ? 9000 : 4000);
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + (localStorage.getItem(TOKEN_KEY) || "") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit",
  });
  if (response.status === 401 || response.status === 403) needToken(response.status);
  const data = await response.json().catch(() => ({}));
  return { status: response.status, ok: response.ok, data };
}

function needToken(status) {
  $("login").hidden = false;
  $("login-error").textContent = status === 403 ? "That token is not the right one." : "";
  $("apps").hidden = true;
}

// ------------------------------------------------------------------ the stream

async function follow() {
  let wait = 500;
  for (;;) {
    try {
      const response = await fetch("/api/stream", {
        headers: { Authorization: "Bearer " + (localStorage.getItem(TOKEN_KEY) || "") },
        cache: "no-store", credentials: "omit",
      });
      if (response.status === 401 || response.status === 403) { needToken(response.status); return; }
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      $("login").hidden = true;
      $("apps").hidden = false;
      wait = 500;
      await readEvents(response.body.getReader());
    } catch (err) { /* pmx web itself is gone: show it, retry */ }
    model.streamUp = false;
    schedule();
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 5000);
  }
}

async function readEvents(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) receive(kind, JSON.parse(data));
    }
  }
}

function receive(kind, data) {
  if (kind === "hello") {
    model.streamUp = true;
    model.daemon = data.daemon;
    if (model.daemon.reachable) model.daemon.uptime -= elapsed();
    model.history = data.history;
    model.events = data.events;
    model.logs = data.logs;
    takeApps(data.apps);
    for (const card of cards.values()) card.logLength = -1;
  } else if (kind === "daemon") {
    model.daemon = data;
    if (data.reachable) data.uptime -= elapsed();
  } else if (kind === "apps") {
    takeApps(data);
  } else if (kind === "stats") {
    takeStats(data);
  } else if (kind === "event") {
    model.events.push(data);
    if (model.events.length > 200) model.events.shift();
    if (data.app) noteProgress(data);
  } else if (kind === "log") {
    const lines = (model.logs[data.app] = model.logs[data.app] || []);
    lines.push(...data.lines);
    if (lines.length > 300) lines.splice(0, lines.length - 300);
    appendLog(data.app, data.lines);
    return;
  }
  schedule();
}

function takeApps(apps) {
  // Uptimes count on from now; CPU and memory keep the last sample until the next.
  const now = elapsed();
  for (const app of apps) {
    for (const inst of app.instances) {
      if (RUNNING.has(inst.status)) inst.uptime -= now;
    }
  }
  model.apps = apps;
}

function takeStats(data) {
  const byId = new Map(data.instances.map((s) => [s.id, s]));
  for (const app of model.apps) {
    for (const inst of app.instances) {
      const sample = byId.get(inst.id);
      if (!sample || inst.replacement || sample.pid !== inst.pid) continue;
      inst.cpu = sample.cpu;
      inst.memory = sample.memory;
      const h = (model.history[inst.id] = model.history[inst.id] || { cpu: [], memory: [] });
      h.cpu.push(sample.cpu);
      h.memory.push(sample.memory);
      if (h.cpu.length > HISTORY) { h.cpu.shift(); h.memory.shift(); }
    }
  }
}

// ------------------------------------------------------------------ actions

function noteProgress(event) {
  const app = model.apps.find((a) => a.name === event.app);
  if (!model.pending[event.app] && !(app && app.busy)) return;
  const progress = (model.progress[event.app] = model.progress[event.app] || { steps: [], current: "" });
  if (event.kind === "reload") progress.steps.push(event.text);
  else progress.current = event.text;
}

async function act(app, action, body) {
  if (model.pending[app]) return;
  model.pending[app] = action;
  model.progress[app] = { steps: [], current: "" };
  schedule();
  try {
    const { status, data } = await api("POST", "/api/apps/" + encodeURIComponent(app) + "/" + action, body);
    if (status === 401 || status === 403) return;
    const errors = (data && data.errors) || [];
    if (data && data.error) toast(data.error.message, "bad");
    else if (errors.length) toast(errors.join("; "), "bad");
    else if (action === "scale") toast(app + " scaled to " + data.instances + " instances", "ok");
    else {
      const done = data[VERBS[action]] || [], running = data.already_running || [];
      if (!done.length && running.length) toast(running.join(", ") + " already running", "ok");
      else toast(VERBS[action] + ": " + (done.length ? done : [app]).join(", "), "ok");
    }
  } catch (err) {
    toast("pmx web did not answer: " + err, "bad");
  } finally {
    delete model.pending[app];
    delete model.progress[app];
    schedule();
  }
}

// ------------------------------------------------------------------ drawing

let scheduled = false;
function schedule() {
  if (!scheduled) { scheduled = true; requestAnimationFrame(() => { scheduled = false; draw(); }); }
}

function draw() {
  drawHeader();
  const names = new Set(model.apps.map((a) => a.name));
  for (const [name, card] of cards) {
    if (!names.has(name)) { card.root.remove(); cards.delete(name); }
  }
  const list = $("apps");
  model.apps.forEach((app, index) => {
    let card = cards.get(app.name);
    if (!card) { card = makeCard(app.name); cards.set(app.name, card); }
    if (list.children[index] !== card.root) list.insertBefore(card.root, list.children[index] || null);
    drawCard(card, app);
  });
  $("empty").hidden = !(model.streamUp && model.daemon.reachable && model.apps.length === 0);
  drawEvents();
}

function drawHeader() {
  const d = model.daemon, box = $("daemon"), banner = $("banner");
  const up = model.streamUp && d.reachable;
  box.className = "daemon " + (up ? "up" : "down");
  box.lastChild.textContent = !model.streamUp ? "pmx web unreachable"
    : d.reachable ? `pmxd ${d.version} · pid ${d.pid} · up ${duration(d.uptime + elapsed())}`
    : "daemon unreachable";
  if (!model.streamUp) {
    banner.hidden = false; banner.className = "banner stale";
    banner.textContent = "Lost the connection to pmx web; reconnecting…";
  } else if (!d.reachable) {
    banner.hidden = false; banner.className = "banner";
    banner.textContent = "Daemon unreachable: " + (d.why || "pmxd does not answer") + ". Retrying…";
  } else banner.hidden = true;
  let total = 0, online = 0, cpu = 0, memory = 0;
  for (const app of model.apps) for (const inst of app.instances) {
    if (inst.replacement) continue;
    total++;
    if (inst.status === "online") online++;
    cpu += inst.cpu || 0; memory += inst.memory || 0;
  }
  const summary = $("summary");
  summary.replaceChildren(
    el("span", {}, el("b", {}, String(model.apps.length)), " apps"),
    el("span", {}, el("b", {}, `${online}/${total}`), " online"),
    el("span", {}, el("b", {}, cpu.toFixed(1) + "%"), " CPU"),
    el("span", {}, el("b", {}, bytes(memory)), " memory"));
}

function makeCard(name) {
  const button = (action, label, cls) => el("button", {
    class: cls || "", "data-action": action, onclick: () => act(name, action) }, label);
  const scaleBy = (delta) => () => act(name, "scale", { count: (delta > 0 ? "+" : "") + delta });
  const parts = {
    name: el("h2", { class: "app-name" }, name), mode: el("span", { class: "badge" }),
    listen: el("span", { class: "badge grey" }), count: el("span", { class: "count" }),
    scaleCount: el("span", { "data-field": "desired" }),
    progress: el("div", { class: "progress", hidden: "" }),
    rows: el("tbody"), log: el("pre", { class: "log", "data-log": name, tabindex: "0" }),
    logLength: -1,
  };
  parts.buttons = [button("restart", "Restart"), button("reload", "Reload"),
    button("stop", "Stop", "danger"), button("start", "Start")];
  const minus = el("button", { "data-action": "scale-down", title: "one instance less",
    "aria-label": "scale down", onclick: scaleBy(-1) }, "−");
  const plus = el("button", { "data-action": "scale-up", title: "one instance more",
    "aria-label": "scale up", onclick: scaleBy(1) }, "+");
  parts.buttons.push(minus, plus);
  const head = el("div", { class: "app-head" }, parts.name, parts.mode, parts.listen, parts.count,
    el("div", { class: "actions" }, ...parts.buttons.slice(0, 4),
      el("span", { class: "scale", title: "scale" }, minus, parts.scaleCount, plus)));
  const table = el("table", {}, el("thead", {}, el("tr", {},
    ...["#", "status", "pid", "uptime", "↻", "cpu", "memory", "reason"].map((h) => el("th", {}, h)))),
    parts.rows);
  parts.settings = el("dl", { class: "settings" });
  parts.root = el("article", { class: "app card", "data-app": name }, head, parts.progress,
    el("div", { class: "app-body" }, el("div", { class: "instances" }, table), parts.log),
    el("details", { class: "more" }, el("summary", {}, "Settings"), parts.settings));
  return parts;
}

function drawCard(card, app) {
  const serving = app.instances.filter((i) => !i.replacement);
  const online = serving.filter((i) => i.status === "online").length;
  const desired = app.spec && typeof app.spec.instances === "number" ? app.spec.instances : serving.length;
  card.root.classList.toggle("down", !model.daemon.reachable || !model.streamUp);
  card.mode.textContent = (app.spec && app.spec.exec_mode) || "fork";
  card.listen.textContent = (app.listen || []).join(" ");
  card.listen.hidden = !(app.listen || []).length;
  card.count.replaceChildren(el("b", {}, `${online}/${desired}`), " online");
  card.scaleCount.textContent = String(desired);
  const pending = model.pending[app.name];
  const busy = pending || app.busy;
  for (const b of card.buttons) b.disabled = Boolean(busy) || !model.daemon.reachable;
  card.progress.hidden = !busy;
  if (!busy) { delete model.progress[app.name]; return drawRest(card, app); }
  // What pmxd reports while it works: a reload's steps (as `pmx reload` prints them),
  // then the latest state change.
  const progress = model.progress[app.name] || { steps: [], current: "" };
  const doing = DOING[pending || app.busy] || String(app.busy);
  card.progress.replaceChildren(el("span", { class: "spinner" }),
    el("span", { class: "doing" }, `${doing} ${app.name}…`),
    ...progress.steps.slice(-6).map((step) => el("span", { class: "step" }, "✓ " + step)),
    progress.current ? el("span", { class: "current" }, progress.current) : null);
  drawRest(card, app);
}

function drawRest(card, app) {
  card.rows.replaceChildren(...app.instances.map(instanceRow));
  drawSettings(card, app);
  drawLog(card, app.name);
}

function drawSettings(card, app) {
  // pmxd masks env values whose names look secret, as `pmx describe` does.
  const spec = app.spec || {};
  const key = JSON.stringify([spec, app.mode]);
  if (card.settingsKey === key) return;
  card.settingsKey = key;
  const size = (n) => (n ? bytes(n) : "–");
  const ms = (n) => (n == null ? "–" : n >= 1000 ? n / 1000 + "s" : n + "ms");
  const rows = [
    ["script", [spec.script, ...(spec.args || [])].join(" ")], ["cwd", spec.cwd],
    ["mode", app.mode], ["instances", String(spec.instances)],
    ["max memory", size(spec.max_memory_restart)], ["kill timeout", ms(spec.kill_timeout)],
    ["env", Object.entries(spec.env || {}).map(([k, v]) => k + "=" + v).join("  ") || "–"],
  ];
  card.settings.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v || "–")]));
}

function instanceRow(inst) {
  // A reload's replacement shares its slot's id: the history is the serving instance's.
  const h = (!inst.replacement && model.history[inst.id]) || { cpu: [], memory: [] };
  const running = RUNNING.has(inst.status) && inst.pid;
  const sampled = running && inst.memory > 0;
  const cell = (label, content, cls) => el("td", { "data-label": label, class: cls || "" }, content);
  return el("tr", { class: inst.replacement ? "replacement" : "", "data-id": String(inst.id) },
    cell("instance", `${inst.instance}${inst.replacement ? " (new)" : ""}`),
    cell("status", el("span", { class: "status s-" + inst.status },
      el("span", { class: "dot" }), inst.status)),
    el("td", { "data-label": "pid", "data-field": "pid" }, inst.pid ? String(inst.pid) : "–"),
    cell("uptime", running ? duration(inst.uptime + elapsed()) : "–"),
    cell("restarts", String(inst.restarts)),
    cell("cpu", el("span", { class: "metric" }, spark(h.cpu, "cpu", 2),
      el("span", { class: "val" }, sampled ? (inst.cpu || 0).toFixed(1) + "%" : "–"))),
    cell("memory", el("span", { class: "metric" }, spark(h.memory, "mem", 0),
      el("span", { class: "val" }, sampled ? bytes(inst.memory) : "–"))),
    cell("reason", inst.status_text || inst.reason || "", "reason wide"));
}

function spark(values, kind, floor) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark " + kind);
  svg.setAttribute("viewBox", "0 0 64 22");
  svg.setAttribute("preserveAspectRatio", "none");
  if (values.length < 2) return svg;
  const top = Math.max(floor, ...values) || 1;  // CPU: at least 2% tall, so idle noise stays flat
  const bottom = kind === "mem" ? Math.min(...values) * 0.9 : 0;
  const span = top - bottom || 1;
  // Spread over the whole width from the second point on; a minute later it scrolls.
  const step = 64 / Math.max(values.length - 1, 1), start = 0;
  const points = values.map((v, i) =>
    `${(start + i * step).toFixed(1)},${(21 - ((v - bottom) / span) * 19).toFixed(1)}`);
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `${start.toFixed(1)},22 ${points.join(" ")} 64,22`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(area, line);
  return svg;
}

function logLine(line) {
  const cls = "l" + (line.stream === "error" ? " err" : "") + (line.time === null ? " old" : "") +
    (line.stream === "note" ? " note" : "");
  return el("span", { class: cls }, el("span", { class: "lab" }, line.label + " │ "), line.line);
}

function drawLog(card, name) {
  const lines = model.logs[name] || [];
  if (card.logLength === -1) {
    card.log.replaceChildren(...lines.map(logLine));
    card.log.scrollTop = card.log.scrollHeight;
    card.logLength = lines.length;
  }
}

function appendLog(name, lines) {
  const card = cards.get(name);
  if (!card || card.logLength === -1) { schedule(); return; }
  const log = card.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 30;
  log.append(...lines.map(logLine));
  while (log.childElementCount > 300) log.firstElementChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function drawEvents() {
  const list = $("events");
  const shown = model.events.slice(-60).reverse();
  list.replaceChildren(...shown.map((e) => {
    const kind = e.kind === "state" ? "state-" + e.state
      : e.kind === "daemon" && e.text.startsWith("daemon unreachable") ? "daemon-down" : e.kind;
    return el("li", { class: "k-" + kind }, el("time", {}, clock(e.time)), el("span", {}, e.text));
  }));
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("login-token").value.trim());
    $("login").hidden = true;
    follow();
  });
  setInterval(schedule, 1000);  // uptimes tick
  if (!localStorage.getItem(TOKEN_KEY)) { needToken(401); return; }
  follow();
});
