"""Target vectors kept per request, so that editors sharing an optimisation run it once.

ROME's v*, MEMIT's z and PMET's δ_a/δ_m depend on the request, the sites, the context templates, the
optimisation settings and the weights. When every edit starts from the same weights (edit, score,
revert), a later editor with the same target settings can take the stored result: a sweep over λ
(only the closed-form solve uses it), or PMET's `update_attn` and `spread` ablations, whose targets
are PMET's.

`reused_targets(lm)` keeps results in memory for the block; `reused_targets(lm, directory)` also
writes them to `directory/<model fingerprint>-<code hash>/` and reads them back in later processes.
The code hash covers the modules the optimisation runs through, so a change to them never serves an
old result. Each entry keeps the seconds its optimisation took, which the store adds up as
`reused_s` for the callers that report edit times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data.requests import EditRequest
from ..models.cache import write_atomic
from ..models.lm import LM

Site = tuple[str, int]
#: One request's result: {site: (init `[d]`, δ `[d]`)}, the step it stopped at, the seconds it took.
Entry = tuple[dict[Site, tuple[torch.Tensor, torch.Tensor]], int, float]

_MEMO_KEY = "reused_targets"  # lm.memo key of the open store
#: Modules whose code decides a target vector (a change to any of them makes stored targets stale).
_CODE = ("editing/targets.py", "models/split.py", "models/tracing.py", "evaluation/scoring.py")


def code_hash() -> str:
    """A short hash of the source files the target optimisation runs through."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=6)
    for name in _CODE:
        h.update((root / name).read_bytes())
    return h.hexdigest()


@dataclass
class TargetStore:
    """Optimised targets by request and settings; in memory, plus `directory` when given."""

    directory: Path | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    reused_s: float = 0.0  # optimisation seconds of the results served from the store

    @staticmethod
    def key(request: EditRequest, sites: Sequence[Site], templates: Sequence[Sequence[str]], options: Any) -> str:
        """One hex string per (request, sites, templates, options dataclass)."""
        text = json.dumps(
            [
                request.prompt,
                request.subject,
                request.target_new,
                [list(s) for s in sites],
                [list(g) for g in templates],
                asdict(options),
            ],
            sort_keys=True,
        )
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def get(self, key: str) -> Entry | None:
        """The stored entry (memory first, then disk), counted in `reused_s`; None if absent."""
        entry = self.entries.get(key)
        path = self._path(key)
        if entry is None and path is not None and path.is_file():
            tensors = load_file(path)
            with path.with_suffix(".json").open() as f:
                meta = json.load(f)
            sites = [(s, int(layer)) for s, layer in meta["sites"]]
            entry = (
                {site: (tensors[f"init.{i}"], tensors[f"delta.{i}"]) for i, site in enumerate(sites)},
                meta["steps"],
                meta["seconds"],
            )
            self.entries[key] = entry
        if entry is None:
            return None
        self.reused_s += entry[2]
        vectors, steps, seconds = entry
        return {s: (a.clone(), b.clone()) for s, (a, b) in vectors.items()}, steps, seconds

    def put(self, key: str, entry: Entry) -> None:
        vectors, steps, seconds = entry
        vectors = {s: (a.detach().cpu().clone(), b.detach().cpu().clone()) for s, (a, b) in vectors.items()}
        self.entries[key] = (vectors, steps, seconds)
        path = self._path(key)
        if path is None:
            return
        sites = list(vectors)
        tensors = {
            f"{kind}.{i}": vectors[s][j].contiguous()
            for i, s in enumerate(sites)
            for j, kind in enumerate(("init", "delta"))
        }
        meta = {"sites": [list(s) for s in sites], "steps": steps, "seconds": seconds}
        write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta)))
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))  # last: its presence means complete

    def take_reused_s(self) -> float:
        """`reused_s` since the last call, reset to 0."""
        seconds, self.reused_s = self.reused_s, 0.0
        return seconds

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"


def open_store(lm: LM) -> TargetStore | None:
    """The store of the `reused_targets` block open on `lm`, if any."""
    return lm.memo.get(_MEMO_KEY)


def store_folder(lm: LM, directory: str | Path) -> Path:
    """`directory/<fingerprint of the current weights>-<dtype>-<code hash>`: where this model's targets go."""
    return Path(directory) / f"{lm.fingerprint()}-{str(lm.model.dtype).removeprefix('torch.')}-{code_hash()}"


@contextmanager
def reused_targets(
    lm: LM, directory: str | Path | None = None, store: TargetStore | None = None
) -> Iterator[TargetStore]:
    """Within this block, `optimize_targets` serves a request it has optimised before (same sites, templates
    and options) from the store instead of optimising again; with `directory`, across processes too.
    `store`: one opened before (e.g. kept across the edits of a run), instead of a new one.

    Targets depend on the weights, so this is only for callers that start every edit from the weights the
    store was opened on (edit, score, revert): the disk folder is named by their fingerprint.
    """
    if _MEMO_KEY in lm.memo:
        raise RuntimeError("reused_targets is already active on this model")
    if store is None:
        store = TargetStore(None if directory is None else store_folder(lm, directory))
    lm.memo[_MEMO_KEY] = store
    try:
        yield store
    finally:
        del lm.memo[_MEMO_KEY]
