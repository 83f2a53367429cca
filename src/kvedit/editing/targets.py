"""Shared steps of the closed-form editors: where the subject is, its keys, and target vectors.

- `subject_positions`: index of the subject's last token in each prompt (ROME's "subject_last").
- `subject_keys`: a module input at that token, averaged over context templates (k*).
- `optimize_targets`: vectors δ added at chosen sites (FFN output, attention output or the
  residual stream) at the subject's last token, optimised so the model predicts target_new
  (ROME's v*, MEMIT's z, PMET's δ_a and δ_m).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.requests import EditRequest
from ..evaluation.scoring import encode_target
from ..models.lm import LM
from ..models.tracing import Addition, Site, Trace
from .delta import check_finite


def subject_position(lm: LM, template: str, subject: str) -> int:
    """Token index of the subject's last token in `template.format(subject)` (one `{}` in template)."""
    prefix = template[: template.index("{}")] + subject
    ids = lm.tokenizer(prefix)["input_ids"]
    special = set(lm.tokenizer.all_special_ids)
    while ids and ids[-1] in special:  # tokenizers that append EOS/SEP
        ids = ids[:-1]
    return len(ids) - 1


def _filled(context: str, request: EditRequest) -> str:
    """A context template with the request's prompt in it; the subject stays `{}`."""
    return context.replace("{}", request.prompt)


@torch.no_grad()
def subject_keys(
    lm: LM, layer: int, requests: Sequence[EditRequest], templates: list[list[str]], site: str = "coefficients"
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
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(lm.device)
    with Trace(lm, read=[(site, layer)], positions=torch.tensor(positions), stop=True) as tr:
        lm.model(**enc)
    keys = tr[site, layer].float()
    out = torch.zeros(len(requests), keys.shape[-1])
    for i in range(len(requests)):
        group_means = [
            keys[[k for k, o in enumerate(owners) if o == (i, g)]].mean(0) for g in range(len(templates))
        ]
        out[i] = torch.stack(group_means).mean(0)
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


@dataclass(frozen=True)
class TargetOptions:
    """Settings of the δ optimisation (ROME §3 / MEMIT §4 / PMET §5 of REFERENCE.md).

    weight_decay multiplies ‖δ‖ / ‖init‖² per site; clamp_norm_factor bounds ‖δ‖ ≤ factor·‖init‖.
    pmet_schedule: PMET's rule — once target_new is the argmax everywhere the NLL weight drops to
    0.1 and the loop stops when the KL term is ≤ 0.01.
    """

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    pmet_schedule: bool = False


def optimize_targets(
    lm: LM, request: EditRequest, sites: Sequence[Site], templates: list[list[str]], opts: TargetOptions
) -> tuple[dict[Site, tuple[torch.Tensor, torch.Tensor]], int]:
    """Optimise one δ per site for `request`; returns ({site: (init `[d]`, δ `[d]`)}, steps taken).

    The loss is the mean NLL of target_new after every context template, plus `kl_factor`·KL of
    the next-token distribution at the subject of "{subject} is a" (edited ‖ original), plus the
    decay terms. The model's weights are not changed.
    """
    tok = lm.tokenizer
    contexts = [c for group in templates for c in group]
    rows = [encode_target(lm, _filled(c, request).replace("{}", request.subject), request.target_new) for c in contexts]
    lookups = [subject_position(lm, _filled(c, request), request.subject) for c in contexts]
    kl_template = "{} is a"
    kl_ids = tok(kl_template.format(request.subject))["input_ids"]
    lookups.append(subject_position(lm, kl_template, request.subject))
    width = max(max(len(r.input_ids) for r in rows), len(kl_ids))
    ids = torch.full((len(rows) + 1, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate([r.input_ids for r in rows] + [tuple(kl_ids)]):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    if len({r.target_ids for r in rows}) != 1:
        raise ValueError(f"target {request.target_new!r} tokenises differently after different context templates")
    pos = torch.tensor([r.positions for r in rows])  # [R, n_target]; every row has the same target ids
    target_ids = torch.tensor(rows[0].target_ids)
    lookup = torch.tensor(lookups)
    ids, mask = ids.to(lm.device), mask.to(lm.device)

    deltas = {site: torch.zeros(lm.d_model, device=lm.device, requires_grad=True) for site in sites}
    inits: dict[Site, torch.Tensor] = {}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=opts.lr)
    head = lm.model.get_output_embeddings()
    kl_init = None
    nll_factor = 1.0
    lm.model.requires_grad_(False)
    for step in range(opts.steps):
        additions = {site: Addition(delta, lookup) for site, delta in deltas.items()}
        with Trace(lm, read=list(sites), add=additions, positions=lookup) as tr:
            hidden = lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        if not inits:  # the sites' own values for the bare prompt, before any δ (δ is 0 at step 0)
            inits = {site: tr[site][0].float() for site in sites}
        r = torch.arange(len(rows), device=lm.device)[:, None]
        logprobs = F.log_softmax(head(hidden[r, pos.to(lm.device)]).float(), -1)
        nll_each = -logprobs.gather(-1, target_ids.to(lm.device).expand(len(rows), -1)[..., None])[..., 0].mean(1)
        kl_logprobs = F.log_softmax(head(hidden[-1, lookup[-1]]).float(), -1)
        if kl_init is None:
            kl_init = kl_logprobs.detach()
        kl = F.kl_div(kl_init, kl_logprobs, log_target=True, reduction="sum")
        decay = sum(deltas[s].norm() / inits[s].norm() ** 2 for s in sites)
        loss = nll_factor * nll_each.mean() + opts.kl_factor * kl + opts.weight_decay * decay
        check_finite(float(loss.detach()), "the target optimisation loss")
        if float(loss) < opts.early_stop_loss or step == opts.steps - 1:
            break
        if opts.pmet_schedule:
            argmax_all = bool((logprobs.argmax(-1) == target_ids.to(lm.device)).all())
            nll_factor = 0.1 if argmax_all else 1.0
            if argmax_all and float(opts.kl_factor * kl) <= 0.01:
                break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for site, delta in deltas.items():
                limit = opts.clamp_norm_factor * inits[site].norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return {site: (inits[site].detach(), deltas[site].detach()) for site in sites}, step
