"""`WeightDelta`: an edit as exact before/after weights, reversible bit for bit, saved as safetensors.

A patch file holds, for every parameter an edit touched, its weights before and after the edit
(`before.<name>`, `after.<name>`), so applying and reverting are exact copies, never float
arithmetic. Its metadata (method, hyperparameters, requests, model fingerprint, kvedit version)
is JSON, stored in the safetensors header and written beside the file as `<patch>.json`.
The header also holds a SHA-256 of every tensor and of the metadata, checked on load before anything
is applied; non-finite weights are refused. Nothing is unpickled on load. Files are written under a
temporary name and renamed when complete, so an interrupted save leaves no half patch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.cache import write_atomic
from ..models.ffn_width import set_parameter
from ..models.lm import LM


class EditError(RuntimeError):
    """An edit failed; the model's weights were restored to what they were before it."""


class PatchMismatchError(ValueError):
    """A patch does not fit the model it is applied to (or reverted from), or is not a valid patch."""


PATCH_SUFFIX = ".safetensors"
PATCH_FORMAT = "kvedit-patch"


def patch_paths(path: str | Path) -> tuple[Path, Path]:
    """The patch file and its metadata file for a user-given `path`.

    A path without a suffix gets `.safetensors`; any other suffix is an error, so the metadata file
    (`<stem>.json`) can never be the patch itself. A folder is an error too.
    """
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(PATCH_SUFFIX)
    if path.suffix != PATCH_SUFFIX:
        raise ValueError(
            f"a patch file must end in {PATCH_SUFFIX} (its metadata goes beside it as {path.stem}.json); got {path}"
        )
    if path.is_dir():
        raise ValueError(f"patch path {path} is a folder; expected a file name ending in {PATCH_SUFFIX}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write patch {path}: {path.parent} is not a folder")
    return path, path.with_suffix(".json")


def _tensor_digest(tensors: dict[str, torch.Tensor], metadata_json: str) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order) and the metadata JSON."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(metadata_json.encode())
    return h.hexdigest()


def _describe_difference(name: str, model: torch.Tensor, recorded: torch.Tensor) -> str:
    """Where a model's parameter differs from a patch's record: element count, rows, largest difference."""
    diff = (model.float() - recorded.float()).abs()
    bad = diff > 0
    n_bad = int(bad.sum())
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if bad.dim() else []
    shown = ", ".join(map(str, rows[:8])) + (", …" if len(rows) > 8 else "")
    return (
        f"{name}: {n_bad} of {diff.numel()} elements differ (rows {shown}; largest |difference| "
        f"{float(diff.max()):.3g})"
    )


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
        """ΔW for one parameter, in float32, in the parameter's storage layout. A parameter the edit grew (memories
        added, `metadata["grown"]`) counts its new slices as the update: `before` is read padded with zeros."""
        before, after = self.before[name].float(), self.after[name].float()
        if before.shape != after.shape:
            pad = [(0, a - b) for b, a in zip(before.shape, after.shape)][::-1]
            before = torch.nn.functional.pad(before, [x for pair in pad for x in pair])
        return after - before

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
            current = p.detach().cpu()
            if not torch.equal(current, expect[name].to(p.dtype)):
                state = "unedited" if verb == "apply" else "edited"
                hint = (
                    " (it matches the patch's edited weights: the patch is applied already)"
                    if verb == "apply" and torch.equal(current, put[name].to(p.dtype))
                    else " (it matches the patch's unedited weights: the patch is not applied)"
                    if verb == "revert" and torch.equal(current, put[name].to(p.dtype))
                    else " (same model family; was another edit applied first?)"
                    if self.metadata.get("model_fingerprint") == lm.base_fingerprint
                    else ""
                )
                raise PatchMismatchError(
                    f"cannot {verb} patch: this model's weights differ from the {state} weights the patch "
                    f"records{hint}. {_describe_difference(name, current, expect[name])}. The patch was made "
                    f"for {self.metadata.get('model_name', '?')} (fingerprint "
                    f"{self.metadata.get('model_fingerprint', '?')}); this model is {lm.name or '?'} "
                    f"(fingerprint {lm.fingerprint()})"
                )
        with torch.no_grad():
            for name, p in params.items():
                if p.shape == put[name].shape:
                    p.copy_(put[name].to(device=p.device, dtype=p.dtype))
                else:  # memories added or removed: the parameter changes size
                    set_parameter(lm, name, put[name])

    def apply(self, lm: LM) -> None:
        """Write the edited weights; refuses unless the model holds exactly the unedited ones."""
        self._swap(lm, self.before, self.after, "apply")

    def revert(self, lm: LM) -> None:
        """Restore the unedited weights bit-exactly; refuses unless the model holds the edited ones."""
        self._swap(lm, self.after, self.before, "revert")

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the patch (safetensors, `.safetensors` suffix added if none) and `<stem>.json` (the
        metadata, for people); returns the patch path. Each file appears only once complete."""
        path, meta_path = patch_paths(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"before.{n}": t.contiguous() for n, t in self.before.items()}
        tensors |= {f"after.{n}": t.contiguous() for n, t in self.after.items()}
        meta_json = json.dumps(self.metadata, default=str)
        header = {"format": PATCH_FORMAT, "kvedit": meta_json, "sha256": _tensor_digest(tensors, meta_json)}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        text = json.dumps(self.metadata, indent=2, default=str) + "\n"
        write_atomic(meta_path, lambda tmp: tmp.write_text(text))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WeightDelta":
        """Read and verify a patch: its checksum, its structure and that every weight is finite."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != PATCH_FORMAT or "kvedit" not in header:
                    raise PatchMismatchError(
                        f"{path} is a safetensors file but not a kvedit patch (its header has no kvedit metadata)"
                    )
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except PatchMismatchError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise PatchMismatchError(f"{path} is not a readable safetensors patch: {err}") from err
        if "sha256" not in header:
            raise PatchMismatchError(
                f"{path} carries no checksum (written by kvedit 0.1); it cannot be verified. "
                "Re-create it with this version of kvedit"
            )
        if _tensor_digest(tensors, header["kvedit"]) != header["sha256"]:
            raise PatchMismatchError(
                f"{path} is damaged: its weights or metadata do not match the checksum it was written with"
            )
        try:
            metadata = json.loads(header["kvedit"])
        except json.JSONDecodeError as err:
            raise PatchMismatchError(f"{path}: the kvedit metadata is not JSON ({err})") from None
        if not isinstance(metadata, dict):
            raise PatchMismatchError(f"{path}: the kvedit metadata is not a JSON object")
        odd = [k for k in tensors if not k.startswith(("before.", "after."))]
        before = {k[len("before.") :]: t for k, t in tensors.items() if k.startswith("before.")}
        after = {k[len("after.") :]: t for k, t in tensors.items() if k.startswith("after.")}
        if odd or not before or set(before) != set(after):
            raise PatchMismatchError(
                f"{path} is malformed: expected matching before.<name>/after.<name> tensors, got {sorted(tensors)[:6]}"
            )
        grown = set(metadata.get("grown", ()))
        for name in before:
            resized = (
                name in grown
                and before[name].dim() == after[name].dim()
                and sum(b != a for b, a in zip(before[name].shape, after[name].shape)) <= 1
            )
            if (before[name].shape != after[name].shape and not resized) or before[name].dtype != after[name].dtype:
                raise PatchMismatchError(
                    f"{path} is malformed: {name} is {tuple(before[name].shape)} "
                    f"{before[name].dtype} before but {tuple(after[name].shape)} "
                    f"{after[name].dtype} after"
                )
            if not (torch.isfinite(before[name]).all() and torch.isfinite(after[name]).all()):
                raise PatchMismatchError(f"{path} holds NaN/Inf weights in {name}; refusing to use it")
        return cls(before=before, after=after, metadata=metadata)


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
                if p.shape == self.before[name].shape:
                    p.copy_(self.before[name].to(p.device))
                else:  # the editor grew it (memories added): back to its old size
                    set_parameter(self.lm, name, self.before[name])

    def finish(self, metadata: dict[str, Any]) -> WeightDelta:
        after = {n: p.detach().cpu().clone() for n, p in self.params.items()}
        bad = [n for n, t in after.items() if not torch.isfinite(t).all()]
        if bad:
            raise EditError(f"the edit produced NaN/Inf weights in {bad}; weights restored")
        grown = [n for n, t in after.items() if t.shape != self.before[n].shape]
        if grown:  # memories were added: the patch says which parameters change size
            metadata = {**metadata, "grown": grown}
        return WeightDelta(before=self.before, after=after, metadata=metadata)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> Literal[False]:
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
