// kvedit explore: how an edit is shown — its prompts' outcomes coloured by what they mean, its next-token
// distributions, what it changed read as memories, and the list of edits with their badges. Loaded before
// app.js, whose helpers (h, tok, pct, num, bars, openMemory, showEdit, revertEdit) these call.
"use strict";

function renderEditResult(e, into) {
  into.classList.remove("hidden");
  const s = e.summary || {};
  const parts = [h("h2", {}, `Edit #${e.id}: ${e.label}`),
    h("p", { class: "muted" }, `${e.source}; layers ${JSON.stringify(e.layers)}; ` +
      (e.time_s ? `${e.steps} steps in ${num(e.time_s, 2)} s; ` : "") + `state: ${e.state}`)];
  if (s.rows) {
    if (e.state === "reverted") {
      parts.push(h("p", { class: "flip reverted" }, "Reverted: the model is back to the weights before this edit; the table shows what the edit did while it was applied."));
    } else {
      parts.push(h("p", { class: s.flipped ? "flip yes" : "flip no" }, s.flipped ? "The rewrite prompt now prefers the new object."
        : "The rewrite prompt does not prefer the new object yet."));
    }
    const leaked = s.rows.filter((r) => outcome(r) === "leaked").length;
    if (leaked) parts.push(h("p", { class: "flip no leak" }, `${leaked} neighbourhood prompt${leaked === 1 ? "" : "s"} now prefer${leaked === 1 ? "s" : ""} the new object: the edit leaked beyond its subject.`));
    parts.push(h("table", { class: "plain probs" }, h("thead", {}, h("tr", {}, h("th", {}, "prompt"), h("th", {}, "kind"),
      h("th", {}, "p(new) before"), h("th", {}, "p(new) after"), h("th", {}, "p(true) before"), h("th", {}, "p(true) after"),
      h("th", { title: "rewrite/paraphrase: flipped when p(new) > p(true) after the edit; neighbourhood: kept when p(true) is still above p(new)" }, "outcome"))),
    h("tbody", {}, s.rows.map((r) => {
      const o = outcome(r), good = o === "flipped" || o === "kept";
      return h("tr", { class: `${r.kind} ${good ? "good" : "bad"}`, "data-outcome": o },
        h("td", {}, r.prompt, h("small", { class: "muted" }, ` new ${JSON.stringify(r.target_new)}, true ${JSON.stringify(r.target_true)}`)),
        h("td", {}, r.kind === "efficacy" ? "rewrite" : r.kind),
        h("td", { class: "num" }, pct(r.new_before)), h("td", { class: "num after " + (good ? "good" : "bad") }, pct(r.new_after), arrow(r.new_before, r.new_after)),
        h("td", { class: "num" }, pct(r.true_before)), h("td", { class: "num" }, pct(r.true_after), arrow(r.true_before, r.true_after)),
        h("td", { class: "outcome " + (good ? "good" : "bad") }, good ? `✓ ${o}` : `✗ ${o}`));
    }))));
  }
  if (s.next_before) {
    parts.push(h("div", { class: "columns" },
      h("div", { class: "card" }, h("h3", {}, "Next token before"), bars(s.next_before)),
      h("div", { class: "card" }, h("h3", {}, "Next token after"), bars(s.next_after))));
  }
  if (s.patch_view) parts.push(renderPatchView(s.patch_view));
  into.replaceChildren(...parts);
}

// what a row's probabilities mean: a rewrite or paraphrase prompt "flipped" (p(new) > p(true) now) or "not
// flipped"; a neighbourhood prompt "kept" (p(true) still above p(new)) or "leaked" (the edit reached it: a failure)
function outcome(r) {
  if (r.outcome) return r.outcome;
  if (r.kind === "neighborhood") return r.true_after > r.new_after ? "kept" : "leaked";
  return r.new_after > r.true_after ? "flipped" : "not flipped";
}
function arrow(before, after) {
  return h("small", { class: "muted" }, after > before ? " ↑" : after < before ? " ↓" : "");
}

function renderPatchView(p) {
  if (p.note) return h("div", { class: "card" }, h("h3", {}, "What changed"), h("p", {}, p.note));
  const layers = Object.entries(p.layers || {});
  return h("div", { class: "card patch" }, h("h3", {}, "What changed, read as memories"),
    p.other_parameters && p.other_parameters.length ? h("p", { class: "muted" }, `Also changed (not FFN keys/values): ${p.other_parameters.join(", ")}`) : null,
    layers.map(([layer, entry]) => h("div", { class: "patch-layer" }, h("h4", {}, `Layer ${layer}`),
      h("ul", {}, Object.entries(entry.changed).map(([role, info]) => h("li", {}, `${role}: ${info.count} memories changed`))),
      entry.locality_ratio !== undefined && entry.locality_ratio !== null ? h("p", { class: "muted" },
        `mean |Δm| on neighbourhood prompts / on edit prompts: ${num(entry.locality_ratio)}`) : null,
      entry.coefficients && entry.coefficients.prompts ? h("div", {}, h("p", {}, "Memories whose coefficient moved most on the edit prompt:"),
        h("div", { class: "chips" }, entry.coefficients.prompts.top.map((t) => h("button", { class: "chip", type: "button",
          onclick: () => openMemory(Number(layer), t.key) }, h("b", {}, `${layer}:${t.key}`), ` ${num(t.before, 2)} → ${num(t.after, 2)}`,
          t.weights_changed ? " (key changed)" : "")))) : null,
      entry.values ? h("div", {}, h("p", {}, `Value vectors changed most (‖ΔV‖/‖V‖ = ${num(entry.values.relative_change, 4)}):`),
        h("table", { class: "plain" }, h("thead", {}, h("tr", {}, h("th", {}, "memory"), h("th", {}, "‖Δv‖"), h("th", {}, "tokens before"),
          h("th", {}, "tokens after"), h("th", {}, "tokens of Δv"))),
        h("tbody", {}, entry.values.top.map((t) => h("tr", {},
          h("td", {}, h("button", { class: "chip", type: "button", onclick: () => openMemory(Number(layer), t.key) }, `${layer}:${t.key}`)),
          h("td", { class: "num" }, num(t.norm_change)), h("td", {}, t.tokens_before.slice(0, 3).map(tok)),
          h("td", {}, t.tokens_after.slice(0, 3).map(tok)), h("td", {}, t.tokens_of_change.slice(0, 3).map(tok))))))) : null)));
}

function renderEdits(edits) {
  $("edits-table").querySelector("tbody").replaceChildren(...edits.map((e) => h("tr", { class: e.state, "data-edit": e.id },
    h("td", { class: "num" }, `#${e.id}`), h("td", {}, e.label,
      e.state === "reverted" ? h("span", { class: "pill small reverted" }, "reverted")
        : e.flipped ? h("span", { class: "pill small" }, "flipped") : null),
    h("td", {}, e.source), h("td", {}, JSON.stringify(e.layers)), h("td", {}, e.state),
    h("td", { class: "actions" },
      h("button", { type: "button", onclick: () => showEdit(e.id) }, "details"),
      e.state === "applied" ? h("button", { type: "button", class: "revert", onclick: () => revertEdit(e.id, false) }, "revert") : null,
      h("a", { href: `/api/edits/${e.id}/patch`, download: "", class: "button" }, "download patch")))));
}
