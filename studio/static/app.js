// kiln studio page: one file of plain JS over the /api routes.
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "kiln-studio-token";
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname + "#runs"); }
})();
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const withToken = (url) => token() ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token()) : url;

async function api(path, opts = {}) {
  const headers = { "X-Kiln-Studio": "1", ...(opts.headers || {}) };
  if (token()) headers["X-Kiln-Token"] = token();
  let body = opts.body;
  if (body && !(body instanceof FormData)) { headers["Content-Type"] = "application/json"; body = JSON.stringify(body); }
  const resp = await fetch("api" + path, { method: opts.method || "GET", headers, body });
  const data = await resp.json().catch(() => ({ error: resp.statusText }));
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}
const q = (params) => new URLSearchParams(params).toString();
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function showError(where, e) { where.replaceChildren(el("div", { class: "error", text: String(e.message || e) })); }
const fmtNum = (v, d = 2) => (v === undefined || v === null || v === "") ? "-" : (+v).toFixed(d);
const fmtBytes = (b) => b === null || b === undefined ? "-" : b > 1e6 ? (b / 1e6).toFixed(2) + " MB" : (b / 1e3).toFixed(1) + " kB";
const fmtTime = (s) => s === null || s === undefined ? "-" : s < 90 ? `${Math.round(s)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
function headline(task, best) {
  if (!best) return "-";
  if (task === "detect" && best.map !== undefined) return `mAP ${(100 * best.map).toFixed(2)}`;
  if (best.top1 !== undefined) return `top-1 ${(+best.top1).toFixed(2)}%`;
  return "-";
}
async function copy(text, button) {
  try { await navigator.clipboard.writeText(text); } catch (e) { /* no clipboard permission: the text stays selectable */ }
  if (button) { const t = button.textContent; button.textContent = "Copied"; setTimeout(() => (button.textContent = t), 1200); }
}

// ---- pages ----------------------------------------------------------------------------------------
const pages = {};
function route() {
  const name = (location.hash.slice(1).split("?")[0] || "runs");
  for (const s of document.querySelectorAll(".page")) s.classList.toggle("active", s.id === "page-" + name);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === "#" + name);
  if (pages[name]) pages[name]();
}
window.addEventListener("hashchange", route);

let runsCache = [];
async function refreshRunSelects() {
  runsCache = await api("/runs");
  for (const sel of document.querySelectorAll(".run-select")) {
    const keep = sel.value;
    sel.replaceChildren(...runsCache.filter((r) => r.bundle).map((r) => el("option", { value: r.run, text: r.run })));
    if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }
  return runsCache;
}

// ---- datasets -------------------------------------------------------------------------------------
let info = {};
pages.datasets = async () => {
  const forms = info.data_forms || {};
  $("ds-form").replaceChildren(...Object.entries(forms).map(([k, v]) => el("option", { value: k, text: `${k} (${v})` })));
  browse("");
  listDatasets();
};
$("ds-form").addEventListener("change", () => {
  const f = $("ds-form").value;
  $("ds-spec").value = ["digits", "shapes"].includes(f) ? f : f + ":";
});
async function browse(path) {
  try {
    const r = await api("/fs?" + q({ path }));
    const items = [];
    if (r.parent) items.push(el("a", { text: "..", onclick: () => browse(r.parent) }));
    for (const e of r.entries) {
      items.push(el("a", { text: e.name + (e.dir ? "/" : ""), onclick: () => {
        const form = $("ds-form").value || "folder";
        $("ds-spec").value = `${form}:${e.path}`;
        if (e.dir) browse(e.path);
      } }));
    }
    $("ds-browser").replaceChildren(el("div", { text: r.path || "allowed folders" }), ...items);
  } catch (e) { showError($("ds-browser"), e); }
}
async function listDatasets() {
  const list = await api("/datasets");
  $("ds-options").replaceChildren(...list.map((d) => el("option", { value: d.spec })));
  const table = el("table", { class: "table" }, el("tr", {}, el("th", { text: "dataset" }), el("th", { text: "task" }), el("th")));
  for (const d of list) {
    table.append(el("tr", { class: "clickable", onclick: () => inspect(d.spec) }, el("td", { text: d.spec }), el("td", { text: d.task }),
      el("td", {}, el("button", { text: "Remove", onclick: async (ev) => { ev.stopPropagation(); await api("/datasets?" + q({ spec: d.spec }), { method: "DELETE" }); listDatasets(); } }))));
  }
  $("ds-list").replaceChildren(table);
}
$("ds-add").addEventListener("click", async () => {
  try { const d = await api("/datasets", { method: "POST", body: { spec: $("ds-spec").value.trim() } }); await listDatasets(); inspect(d.spec); }
  catch (e) { showError($("ds-report"), e); }
});
async function inspect(spec) {
  $("ds-report").replaceChildren(el("p", { text: `inspecting ${spec}...` }));
  try { renderReport(await api("/datasets/inspect?" + q({ spec }))); } catch (e) { showError($("ds-report"), e); }
}
function renderReport(r) {
  const out = [el("h3", { text: `${r.data}: ${r.task}, ${r.classes.length} classes, ${r.channels}` }),
    el("p", { text: `${r.train.images} train + ${r.val.images} val images (${r.split_source})` })];
  const det = r.task === "detect";
  const table = el("table", { class: "table ds-counts" },
    el("tr", {}, ...["class", "train", "val", ...(det ? ["train boxes", "val boxes"] : [])].map((h) => el("th", { text: h }))));
  for (const c of r.classes) {
    table.append(el("tr", {}, el("td", { text: c }), el("td", { text: String(r.train.per_class[c] ?? 0) }),
      el("td", { text: String(r.val.per_class[c] ?? 0) }),
      ...(det ? [el("td", { text: String(r.train.boxes_per_class[c] ?? 0) }), el("td", { text: String(r.val.boxes_per_class[c] ?? 0) })] : [])));
  }
  table.append(el("tr", {}, el("th", { text: "total" }), el("th", { text: String(r.train.images) }), el("th", { text: String(r.val.images) })));
  out.push(table);
  for (const s of [r.train, r.val]) {
    if (!s.sizes) continue;
    const w = s.sizes.width, h = s.sizes.height;
    out.push(el("div", { text: w[0] === w[2] && h[0] === h[2] ? `${s.split} image sizes: all ${w[0]}x${h[0]}` :
      `${s.split} image sizes (W x H): min ${w[0]}x${h[0]}, median ${w[1]}x${h[1]}, max ${w[2]}x${h[2]}` +
      (s.sizes.images < s.images ? ` (a sample of ${s.sizes.images})` : "") }));
  }
  const size = r.input_size;
  out.push(el("div", { text: size.size ? `input size a run would use: ${size.size}x${size.size} (${size.reason})` : `input size: ${size.reason}` }));
  if (r.skipped.length) {
    out.push(el("div", { class: "warning", text: `${r.skipped.length} unreadable file(s) skipped:` }),
      el("ul", {}, ...r.skipped.slice(0, 20).map((k) => el("li", { text: `${k.path}: ${k.reason}` }))));
  }
  for (const w of r.warnings) out.push(el("div", { class: "warning", text: "⚠ " + w }));
  out.push(el("h4", { text: "thumbnails per class (training split)" }),
    el("img", { class: "sheet", alt: "contact sheet", src: withToken("api/datasets/sheet?" + q({ spec: r.data })) }));
  $("ds-report").replaceChildren(...out);
}

// ---- new run --------------------------------------------------------------------------------------
let defaults = null;
pages.new = async () => {
  if (!defaults) {
    defaults = await api("/train/defaults");
    const f = $("new-form");
    for (const [k, v] of Object.entries(defaults.values)) {
      const input = f.elements[k];
      if (!input || v === null) continue;
      if (input.type === "checkbox") input.checked = !!v; else input.value = v;
    }
    f.elements.optimizer.replaceChildren(...defaults.optimizers.map((o) => el("option", { text: o })));
    f.elements.schedule.replaceChildren(...defaults.schedules.map((o) => el("option", { text: o })));
    f.elements.optimizer.value = defaults.values.optimizer; f.elements.schedule.value = defaults.values.schedule;
    f.elements.lr.placeholder = `(${defaults.default_lr[defaults.values.optimizer]} for ${defaults.values.optimizer})`;
    $("model-options").replaceChildren(...defaults.models.map((m) => el("option", { value: m })));
    labelCosts(defaults.models);
    api("/train/models").then((m) => $("model-options").append(
      ...m.torchvision.filter((n) => !m.kiln.includes(n)).map((n) => el("option", { value: n, label: "torchvision" })),
      el("option", { value: "timm:", label: "timm:NAME (any timm model)" })));
  }
  listDatasets();
  updateCommand();
};
// parameters and GFLOPs of the picked model (kiln's model_cost, cached by the studio), for the data's
// classes, channels and input size once "Resolve defaults" has read them
let resolved = null, costSeq = 0, costTimer = null;
const costText = (c) => `${(c.parameters / 1e6).toFixed(2)}M parameters, ${+(+c.gflops).toPrecision(3)} GFLOPs per ${c.image_size}x${c.image_size} image`;
function costParams(model) {
  const f = $("new-form");
  const p = { model };
  const size = f.elements.image_size.value || (resolved && resolved.model === model ? resolved.image_size[0] : "");
  if (size) p.image_size = size;
  if (resolved) { p.classes = resolved.classes.length; p.channels = resolved.channels; }
  return p;
}
async function showCost() {
  const model = $("new-form").elements.model.value.trim() || (resolved ? resolved.model : "");
  const seq = ++costSeq;
  if (!model) { $("new-cost").textContent = ""; return; }
  $("new-cost").textContent = `${model}: counting parameters and GFLOPs...`;
  let text;
  try { const c = await api("/train/cost?" + q(costParams(model))); text = `${model}: ${costText(c)}, ${c.classes} classes` + (resolved ? "" : " (until Resolve reads the data's)"); }
  catch (e) { text = `${model}: ${e.message}`; }
  if (seq === costSeq) $("new-cost").textContent = text;
}
for (const name of ["model", "image_size"]) {
  $("new-form").elements[name].addEventListener("input", () => { clearTimeout(costTimer); costTimer = setTimeout(showCost, 400); });
}
async function labelCosts(models) {
  // one at a time, after the page is up: each answer is cached, the next visit is instant
  for (const m of models) {
    try {
      const c = await api("/train/cost?" + q({ model: m }));
      const opt = [...$("model-options").options].find((o) => o.value === m);
      if (opt) opt.label = `${c.task}, ${costText(c)}`;
    } catch (e) { /* a model this install cannot build: no label */ }
  }
}
function formValues() {
  const out = {};
  for (const input of $("new-form").elements) {
    if (!input.name) continue;
    if (input.type === "checkbox") { if (input.checked) out[input.name] = true; continue; }
    const d = defaults && defaults.values[input.name];
    if (input.value !== "" && String(d) !== input.value) out[input.name] = input.value;
  }
  return out;
}
let commandSeq = 0;
async function updateCommand() {
  const seq = ++commandSeq;  // answers can arrive out of order: only the latest request's is shown
  let text;
  try { text = (await api("/train/command", { method: "POST", body: formValues() })).command; }
  catch (e) { text = "✗ " + e.message; }
  if (seq === commandSeq) $("new-command").textContent = text;
}
$("new-form").addEventListener("input", updateCommand);
$("new-form").elements.optimizer.addEventListener("change", () => {
  const o = $("new-form").elements.optimizer.value;
  $("new-form").elements.lr.placeholder = `(${defaults.default_lr[o]} for ${o})`;
});
$("new-copy").addEventListener("click", (e) => copy($("new-command").textContent, e.target));
$("new-resolve").addEventListener("click", async () => {
  $("new-resolved").textContent = "reading the dataset...";
  try {
    const r = await api("/train/resolve", { method: "POST", body: formValues() });
    resolved = r; showCost();
    $("new-resolved").textContent = `kiln train would use: model ${r.model} (${r.task}), batch ${r.batch_size}, lr ${r.lr}, ` +
      `warm-up ${+r.warmup_epochs.toFixed(3)} epoch(s), input ${r.image_size.join("x")} (${r.image_size_reason}), ${r.workers} loader worker(s); ` +
      `${r.train_images} training images, ${r.classes.length} classes`;
  } catch (e) { showError($("new-resolved"), e); }
});
$("new-start").addEventListener("click", async () => {
  try { const r = await api("/runs", { method: "POST", body: formValues() }); location.hash = "runs?" + q({ run: r.run }); selectRun(r.run); }
  catch (e) { showError($("new-resolved"), e); }
});

// ---- runs -----------------------------------------------------------------------------------------
let source = null, current = null;
pages.runs = async () => {
  const m = location.hash.match(/run=([^&]+)/);
  await renderRuns();
  if (m) selectRun(decodeURIComponent(m[1]));
};
async function renderRuns() {
  const runs = await refreshRunSelects();
  const t = $("runs-table");
  t.replaceChildren(el("tr", {}, ...["run", "state", "model", "data", "epochs", "best"].map((h) => el("th", { text: h }))));
  for (const r of runs) {
    t.append(el("tr", { class: "clickable" + (r.run === current ? " selected" : ""), "data-run": r.run, onclick: () => selectRun(r.run) },
      el("td", { text: r.run }), el("td", {}, el("span", { class: "state " + r.state, text: r.state })),
      el("td", { text: r.model || "-" }), el("td", { text: r.data || "-" }),
      el("td", { text: `${r.epochs_done}/${r.epochs || "?"}` }), el("td", { text: headline(r.task, r.best) })));
  }
}
function selectRun(run) {
  current = run;
  $("run-detail").hidden = false;
  $("run-title").textContent = run;
  $("run-zip").href = withToken("api/download/bundle?" + q({ run }));
  if (source) source.close();
  source = new EventSource(withToken("api/run/events?" + q({ run })));
  source.addEventListener("run", (ev) => renderRun(JSON.parse(ev.data)));
  for (const tr of $("runs-table").querySelectorAll("tr[data-run]")) tr.classList.toggle("selected", tr.dataset.run === run);
}
let lastState = {};
function renderRun(s) {
  const p = s.progress;
  const parts = [el("span", { class: "state " + s.state, text: s.state }), ` epoch ${s.epochs_done}/${s.epochs || "?"}`];
  if (p) parts.push(`, batch ${p.batch}/${p.batches} of epoch ${p.epoch}` + (p.loss !== null ? `, loss ${p.loss}` : ""));
  if (s.eta_s !== null && s.eta_s !== undefined) parts.push(`, ETA ${fmtTime(s.eta_s)}`);
  if (s.best && Object.keys(s.best).length) parts.push(`, best ${headline(s.task, s.best)}`);
  if (s.job && s.job.info && s.job.info.command) parts.push(el("div", { class: "command-inline", text: s.job.info.command }));
  $("run-status").replaceChildren(...parts);
  $("run-stop").disabled = !(s.state === "running" || s.state === "queued");
  $("run-resume").disabled = !s.resumable || s.state === "running" || s.state === "queued";
  const rows = s.metrics || [];
  const col = (k) => rows.filter((r) => r[k] !== undefined && r[k] !== "").map((r) => [r.epoch, +r[k]]);
  KilnChart.draw($("chart-loss"), { title: "loss per epoch", xLabel: "epoch", xInteger: true, series: [
    { name: "train", points: col("train_loss") }, { name: "val", points: col("val_loss") }] });
  const metric = s.task === "detect" ? "val_map" : "val_top1";
  KilnChart.draw($("chart-metric"), { title: s.task === "detect" ? "validation mAP" : "accuracy %", xLabel: "epoch", xInteger: true, series: [
    { name: metric.replace("val_", "val "), points: col(metric), color: "#2ca02c" },
    ...(s.task === "detect" ? [] : [{ name: "train", points: col("train_acc"), color: "#ff7f0e" }])] });
  KilnChart.draw($("chart-steps"), { title: "running training loss within epochs (progress bar)", xLabel: "epoch", series: [
    { name: "loss", points: s.steps || [], dots: false, width: 1.5 }] });
  $("run-files").replaceChildren(...(s.artifacts || []).map((a) =>
    el("a", { href: withToken("api/download?" + q({ run: s.run, file: a.file })), text: `${a.file} (${a.precision}, ${fmtBytes(a.size)})  ` })));
  $("run-log").textContent = s.log || "";
  if (lastState[s.run] !== s.state || lastState[s.run + "#"] !== s.epochs_done) { renderRuns(); }
  lastState[s.run] = s.state; lastState[s.run + "#"] = s.epochs_done;
}
$("run-stop").addEventListener("click", () => api("/run/stop", { method: "POST", body: { run: current } }).catch((e) => alert(e.message)));
$("run-resume").addEventListener("click", () => api("/run/resume", { method: "POST", body: { run: current, epochs: $("run-resume-epochs").value || null } }).catch((e) => alert(e.message)));
$("run-delete").addEventListener("click", async () => {
  if (!confirm(`Delete ${current} and everything in its folder?`)) return;
  try { await api("/run?" + q({ run: current }), { method: "DELETE" }); if (source) source.close(); $("run-detail").hidden = true; renderRuns(); }
  catch (e) { alert(e.message); }
});

// ---- compare --------------------------------------------------------------------------------------
pages.compare = async () => {
  const runs = await refreshRunSelects();
  $("cmp-pick").replaceChildren(...runs.filter((r) => r.epochs_done).map((r) =>
    el("label", {}, el("input", { type: "checkbox", value: r.run }), " " + r.run)));
};
$("cmp-go").addEventListener("click", async () => {
  const chosen = [...$("cmp-pick").querySelectorAll("input:checked")].map((i) => i.value);
  if (!chosen.length) return;
  const data = await api("/compare?" + chosen.map((r) => "run=" + encodeURIComponent(r)).join("&"));
  const pal = KilnChart.PALETTE;
  KilnChart.draw($("cmp-loss"), { title: "validation loss", xLabel: "epoch", xInteger: true, series: data.map((d, i) => ({
    name: d.run, color: pal[i % pal.length], points: d.metrics.filter((r) => r.val_loss !== undefined).map((r) => [r.epoch, r.val_loss]) })) });
  KilnChart.draw($("cmp-metric"), { title: "validation top-1 % / mAP", xLabel: "epoch", xInteger: true, series: data.map((d, i) => ({
    name: d.run, color: pal[i % pal.length], points: d.metrics.map((r) => [r.epoch, r.val_top1 !== undefined ? r.val_top1 : r.val_map]) })) });
  const t = $("cmp-table");
  t.replaceChildren(el("tr", {}, ...["run", "model", "data", "epochs", "best", "parameters", "GFLOPs", "artifacts (size)", "p50 ms b1 per artifact"].map((h) => el("th", { text: h }))));
  for (const d of data) {
    const bench = d.bench ? d.bench.artifacts.map((a) => `${a.precision} ${a.format}: ${fmtNum(a.p50_ms_b1, 3)}`).join(", ") : "-";
    t.append(el("tr", {}, el("td", { text: d.run }), el("td", { text: d.model }), el("td", { text: d.data }),
      el("td", { text: String(d.epochs_done) }), el("td", { text: headline(d.task, d.best) }),
      el("td", { text: d.params ? d.params.toLocaleString() : "-" }), el("td", { text: d.gflops ? (+d.gflops).toPrecision(3) : "-" }),
      el("td", { text: d.artifacts.map((a) => `${a.file} ${fmtBytes(a.size)}`).join(", ") }), el("td", { text: bench })));
  }
});

// ---- export ---------------------------------------------------------------------------------------
let exportTimer = null;
pages.export = async () => { await refreshRunSelects(); pollExport(); };
$("ex-run").addEventListener("change", pollExport);
$("ex-go").addEventListener("click", async () => {
  const precisions = ["fp32", "fp16", "int8"].filter((p) => $("ex-" + p).checked);
  try {
    const r = await api("/export", { method: "POST", body: { run: $("ex-run").value, precisions, calib_method: $("ex-method").value,
      int8_layout: $("ex-layout").value, max_accuracy_drop: $("ex-budget").value, calib_images: $("ex-calib").value, triton: $("ex-triton").checked } });
    $("ex-command").textContent = r.command;
    pollExport();
  } catch (e) { showError($("ex-status"), e); }
});
async function pollExport() {
  clearTimeout(exportTimer);
  const run = $("ex-run").value;
  if (!run || !document.getElementById("page-export").classList.contains("active")) return;
  const r = await api("/run/table?" + q({ run })).catch((e) => ({ error: e.message }));
  if (r.error) { showError($("ex-status"), r); return; }
  const job = r.job;
  $("ex-status").replaceChildren(job ? el("span", { class: "state " + job.state, text: `export job ${job.id}: ${job.state}` }) : "no export yet");
  $("ex-log").textContent = r.log || "";
  renderTable(r.table);
  if (job && (job.state === "running" || job.state === "queued")) exportTimer = setTimeout(pollExport, 1000);
}
function renderTable(table) {
  const t = $("ex-table");
  if (!table) { t.replaceChildren(); return; }
  const det = table.task === "detect";
  const key = det ? "map" : "top1", scale = det ? 100 : 1;
  const ref = table.artifacts.find((a) => a.format === "torch" && a.precision === "fp32");
  const refv = ref && ref.metrics ? ref.metrics[key] * scale : null;
  t.replaceChildren(el("tr", {}, ...["file", "format", "precision", "size MB", det ? "mAP %" : "top-1 %", "drop (points)", "agreement %", "p50 ms (b1)", "items/s (batch)"].map((h) => el("th", { text: h }))));
  for (const a of table.artifacts) {
    if (a.error) { t.append(el("tr", {}, el("td", { text: a.file }), el("td", { text: a.format }), el("td", { text: a.precision }), el("td", { text: fmtNum(a.size_mb) }), el("td", { colspan: "5", text: "not runnable here: " + a.error }))); continue; }
    const v = a.metrics ? a.metrics[key] * scale : null;
    const drop = refv !== null && v !== null ? refv - v : null;
    t.append(el("tr", { class: "artifact-row" }, el("td", { text: a.file }), el("td", { text: a.format }), el("td", { text: a.precision }),
      el("td", { text: fmtNum(a.size_mb) }), el("td", { text: fmtNum(v) }),
      el("td", { class: drop !== null && drop > 0.5 ? "drop" : "ok", text: drop === null ? "-" : fmtNum(drop) }),
      el("td", { text: fmtNum(a.agreement) }), el("td", { text: fmtNum(a.p50_ms_b1, 3) }),
      el("td", { text: a.items_per_s ? `${Math.round(a.items_per_s)} (${a.best_batch})` : "-" })));
  }
}

// ---- test -----------------------------------------------------------------------------------------
pages.test = async () => { await refreshRunSelects(); resetVal(); };
$("test-run").addEventListener("change", resetVal);
$("test-precision").addEventListener("change", resetVal);
const panel = KilnTestPanel.mount($("test-panel"), {
  predict: async (files) => {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    const params = { run: $("test-run").value };
    if ($("test-precision").value) params.precision = $("test-precision").value;
    return api("/predict?" + q(params), { method: "POST", body: form });
  },
});

// the validation split through the bundle: confusion matrix, the images of each cell, images to test
let val = null;
const picked = new Set();
const VAL_SHOWN = 200;
function resetVal() {
  val = null; picked.clear();
  for (const id of ["val-confusion", "val-cell", "val-images", "val-status", "val-picked"]) $(id).replaceChildren();
  $("val-test").disabled = true;
}
function valParams() {
  const params = { run: $("test-run").value };
  if ($("test-precision").value) params.precision = $("test-precision").value;
  return params;
}
const valImageUrl = (i, size) => withToken("api/val/image?" + q({ ...val.params, i, ...(size ? { size } : {}) }));
$("val-load").addEventListener("click", async () => {
  const params = valParams();
  if (!params.run) return;
  resetVal();
  $("val-status").textContent = "running the validation split...";
  try { val = await api("/val?" + q(params)); } catch (e) { $("val-status").textContent = "✗ " + e.message; return; }
  val.params = params;
  $("val-status").textContent = `${val.count} of ${val.split_size} validation images through ${val.backend} ${val.precision}` +
    (val.top1 !== undefined ? `: top-1 ${val.top1.toFixed(2)}%` : "");
  if (val.task === "classify") {
    renderConfusion();
    const wrong = val.images.filter((im) => im.true !== im.pred);
    showImages(wrong, `${wrong.length} misclassified image(s)`);
  } else {
    showImages(val.images, "validation images");
  }
});
function renderConfusion() {
  const c = val.classes;
  const t = el("table", { class: "table confusion" },
    el("tr", {}, el("th", { text: "true \u2193 / predicted \u2192" }), ...c.map((name) => el("th", { text: name }))));
  val.confusion.forEach((row, ti) => {
    t.append(el("tr", {}, el("th", { text: c[ti] }), ...row.map((n, pi) => {
      const cls = n === 0 ? "zero" : ti === pi ? "hit" : "miss";
      return el("td", { class: cls, "data-true": String(ti), "data-pred": String(pi), text: String(n), onclick: (ev) => {
        if (!n) return;
        for (const td of t.querySelectorAll("td.picked")) td.classList.remove("picked");
        ev.target.classList.add("picked");
        showImages(val.images.filter((im) => im.true === ti && im.pred === pi), `true ${c[ti]}, predicted ${c[pi]}: ${n} image(s)`);
      } });
    })));
  });
  $("val-confusion").replaceChildren(el("p", { text: "validation confusion matrix: click a cell for its images" }), t);
}
function showImages(images, title) {
  const c = val.classes;
  $("val-cell").replaceChildren(el("p", { text: title + (images.length > VAL_SHOWN ? ` (the first ${VAL_SHOWN})` : "") + "; click images to pick them" }));
  $("val-images").replaceChildren(...images.slice(0, VAL_SHOWN).map((im) => {
    const caption = val.task === "classify"
      ? el("div", {}, el("div", { text: "true " + c[im.true] }),
        el("div", { class: im.true === im.pred ? "" : "wrong", text: `pred ${c[im.pred]} ${(100 * im.score).toFixed(0)}%` }))
      : el("div", { text: `#${im.i}: ${im.true_boxes} box(es)` });
    const item = el("div", { class: "val-item" + (picked.has(im.i) ? " picked" : ""), "data-i": String(im.i) },
      el("img", { loading: "lazy", alt: `validation image ${im.i}`, src: valImageUrl(im.i, 96) }), caption);
    item.addEventListener("click", () => {
      if (picked.has(im.i)) picked.delete(im.i); else picked.add(im.i);
      item.classList.toggle("picked", picked.has(im.i));
      $("val-picked").textContent = picked.size ? `${picked.size} picked` : "";
      $("val-test").disabled = !picked.size;
    });
    return item;
  }));
}
$("val-test").addEventListener("click", async () => {
  const files = await Promise.all([...picked].map(async (i) => {
    const resp = await fetch(valImageUrl(i), { headers: token() ? { "X-Kiln-Token": token() } : {} });
    const name = resp.headers.get("X-Kiln-Name") || `val-${i}.png`;
    return new File([await resp.blob()], name, { type: "image/png" });
  }));
  panel.run(files);
});

// ---- serve ----------------------------------------------------------------------------------------
let serveTimer = null;
pages.serve = async () => { await refreshRunSelects(); pollServers(); };
$("serve-go").addEventListener("click", async () => {
  try {
    const body = { run: $("serve-run").value };
    if ($("serve-precision").value) body.precision = $("serve-precision").value;
    await api("/serve", { method: "POST", body }); pollServers();
  } catch (e) { showError($("serve-list"), e); }
});
async function pollServers() {
  clearTimeout(serveTimer);
  if (!document.getElementById("page-serve").classList.contains("active")) return;
  const list = await api("/serve").catch(() => []);
  const out = list.length ? [] : [el("p", { text: "no server running" })];
  for (const s of list) {
    const snippets = Object.entries(s.snippets).map(([k, v]) => {
      const b = el("button", { text: "Copy", class: "copy-" + k, onclick: (e) => copy(v, e.target) });
      return el("div", { class: "snippet" }, el("div", { text: k }), el("pre", { class: "command snippet-" + k, text: v }), b);
    });
    out.push(el("div", { class: "server", "data-ready": String(s.ready) },
      el("h3", { text: `${s.run} on ${s.url} ` }, el("span", { class: "state " + (s.ready ? "done" : "queued"), text: s.ready ? "ready" : "starting" })),
      el("div", { class: "row" }, el("a", { href: s.url + "/docs", target: "_blank", text: "API docs" }), el("a", { href: s.url + "/", target: "_blank", text: "test page" }),
        el("button", { text: "Stop", onclick: () => api("/serve/stop", { method: "POST", body: { id: s.id } }).then(pollServers) })),
      ...snippets));
  }
  $("serve-list").replaceChildren(...out);
  serveTimer = setTimeout(pollServers, list.some((s) => !s.ready) ? 700 : 4000);
}

// ---- start ----------------------------------------------------------------------------------------
(async () => {
  try {
    info = await api("/info");
    $("workspace").textContent = info.workspace;
    if (info.training_missing) { $("banner").hidden = false; $("banner").textContent = info.training_missing; }
  } catch (e) {
    $("banner").hidden = false;
    $("banner").textContent = e.message + (token() ? "" : " — open the address the studio printed (it carries the token).");
  }
  route();
})();
