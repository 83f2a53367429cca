"""Shared steps of the closed-form editors: where the subject is, its keys, and target vectors.

- `subject_positions`: index of the subject's last token in each prompt (ROME's "subject_last").
- `subject_keys`: a module input at that token, averaged over context templates (k*).
- `optimize_targets`: vectors δ added at chosen sites (FFN output, attention output or the
  residual stream) at the subject's last token, optimised so the model predicts target_new
  (ROME's v*, MEMIT's z, PMET's δ_a and δ_m).
"""

from __future__ import annotations

import copy
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
    lm: LM, layer: int, requests: Sequence[EditRequest], templates: list[list[str]], site: str = "coefficients",
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
        enc = lm.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                           padding_side="right").to(lm.device)
        with Trace(lm, read=[(site, layer)], positions=torch.tensor(positions[start : start + batch_size]),
                   stop=True) as tr:
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


class SplitBatch:
    """Rows split at their lookup token: the prefix before it runs once and is kept as a KV cache;
    each optimisation step runs only the suffix (lookup token onward), where δ can have an effect.

    rows: token ids per row; lookups: lookup index per row. Suffix position 0 is every row's lookup.
    """

    def __init__(self, lm: LM, rows: Sequence[Sequence[int]], lookups: Sequence[int]) -> None:
        pad = lm.tokenizer.pad_token_id
        self.lm, self.lookups = lm, list(lookups)
        self.width = max(self.lookups)  # left-padded prefix width
        suffix_len = max(len(r) - p for r, p in zip(rows, lookups))
        n = len(rows)
        self.prefix = torch.full((n, self.width), pad, dtype=torch.long)
        self.prefix_mask = torch.zeros((n, self.width), dtype=torch.long)
        self.suffix = torch.full((n, suffix_len), pad, dtype=torch.long)
        self.suffix_mask = torch.zeros((n, suffix_len), dtype=torch.long)
        for i, (row, p) in enumerate(zip(rows, lookups)):
            if p:
                self.prefix[i, self.width - p :] = torch.tensor(row[:p])
                self.prefix_mask[i, self.width - p :] = 1
            self.suffix[i, : len(row) - p] = torch.tensor(row[p:])
            self.suffix_mask[i, : len(row) - p] = 1
        self.suffix_positions = torch.tensor(self.lookups)[:, None] + torch.arange(suffix_len)
        self.cache = None
        if self.width:
            with torch.no_grad():
                self.cache = lm.model.base_model(
                    input_ids=self.prefix.to(lm.device), attention_mask=self.prefix_mask.to(lm.device),
                    position_ids=(self.prefix_mask.cumsum(-1) - 1).clamp(min=0).to(lm.device), use_cache=True,
                ).past_key_values

    def forward_suffix(self) -> torch.Tensor:
        """Last hidden states of the suffix tokens, `[n, suffix_len, d_model]`."""
        device = self.lm.device
        mask = torch.cat([self.prefix_mask, self.suffix_mask], dim=1) if self.width else self.suffix_mask
        # the pass appends the suffix to the cache it is given: give it a copy of the prefix cache
        cache = copy.deepcopy(self.cache) if self.cache is not None else None
        out = self.lm.model.base_model(
            input_ids=self.suffix.to(device), attention_mask=mask.to(device),
            position_ids=self.suffix_positions.to(device), past_key_values=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state


def optimize_targets(
    lm: LM, request: EditRequest, sites: Sequence[Site], templates: list[list[str]], opts: TargetOptions
) -> tuple[dict[Site, tuple[torch.Tensor, torch.Tensor]], int]:
    """Optimise one δ per site for `request`; returns ({site: (init `[d]`, δ `[d]`)}, steps taken).

    The loss is the mean NLL of target_new after every context template, plus `kl_factor`·KL of
    the next-token distribution at the subject of "{subject} is a" (edited ‖ original), plus the
    decay terms. The model's weights are not changed. Tokens before the subject's last token do
    not depend on δ, so they are computed once (see `SplitBatch`).
    """
    if lm.arch.objective != "causal":
        raise ValueError(f"{lm.arch.family} is a masked LM; ROME/MEMIT/PMET edit causal language models")
    tok = lm.tokenizer
    contexts = [c for group in templates for c in group]
    rows = [encode_target(lm, _filled(c, request).replace("{}", request.subject), request.target_new) for c in contexts]
    if len({r.target_ids for r in rows}) != 1:
        raise ValueError(f"target {request.target_new!r} tokenises differently after different context templates")
    lookups = [subject_position(lm, _filled(c, request), request.subject) for c in contexts]
    kl_template = "{} is a"
    kl_ids = tok(kl_template.format(request.subject))["input_ids"]
    lookups.append(subject_position(lm, kl_template, request.subject))
    batch = SplitBatch(lm, [r.input_ids for r in rows] + [kl_ids], lookups)
    # target positions relative to each row's lookup token; the KL is read at the lookup itself
    pos = (torch.tensor([r.positions for r in rows]) - torch.tensor(lookups[:-1])[:, None]).to(lm.device)
    target_ids = torch.tensor(rows[0].target_ids, device=lm.device)
    at_lookup = torch.zeros(len(lookups), dtype=torch.long)

    deltas = {site: torch.zeros(lm.d_model, device=lm.device, requires_grad=True) for site in sites}
    inits: dict[Site, torch.Tensor] = {}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=opts.lr)
    head = lm.model.get_output_embeddings()
    kl_init = None
    nll_factor = 1.0
    lm.model.requires_grad_(False)
    for step in range(opts.steps):
        additions = {site: Addition(delta, at_lookup) for site, delta in deltas.items()}
        with Trace(lm, read=list(sites), add=additions, positions=at_lookup) as tr:
            hidden = batch.forward_suffix()
        if not inits:  # the sites' own values for the bare prompt, before any δ (δ is 0 at step 0)
            inits = {site: tr[site][0].float() for site in sites}
        r = torch.arange(len(rows), device=lm.device)[:, None]
        logprobs = F.log_softmax(head(hidden[r, pos]).float(), -1)
        nll_each = -logprobs.gather(-1, target_ids.expand(len(rows), -1)[..., None])[..., 0].mean(1)
        kl_logprobs = F.log_softmax(head(hidden[-1, 0]).float(), -1)
        if kl_init is None:
            kl_init = kl_logprobs.detach()
        kl = F.kl_div(kl_init, kl_logprobs, log_target=True, reduction="sum")
        decay = sum(deltas[s].norm() / inits[s].norm() ** 2 for s in sites)
        loss = nll_factor * nll_each.mean() + opts.kl_factor * kl + opts.weight_decay * decay
        loss_value = check_finite(float(loss.detach()), "the target optimisation loss")
        if loss_value < opts.early_stop_loss or step == opts.steps - 1:
            break
        if opts.pmet_schedule:
            argmax_all = bool((logprobs.argmax(-1) == target_ids).all())
            nll_factor = 0.1 if argmax_all else 1.0
            if argmax_all and opts.kl_factor * float(kl.detach()) <= 0.01:
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
