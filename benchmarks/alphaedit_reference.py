"""kvedit's AlphaEdit against the reference's own formula on the same tensors, batch after batch.

For each model, two sequential batches are edited with `edit(..., "alphaedit", history=...)`. For every layer of
every batch the reference's computation is redone here from its published equations (REFERENCE-2.md §1.2, §1.4),
on the keys K and residual shares R that kvedit's edit used:

    P   = Û Ûᵀ, Û = left singular vectors of the float32 mean E[kkᵀ] with singular value < threshold (full SVD)
    C   = Σ K' K'ᵀ over earlier batches, K' measured on the model after each batch (independently of
          kvedit's history object)
    ΔW  = ( solve(P (K Kᵀ + C) + λ I,  P K Rᵀ) )ᵀ  in float32

and compared with kvedit's ΔW. Printed per model and kvedit precision: the largest |ΔW_kvedit − ΔW_ref| over all
layers and batches, relative to max |ΔW_ref|, the largest Frobenius relative difference, and the first against the
same formula evaluated in float64 (which separates the formula from float32 rounding).

Usage: python benchmarks/alphaedit_reference.py [--families llama,gpt2,gemma3_text] [--threshold-quantile 0.5]
(tiny random models built from configs, as the tests use; a second or two each.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import tiny_lm  # noqa: E402

from kvedit import EditRequest, edit  # noqa: E402
from kvedit.editing.alphaedit_state import AlphaEditHistory  # noqa: E402
from kvedit.editing.context import MEMIT_TEMPLATES, context_templates  # noqa: E402
from kvedit.editing.stats import key_statistics  # noqa: E402
from kvedit.editing.targets import subject_keys  # noqa: E402

BATCHES = [
    [
        EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"),
        EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
    ],
    [
        EditRequest("{} is located in the city of", "the colosseum", target_new="london", target_true="rome"),
        EditRequest("{} is the official language of", "france", target_new="german", target_true="french"),
    ],
]
TEXTS = [
    "the louvre is a famous landmark and it stands in france",
    "madrid is the capital of spain where spanish is spoken",
    "big ben lies in london which is in england",
    "the official language of italy is italian",
]
LAYERS = (1, 2)
TOKENS = 1000
L2 = 10.0


def reference_projector(mom2: torch.Tensor, threshold: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's route: full SVD of the mean (float32 in the reference), singular values below the threshold."""
    u, s, _ = torch.linalg.svd(mom2.to(dtype), full_matrices=False)
    small = u[:, s < threshold]
    return small @ small.T


def reference_update(
    keys: torch.Tensor, resid: torch.Tensor, p: torch.Tensor, c: torch.Tensor, lam: float
) -> torch.Tensor:
    """ΔW `[d_out, d_k]` as the reference solves it, in P's dtype (float32 in the reference); keys `[N, d_k]`,
    resid `[N, d_out]`."""
    k, r = keys.to(p.dtype).T, resid.to(p.dtype).T  # the reference's column layout: K [d_k, N], R [d_out, N]
    eye = torch.eye(k.shape[0], dtype=p.dtype)
    return torch.linalg.solve(p @ (k @ k.T + c.to(p.dtype)) + lam * eye, p @ k @ r.T).T


def compare(family: str, corpus: str, quantile: float, precision: str) -> tuple[float, float, float, list[int]]:
    """(largest max-abs difference vs the float32 reference formula, its Frobenius relative difference, the largest
    max-abs difference vs the same formula in float64, rank of P per layer), all relative to max |ΔW_ref|."""
    lm = tiny_lm(family)
    stats = key_statistics(lm, list(LAYERS), corpus, TOKENS, progress=False)
    values = torch.linalg.eigvalsh(stats[LAYERS[0]].mom2)
    q = int(len(values) * quantile)
    threshold = float((values[q - 1] * values[q]).sqrt())
    projectors = {l: reference_projector(stats[l].mom2, threshold) for l in LAYERS}
    projectors64 = {l: reference_projector(stats[l].mom2, threshold, torch.float64) for l in LAYERS}
    cache_c = {l: torch.zeros_like(projectors64[l]) for l in LAYERS}
    templates = context_templates(lm, MEMIT_TEMPLATES)
    history = AlphaEditHistory()
    worst_abs = worst_fro = worst64 = 0.0
    dims: list[int] = []
    for batch in BATCHES:
        delta = edit(
            lm,
            batch,
            "alphaedit",
            history=history,
            layers=LAYERS,
            stats_source=corpus,
            stats_tokens=TOKENS,
            nullspace_threshold=threshold,
            l2=L2,
            precision=precision,
        )
        dims = list(delta.records.null_dims.values())
        for rec in delta.records.layers:
            ref = reference_update(rec.keys, rec.assigned, projectors[rec.layer], cache_c[rec.layer], L2)
            worst_abs = max(worst_abs, float((rec.update - ref).abs().max() / ref.abs().max()))
            worst_fro = max(worst_fro, float((rec.update - ref).norm() / ref.norm()))
            ref64 = reference_update(rec.keys, rec.assigned, projectors64[rec.layer], cache_c[rec.layer], L2)
            worst64 = max(worst64, float((rec.update.double() - ref64).abs().max() / ref64.abs().max()))
        for l in LAYERS:  # the reference's cache update: keys re-measured on the edited model, float32
            k = subject_keys(lm, l, batch, templates).double().T
            cache_c[l] += k @ k.T
        history = delta.records.history
    return worst_abs, worst_fro, worst64, dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,gpt2,gemma3_text")
    parser.add_argument(
        "--threshold-quantile",
        type=float,
        default=0.5,
        help="threshold between the eigenvalues at this quantile (tiny models' activations are far "
        "smaller than a trained model's; the reference's 2e-2 would keep every direction)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KVEDIT_CACHE"] = str(Path(tmp) / "cache")
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n\n".join(TEXTS * 60))
        print(
            f"{'model':<12} {'precision':<9} {'null dims':<10} {'max|Δ−Δref|/max|Δref|':>22} {'‖Δ−Δref‖/‖Δref‖':>16} "
            f"{'vs the formula in float64':>26}"
        )
        overall = 0.0
        for family in args.families.split(","):
            for precision in ("float32", "float64"):
                worst_abs, worst_fro, worst64, dims = compare(family, str(corpus), args.threshold_quantile, precision)
                overall = max(overall, worst_abs)
                print(
                    f"{family:<12} {precision:<9} {str(dims):<10} {worst_abs:>22.2e} {worst_fro:>16.2e} {worst64:>26.2e}"
                )
        print(
            f"largest difference from the float32 reference formula over all models, layers, batches and "
            f"precisions: {overall:.2e} (of max |ΔW_ref|)"
        )


if __name__ == "__main__":
    main()
