"""One explorer session: a loaded model, its mined triggers, the edits applied to it, and the jobs running.

Everything the page does goes through here. Quick reads (prompt, memory, intervention views) hold the
model briefly; edits and mining run as background jobs (`jobs.JobRunner`); reverts and loaded patches change
weights only after every check has passed, so bad input changes nothing.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..analysis.inspect import Intervention
from ..analysis.neurons import fact_neurons, suppression_effect
from ..analysis.patch_view import patch_report
from ..analysis.triggers import TriggerSet, check_for_model, mine_triggers
from ..analysis.vocab import token_strings
from ..data.requests import EditRequest, RequestError
from ..editing.delta import PatchMismatchError, WeightDelta
from ..editing.hparams import EditorSettings
from ..editing.registry import METHODS, edit, make_settings
from ..evaluation.probe import greedy_answer, target_probabilities
from ..models.lm import LM
from ..models.memory import ffn_memory
from . import views
from .edits import AppliedEdit, EditLog
from .forms import EditForm, ExploreSettings, edit_template
from .jobs import Job, JobRunner
from .value_cache import ValueTokenCache

#: the methods the page offers first (every registered method is accepted)
MAIN_METHODS = ("ft-keys", "ft-values", "rome", "memit", "pmet")
#: requests of a loaded patch whose probabilities are shown (a batch patch can hold hundreds)
SCORED_REQUESTS = 10


class ExploreSession:
    """The model and everything the explorer keeps about it. Thread-safe: quick views and jobs share one lock."""

    def __init__(
        self,
        lm: LM,
        settings: ExploreSettings | None = None,
        triggers: TriggerSet | None = None,
        triggers_origin: str = "",
    ) -> None:
        self.lm = lm
        self.settings = settings or ExploreSettings()
        self.vocab = views.Vocabulary(token_strings(lm))
        self.jobs = JobRunner(threading.Lock(), cancel_points=list(lm.layer_list()))
        self.edits = EditLog()
        self.triggers: dict[int, tuple[TriggerSet, str]] = {}
        if triggers is not None:
            check_for_model(triggers, lm, triggers_origin or "the given triggers")
            for layer in triggers.layers:
                self.triggers[layer] = (triggers, f"mined into {triggers_origin}" if triggers_origin else "given")
        self._files = tempfile.TemporaryDirectory(prefix="kvedit-explore-")
        self.values = ValueTokenCache(lm, self.settings.top_tokens)
        if self.settings.prefetch_values:
            self.values.start()

    # ---- facts ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        lm = self.lm
        active = self.jobs.active()
        return {
            "model": lm.name,
            "family": lm.arch.family,
            "layers": lm.num_layers,
            "d_model": lm.d_model,
            "d_ff": ffn_memory(lm, 0).d_ff,
            "vocab": len(self.vocab.strings),
            "methods": [{"name": n, "summary": m.summary, "main": n in MAIN_METHODS} for n, m in METHODS.items()],
            "mined_layers": sorted(self.triggers),
            "corpus": self.settings.corpus,
            "value_tokens_ready": self.values.ready,
            "mine_tokens": self.settings.mine_tokens,
            "limits": self.settings.limits.to_dict(),
            "edits": [e.to_dict() for e in self.edits.entries],
            "applied": len(self.edits.applied()),
            "job": active.to_dict() if active else None,
        }

    def _triggers(self, layer: int) -> TriggerSet | None:
        found = self.triggers.get(layer)
        return found[0] if found else None

    # ---- quick views ---------------------------------------------------------------------------
    def prompt(self, prompt: str, watch: str | None = None) -> dict[str, Any]:
        s = self.settings
        s.limits.text(self.lm, prompt, "prompt")
        with self.jobs.quick_use(f"a prompt view of {prompt[:40]!r}"):
            return views.prompt_view(
                self.lm, self.vocab, prompt, s.top_memories, s.top_tokens, s.next_tokens, watch, self.values.get
            )

    def memory(self, layer: int, key: int, prompt: str | None = None) -> dict[str, Any]:
        if prompt:
            self.settings.limits.text(self.lm, prompt, "prompt")
        with self.jobs.quick_use(f"a view of memory {layer}:{key}"):
            layer = self.lm.check_layer(layer)
            out = views.memory_view(self.lm, self.vocab, layer, key, prompt or None, self._triggers(layer))
        if layer in self.triggers:
            out["triggers_origin"] = self.triggers[layer][1]
        return out

    def intervene(self, prompt: str, interventions: Sequence[Intervention], watch: str | None = None) -> dict[str, Any]:
        self.settings.limits.text(self.lm, prompt, "prompt")
        self.settings.limits.count(interventions, "interventions", self.settings.limits.interventions)
        with self.jobs.quick_use(f"an intervention on {prompt[:40]!r}"):
            return views.intervene(self.lm, self.vocab, prompt, interventions, self.settings.next_tokens, watch)

    # ---- mining ----------------------------------------------------------------------------------
    def start_mining(self, layer: int, tokens: int | None = None) -> Job:
        """Mine trigger examples of every memory of `layer` from the session's corpus, in the background."""
        layer = self.lm.check_layer(layer)
        tokens = self.settings.limits.mine(self.settings.mine_tokens if tokens is None else tokens)
        corpus = self.settings.corpus

        def work(job: Job) -> dict[str, Any]:
            job.set_phase(f"mining layer {layer} over {tokens} tokens of {corpus}")
            edited = len(self.edits.applied())
            found = mine_triggers(
                self.lm,
                corpus,
                layers=[layer],
                k=self.settings.mine_k,
                max_tokens=tokens,
                rank=self.settings.mine_rank,
                progress=True,
            )
            note = f"mined here from {found.meta['tokens']} tokens of {corpus}"
            self.triggers[layer] = (found, note + (f", with {edited} edit(s) applied" if edited else ""))
            return {"layer": layer, "tokens": found.meta["tokens"], "origin": self.triggers[layer][1]}

        return self.jobs.submit("mine", f"mining layer {layer}", work)

    # ---- knowledge neurons ------------------------------------------------------------------------
    def start_neurons(self, prompts: Sequence[str], answer: str, steps: int = 20) -> Job:
        """Find the knowledge neurons of `answer` asked by `prompts` (Dai et al.; `analysis.neurons`) in the
        background; each neuron comes with its memory's place so the page can link to it."""
        limits = self.settings.limits
        if not prompts:
            raise RequestError("give at least one prompt that asks for the answer")
        limits.count(prompts, "prompts", limits.prompts)
        for i, text in enumerate(prompts, 1):
            limits.text(self.lm, text, f"prompt {i}")
        limits.text(self.lm, answer, "answer")
        if not answer.strip():
            raise RequestError("the answer is empty")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limits.max_steps:
            raise RequestError(f"steps must be a whole number from 1 to {limits.max_steps}, got {steps!r}")

        def work(job: Job) -> dict[str, Any]:
            job.set_phase(f"integrated gradients over {len(prompts)} prompt(s) × {self.lm.num_layers} layers")
            fact = fact_neurons(self.lm, list(prompts), answer, steps, progress=True)
            effect = suppression_effect(self.lm, fact) if fact.neurons else None
            return {
                "prompts": list(prompts),
                "answer": answer,
                "steps": steps,
                "neurons": [{"layer": l, "key": i, "attribution": a} for l, i, a in fact.neurons],
                "coarse": [len(c) for c in fact.coarse],
                "suppression": effect,
            }

        return self.jobs.submit("neurons", f"knowledge neurons of {answer!r}", work)

    # ---- editing ---------------------------------------------------------------------------------
    def _overrides(self, form: EditForm) -> dict[str, Any]:
        reads_statistics = METHODS[form.method].uses_statistics if form.method in METHODS else False
        return dict(
            layers=form.layers,
            lr=form.lr,
            max_steps=form.max_steps,
            stats_source=self.settings.stats_source if reads_statistics else None,
            stats_tokens=self.settings.stats_tokens if reads_statistics else None,
        )

    def start_edit(self, form: EditForm) -> Job:
        """Check the form (bad input raises here and changes nothing), then edit in the background:
        p(new), p(true) on every prompt before and after, the next token, and the patch view."""
        lm, limits = self.lm, self.settings.limits
        limits.count(form.paraphrases, "paraphrases", limits.prompts)
        limits.count(form.neighbours, "neighbourhood prompts", limits.prompts)
        limits.edit_settings(form.lr, form.max_steps, form.layers, lm)
        for what, text in (("prompt", form.prompt), ("subject", form.subject)):
            limits.text(lm, text, what)
        template = edit_template(form.prompt, form.subject)
        texts = {
            "prompt": form.prompt,
            "subject": form.subject,
            "new object": form.target_new,
            **({"true object": form.target_true} if form.target_true else {}),
            **{f"paraphrase {i + 1}": p for i, p in enumerate(form.paraphrases)},
            **{f"neighbourhood prompt {i + 1}": p for i, p in enumerate(form.neighbours)},
        }
        for what, text in texts.items():
            limits.text(lm, text, what)
            if not text.strip():
                raise RequestError(f"the {what} is empty")
            views.check_known(lm, text, what)
        probe = EditRequest(
            template,
            form.subject,
            form.target_new,
            form.target_true or None,
            tuple(form.paraphrases),
            tuple(form.neighbours),
        )
        settings = make_settings(lm, form.method, **self._overrides(form))  # the edit uses them as they are

        def work(job: Job) -> dict[str, Any]:
            with self.values.writing():
                entry = self._edit(job, form, template, probe, settings)
            self.values.invalidate(entry.delta.names)
            return entry.to_dict(detail=True)

        return self.jobs.submit("edit", f"{form.method} edit of {form.subject!r} → {form.target_new!r}", work)

    def _edit(
        self, job: Job, form: EditForm, template: str, probe: EditRequest, settings: EditorSettings
    ) -> AppliedEdit:
        """The edit job's steps; on failure the weights are as they were."""
        lm = self.lm
        request = probe
        if request.target_true is None:
            job.set_phase("reading the model's own answer")
            request = EditRequest(
                template,
                form.subject,
                form.target_new,
                greedy_answer(lm, probe.rewrite_prompt),
                probe.paraphrase_prompts,
                probe.neighborhood_prompts,
            )
        job.set_phase("scoring the prompts before the edit")
        before = target_probabilities(lm, request)
        next_before = views.next_token(lm, self.vocab, request.rewrite_prompt)
        job.set_phase(f"editing with {form.method}")
        job.expect_steps(getattr(settings, "max_steps", None), "optimisation steps (limit)")
        delta = edit(lm, request, form.method, hparams=settings)
        job.expect_steps(None, "")
        try:
            job.set_phase("scoring the prompts after the edit")
            after = target_probabilities(lm, request)
            next_after = views.next_token(lm, self.vocab, request.rewrite_prompt)
            job.set_phase("reading the patch as memories")
            report = self._patch_view(delta)
        except BaseException:
            delta.revert(lm)
            raise
        summary = _summary([request], before, after) | {
            "next_before": next_before,
            "next_after": next_after,
            "patch_view": report,
        }
        label = f"{request.subject}: {request.target_true} → {request.target_new}"
        return self.edits.add(delta, label, f"edited here ({form.method})", summary)

    def _patch_view(self, delta: WeightDelta) -> dict[str, Any] | None:
        """`patch_report` of an applied `delta` (it needs the unedited weights, so revert, read, re-apply)."""
        delta.revert(self.lm)
        try:
            return patch_report(self.lm, delta)
        except ValueError as err:  # e.g. a patch that changes no FFN weights
            return {"note": str(err)}
        finally:
            delta.apply(self.lm)

    def revert(self, edit_id: int, cascade: bool = False) -> dict[str, Any]:
        with self.jobs.quick_use(f"reverting edit #{edit_id}"), self.values.writing():
            reverted = self.edits.revert(self.lm, edit_id, cascade)
        for done in reverted:
            self.values.invalidate(self.edits.get(done).delta.names)
        return {"reverted": reverted, "applied": [e.id for e in self.edits.applied()]}

    def patch_file(self, edit_id: int) -> Path:
        """The patch of edit `edit_id` as a file (written once into the session's folder)."""
        entry = self.edits.get(edit_id)
        path = (
            Path(self._files.name) / f"kvedit-edit-{entry.id}-{entry.delta.metadata.get('method', 'patch')}.safetensors"
        )
        if not path.is_file():
            entry.delta.save(path)
        return path

    def patch_size_limit(self) -> int:
        """The largest patch upload accepted, in bytes: twice the model's weights (a patch stores at most the old
        and new values of what it changes) plus 1 MiB of metadata."""
        weights = sum(p.numel() * p.element_size() for p in self.lm.model.parameters())
        return 2 * weights + (1 << 20)

    def load_patch(self, data: bytes, filename: str = "patch.safetensors") -> dict[str, Any]:
        """Verify a patch file's bytes and apply it on top of the current weights; refuse (changing nothing)
        a damaged file or one made for other weights."""
        if not data:
            raise PatchMismatchError("the uploaded patch file is empty")
        name = Path(filename or "patch.safetensors").name
        handle, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="upload-", dir=self._files.name)
        path = Path(tmp)
        with open(handle, "wb") as f:
            f.write(data)
        try:
            delta = WeightDelta.load(path)
        except PatchMismatchError as err:  # name the user's file, not the temporary copy
            raise PatchMismatchError(str(err).replace(str(path), name)) from None
        finally:
            path.unlink(missing_ok=True)
        meta = delta.metadata
        requests = []
        for r in meta.get("requests") or []:
            try:
                request = EditRequest.from_dict(r)
            except (RequestError, TypeError):
                continue
            if request.target_true is not None:
                requests.append(request)
        total, requests = len(requests), requests[:SCORED_REQUESTS]  # a batch patch: score the first few
        with self.jobs.quick_use(f"loading the patch {name}"), self.values.writing():
            missing = [n for n in delta.names if n not in dict(self.lm.model.named_parameters())]
            if missing:
                raise PatchMismatchError(
                    f"{name} was made for {meta.get('model_name', 'another model')!r}: this model "
                    f"({self.lm.name}) has no parameter {missing[0]}"
                )
            before = [target_probabilities(self.lm, r) for r in requests]
            delta.apply(self.lm)  # checks every parameter first; raises before writing anything
            try:
                after = [target_probabilities(self.lm, r) for r in requests]
                report = self._patch_view(delta)
            except BaseException:
                delta.revert(self.lm)
                raise
        self.values.invalidate(delta.names)
        summary = (_summary(requests, before, after) if requests else {}) | {"patch_view": report}
        label = "; ".join(f"{r.subject}: {r.target_true} → {r.target_new}" for r in requests[:3]) or name
        entry = self.edits.add(
            delta,
            label + (f" (+{total - 3} more)" if total > 3 else ""),
            f"loaded from {name} ({meta.get('method', '?')})",
            summary,
        )
        return entry.to_dict(detail=True)

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Ask job `job_id` to stop at its next step (its weights are then restored); returns the job."""
        return self.jobs.cancel(job_id).to_dict()

    def close(self) -> None:
        """Cancel and wait for the running job, stop the background projection, delete the session's files."""
        self.jobs.shutdown()
        self.values.stop()
        self._files.cleanup()


def _summary(requests: Sequence[EditRequest], before: Any, after: Any) -> dict[str, Any]:
    """Rows of p(new) and p(true) before and after, per request and prompt, each with its `outcome`: a rewrite
    or paraphrase prompt "flipped" (p(new) > p(true) after) or "not flipped"; a neighbourhood prompt "kept"
    (p(true) still above p(new)) or "leaked". `flipped` when every rewrite prompt now prefers the new object;
    `leaked`: how many neighbourhood prompts leaked."""
    if isinstance(before, dict):
        before, after = [before], [after]
    rows = []
    for request, b, a in zip(requests, before, after):
        prompts = {
            "efficacy": [request.rewrite_prompt],
            "paraphrase": list(request.paraphrase_prompts),
            "neighborhood": list(request.neighborhood_prompts),
        }
        for group, texts in prompts.items():
            for i, text in enumerate(texts):
                rows.append(
                    {
                        "kind": group,
                        "prompt": text,
                        "target_new": request.target_new,
                        "target_true": request.target_true,
                        "new_before": b[group][i]["target_new"],
                        "new_after": a[group][i]["target_new"],
                        "true_before": b[group][i]["target_true"],
                        "true_after": a[group][i]["target_true"],
                    }
                )
    for r in rows:
        if r["kind"] == "neighborhood":
            r["outcome"] = "kept" if r["true_after"] > r["new_after"] else "leaked"
        else:
            r["outcome"] = "flipped" if r["new_after"] > r["true_after"] else "not flipped"
    rewrites = [r for r in rows if r["kind"] == "efficacy"]
    return {
        "rows": rows,
        "flipped": bool(rewrites) and all(r["outcome"] == "flipped" for r in rewrites),
        "leaked": sum(r["outcome"] == "leaked" for r in rows),
    }
