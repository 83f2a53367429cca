// kvedit explore: a fact's knowledge neurons — found as a job over the analysed prompt (and any others that ask
// the same), each shown as a chip that opens its memory. Loaded before app.js, whose helpers (h, num, pct, api,
// busy, followJob, openMemory, showMessage, lines, $) these call.
"use strict";

async function findNeurons(event) {
  if (event) event.preventDefault();
  const prompt = $("prompt").value.trim(), answer = $("kn-answer").value.trim();
  if (!prompt) { showMessage("type a prompt above first: the knowledge neurons are those of its answer"); return; }
  if (!answer) { showMessage("type the answer whose knowledge neurons you want"); return; }
  const button = $("kn-run");
  busy(button, true);
  try {
    const job = await api("/api/neurons", { prompts: [prompt, ...lines("kn-prompts")], answer,
      steps: Number($("kn-steps").value) || 20 });
    await followJob(job, async (done) => { if (done.state === "done") renderNeurons(done.result); });
  } catch (err) { showMessage(err.message); } finally { busy(button, false); }
}

function renderNeurons(r) {
  const into = $("kn-result");
  if (!r.neurons.length) {
    into.replaceChildren(h("p", { class: "muted" }, `No memory passes the thresholds in ${r.prompts.length} prompt(s) `
      + `(coarse neurons per prompt: ${r.coarse.join(", ")}).`));
    return;
  }
  const s = r.suppression, change = (x) => `${x > 0 ? "−" : "+"}${Math.abs(100 * x).toFixed(1)} %`;
  const effect = s ? `Switching them off changes p(${JSON.stringify(r.answer)}) by ${change(s.knowledge)} on average; `
    + `switching off as many random memories, by ${change(s.random)}.` : "";
  into.replaceChildren(
    h("p", {}, `${r.neurons.length} knowledge neuron${r.neurons.length === 1 ? "" : "s"} of ${JSON.stringify(r.answer)} `
      + `over ${r.prompts.length} prompt(s). ${effect}`),
    h("div", { class: "chips", id: "kn-chips" }, r.neurons.map((n) => h("button", {
      class: "chip pos", type: "button", "data-key": `${n.layer}:${n.key}`,
      title: `memory ${n.layer}:${n.key}, attribution ${num(n.attribution, 4)}`,
      onclick: () => openMemory(n.layer, n.key) }, h("b", {}, `${n.layer}:${n.key}`), " ", num(n.attribution, 3)))));
}
