// mmoe-ranker playground: plain JS, no build step, no dependencies, same-origin calls only.
// Reads the tasks from GET /model, ids from GET /playground/sample, presets from
// GET /playground/config, and re-ranks through POST /rank whenever a control changes.
// The re-rank controls send a `rerank` object (diversity, filters, a rules preset); with one on,
// the request asks for `explain`, so each item says which rule moved it and from where.
"use strict";

const DEBOUNCE_MS = 150;
const SLIDER_MAX = 10; // raised to fit a preset or default weight that is larger
const TASK_COLOURS = ["#2f6fdf", "#d9822b", "#1f9d6b", "#a347c2", "#c23b3b", "#5b6b7a"];

const state = {
  tasks: [],
  nExperts: 0,
  model: null,
  config: { presets: {}, default_weights: {}, weight_min: 0, weight_max: 100, max_candidates: 1000 },
  weights: {},
  setKey: null, // user + candidates + context of the last ranking: positions compare within it
  prevPositions: new Map(),
  lastItems: [],
  selectedItem: null,
  seq: 0,
  timer: null,
};

const $ = (id) => document.getElementById(id);
// Three decimals, or three significant digits for small scores (share rates are often < 0.01).
const fmt = (v) => (Math.abs(v) >= 0.1 || v === 0 ? v.toFixed(3) : v.toPrecision(3));

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function apiKeyHeader() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function getJSON(url, options = {}) {
  const headers = { ...(options.headers || {}), ...apiKeyHeader() };
  const resp = await fetch(url, { ...options, headers });
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = null;
  }
  if (!resp.ok) throw new Error(describeError(resp.status, body));
  return body;
}

function describeError(status, body) {
  // The service's 4xx bodies name the field and the limit: show exactly that.
  if (body && Array.isArray(body.detail)) {
    return `${status}: ` + body.detail.map((d) => `${d.field || d.loc}: ${d.message || d.msg}`).join("; ");
  }
  if (body && (body.message || body.detail || body.error)) {
    return `${status}: ${body.message || body.detail || body.error}`;
  }
  return `HTTP ${status}`;
}

function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = kind || "muted";
  document.body.dataset.state = kind === "error" ? "error" : kind === "busy" ? "loading" : "ready";
}

// ---------- controls ----------

function currentUser() {
  return $("user-input").value.trim() || $("user-select").value;
}

function parseIds(text) {
  const seen = new Set();
  const out = [];
  let dupes = 0;
  for (const id of text.split(/[\s,;]+/)) {
    if (!id) continue;
    if (seen.has(id)) dupes++;
    else {
      seen.add(id);
      out.push(id);
    }
  }
  return { ids: out, dupes };
}

function currentContext() {
  const ctx = {};
  for (const sel of document.querySelectorAll("#context-fields select")) {
    if (sel.value !== "") ctx[sel.name] = sel.value;
  }
  return ctx;
}

function updateCandidateCount() {
  const { ids, dupes } = parseIds($("candidates").value);
  $("n-candidates").textContent =
    `${ids.length} candidates` + (dupes ? ` (${dupes} duplicate${dupes > 1 ? "s" : ""} dropped)` : "");
}

function buildSliders() {
  const box = $("sliders");
  box.replaceChildren();
  const { weight_min: lo, weight_max: hi, presets, default_weights: defaults } = state.config;
  const biggest = Math.max(
    SLIDER_MAX,
    ...state.tasks.map((t) => defaults[t] ?? 1),
    ...Object.values(presets).flatMap((p) => state.tasks.map((t) => p[t] ?? 0)),
  );
  const max = Math.min(hi, biggest);
  state.tasks.forEach((task, i) => {
    const w = Math.min(max, Math.max(lo, defaults[task] ?? 1));
    state.weights[task] = w;
    const input = el("input", {
      id: `w-${task}`, type: "range", min: String(lo), max: String(max), step: "0.1",
      value: String(w), "data-task": task, "aria-label": `weight of ${task}`,
    });
    const out = el("output", { id: `wv-${task}`, for: `w-${task}`, text: w.toFixed(1) });
    input.style.setProperty("--accent", TASK_COLOURS[i % TASK_COLOURS.length]);
    input.addEventListener("input", () => {
      state.weights[task] = Number(input.value);
      out.textContent = Number(input.value).toFixed(1);
      $("preset").value = matchingPreset();
      scheduleRank();
    });
    box.append(el("div", { class: "slider" }, [el("label", { for: `w-${task}`, text: task }), input, out]));
  });
}

function presetWeights(name) {
  const { default_weights: defaults, presets } = state.config;
  const w = {};
  for (const t of state.tasks) w[t] = presets[name]?.[t] ?? defaults[t] ?? 1;
  return w;
}

function matchingPreset() {
  for (const name of Object.keys(state.config.presets)) {
    const w = presetWeights(name);
    if (state.tasks.every((t) => Math.abs(w[t] - state.weights[t]) < 1e-9)) return name;
  }
  return "";
}

function applyPreset(name) {
  if (!name) return;
  const w = presetWeights(name);
  for (const t of state.tasks) {
    const input = $(`w-${t}`);
    input.value = String(w[t]);
    state.weights[t] = Number(input.value); // the slider clamps to its range
    $(`wv-${t}`).textContent = state.weights[t].toFixed(1);
  }
  scheduleRank(0);
}

function buildPresets() {
  const sel = $("preset");
  for (const name of Object.keys(state.config.presets)) {
    const w = presetWeights(name);
    const label = `${name} (${state.tasks.map((t) => `${t} ${w[t]}`).join(", ")})`;
    sel.append(el("option", { value: name, text: label }));
  }
  sel.value = matchingPreset();
  sel.addEventListener("change", () => applyPreset(sel.value));
}

function buildContext(choices) {
  const names = Object.keys(choices || {});
  $("context-box").hidden = names.length === 0;
  const box = $("context-fields");
  box.replaceChildren();
  for (const name of names) {
    const sel = el("select", { id: `ctx-${name}`, name });
    sel.append(el("option", { value: "", text: "(missing)" }));
    for (const v of choices[name]) sel.append(el("option", { value: v, text: v }));
    sel.addEventListener("change", () => scheduleRank(0));
    box.append(el("div", { class: "row" }, [el("label", { for: `ctx-${name}`, text: name }), sel]));
  }
}

async function loadSample(first = false) {
  const n = Math.max(1, Math.min(Number($("n-items").value) || 20, state.config.max_candidates));
  const sample = await getJSON(`/playground/sample?users=20&items=${n}`);
  if (first) {
    const sel = $("user-select");
    sel.replaceChildren(...sample.users.map((u) => el("option", { value: u, text: u })));
    buildContext(sample.context);
  }
  $("candidates").value = sample.items.join(", ");
  updateCandidateCount();
}

// ---------- ranking ----------

function scheduleRank(delay = DEBOUNCE_MS) {
  clearTimeout(state.timer);
  state.timer = setTimeout(rank, delay);
}

async function rank() {
  const user = currentUser();
  const { ids } = parseIds($("candidates").value);
  if (!user || ids.length === 0) {
    setStatus("pick a user and at least one candidate", "error");
    return;
  }
  const context = currentContext();
  const body = {
    user_id: user,
    candidates: ids,
    weights: { ...state.weights },
    explain: $("explain").checked,
  };
  if (Object.keys(context).length) body.context = context;
  const rerank = currentRerank();
  if (rerank) {
    body.rerank = rerank;
    body.explain = true; // per-item "moved by" comes with explain
  }
  const seq = ++state.seq;
  setStatus("ranking…", "busy");
  const t0 = performance.now();
  let resp;
  try {
    resp = await getJSON("/rank", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (e) {
    if (seq === state.seq) setStatus(String(e.message || e), "error");
    return;
  }
  if (seq !== state.seq) return; // a newer request was sent meanwhile: its answer wins
  const ms = performance.now() - t0;
  const key = JSON.stringify([user, ids, context]);
  const t1 = performance.now();
  render(resp, key);
  void $("ranked").offsetHeight; // layout now, so the timing below includes it
  // Timings of this re-rank (fetch incl. JSON parse; DOM rebuild + layout), for measure scripts.
  $("ranked").dataset.fetchMs = ms.toFixed(2);
  $("ranked").dataset.renderMs = (performance.now() - t1).toFixed(2);
  const d = resp.defaulted || {};
  const notes = [];
  if (d.user) notes.push("unknown user → default features");
  if (d.items) notes.push(`${d.items} items with default features`);
  if (resp.degraded) notes.push(`DEGRADED (${resp.degraded_reason || "features unavailable"})`);
  setStatus(
    `${resp.items.length} items ranked in ${ms.toFixed(0)} ms · ${resp.scoring || "weighted_sum"} · ` +
      `request ${resp.request_id}` + (notes.length ? ` · ${notes.join(" · ")}` : ""),
    resp.degraded ? "warn" : "",
  );
}

function moveBadge(id, pos, comparable) {
  if (!comparable || !state.prevPositions.has(id)) return el("span", { class: "move same", text: "–" });
  const delta = state.prevPositions.get(id) - pos;
  if (delta > 0) return el("span", { class: "move up", text: `↑${delta}`, "data-delta": String(delta) });
  if (delta < 0) return el("span", { class: "move down", text: `↓${-delta}`, "data-delta": String(delta) });
  return el("span", { class: "move same", text: "=", "data-delta": "0" });
}

function render(resp, key) {
  const tasks = resp.tasks || state.tasks;
  const comparable = key === state.setKey;
  const maxPerTask = {};
  for (const t of tasks) maxPerTask[t] = Math.max(1e-12, ...resp.items.map((it) => it.scores[t]));
  const list = $("ranked");
  const rows = resp.items.map((it, pos) => {
    const bars = tasks.map((t, i) => {
      const v = it.scores[t];
      const fill = el("span", { class: "fill" });
      fill.style.width = `${(100 * Math.max(0, v)) / maxPerTask[t]}%`;
      fill.style.background = TASK_COLOURS[i % TASK_COLOURS.length];
      return el("div", { class: "bar", "data-task": t, "data-score": String(v), title: `${t}: ${v}` }, [
        el("span", { class: "bar-label", text: t }),
        el("span", { class: "track" }, [fill]),
        el("span", { class: "bar-value", text: fmt(v) }),
      ]);
    });
    const li = el("li", { class: "item", "data-id": it.id, "data-score": String(it.score) }, [
      el("span", { class: "pos", text: String(pos + 1) }),
      moveBadge(it.id, pos, comparable),
      el("span", { class: "id", text: it.id }),
      el("span", { class: "final", text: fmt(it.score), title: "final score" }),
      el("div", { class: "bars" }, bars),
    ]);
    const why = whyMoved(it, pos);
    if (why) li.append(why);
    if (it.id === state.selectedItem) li.classList.add("selected");
    li.addEventListener("click", () => selectItem(it.id));
    return li;
  });
  list.replaceChildren(...rows);
  state.prevPositions = new Map(resp.items.map((it, pos) => [it.id, pos]));
  state.setKey = key;
  state.lastItems = resp.items;
  // Hooks for tests and curious humans: which weights this list was ranked with.
  list.dataset.weights = JSON.stringify(resp.weights);
  list.dataset.seq = String(Number(list.dataset.seq || 0) + 1);
  $("model-info").textContent =
    `model ${resp.model.name} v${resp.model.version} · tasks ${tasks.join(", ")}` +
    (state.nExperts ? ` · ${state.nExperts} experts` : "");
  renderLegend(resp.scoring);
  renderRerankSummary(resp.rerank);
  renderHeatmap();
}

// ---------- re-rank ----------

function buildRerank(config) {
  const rc = config || {};
  const attrSel = $("diversity-attr");
  attrSel.replaceChildren(...(rc.attributes || []).map((a) => el("option", { value: a, text: a })));
  if (!(rc.attributes || []).length) $("diversity-on").disabled = true;
  const presetSel = $("rerank-preset");
  for (const name of rc.presets || []) presetSel.append(el("option", { value: name, text: name }));
  $("rerank-preset-row").hidden = !(rc.presets || []).length;
  presetSel.value = rc.default_preset || "";
  for (const id of ["diversity-on", "diversity-k", "diversity-w", "diversity-attr", "filters-on",
    "filter-seen", "rerank-preset"]) {
    $(id).addEventListener("change", () => scheduleRank(0));
  }
  $("filter-ids").addEventListener("input", () => scheduleRank(400));
}

function currentRerank() {
  const out = {};
  const preset = $("rerank-preset").value;
  out.preset = preset || null; // null: not even the rules file's default preset
  if ($("diversity-on").checked) {
    out.diversity = {
      attribute: $("diversity-attr").value,
      max_per_window: Number($("diversity-k").value) || 1,
      window: Number($("diversity-w").value) || 2,
    };
  } // unchecked: the preset's own diversity (if any) applies
  if ($("filters-on").checked) {
    const { ids } = parseIds($("filter-ids").value);
    out.filters = { exclude: ids, seen: $("filter-seen").checked };
  }
  const anything = preset || out.diversity || out.filters;
  return anything ? out : (state.config.rerank?.default_preset ? out : null);
}

function whyMoved(it, pos) {
  // The rules that moved the item past others, and its place in the plain score order of the
  // candidates the filters kept (they run before scoring), so an item can shift with no rule
  // of its own only when a pin went in above it.
  const rr = it.rerank;
  if (!rr || !rr.rules.length) return null;
  const was = rr.from === pos ? "same place" : `was #${rr.from + 1}`;
  return el("span", {
    class: "why", "data-rules": rr.rules.join(","), "data-from": String(rr.from),
    text: `moved by ${rr.rules.join(" + ")} · ${was}`,
  });
}

function renderRerankSummary(summary) {
  const box = $("rerank-summary");
  if (!summary) {
    box.textContent = "";
    box.dataset.applied = "";
    return;
  }
  const parts = [summary.applied.length ? `applied: ${summary.applied.join(", ")}` : "no rule changed the list"];
  if (summary.filtered) parts.push(`${summary.filtered} filtered out`);
  for (const r of summary.relaxed || []) {
    parts.push(r.rule === "diversity"
      ? `diversity relaxed at position${r.positions.length > 1 ? "s" : ""} ${r.positions.map((p) => p + 1).join(", ")}`
      : `${r.rule}: ${r.reason}${r.id ? ` (${r.id})` : ""}`);
  }
  for (const a of summary.adjusted || []) parts.push(a);
  box.textContent = parts.join(" · ");
  box.dataset.applied = summary.applied.join(",");
}

function renderLegend(scoring) {
  const formula = scoring === "weighted_product" ? "Π task score ^ weight" : "Σ weight × task score";
  $("legend").textContent = `final score = ${formula} · each task's bars are scaled to its max in the list`;
}

function selectItem(id) {
  state.selectedItem = state.selectedItem === id ? null : id;
  for (const li of document.querySelectorAll("#ranked li")) {
    li.classList.toggle("selected", li.dataset.id === state.selectedItem);
  }
  renderHeatmap();
}

function renderHeatmap() {
  const box = $("heatmap-box");
  const withGates = state.lastItems.filter((it) => Array.isArray(it.gates));
  if (!$("explain").checked || state.lastItems.length === 0) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  if (withGates.length === 0) {
    $("heatmap-title").textContent = "the serving model has no gates (not a mixture of experts)";
    $("heatmap").replaceChildren();
    return;
  }
  const chosen = withGates.find((it) => it.id === state.selectedItem);
  const items = chosen ? [chosen] : withGates;
  const T = items[0].gates.length;
  const M = items[0].gates[0].length;
  const mean = Array.from({ length: T }, (_, t) =>
    Array.from({ length: M }, (_, m) => items.reduce((s, it) => s + it.gates[t][m], 0) / items.length),
  );
  $("heatmap-title").textContent = chosen
    ? `gate weights of item ${chosen.id} (click it again for the mean)`
    : `mean gate weights over ${items.length} items (click an item for its own)`;
  const grid = $("heatmap");
  grid.style.gridTemplateColumns = `auto repeat(${M}, minmax(2.6em, 1fr))`;
  const cells = [el("span", { class: "hm-head" })];
  for (let m = 0; m < M; m++) cells.push(el("span", { class: "hm-head", text: `e${m}` }));
  const tasks = state.tasks.length === T ? state.tasks : mean.map((_, t) => `task ${t}`);
  for (let t = 0; t < T; t++) {
    cells.push(el("span", { class: "hm-task", text: tasks[t] }));
    for (let m = 0; m < M; m++) {
      const v = mean[t][m];
      const cell = el("span", { class: "hm-cell", "data-task": tasks[t], "data-expert": String(m), text: v.toFixed(2) });
      // A gate row sums to 1: shade by the share of the row, darker = more of this expert.
      const light = Math.round(97 - 55 * Math.min(1, v * M / 2));
      cell.style.background = `hsl(215 70% ${light}%)`;
      cell.style.color = light < 60 ? "#fff" : "#1d2733";
      cells.push(cell);
    }
  }
  grid.replaceChildren(...cells);
}

// ---------- start ----------

async function start() {
  // The key lives in this tab's sessionStorage only: gone when the tab is closed.
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem("ranker-api-key") || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem("ranker-api-key", keyInput.value.trim());
    scheduleRank(0);
  });
  try {
    const [manifest, config] = await Promise.all([getJSON("/model"), getJSON("/playground/config")]);
    state.tasks = manifest.tasks;
    state.nExperts = manifest.n_experts || 0;
    state.model = { name: manifest.name, version: manifest.version };
    state.config = { ...state.config, ...config };
    $("model-info").textContent = `model ${manifest.name} v${manifest.version} · tasks ${manifest.tasks.join(", ")}`;
    $("n-items").max = String(state.config.max_candidates);
    buildSliders();
    buildPresets();
    buildRerank(state.config.rerank);
    await loadSample(true);
  } catch (e) {
    setStatus(`cannot start: ${e.message || e}`, "error");
    return;
  }
  $("user-select").addEventListener("change", () => {
    $("user-input").value = "";
    scheduleRank(0);
  });
  $("user-input").addEventListener("input", () => scheduleRank(400));
  $("candidates").addEventListener("input", updateCandidateCount);
  $("apply-candidates").addEventListener("click", () => scheduleRank(0));
  $("sample-btn").addEventListener("click", async () => {
    try {
      await loadSample();
      scheduleRank(0);
    } catch (e) {
      setStatus(String(e.message || e), "error");
    }
  });
  $("explain").addEventListener("change", () => scheduleRank(0));
  scheduleRank(0);
}

document.addEventListener("DOMContentLoaded", start);
