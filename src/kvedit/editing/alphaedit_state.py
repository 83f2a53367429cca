"""AlphaEdit's two matrices per edited layer: the null-space projector P and the history of edited keys.

Both are `[d_k, d_k]`, where d_k is the width of the values module's input (the FFN hidden width, the
"keys" of kvedit's key-value view).

- **P** (`null_space_projector`) is computed once from the key second moment E[k kᵀ] of the *unedited*
  model, the same statistic MEMIT inverts (`stats.key_statistics`, the per-token mean Σ k kᵀ / N, not the
  raw sum). Its eigenvectors whose eigenvalue is below `threshold` span the approximate null space of the
  preserved keys, and P = Û Ûᵀ projects onto it. P is cached on disk (with a SHA-256 over its bytes and
  settings) and in `lm.memo`, keyed by the model's unedited fingerprint, layer, statistics source, token
  count, threshold and precision. It never changes during a sequential run.
- **The history** (`AlphaEditHistory`) is Σ K Kᵀ over the keys of every earlier batch of a sequential run,
  one matrix per layer. It belongs to the run (the caller carries it from batch to batch and saves it beside
  its records); nothing here keeps it in module state. An edit never changes the history it is given: it
  returns a new one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.cache import cache_dir, write_atomic
from ..models.lm import LM
from .stats import key_statistics, source_slug

Precision = Literal["float32", "float64"]
PRECISIONS: tuple[str, ...] = ("float32", "float64")
HISTORY_FORMAT = "kvedit-alphaedit-history"


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name ("float32" or "float64")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float32 if precision == "float32" else torch.float64


def _digest(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes; in name order) and every metadata field but sha256."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the projector


@dataclass(frozen=True)
class Projector:
    """P `[d_k, d_k]` for one layer, and how it was made.

    null_dim: how many eigenvectors were kept (the rank of P; 0 means P = 0 and the edit changes nothing);
    eigenvalues: all eigenvalues of E[k kᵀ] `[d_k]`, ascending, in the projector's precision.
    """

    matrix: torch.Tensor
    null_dim: int
    eigenvalues: torch.Tensor


def projector_from_mom2(mom2: torch.Tensor, threshold: float, precision: Precision = "float32") -> Projector:
    """P = Û Ûᵀ from the second moment `mom2` `[d_k, d_k]` (per-token mean, symmetric PSD).

    Û: the eigenvectors whose eigenvalue is below `threshold`. The reference takes a full SVD and compares the
    singular values with the threshold; for a symmetric PSD matrix the singular values are |eigenvalues| and the
    singular vectors eigenvectors, so `eigh` with |λ| < threshold selects the same subspace (a rounding-level
    negative eigenvalue counts by its magnitude, as its singular value would). The decomposition runs in
    `precision` (the reference: float32).
    """
    if mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"mom2 must be a square matrix, got shape {tuple(mom2.shape)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    dtype = torch_dtype(precision)
    sym = mom2.to(dtype)
    sym = (sym + sym.T) / 2  # exactly symmetric input for eigh (the accumulated sum is, up to rounding)
    values, vectors = torch.linalg.eigh(sym)
    kept = values.abs() < threshold
    basis = vectors[:, kept]
    return Projector(basis @ basis.T, int(kept.sum()), values)


def _projector_path(lm: LM, layer: int, source: str, n_tokens: int, threshold: float, precision: str) -> Path:
    name = f"P-L{layer}-{source_slug(source)}-{n_tokens}-t{threshold!r}-{precision}.safetensors"
    return cache_dir() / "alphaedit" / lm.base_fingerprint / name


def _projector_meta(lm: LM, layer: int, source: str, n_tokens: int, threshold: float, precision: str) -> dict[str, str]:
    return {
        "model": lm.base_fingerprint,
        "layer": str(layer),
        "source": source,
        "n_tokens": str(n_tokens),
        "threshold": repr(threshold),
        "precision": precision,
        "statistic": "values mom2 (sum / count)",
    }


def _load_projector(path: Path, expect: dict[str, str], dtype: torch.dtype) -> Projector | None:
    """The cached projector, or None if missing, unreadable, made with other settings, or damaged."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    if any(meta.get(k) != v for k, v in expect.items()) or set(tensors) != {"P", "eigenvalues"}:
        return None
    if meta.get("sha256") != _digest(tensors, meta) or not meta.get("null_dim", "").isdigit():
        return None
    matrix, values = tensors["P"], tensors["eigenvalues"]
    if matrix.dtype != dtype or values.dim() != 1 or matrix.shape != (values.shape[0], values.shape[0]):
        return None
    return Projector(matrix, int(meta["null_dim"]), values)


def null_space_projector(
    lm: LM,
    layer: int,
    source: str,
    n_tokens: int,
    threshold: float,
    precision: Precision = "float32",
    use_cache: bool = True,
) -> Projector:
    """P for `layer`'s values-module keys from `key_statistics(lm, [layer], source, n_tokens)`.

    Kept in `lm.memo` and on disk under `<cache>/alphaedit/<unedited fingerprint>/`; a file made with other
    settings, or whose checksum fails, is recomputed. Compute it before the first edit (`alphaedit_prepare`):
    like the statistics, it belongs to the unedited model.
    """
    layer = lm.check_layer(layer)
    memo_key = ("alphaedit_projector", layer, source, n_tokens, repr(threshold), precision)
    if use_cache and memo_key in lm.memo:
        return lm.memo[memo_key]
    path = _projector_path(lm, layer, source, n_tokens, threshold, precision)
    meta = _projector_meta(lm, layer, source, n_tokens, threshold, precision)
    found = _load_projector(path, meta, torch_dtype(precision)) if use_cache else None
    if found is None:
        mom2 = key_statistics(lm, [layer], source, n_tokens, use_cache=use_cache)[layer].mom2
        found = projector_from_mom2(mom2, threshold, precision)
        if use_cache:
            tensors = {"P": found.matrix.contiguous(), "eigenvalues": found.eigenvalues.contiguous()}
            full = meta | {"null_dim": str(found.null_dim)}
            write_atomic(
                path, lambda tmp: save_file(tensors, str(tmp), metadata=full | {"sha256": _digest(tensors, full)})
            )
    if use_cache:
        lm.memo[memo_key] = found
    return found


# --------------------------------------------------------------------------------------------- the history


@dataclass(frozen=True)
class AlphaEditHistory:
    """Σ K Kᵀ of the keys of every batch edited so far in a sequential run, per layer.

    sums: layer -> `[d_k, d_k]` (the layer's d_k), in the precision of the edits that made it;
    n_edits: how many requests have been added; model: the unedited fingerprint of the model it belongs to
    ("" until the first batch). A new history (`AlphaEditHistory()`) is the reference's first batch: all zeros.
    Never modified in place: `added` returns a new history.
    """

    sums: Mapping[int, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}))
    n_edits: int = 0
    model: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sums", MappingProxyType(dict(self.sums)))
        for layer, t in self.sums.items():
            if t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise ValueError(f"history of layer {layer} must be square, got shape {tuple(t.shape)}")
        if self.n_edits < 0:
            raise ValueError(f"n_edits must be >= 0, got {self.n_edits}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.sums)

    def check_model(self, lm: LM) -> None:
        """Refuse a history that was built on another model."""
        if self.model and self.model != lm.base_fingerprint:
            raise ValueError(
                f"this AlphaEdit history belongs to the model with fingerprint {self.model}; this model "
                f"is {lm.base_fingerprint}. Start a new history for a new run"
            )

    def sum_for(self, layer: int, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Σ K Kᵀ `[dim, dim]` of `layer` (zeros if the layer has no history yet) as `dtype` on `device`."""
        if layer not in self.sums:
            return torch.zeros(dim, dim, dtype=dtype, device=device)
        t = self.sums[layer]
        if t.shape[0] != dim:
            raise ValueError(f"the history of layer {layer} is {t.shape[0]}-dimensional; this model's keys are {dim}")
        return t.to(device=device, dtype=dtype)

    def added(self, keys: Mapping[int, torch.Tensor], n_edits: int, model: str) -> "AlphaEditHistory":
        """A new history with Kᵀ K of `keys` (layer -> `[N, d_k]`, one row per request) added per layer."""
        if self.model and model != self.model:
            raise ValueError(f"cannot add keys of model {model} to a history of model {self.model}")
        sums = dict(self.sums)
        for layer, k in keys.items():
            gram = k.T @ k
            sums[layer] = gram if layer not in sums else sums[layer].to(gram.dtype) + gram
        return AlphaEditHistory({l: t.cpu() for l, t in sums.items()}, self.n_edits + n_edits, model)

    def digest(self) -> str:
        """SHA-256 of the history (its tensors and counts), to tie a saved run's records to it."""
        tensors, meta = self._payload()
        return _digest(tensors, meta)

    def _payload(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"layer.{l}": t.contiguous() for l, t in self.sums.items()}
        return tensors, {"format": HISTORY_FORMAT, "n_edits": str(self.n_edits), "model": self.model}

    def save(self, path: str | Path) -> Path:
        """Write the history as safetensors with a SHA-256 of tensors and counts (atomically); returns the path."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"an AlphaEdit history file must end in .safetensors, got {path}")
        tensors, meta = self._payload()
        header = meta | {"sha256": _digest(tensors, meta)}
        if not tensors:  # safetensors needs a tensor; an empty history stores a 0-element marker
            tensors = {"empty": torch.zeros(0)}
        return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> "AlphaEditHistory":
        """Read a history written by `save`, bit-exactly; refuses files that are not one or fail the checksum."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"AlphaEdit history {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if meta.get("format") != HISTORY_FORMAT:
            raise ValueError(f"{path} is not an AlphaEdit history (format {meta.get('format')!r})")
        tensors.pop("empty", None)
        if meta.get("sha256") != _digest(tensors, meta):
            raise ValueError(f"{path} is damaged: its tensors or counts do not match the checksum it was written with")
        bad = [k for k in tensors if not (k.startswith("layer.") and k[len("layer.") :].isdigit())]
        if bad or not meta.get("n_edits", "").isdigit():
            raise ValueError(f"{path} is malformed (tensors {sorted(tensors)[:6]}, n_edits {meta.get('n_edits')!r})")
        return cls(
            {int(k[len("layer.") :]): t for k, t in tensors.items()}, int(meta["n_edits"]), meta.get("model", "")
        )
