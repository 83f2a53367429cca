"""Context templates: short model generations put before an edit prompt, as ROME and MEMIT do.

A template is a string with one `{}` where the (subject-filled) prompt goes, e.g.
``"The city is a great place. {}"``. Templates come in groups (one per generation length);
keys are averaged within a group, then across groups. Generations are seeded and cached per model.
"""

from __future__ import annotations

import json

import torch

from ..models.cache import cache_dir
from ..models.lm import LM

#: (tokens per generation, generations) per group, after the bare "{}" group
ROME_TEMPLATES: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
MEMIT_TEMPLATES: tuple[tuple[int, int], ...] = ((10, 5),)
SEEDS = ("The", "Therefore", "Because", "I", "You")


def _generate(lm: LM, length: int, count: int, seed: int) -> list[str]:
    tok = lm.tokenizer
    prompts = [SEEDS[i % len(SEEDS)] for i in range(count)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(lm.device)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        out = lm.generate(
            **enc,
            do_sample=True,
            top_k=5,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=tok.pad_token_id,
        )
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return [t.replace("{", " ").replace("}", " ").replace("\n", " ").strip() + ". {}" for t in texts]


def context_templates(lm: LM, spec: tuple[tuple[int, int], ...] = ROME_TEMPLATES, seed: int = 0) -> list[list[str]]:
    """`[["{}"], [group 1 …], …]`, generated once per (model, spec, seed) and cached as JSON."""
    name = "-".join(f"{length}x{count}" for length, count in spec)
    path = cache_dir() / "templates" / f"{lm.base_fingerprint}-{name}-seed{seed}.json"
    if path.is_file():
        try:
            groups = json.loads(path.read_text())
            if isinstance(groups, list) and all(isinstance(g, list) and all("{}" in t for t in g) for g in groups):
                return groups
        except json.JSONDecodeError:
            pass  # a damaged cache file is regenerated below
    groups = [["{}"]] + [_generate(lm, length, count, seed + i) for i, (length, count) in enumerate(spec)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(groups, indent=1))
    return groups
