// kvedit explore: plain JavaScript over the JSON API (no build step, nothing loaded from elsewhere).
"use strict";

const state = { info: null, prompt: "", lastPrompt: null, memory: null, interventions: [], lastEdit: null };

// ---- small helpers -------------------------------------------------------------------------------
function $(id) { return document.getElementById(id); }

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// a token with its spaces and newlines visible
function tok(t) {
  const shown = String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
  return h("span", { class: "tok", title: JSON.stringify(t) }, shown);
}

function pct(p) {
  if (p === null || p === undefined) return "–";
  if (p >= 0.001) return (100 * p).toFixed(1) + "%";
  return p === 0 ? "0%" : (100 * p).toExponential(1) + "%";
}
function num(x, d = 3) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }

function showMessage(text, kind = "error") {
  const box = $("message");
  box.className = "message " + kind;
  box.textContent = text;
}
function clearMessage() { $("message").className = "message hidden"; }

// the server's token, written into this page when it was served: every request that changes or starts
// something sends it (a page of another site cannot read it), and the browser adds this page's Origin
function pageToken() {
  const meta = document.querySelector('meta[name="kvedit-token"]');
  return meta ? meta.content : "";
}

async function api(path, body, method) {
  const opts = { method: method || (body === undefined ? "GET" : "POST"), headers: {} };
  if (opts.method !== "GET") opts.headers["X-Kvedit-Token"] = pageToken();
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({ error: `the server answered ${res.status} without JSON` }));
  if (!res.ok) { const err = new Error(data.error || `error ${res.status}`); err.status = res.status; throw err; }
  return data;
}

function bars(entries, opts = {}) {
  const max = Math.max(...entries.map((e) => e.prob), 1e-9);
  return h("div", { class: "bars" }, entries.map((e) =>
    h("div", { class: "bar-row" + (opts.mark === e.token ? " marked" : "") },
      h("div", { class: "bar-label" }, tok(e.token)),
      h("div", { class: "bar" }, h("div", { class: "fill", style: `width:${(100 * e.prob) / max}%` })),
      h("div", { class: "bar-value" }, pct(e.prob)))));
}

function busy(button, on) { if (button) { button.disabled = on; button.classList.toggle("working", on); } }

// ---- tabs ----------------------------------------------------------------------------------------
function openTab(name) {
  if (name === "edit" && !$("ed-prompt").value && $("prompt").value) $("ed-prompt").value = $("prompt").value;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("hidden", s.id !== "tab-" + name);
}

// ---- model facts and the edit list ---------------------------------------------------------------
async function refreshInfo() {
  const info = await api("/api/info");
  state.info = info;
  $("model-info").textContent = `${info.model} · ${info.family} · ${info.layers} layers × ${info.d_ff} memories · ` +
    `d_model ${info.d_model} · vocabulary ${info.vocab}`;
  const applied = $("applied");
  applied.classList.toggle("hidden", info.applied === 0);
  applied.textContent = `${info.applied} edit${info.applied === 1 ? "" : "s"} applied`;
  $("edit-count").textContent = info.edits.length;
  renderEdits(info.edits);
  if (info.job && !jobPolling) followJob(info.job, () => refreshInfo());
  return info;
}

function fillMethods(info) {
  const select = $("ed-method");
  select.innerHTML = "";
  const main = info.methods.filter((m) => m.main), more = info.methods.filter((m) => !m.main);
  for (const m of main) select.append(h("option", { value: m.name }, m.name));
  const group = h("optgroup", { label: "more" });
  for (const m of more) group.append(h("option", { value: m.name }, m.name));
  select.append(group);
  const help = () => { const m = info.methods.find((x) => x.name === select.value); $("ed-method-help").textContent = m ? m.summary : ""; };
  select.addEventListener("change", help);
  help();
  $("mine-tokens").value = info.mine_tokens;
  $("mine-corpus").textContent = `from ${info.corpus}`;
}

// ---- jobs ----------------------------------------------------------------------------------------
let jobPolling = false;

async function followJob(job, done) {
  jobPolling = true;
  const panel = $("job");
  panel.classList.remove("hidden");
  try {
    while (true) {
      $("job-title").textContent = job.title;
      $("job-phase").textContent = "· " + job.phase;
      $("job-elapsed").textContent = `· ${job.elapsed_s.toFixed(1)} s`;
      const list = $("job-bars");
      list.innerHTML = "";
      const cancel = $("job-cancel");
      cancel.dataset.job = job.id;
      cancel.disabled = !!job.cancel_requested;
      const p = job.progress;
      const shown = p ? [{ desc: p.what, n: p.done, total: p.total, unit: p.unit }]
        : job.bars.length ? job.bars : [{ desc: job.phase, n: 0, total: null, unit: "", working: true }];
      $("job-fraction").textContent = p ? `${Math.round(100 * p.fraction)}%` : "";
      for (const b of shown) {
        const frac = b.total ? Math.min(1, b.n / b.total) : null;
        list.append(h("div", { class: "bar-row" }, h("div", { class: "bar-label wide" }, b.desc || "working"),
          h("div", { class: "bar" }, h("div", { class: "fill" + (frac === null ? " indeterminate" : ""),
            style: `width:${frac === null ? 100 : 100 * frac}%` })),
          h("div", { class: "bar-value" }, b.working ? "working…" : b.total ? `${Math.round(b.n)} / ${Math.round(b.total)} ${b.unit}` : `${Math.round(b.n)} ${b.unit}`)));
      }
      if (!["queued", "running"].includes(job.state)) break;
      await new Promise((r) => setTimeout(r, 300));
      job = await api(`/api/jobs/${job.id}`);
    }
  } finally {
    jobPolling = false;
    panel.classList.add("hidden");
  }
  if (job.state === "failed") showMessage(`${job.title} failed: ${job.error}`);
  if (job.state === "cancelled") showMessage(`${job.title} was cancelled; the model is exactly as it was before it.`, "info");
  await done(job);
  return job;
}

async function cancelJob() {
  const button = $("job-cancel");
  if (!button.dataset.job) return;
  button.disabled = true;
  try { await api(`/api/jobs/${button.dataset.job}`, undefined, "DELETE"); }
  catch (err) { showMessage(`could not cancel: ${err.message}`); button.disabled = false; }
}

// ---- prompt view ---------------------------------------------------------------------------------
function memoryChip(layer, m) {
  return h("button", { class: "chip " + (m.coefficient >= 0 ? "pos" : "neg"), type: "button",
    title: `memory ${layer}:${m.key}, coefficient ${num(m.coefficient)}, |m|·‖v‖ ${num(m.contribution)}`,
    "data-key": `${layer}:${m.key}`, onclick: () => openMemory(layer, m.key) },
  h("b", {}, `${layer}:${m.key}`), " ", m.value_tokens.slice(0, 3).map(tok));
}

async function analyze(event) {
  if (event) event.preventDefault();
  const prompt = $("prompt").value, watch = $("watch").value.trim();
  const button = $("analyze");
  busy(button, true);
  try {
    const r = await api("/api/prompt", { prompt, watch: watch || null });
    clearMessage();
    state.prompt = prompt;
    renderPrompt(r);
    openTab("prompt");
  } catch (err) { showMessage(err.message); } finally { busy(button, false); }
}

// after the weights changed: show the analysed prompt as the model now answers it (quietly, same tab)
async function refreshPrompt() {
  if (!state.prompt) return;
  try { renderPrompt(await api("/api/prompt", { prompt: state.prompt, watch: $("watch").value.trim() || null })); }
  catch (err) { /* the prompt view keeps its last answer */ }
}

function renderPrompt(r) {
  $("prompt-empty").classList.add("hidden");
  $("prompt-result").classList.remove("hidden");
  $("prompt-tokens").replaceChildren(h("span", { class: "muted" }, `${r.tokens.length} tokens: `), ...r.tokens.map(tok));
  $("next-token").replaceChildren(bars(r.next_token, { mark: r.watch && r.watch.token }));
  $("watch-final").textContent = (r.watch ? `followed token ${JSON.stringify(r.watch.token)}: ${pct(r.watch.prob)}, rank ${r.watch.rank}` : "")
    + (r.watch_note ? ` (${r.watch_note})` : "");
  document.querySelectorAll(".watch-col").forEach((c) => c.classList.toggle("hidden", !r.watch));
  state.lastPrompt = r;
  const body = $("layers").querySelector("tbody");
  const layers = $("reverse-layers").checked ? [...r.layers].reverse() : r.layers;
  body.replaceChildren(...layers.map((l) => h("tr", { "data-layer": l.layer },
    h("td", { class: "num" }, l.layer),
    h("td", {}, l.lens.map((e) => h("span", { class: "lens" }, tok(e.token), h("small", {}, pct(e.prob))))),
    h("td", { class: "watch-col" + (r.watch ? "" : " hidden") }, l.watch ? `${pct(l.watch.prob)} (#${l.watch.rank})` : ""),
    h("td", { class: "chips" }, l.memories.map((m) => memoryChip(l.layer, m))))));
}

// ---- memory view ---------------------------------------------------------------------------------
async function openMemory(layer, key) {
  $("mem-layer").value = layer; $("mem-key").value = key;
  try {
    const r = await api("/api/memory", { layer: Number(layer), key: Number(key), prompt: state.prompt || null });
    clearMessage();
    state.memory = r;
    renderMemory(r);
    openTab("memory");
  } catch (err) { showMessage(err.message); }
}

function renderMemory(r) {
  $("memory-empty").classList.add("hidden");
  $("memory-result").classList.remove("hidden");
  $("mem-title").textContent = `Memory ${r.layer}:${r.key}`;
  const facts = [`layer ${r.layer}, memory ${r.key} of ${r.d_ff}`, `‖v‖ = ${num(r.value_norm)}`, `‖k‖ = ${num(r.key_norm)}`];
  const on = r.on_prompt;
  if (on) {
    const last = on.coefficients[on.coefficients.length - 1];
    facts.push(`m at the last token = ${num(last)}`, `|m|·‖v‖ = ${num(on.contribution)}`, `rank ${on.rank} of ${r.d_ff} in its layer`);
  }
  $("mem-facts").replaceChildren(...facts.map((f) => h("span", { class: "fact" }, f)));
  const list = (entries, title) => h("div", {}, h("h4", {}, title),
    h("ol", { class: "toklist" }, entries.map((e) => h("li", {}, tok(e.token), h("small", {}, num(e.logit, 2))))));
  $("mem-plus").replaceChildren(list(r.promotes, "+v (m > 0)"));
  $("mem-minus").replaceChildren(list(r.promotes_if_negative, "−v (m < 0)"));
  if (on) {
    const max = Math.max(...on.coefficients.map(Math.abs), 1e-9);
    $("mem-coefs").replaceChildren(h("div", { class: "coefs" }, on.tokens.map((t, i) => {
      const c = on.coefficients[i];
      return h("div", { class: "coef", title: `m = ${num(c, 4)}` },
        h("div", { class: "coef-bar " + (c >= 0 ? "pos" : "neg"), style: `height:${(40 * Math.abs(c)) / max}px` }),
        h("div", { class: "coef-value" }, num(c, 2)), tok(t));
    })));
  } else {
    $("mem-coefs").replaceChildren(h("p", { class: "muted" }, "Analyze a prompt to see this memory's coefficient on it."));
  }
  const has = Array.isArray(r.triggers);
  $("mem-mine").classList.toggle("hidden", has);
  const rank = has && r.triggers_source ? (r.triggers_source.rank === "abs" ? "; ranked by |m|" : "; ranked by m, largest first") : "";
  $("mem-trigger-origin").textContent = has ? `(${r.triggers_origin || ""}${rank})` : "";
  $("mem-triggers").replaceChildren(...(has ? [h("table", { class: "plain triggers" }, h("tbody", {},
    r.triggers.map((e) => h("tr", {}, h("td", { class: "num" }, num(e.coefficient, 2)),
      h("td", {}, h("span", { class: "ctx" }, e.context), h("mark", {}, e.trigger),
        e.next !== null ? h("span", { class: "next" }, " → ", tok(e.next)) : null)))))] : []));
}

async function mineLayer() {
  const r = state.memory;
  if (!r) return;
  const button = $("mine-button");
  busy(button, true);
  try {
    const job = await api("/api/mine", { layer: r.layer, tokens: Number($("mine-tokens").value) || null });
    clearMessage();
    await followJob(job, async (done) => {
      if (done.state === "done") { await refreshInfo(); await openMemory(r.layer, r.key); }
    });
  } catch (err) { showMessage(err.message); } finally { busy(button, false); }
}

// ---- interventions -------------------------------------------------------------------------------
function addIntervention(layer, key, factor) {
  const same = state.interventions.find((i) => i.layer === layer && i.key === key);
  if (same) same.factor = factor; else state.interventions.push({ layer, key, factor });
  renderInterventions();
}

function renderInterventions() {
  $("iv-table").querySelector("tbody").replaceChildren(...state.interventions.map((iv, i) => h("tr", {},
    h("td", { class: "num" }, iv.layer), h("td", { class: "num" }, iv.key),
    h("td", {}, h("input", { type: "number", step: "any", value: iv.factor, class: "num",
      onchange: (e) => { iv.factor = Number(e.target.value); } })),
    h("td", {}, h("button", { type: "button", onclick: () => { state.interventions.splice(i, 1); renderInterventions(); } }, "remove")))));
}

async function runIntervention() {
  const button = $("iv-run");
  busy(button, true);
  try {
    const r = await api("/api/intervene", { prompt: $("prompt").value, interventions: state.interventions,
      watch: $("watch").value.trim() || null });
    clearMessage();
    $("iv-result").classList.remove("hidden");
    const what = r.interventions.map((i) => `${i.layer}:${i.key}×${i.factor}`).join(", ");
    $("iv-summary").textContent = `${what} on ${JSON.stringify(r.prompt)}: KL(before‖after) = ${num(r.kl_before_after, 4)} nats; ` +
      (r.top_changed ? "the top token changed." : "the top token stayed.") +
      (r.watch ? ` Followed token: ${pct(r.watch.before.prob)} → ${pct(r.watch.after.prob)}.` : "") +
      (r.watch_note ? ` (${r.watch_note})` : "");
    $("iv-before").replaceChildren(bars(r.before));
    $("iv-after").replaceChildren(bars(r.after));
    $("iv-changes").replaceChildren(h("thead", {}, h("tr", {}, h("th", {}, "token"), h("th", {}, "before"), h("th", {}, "after"))),
      h("tbody", {}, r.largest_changes.map((c) => h("tr", {}, h("td", {}, tok(c.token)), h("td", { class: "num" }, pct(c.before)),
        h("td", { class: "num " + (c.after > c.before ? "up" : "down") }, pct(c.after))))));
  } catch (err) { showMessage(err.message); } finally { busy(button, false); }
}

// ---- edits ---------------------------------------------------------------------------------------
function lines(id) { return $(id).value.split("\n").map((s) => s.trim()).filter(Boolean); }

async function runEdit(event) {
  event.preventDefault();
  const layersText = $("ed-layers").value.trim();
  const body = { prompt: $("ed-prompt").value, subject: $("ed-subject").value, target_new: $("ed-new").value,
    target_true: $("ed-true").value.trim() || null, paraphrases: lines("ed-para"), neighbours: lines("ed-neigh"),
    method: $("ed-method").value, layers: null,
    max_steps: $("ed-steps").value ? Number($("ed-steps").value) : null, lr: $("ed-lr").value ? Number($("ed-lr").value) : null };
  if (layersText) {
    const layers = layersText.split(",").map((s) => Number(s.trim()));
    if (layers.some((x) => !Number.isInteger(x))) { showMessage(`layers: expected numbers like 3 or 3,4,5; got ${JSON.stringify(layersText)}`); return; }
    body.layers = layers;
  }
  const button = $("ed-run");
  busy(button, true);
  try {
    const job = await api("/api/edits", body);
    clearMessage();
    await followJob(job, async (done) => {
      await refreshInfo();
      if (done.state === "done") {
        state.lastEdit = done.result.id;
        renderEditResult(done.result, $("edit-result"));
        showMessage(`Edit #${done.result.id} applied.`, "info");
        await refreshPrompt();
      }
    });
  } catch (err) { showMessage(err.message); } finally { busy(button, false); }
}

async function showEdit(id) {
  try { renderEditResult(await api(`/api/edits/${id}`), $("edit-detail")); } catch (err) { showMessage(err.message); }
}

async function revertEdit(id, cascade) {
  try {
    const r = await api(`/api/edits/${id}/revert`, { cascade });
    showMessage(`Reverted ${r.reverted.map((x) => "#" + x).join(", ")}; the weights are exactly what they were before.`, "info");
    await refreshInfo();
    if (r.reverted.includes(state.lastEdit)) $("edit-result").classList.add("hidden");
    await refreshPrompt();
  } catch (err) {
    showMessage(err.message);
    if (err.status === 409 && !cascade) {
      $("message").append(" ", h("button", { type: "button", onclick: () => revertEdit(id, true) }, "Revert them together"));
    }
  }
}

async function loadPatch() {
  const file = $("patch-file").files[0];
  if (!file) { showMessage("choose a .safetensors patch file first"); return; }
  const button = $("patch-load");
  busy(button, true);
  try {
    const res = await fetch("/api/patches", { method: "POST", headers: { "Content-Type": "application/octet-stream",
      "X-Filename": file.name, "X-Kvedit-Token": pageToken() }, body: await file.arrayBuffer() });
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || `error ${res.status}`);
    showMessage(`Patch ${file.name} applied as edit #${data.id}.`, "info");
    state.lastEdit = data.id;
    renderEditResult(data, $("edit-result"));
    await refreshInfo();
    await refreshPrompt();
  } catch (err) { showMessage(`patch not loaded: ${err.message}`); } finally { busy(button, false); }
}

// ---- wiring --------------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", async () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => openTab(b.dataset.tab));
  $("prompt-form").addEventListener("submit", analyze);
  $("reverse-layers").addEventListener("change", () => { if (state.lastPrompt) renderPrompt(state.lastPrompt); });
  $("memory-form").addEventListener("submit", (e) => { e.preventDefault(); openMemory($("mem-layer").value, $("mem-key").value); });
  $("mine-button").addEventListener("click", mineLayer);
  $("mem-zero").addEventListener("click", () => { if (state.memory) { addIntervention(state.memory.layer, state.memory.key, 0); openTab("intervene"); } });
  $("mem-double").addEventListener("click", () => { if (state.memory) { addIntervention(state.memory.layer, state.memory.key, 2); openTab("intervene"); } });
  $("iv-add").addEventListener("submit", (e) => {
    e.preventDefault();
    const layer = $("iv-layer").value, key = $("iv-key").value;
    if (layer === "" || key === "") { showMessage("type a layer and a memory number to add"); return; }
    addIntervention(Number(layer), Number(key), Number($("iv-factor").value));
  });
  $("iv-run").addEventListener("click", runIntervention);
  $("edit-form").addEventListener("submit", runEdit);
  $("patch-load").addEventListener("click", loadPatch);
  $("job-cancel").addEventListener("click", cancelJob);
  $("kn-form").addEventListener("submit", findNeurons);
  try { fillMethods(await refreshInfo()); } catch (err) { showMessage(`cannot reach the server: ${err.message}`); }
  $("prompt").focus();
});
