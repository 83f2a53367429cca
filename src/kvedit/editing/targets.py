"""Shared steps of the closed-form editors: where the subject is, its keys, and target vectors.

- `subject_positions`: index of the subject's last token in each prompt (ROME's "subject_last").
- `subject_keys`: a module input at that token, averaged over context templates (k*).
- `optimize_targets`: vectors δ added at chosen sites (FFN output, attention output or the
  residual stream) at the subject's last token, optimised so the model predicts target_new
  (ROME's v*, MEMIT's z, PMET's δ_a and δ_m).
- `TargetPlan`: an editor's sites, templates and options, for optimising targets ahead of its edits.
- `reused_targets` (target_store.py): within it, a request optimised before with the same settings is
  served from a store (sweeps over λ, PMET's ablations), on disk too if asked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.requests import EditRequest
from ..evaluation.scoring import encode_target
from ..models.compute import compute_view
from ..models.lm import LM
from ..models.split import SplitBatch
from ..models.tracing import Addition, Site, Trace
from .delta import check_finite
from .target_store import open_store


def subject_position(lm: LM, template: str, subject: str) -> int:
    """Token index of the subject's last token in `template.format(subject)` (one `{}` in template)."""
    prefix = template[: template.index("{}")] + subject
    ids = lm.tokenizer(prefix)["input_ids"]
    appended = {lm.tokenizer.eos_token_id, lm.tokenizer.sep_token_id} - {None}
    while ids and ids[-1] in appended:  # tokenizers that append EOS/SEP (an unknown-word token stays)
        ids = ids[:-1]
    return len(ids) - 1


def _filled(context: str, request: EditRequest) -> str:
    """A context template with the request's prompt in it; the subject stays `{}`."""
    return context.replace("{}", request.prompt)


@torch.no_grad()
def subject_keys(
    lm: LM,
    layer: int,
    requests: Sequence[EditRequest],
    templates: list[list[str]],
    site: str = "coefficients",
    batch_size: int = 64,
) -> torch.Tensor:
    """`[N, d_key]`: the `site` input at the subject's last token, averaged within each template
    group, then across groups (MEMIT; for one flat group this is ROME's plain mean)."""
    texts, positions, owners = [], [], []
    for i, request in enumerate(requests):
        for g, group in enumerate(templates):
            for context in group:
                template = _filled(context, request)
                texts.append(template.replace("{}", request.subject))
                positions.append(subject_position(lm, template, request.subject))
                owners.append((i, g))
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = lm.tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="right"
        ).to(lm.device)
        with Trace(
            lm, read=[(site, layer)], positions=torch.tensor(positions[start : start + batch_size]), stop=True
        ) as tr:
            lm.model(**enc)
        chunks.append(tr[site, layer].float().cpu())
    keys = torch.cat(chunks)
    rows: dict[tuple[int, int], list[int]] = {}
    for k, owner in enumerate(owners):
        rows.setdefault(owner, []).append(k)
    out = torch.zeros(len(requests), keys.shape[-1])
    for i in range(len(requests)):
        out[i] = torch.stack([keys[rows[(i, g)]].mean(0) for g in range(len(templates))]).mean(0)
    return out


@torch.no_grad()
def site_values(lm: LM, site: Site, requests: Sequence[EditRequest]) -> torch.Tensor:
    """`[N, d]`: the site's value at the subject's last token of each bare rewrite prompt."""
    texts = [r.rewrite_prompt for r in requests]
    positions = torch.tensor([subject_position(lm, r.prompt, r.subject) for r in requests])
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(lm.device)
    with Trace(lm, read=[site], positions=positions, stop=True) as tr:
        lm.model(**enc)
    return tr[site].float()


#: requests optimised in one batched pass at most. Per fact, 16 MEMIT facts in one group cost 4.66 s against 7.91 s
#: one at a time at 2 threads, 8.39 s against 8.94 s at one (float32, quiet machine; benchmarks/compute_speed.py);
#: memory grows by ≈ 120 MB per fact in the group (peak RSS 4.9 GB for one step of 32), so 16 keeps the peak within
#: twice the 2.2 GB of 8.
GROUP_SIZE = 16


@dataclass(frozen=True)
class TargetOptions:
    """Settings of the δ optimisation (ROME §3 / MEMIT §4 / PMET §5 of REFERENCE.md).

    weight_decay multiplies ‖δ‖ / ‖init‖² per site; clamp_norm_factor bounds ‖δ‖ ≤ factor·‖init‖.
    pmet_schedule: PMET's rule — once target_new is the argmax everywhere the NLL weight drops to
    0.1 and the loop stops when the KL term is ≤ 0.01.
    stop_nll: also stop a request once the mean NLL of target_new (nats per token, over the context
    templates) is below this (not in the reference editors: the `-fast` methods use it).
    """

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    pmet_schedule: bool = False
    stop_nll: float | None = None
    compute_dtype: str = "float32"  # precision of the loop's forward/backward (`models.compute`); set from the LM


@dataclass(frozen=True)
class TargetPlan:
    """What an editor optimises its target vectors for: sites, context templates (groups) and options.

    Editors build it from their settings (`EditMethod.target_plan`), so a caller can optimise a whole set of
    requests' targets in groups before editing them one at a time (`bench --group-targets`).
    in_turn: the editor applies a call's requests one after another (ROME), so only the first request's
    targets are optimised on the weights the call starts from."""

    sites: tuple[Site, ...]
    templates: list[list[str]]
    options: TargetOptions
    in_turn: bool = False

    def optimize(
        self, lm: LM, requests: Sequence[EditRequest], group_size: int = GROUP_SIZE, reuse: bool = True
    ) -> tuple[list[dict[Site, tuple[torch.Tensor, torch.Tensor]]], list[int]]:
        """`optimize_targets` of `requests` at this plan's sites, templates and options. reuse=False: never
        from or into an open `reused_targets` store (weights an earlier request of the same call changed)."""
        return optimize_targets(lm, requests, self.sites, self.templates, self.options, group_size, reuse)


@dataclass
class _RequestRows:
    """One request's rows: a row per context template, then the KL row "{subject} is a"."""

    input_ids: list[list[int]]
    lookups: list[int]
    positions: list[list[int]]  # target token positions per context row
    target_ids: list[int]


def _request_rows(lm: LM, request: EditRequest, contexts: Sequence[str]) -> _RequestRows:
    rows = [encode_target(lm, _filled(c, request).replace("{}", request.subject), request.target_new) for c in contexts]
    if len({r.target_ids for r in rows}) != 1:
        raise ValueError(f"target {request.target_new!r} tokenises differently after different context templates")
    lookups = [subject_position(lm, _filled(c, request), request.subject) for c in contexts]
    kl_template = "{} is a"
    kl_ids = lm.tokenizer(kl_template.format(request.subject))["input_ids"]
    return _RequestRows(
        input_ids=[list(r.input_ids) for r in rows] + [list(kl_ids)],
        lookups=lookups + [subject_position(lm, kl_template, request.subject)],
        positions=[list(r.positions) for r in rows],
        target_ids=list(rows[0].target_ids),
    )


class _Group:
    """The rows of several requests as one `SplitBatch`, with the index maps the loss needs."""

    def __init__(
        self, lm: LM, items: Sequence[_RequestRows], owners: Sequence[int], start: int, batch: SplitBatch | None = None
    ) -> None:
        """`batch`: these rows' `SplitBatch` taken from a larger group (`kept`), else it is computed."""
        self.owners = list(owners)  # request index per item
        input_ids: list[list[int]] = []  # one row per context prompt, then the item's KL prompt
        lookups: list[int] = []
        self.row_owner: list[int] = []
        self.kl_rows: list[int] = []
        self.first_rows: list[int] = []
        ctx_rows: list[int] = []
        rel_pos: list[list[int]] = []
        tgt: list[list[int]] = []
        for k, item in enumerate(items):
            self.first_rows.append(len(input_ids))
            for ids, lookup, pos in zip(item.input_ids, item.lookups, item.positions):
                ctx_rows.append(len(input_ids))
                rel_pos.append([p - lookup for p in pos])
                tgt.append(item.target_ids)
                input_ids.append(ids)
                lookups.append(lookup)
                self.row_owner.append(k)
            self.kl_rows.append(len(input_ids))
            input_ids.append(item.input_ids[-1])
            lookups.append(item.lookups[-1])
            self.row_owner.append(k)
        self.batch = batch if batch is not None else SplitBatch(lm, input_ids, lookups, start)
        width = max(len(t) for t in tgt)
        device = lm.output_device  # the loss is computed where the logits are
        self.ctx_rows = torch.tensor(ctx_rows, device=device)
        self.ctx_owner = torch.tensor([self.row_owner[r] for r in ctx_rows], device=device)
        self.rel_pos = torch.tensor([p + [p[-1]] * (width - len(p)) for p in rel_pos], device=device)
        self.targets = torch.tensor([t + [0] * (width - len(t)) for t in tgt], device=device)
        self.target_mask = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in tgt], device=device)
        self.kl_index = torch.tensor(self.kl_rows, device=device)
        self.at_lookup = torch.zeros(len(input_ids), dtype=torch.long)

    def kept(self, lm: LM, items: Sequence[_RequestRows], keep: Sequence[int]) -> "_Group":
        """The group of items `keep` (positions in this group) only; its batch is sliced from this one's."""
        chosen = set(keep)
        rows = [r for r, k in enumerate(self.row_owner) if k in chosen]
        try:
            batch = self.batch.select(rows)
        except NotImplementedError:
            batch = None
        return _Group(
            lm, [items[self.owners[k]] for k in keep], [self.owners[k] for k in keep], self.batch.start, batch
        )


def optimize_targets(
    lm: LM,
    requests: Sequence[EditRequest],
    sites: Sequence[Site],
    templates: list[list[str]],
    opts: TargetOptions,
    group_size: int = GROUP_SIZE,
    reuse: bool = True,
) -> tuple[list[dict[Site, tuple[torch.Tensor, torch.Tensor]]], list[int]]:
    """Optimise one δ per site and request; returns ([{site: (init `[d]`, δ `[d]`)}] per request, steps).

    Each request's loss is the mean NLL of target_new after every context template, plus
    `kl_factor`·KL of the next-token distribution at the subject of "{subject} is a" (edited ‖
    original), plus the decay terms. Requests are independent (each δ sees only its own rows), so
    up to `group_size` of them share one batched pass (N requests are split into ⌈N / group_size⌉ groups of
    near-equal size); a request that meets its stopping rule leaves the
    batch. The model's weights are not changed. Tokens before the subject's last token and layers
    below the lowest site do not depend on δ, so they are computed once (see `SplitBatch`). A progress bar shows when there
    is more than one group. Inside `reused_targets`, a request optimised before with the same sites, templates and
    options is served from the store (unless `reuse` is False: the weights are no longer the store's).
    """
    opts = replace(opts, compute_dtype=lm.compute_dtype)  # part of a stored result's key
    store = open_store(lm) if reuse else None
    if store is None:
        return _optimize_targets(lm, requests, sites, templates, opts, group_size)
    keys = [store.key(r, sites, templates, opts) for r in requests]
    found = {
        i: ({s: (a.to(lm.device), b.to(lm.device)) for s, (a, b) in entry[0].items()}, *entry[1:])
        for i, key in enumerate(keys)
        if (entry := store.get(key)) is not None
    }
    missing = [i for i in range(len(requests)) if i not in found]
    if missing:
        start = time.perf_counter()
        results, steps = _optimize_targets(lm, [requests[i] for i in missing], sites, templates, opts, group_size)
        seconds = (time.perf_counter() - start) / len(missing)  # a group's time, shared evenly
        for i, vectors, n in zip(missing, results, steps):
            store.put(keys[i], (vectors, n, seconds))
            found[i] = ({s: (a.clone(), b.clone()) for s, (a, b) in vectors.items()}, n, seconds)
    return [found[i][0] for i in range(len(requests))], [found[i][1] for i in range(len(requests))]


def _optimize_targets(
    lm: LM,
    requests: Sequence[EditRequest],
    sites: Sequence[Site],
    templates: list[list[str]],
    opts: TargetOptions,
    group_size: int,
) -> tuple[list[dict[Site, tuple[torch.Tensor, torch.Tensor]]], list[int]]:
    """`optimize_targets` without the reuse store."""
    if lm.arch.objective != "causal":
        raise ValueError(f"{lm.arch.family} is a masked LM; ROME/MEMIT/PMET edit causal language models")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    contexts = [c for group in templates for c in group]
    items = [_request_rows(lm, r, contexts) for r in requests]
    results: list[dict[Site, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in requests]
    steps = [0] * len(requests)
    lm.model.requires_grad_(False)
    view = compute_view(lm)  # the loop's model: lm itself in float32, else its frozen bfloat16 copy
    inits: dict[tuple[int, Site], torch.Tensor] = {}
    if view is not lm:  # the sites' starting values, which the solves add δ to, are read from the float32 model
        for s in sites:
            for i, value in enumerate(site_values(lm, s, requests)):
                inits[(i, s)] = value.to(lm.device)
    with tqdm(
        total=len(requests), desc="target vectors", unit="request", leave=False, disable=len(requests) <= group_size
    ) as bar:
        size = -(-len(requests) // -(-len(requests) // group_size))  # equal groups: 20 at most 16 → 10 + 10
        for start in range(0, len(requests), size):
            owners = list(range(start, min(start + size, len(requests))))
            _optimize_group(view, items, owners, sites, opts, results, steps, inits)
            bar.update(len(owners))
    return results, steps


def _optimize_group(
    lm: LM,
    items: Sequence[_RequestRows],
    owners: list[int],
    sites: Sequence[Site],
    opts: TargetOptions,
    results: list[dict[Site, tuple[torch.Tensor, torch.Tensor]]],
    steps: list[int],
    inits: dict[tuple[int, Site], torch.Tensor],
) -> None:
    """Optimise the δs of requests `owners` together, writing `results` and `steps` in place.

    `lm` is the model the loop runs on (a bfloat16 compute view, or the model); δ and Adam's state are float32 and
    cast to the model's precision where δ is added. `inits` holds each site's starting value `[d]` float32 where it
    was read beforehand (from the float32 model); missing ones are read in the first step."""
    deltas = {(i, s): torch.zeros(lm.d_model, device=lm.device, requires_grad=True) for i in owners for s in sites}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=opts.lr)
    out = lm.output_device  # δs live on lm.device; per-request losses where the logits are
    kl_init: dict[int, torch.Tensor] = {}
    nll_factor = {i: 1.0 for i in owners}
    active = list(owners)
    start = min(lm.check_layer(layer) for _, layer in sites)  # nothing below this layer changes
    group = _Group(lm, [items[i] for i in active], active, start)
    for step in range(opts.steps):
        if len(active) < len(group.owners):  # finished requests leave the batch (its rows are sliced out)
            group = group.kept(lm, items, [group.owners.index(i) for i in active])
        n = len(active)
        additions = {
            s: Addition(torch.stack([deltas[(active[k], s)] for k in group.row_owner]), group.at_lookup) for s in sites
        }
        with Trace(lm, read=list(sites), add=additions, positions=group.at_lookup) as tr:
            hidden = group.batch.forward_suffix()
        for k, i in enumerate(active):  # the sites' own values for the bare prompt, before any δ
            for s in sites:
                inits.setdefault((i, s), tr[s][group.first_rows[k]].float().to(lm.device))
        # one pass of the output layer over every position the loss reads (each context row's target positions,
        # then each request's KL position): its weight `[vocab, d]`, 671 MB on Gemma-3, is read once per pass
        at_targets = hidden[group.ctx_rows[:, None], group.rel_pos]  # [rows, width, d]
        rows, width = at_targets.shape[:2]
        every = F.log_softmax(lm.unembed(torch.cat([at_targets.flatten(0, 1), hidden[group.kl_index, 0]])).float(), -1)
        logprobs, kl_logprobs = every[: rows * width].unflatten(0, (rows, width)), every[rows * width :]
        token_nll = -logprobs.gather(-1, group.targets[..., None])[..., 0]
        row_nll = (token_nll * group.target_mask).sum(1) / group.target_mask.sum(1)
        counts = torch.zeros(n, device=out).index_add_(0, group.ctx_owner, torch.ones_like(row_nll))
        nll = torch.zeros(n, device=out).index_add_(0, group.ctx_owner, row_nll) / counts
        for k, i in enumerate(active):
            kl_init.setdefault(i, kl_logprobs[k].detach())
        kl = torch.stack(
            [F.kl_div(kl_init[i], kl_logprobs[k], log_target=True, reduction="sum") for k, i in enumerate(active)]
        )
        decay = torch.stack([sum(deltas[(i, s)].norm() / inits[(i, s)].norm() ** 2 for s in sites) for i in active]).to(
            out
        )
        factors = torch.tensor([nll_factor[i] for i in active], device=out)
        losses = factors * nll + opts.kl_factor * kl + opts.weight_decay * decay
        loss_values, nll_values = losses.detach().tolist(), nll.detach().tolist()
        check_finite(sum(loss_values), "the target optimisation loss")
        hit = (logprobs.argmax(-1) == group.targets) | (group.target_mask == 0)
        row_hit = hit.all(1).float()
        argmax_all = torch.zeros(n, device=out).index_add_(0, group.ctx_owner, row_hit) == counts
        finished = []
        for k, i in enumerate(active):
            done = (
                loss_values[k] < opts.early_stop_loss
                or step == opts.steps - 1
                or (opts.stop_nll is not None and nll_values[k] < opts.stop_nll)
            )
            if opts.pmet_schedule and not done:
                nll_factor[i] = 0.1 if bool(argmax_all[k]) else 1.0
                done = bool(argmax_all[k]) and opts.kl_factor * float(kl[k].detach()) <= 0.01
            if done:
                finished.append(i)
                steps[i] = step
                results[i] = {s: (inits[(i, s)].detach(), deltas[(i, s)].detach().clone()) for s in sites}
        still = [k for k, i in enumerate(active) if i not in finished]
        if not still:
            break
        optimizer.zero_grad(set_to_none=True)
        losses[still].sum().backward()
        for i in finished:  # no gradient: Adam leaves these δs alone
            for s in sites:
                deltas[(i, s)].grad = None
        optimizer.step()
        with torch.no_grad():
            for k in still:
                for s in sites:
                    delta, init = deltas[(active[k], s)], inits[(active[k], s)]
                    limit = opts.clamp_norm_factor * init.norm()
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
        active = [active[k] for k in still]
