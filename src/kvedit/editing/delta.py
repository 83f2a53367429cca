"""`WeightDelta`: an edit as exact before/after weights, reversible bit for bit, saved as safetensors.

A patch file holds, for every parameter an edit touched, its weights before and after the edit
(`before.<name>`, `after.<name>`), so applying and reverting are exact copies, never float
arithmetic. Its metadata (method, hyperparameters, requests, model fingerprint, kvedit version)
is JSON, stored in the safetensors header and written beside the file as `<patch>.json`.
Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.lm import LM


class EditError(RuntimeError):
    """An edit failed; the model's weights were restored to what they were before it."""


class PatchMismatchError(ValueError):
    """A patch does not fit the model it is applied to (or reverted from)."""


def _params(lm: LM, names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    named = dict(lm.model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise PatchMismatchError(f"this model has no parameter(s) {missing}")
    return {n: named[n] for n in names}


@dataclass
class WeightDelta:
    """The exact weights an edit changed. `after[name] - before[name]` is the update."""

    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: in-memory diagnostics of the editor (e.g. MEMIT's per-layer residuals); never saved
    records: Any = field(default=None, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return list(self.before)

    def update(self, name: str) -> torch.Tensor:
        """ΔW for one parameter, in float32, in the parameter's storage layout."""
        return self.after[name].float() - self.before[name].float()

    def relative_norm(self) -> dict[str, float]:
        """‖ΔW‖ / ‖W‖ per parameter (Frobenius)."""
        return {n: float(self.update(n).norm() / self.before[n].float().norm()) for n in self.names}

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.before.values(), *self.after.values()])

    # ---- applying --------------------------------------------------------------------------
    def _swap(self, lm: LM, expect: dict[str, torch.Tensor], put: dict[str, torch.Tensor], verb: str) -> None:
        params = _params(lm, self.names)
        for name, p in params.items():
            if p.shape != expect[name].shape:
                raise PatchMismatchError(
                    f"cannot {verb} patch: parameter {name} has shape {tuple(p.shape)} in this model but "
                    f"{tuple(expect[name].shape)} in the patch (made for {self.metadata.get('model_name', '?')})"
                )
            if not torch.equal(p.detach().cpu(), expect[name].to(p.dtype)):
                state = "unedited" if verb == "apply" else "edited"
                raise PatchMismatchError(
                    f"cannot {verb} patch: parameter {name} differs from the {state} weights the patch "
                    f"records; it was made for model {self.metadata.get('model_name', '?')} "
                    f"(fingerprint {self.metadata.get('model_fingerprint', '?')}), this model is "
                    f"{lm.name or '?'} (fingerprint {lm.fingerprint()})"
                )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(put[name].to(device=p.device, dtype=p.dtype))

    def apply(self, lm: LM) -> None:
        """Write the edited weights; refuses unless the model holds exactly the unedited ones."""
        self._swap(lm, self.before, self.after, "apply")

    def revert(self, lm: LM) -> None:
        """Restore the unedited weights bit-exactly; refuses unless the model holds the edited ones."""
        self._swap(lm, self.after, self.before, "revert")

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `path` (safetensors) and `path` with suffix `.json` (the metadata, for people)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"before.{n}": t.contiguous() for n, t in self.before.items()}
        tensors |= {f"after.{n}": t.contiguous() for n, t in self.after.items()}
        meta_json = json.dumps(self.metadata, default=str)
        save_file(tensors, str(path), metadata={"format": "kvedit-patch", "kvedit": meta_json})
        path.with_suffix(".json").write_text(json.dumps(self.metadata, indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WeightDelta":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != "kvedit-patch":
                    raise PatchMismatchError(f"{path} is a safetensors file but not a kvedit patch")
                before = {k[len("before."):]: f.get_tensor(k) for k in f.keys() if k.startswith("before.")}
                after = {k[len("after."):]: f.get_tensor(k) for k in f.keys() if k.startswith("after.")}
        except PatchMismatchError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise PatchMismatchError(f"{path} is not a readable safetensors patch: {err}") from err
        if set(before) != set(after):
            raise PatchMismatchError(f"{path} is incomplete: before/after parameter sets differ")
        return cls(before=before, after=after, metadata=json.loads(header["kvedit"]))


class WeightGuard:
    """Snapshot parameters on entry; restore them bit-exactly if the block raises (Ctrl-C included).

    Inside the block, edit the parameters in place, then call `finish(metadata)` to check they are
    finite and get the `WeightDelta`. Also restores each parameter's `requires_grad` flag.
    """

    def __init__(self, lm: LM, names: Iterable[str]) -> None:
        self.lm = lm
        self.params = _params(lm, list(dict.fromkeys(names)))
        self.before: dict[str, torch.Tensor] = {}
        self._requires_grad: dict[str, bool] = {}

    def __enter__(self) -> "WeightGuard":
        self.before = {n: p.detach().cpu().clone() for n, p in self.params.items()}
        self._requires_grad = {n: p.requires_grad for n, p in self.lm.model.named_parameters()}
        return self

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.before[name].to(p.device))

    def finish(self, metadata: dict[str, Any]) -> WeightDelta:
        after = {n: p.detach().cpu().clone() for n, p in self.params.items()}
        bad = [n for n, t in after.items() if not torch.isfinite(t).all()]
        if bad:
            raise EditError(f"the edit produced NaN/Inf weights in {bad}; weights restored")
        return WeightDelta(before=self.before, after=after, metadata=metadata)

    def __exit__(self, exc_type, exc, tb) -> bool:
        for name, p in self.lm.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        if exc_type is not None:
            self.restore()
        return False


def check_finite(value: float, what: str) -> float:
    """Raise `EditError` if a loss or norm went NaN/Inf mid-edit."""
    if not math.isfinite(value):
        raise EditError(f"{what} became {value} during the edit; weights restored")
    return value
