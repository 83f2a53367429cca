"""AlphaEdit on tiny models: the update against the published equations, P = I against MEMIT, the projector,
the history carried over batches and through a file, the edit and its revert, the command line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import snapshot, tiny, write_facts

from kvedit import EditRequest, WeightDelta, edit
from kvedit.cli import main
from kvedit.editing import make_settings
from kvedit.editing.alphaedit import ALPHAEDIT_PRESETS
from kvedit.editing.alphaedit_state import AlphaEditHistory, null_space_projector
from kvedit.editing.context import MEMIT_TEMPLATES, context_templates
from kvedit.editing.memit import MEMIT_PRESETS
from kvedit.editing.stats import key_statistics
from kvedit.editing.targets import site_values, subject_keys
from kvedit.evaluation.probe import target_probabilities

REQUESTS = [
    EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"),
    EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
    EditRequest("{} is located in the city of", "the colosseum", target_new="london", target_true="rome"),
]
#: text unlike the edit prompts, so that the edited subjects' keys are not all "preserved knowledge"
TEXTS = [
    "the louvre is a famous landmark and it stands in france",
    "madrid is the capital of spain where spanish is spoken",
    "big ben lies in london which is in england",
    "the official language of italy is italian",
]
RELATIONS = [
    "the louvre is located in the city of paris",
    "big ben is located in the city of london",
    "the colosseum is located in the city of rome",
]
LAYERS = (1, 2)
TOKENS = 1000
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = "\n\n".join(TEXTS * 60)


def mid_threshold(lm, corpus, layer=LAYERS[0], keep=0.5) -> float:
    """A threshold between two eigenvalues of E[kkᵀ] of `layer` that keeps about `keep` of them (the tiny models'
    activations are far smaller than a trained model's, so the reference's 2e-2 would keep every one)."""
    values = torch.linalg.eigvalsh(key_statistics(lm, [layer], corpus, TOKENS)[layer].mom2)
    q = int(len(values) * keep)
    return float((values[q - 1] * values[q]).sqrt())


def settings(corpus, threshold, **extra):
    return dict(layers=LAYERS, stats_source=corpus, stats_tokens=TOKENS, nullspace_threshold=threshold, **extra)


def paper_update(keys, assigned, p, c, lam):
    """The paper's Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + λ I)⁻¹ in the (d_out × d_k) layout, float64, with an
    explicit inverse; K₁ = keysᵀ `[d_k, N]`, R = assignedᵀ `[d_out, N]`, C = K_p K_pᵀ."""
    k, r, p, c = keys.double().T, assigned.double().T, p.double(), c.double()
    eye = torch.eye(k.shape[0], dtype=torch.float64)
    return r @ k.T @ p @ torch.linalg.inv(c @ p + k @ k.T @ p + lam * eye)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------- (a) one batch, no history


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_batch_is_the_published_update_and_memit_on_projected_keys(corpus, family):
    lm = tiny(family)
    thr = mid_threshold(lm, corpus)
    delta = edit(lm, REQUESTS[:2], "alphaedit", **settings(corpus, thr, precision="float64"))
    assert delta.metadata["method"] == "alphaedit" and delta.metadata["hparams"]["l2"] == 10.0
    assert delta.records.history is None  # a one-shot edit carries no history on
    for rec in delta.records.layers:
        proj = null_space_projector(lm, rec.layer, corpus, TOKENS, thr, "float64")
        assert 0 < proj.null_dim < proj.matrix.shape[0]
        p = proj.matrix
        zero = torch.zeros_like(p)
        published = paper_update(rec.keys, rec.assigned, p, zero, 10.0)
        assert rel(rec.update, published) < 1e-6
        # MEMIT's closed form R K̃ᵀ (λ C + K̃ K̃ᵀ)⁻¹ with the L2 term for λC (C = I) on projected keys K̃ = P K
        kt = p @ rec.keys.double().T
        memit_form = (
            rec.assigned.double().T @ kt.T @ torch.linalg.inv(10.0 * torch.eye(len(p), dtype=p.dtype) + kt @ kt.T)
        )
        assert rel(rec.update, memit_form) < 1e-6
        assert rel(rec.update.double() @ p, rec.update) < 1e-6  # ΔW = ΔW P: rows in the null space
        # what the weights received is that update (to the weights' own float32 rounding)
        stored = delta.update(f"{lm.values_path(rec.layer)}.weight")
        stored = stored.T if lm.arch.transposed else stored
        w = delta.before[f"{lm.values_path(rec.layer)}.weight"].abs().max()
        torch.testing.assert_close(stored, rec.update, rtol=0, atol=float(w) * 2e-7)


def test_the_default_float32_agrees_with_float64(corpus):
    lm = tiny("llama")
    thr = mid_threshold(lm, corpus)
    d32 = edit(lm, REQUESTS[:2], "alphaedit", **settings(corpus, thr))
    d32.revert(lm)
    d64 = edit(lm, REQUESTS[:2], "alphaedit", **settings(corpus, thr, precision="float64"))
    assert d32.metadata["hparams"]["precision"] == "float32"
    for a, b in zip(d32.records.layers, d64.records.layers):
        assert rel(a.update, b.update) < 1e-4


# ------------------------------------------------------------------------------------- (b) P = I is MEMIT


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_with_every_eigenvector_kept_it_is_memit_with_the_l2_term(corpus, family):
    """Threshold above every eigenvalue: P = I, and ΔW = R Kᵀ (K Kᵀ + λ I)⁻¹ is MEMIT's update with λ C = λ I
    (MEMIT's C⁻¹ set to I) on the same targets."""
    lm = tiny(family)
    original = snapshot(lm)
    same = dict(lr=0.5, weight_decay=0.5, max_steps=20, clamp_norm_factor=0.75, kl_factor=0.0625)
    alpha = edit(lm, REQUESTS[:2], "alphaedit", **settings(corpus, 1e6, precision="float64", **same))
    for layer in LAYERS:
        proj = null_space_projector(lm, layer, corpus, TOKENS, 1e6, "float64")
        assert proj.null_dim == proj.matrix.shape[0]
        torch.testing.assert_close(proj.matrix, torch.eye(proj.null_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    alpha_after = snapshot(lm)
    alpha.revert(lm)
    assert all(torch.equal(original[n], t) for n, t in snapshot(lm).items())
    for layer in LAYERS:  # MEMIT with C = I: its cached C⁻¹ is the identity
        d_k = key_statistics(lm, [layer], corpus, TOKENS)[layer].sum_kkT.shape[0]
        lm.memo[("inverse_mom2", "values", layer, corpus, TOKENS)] = torch.eye(d_k, dtype=torch.float64)
    memit = edit(
        lm,
        REQUESTS[:2],
        "memit",
        layers=LAYERS,
        stats_source=corpus,
        stats_tokens=TOKENS,
        mom2_update_weight=10.0,
        **same,
    )
    for a, m in zip(alpha.records.layers, memit.records):
        torch.testing.assert_close(a.update, m.update, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(alpha_after[n], t) for n, t in snapshot(lm).items())  # the same weights, bit for bit


# --------------------------------------------------------------------------------------- (c) the projector


def test_p_is_an_orthogonal_projector_onto_the_small_eigenvalues(corpus):
    lm = tiny("llama")
    thr = mid_threshold(lm, corpus)
    mom2 = key_statistics(lm, [1], corpus, TOKENS)[1].mom2
    for precision, tol in (("float32", 1e-5), ("float64", 1e-12)):
        proj = null_space_projector(lm, 1, corpus, TOKENS, thr, precision)
        p = proj.matrix.double()
        torch.testing.assert_close(p @ p, p, rtol=0, atol=tol)
        torch.testing.assert_close(p, p.T, rtol=0, atol=tol)
        assert abs(float(torch.trace(p)) - proj.null_dim) < 1e3 * tol
        values, vectors = torch.linalg.eigh(mom2)
        small, large = vectors[:, values < thr], vectors[:, values >= thr]
        assert proj.null_dim == small.shape[1]
        torch.testing.assert_close(p @ small, small, rtol=0, atol=100 * tol)  # keeps the null space
        assert float((p @ large).abs().max()) < 100 * tol  # and removes the preserved directions
    # the reference's route (full SVD of the float32 mean, singular values < threshold) selects the same subspace
    u, s, _ = torch.linalg.svd(mom2.float(), full_matrices=False)
    ref = u[:, s < thr] @ u[:, s < thr].T
    torch.testing.assert_close(
        null_space_projector(lm, 1, corpus, TOKENS, thr, "float32").matrix, ref, rtol=0, atol=1e-5
    )


def test_the_update_leaves_preserved_keys_alone(corpus):
    lm = tiny("gpt2")
    thr = mid_threshold(lm, corpus, keep=0.5)
    alpha = edit(lm, REQUESTS[:2], "alphaedit", **settings(corpus, thr, precision="float64"))
    for a in alpha.records.layers:
        values, vectors = torch.linalg.eigh(key_statistics(lm, [a.layer], corpus, TOKENS)[a.layer].mom2)
        preserved = vectors[:, values >= thr]  # K0: the directions the corpus keys occupy
        assert float((a.update.double() @ preserved).norm()) < 1e-6 * float(a.update.norm())  # float32 records
        # on the corpus keys themselves: E‖ΔW k‖² = tr(ΔW Σ ΔWᵀ) ≤ threshold · ‖ΔW‖²
        sigma = key_statistics(lm, [a.layer], corpus, TOKENS)[a.layer].mom2
        energy = lambda u: float(torch.trace(u.double() @ sigma @ u.double().T))
        assert energy(a.update) <= thr * float(a.update.double().norm() ** 2) * (1 + 1e-6)


def test_projector_is_cached_on_disk_with_a_checksum(corpus, kvedit_cache):
    lm = tiny("llama")
    thr = mid_threshold(lm, corpus)
    first = null_space_projector(lm, 1, corpus, TOKENS, thr)
    files = list((kvedit_cache / "alphaedit").rglob("*.safetensors"))
    assert len(files) == 1 and lm.base_fingerprint in str(files[0])
    lm.memo.clear()
    again = null_space_projector(lm, 1, corpus, TOKENS, thr)
    assert torch.equal(first.matrix, again.matrix) and again.null_dim == first.null_dim
    raw = bytearray(files[0].read_bytes())
    raw[-3] ^= 0x01  # a damaged file is recomputed, not trusted
    files[0].write_bytes(bytes(raw))
    lm.memo.clear()
    assert torch.equal(null_space_projector(lm, 1, corpus, TOKENS, thr).matrix, first.matrix)
    assert null_space_projector(lm, 1, corpus, TOKENS, thr * 2).null_dim >= first.null_dim  # its own file
    assert len(list((kvedit_cache / "alphaedit").rglob("*.safetensors"))) == 2


# --------------------------------------------------------------------------------------- (d) the history


def test_history_over_two_batches_is_the_reference_accumulation_and_survives_a_file(corpus, tmp_path):
    lm = tiny("llama")
    original = snapshot(lm)
    thr = mid_threshold(lm, corpus)
    kw = settings(corpus, thr, precision="float64", l2=1.0)
    templates = context_templates(lm, MEMIT_TEMPLATES)
    start = AlphaEditHistory()
    first = edit(lm, REQUESTS[:2], "alphaedit", history=start, **kw)
    assert start.n_edits == 0 and not start.sums  # the history given is never changed
    after_first = first.records.history
    keys_a = {l: subject_keys(lm, l, REQUESTS[:2], templates).double() for l in LAYERS}  # on the edited model
    for l in LAYERS:
        assert torch.equal(after_first.sums[l], keys_a[l].T @ keys_a[l])
    assert after_first.n_edits == 2 and after_first.model == lm.base_fingerprint

    path = after_first.save(tmp_path / "run" / "alphaedit-history.safetensors")
    loaded = AlphaEditHistory.load(path)
    assert loaded.n_edits == 2 and loaded.model == after_first.model and loaded.layers == list(LAYERS)
    assert all(torch.equal(loaded.sums[l], after_first.sums[l]) for l in LAYERS)
    assert loaded.digest() == after_first.digest()

    second = edit(lm, REQUESTS[2:], "alphaedit", history=loaded, **kw)
    assert second.metadata["result"]["history_edits_before"] == 2
    for rec in second.records.layers:  # the second batch solves with C = K_A K_Aᵀ
        p = null_space_projector(lm, rec.layer, corpus, TOKENS, thr, "float64").matrix
        assert rel(rec.update, paper_update(rec.keys, rec.assigned, p, after_first.sums[rec.layer], 1.0)) < 1e-6
        assert rel(rec.update, paper_update(rec.keys, rec.assigned, p, torch.zeros_like(p), 1.0)) > 1e-6
    keys_b = {l: subject_keys(lm, l, REQUESTS[2:], templates).double() for l in LAYERS}
    final = second.records.history
    for l in LAYERS:  # one computation over the concatenated keys, as the reference accumulates them
        both = torch.cat([keys_a[l], keys_b[l]])
        torch.testing.assert_close(final.sums[l], both.T @ both, rtol=1e-12, atol=1e-15)
    assert final.n_edits == 3

    # resuming from the file is the same as carrying the object: bit for bit
    edited = snapshot(lm)
    second.revert(lm)
    again = edit(lm, REQUESTS[2:], "alphaedit", history=after_first, **kw)
    assert all(torch.equal(edited[n], t) for n, t in snapshot(lm).items())
    assert all(torch.equal(again.records.history.sums[l], final.sums[l]) for l in LAYERS)
    again.revert(lm)
    first.revert(lm)  # the whole chain reverts bit-exactly
    assert all(torch.equal(original[n], t) for n, t in snapshot(lm).items())


def test_history_files_and_misuse_are_refused(corpus, tmp_path):
    lm = tiny("llama")
    thr = mid_threshold(lm, corpus)
    empty = AlphaEditHistory().save(tmp_path / "empty.safetensors")
    assert AlphaEditHistory.load(empty).n_edits == 0
    delta = edit(lm, REQUESTS[:1], "alphaedit", history=AlphaEditHistory(), **settings(corpus, thr))
    path = delta.records.history.save(tmp_path / "h.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged"):
        AlphaEditHistory.load(path)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        delta.records.history.save(tmp_path / "h.pt")
    with pytest.raises(ValueError, match="carries no history"):
        edit(
            lm,
            REQUESTS[:1],
            "memit",
            history=AlphaEditHistory(),
            layers=LAYERS,
            stats_source=corpus,
            stats_tokens=TOKENS,
        )
    other = tiny("gpt2")
    with pytest.raises(ValueError, match="belongs to the model"):
        edit(other, REQUESTS[:1], "alphaedit", history=delta.records.history, **settings(corpus, thr))


# --------------------------------------------------------------------------------- (e) the edit and revert


def test_the_edit_flips_the_target_and_reverts_bit_exactly(corpus, tmp_path):
    """On a tiny random model the flip needs a corpus that holds the relation's words (so P protects the
    prompt's own tokens, which a minimum-norm update would otherwise disturb), a quarter of the directions
    preserved, and a free δ (no decay, no KL, a wide clamp); the algebra is checked on every setting above."""
    corpus = tmp_path / "relations.txt"
    corpus.write_text("\n\n".join((TEXTS + RELATIONS) * 40))
    corpus = str(corpus)
    lm = tiny("gpt2")
    request = EditRequest("{} is located in the city of", "the eiffel tower", target_new="london", target_true="paris")
    before = target_probabilities(lm, request)["efficacy"][0]
    assert before["target_new"] < before["target_true"]
    original = snapshot(lm)
    thr = mid_threshold(lm, corpus, keep=0.75)
    kw = settings(corpus, thr, l2=1e-3, lr=0.5, max_steps=100, weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=50.0)
    site = ("residual", LAYERS[-1])
    gap_before = site_values(lm, site, [request])
    delta = edit(lm, request, "alphaedit", **kw)
    after = target_probabilities(lm, request)["efficacy"][0]
    # the update moves the subject's residual towards z*
    goal = gap_before + delta.records.layers[0].remaining.to(gap_before.dtype)
    assert (goal - site_values(lm, site, [request])).norm() < 0.5 * (goal - gap_before).norm()
    assert after["target_new"] > after["target_true"], (before, after)
    delta.revert(lm)
    assert all(torch.equal(original[n], t) for n, t in snapshot(lm).items())


def test_presets_follow_the_reference_files():
    assert dict(ALPHAEDIT_PRESETS["gpt2-xl"]) == dict(
        layers=(13, 14, 15, 16, 17), max_steps=20, lr=0.5, weight_decay=0.5, l2=10.0, nullspace_threshold=2e-2
    )
    assert ALPHAEDIT_PRESETS["gpt-j"]["layers"] == (3, 4, 5, 6, 7, 8) and ALPHAEDIT_PRESETS["gpt-j"]["max_steps"] == 25
    assert ALPHAEDIT_PRESETS["llama"]["lr"] == 0.1 and ALPHAEDIT_PRESETS["llama"]["weight_decay"] == 0.5
    assert ALPHAEDIT_PRESETS["smollm2"]["layers"] == MEMIT_PRESETS["smollm2"]["layers"]
    with pytest.raises(TypeError):
        ALPHAEDIT_PRESETS["llama"]["lr"] = 1.0  # read-only, as every preset table
    hp = make_settings(None, "alphaedit", preset="gpt2-xl")
    assert (hp.clamp_norm_factor, hp.kl_factor, hp.precision) == (0.75, 0.0625, "float32")
    lm = tiny("llama")
    with pytest.raises(ValueError, match="nullspace_threshold"):
        make_settings(lm, "alphaedit", layers=(1,), nullspace_threshold=-1.0)
    with pytest.raises(ValueError, match="precision"):
        make_settings(lm, "alphaedit", layers=(1,), precision="float16")


# ----------------------------------------------------------------------------------- (f) the command line


def test_kvedit_edit_method_alphaedit_end_to_end(capsys, tiny_folder, corpus, tmp_path):
    save = tmp_path / "alphaedit.safetensors"
    code = main(
        [
            "edit",
            "--model",
            str(tiny_folder),
            "--method",
            "alphaedit",
            "--prompt",
            "{} is located in the city of",
            "--subject",
            "the eiffel tower",
            "--new",
            "rome",
            "--true",
            "paris",
            "--layers",
            "1,2",
            "--steps",
            "3",
            "--stats",
            corpus,
            "--stats-tokens",
            "300",
            "--save",
            str(save),
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "alphaedit" and result["layers"] == [1, 2]
    delta = WeightDelta.load(save)
    assert delta.metadata["method"] == "alphaedit"
    assert {"l2", "nullspace_threshold", "precision"} <= set(delta.metadata["hparams"])
    assert set(delta.metadata["result"]["null_space_dims"]) == {"1", "2"}
    lm = tiny("llama")  # the same weights as tiny_folder
    original = snapshot(lm)
    delta.apply(lm)
    delta.revert(lm)
    assert all(torch.equal(original[n], t) for n, t in snapshot(lm).items())


def test_kvedit_bench_methods_alphaedit(capsys, tiny_folder, corpus, tmp_path):
    dataset = write_facts(tmp_path / "facts.json", REQUESTS)
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            str(tiny_folder),
            "--dataset",
            str(dataset),
            "--methods",
            "alphaedit",
            "--n",
            "2",
            "--layers",
            "1",
            "--stats",
            corpus,
            "--stats-tokens",
            "300",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert "alphaedit@L1" in summary["runs"] and summary["settings"]["alphaedit@L1"]["l2"] == 10.0
