"""ROME, MEMIT and PMET on tiny models: their closed-form properties, reverts, failures, bad settings."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot, tiny
from tiny_models import TINY_CONFIGS

import kvedit.editing.context as context_module
import kvedit.editing.stats as stats_module
from kvedit import EditRequest, edit
from kvedit.editing import prepare
from kvedit.editing.context import MEMIT_TEMPLATES, ROME_TEMPLATES, context_templates
from kvedit.editing.memit import spread_fraction
from kvedit.editing.stats import key_statistics
from kvedit.editing.targets import subject_keys
from kvedit.models.tracing import Addition, Trace

REQUESTS = [
    EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"),
    EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
]
SENTENCE = "the eiffel tower is located in the city of paris and rome is the capital of italy"
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = "\n\n".join(SENTENCE for _ in range(200))


def test_rome_maps_the_key_to_the_target_value(corpus):
    lm = tiny("llama")
    delta = edit(lm, REQUESTS[0], "rome", layers=(1,), stats_source=corpus, stats_tokens=1000, mom2_adjustment=True)
    record = delta.records[0]
    module = lm.module(lm.values_path(1))
    with torch.no_grad():
        out = module(record.key[None])[0]
    torch.testing.assert_close(out, record.target, rtol=1e-4, atol=1e-4)
    # k* is the template-averaged values-module input at the subject's last token, unchanged by the edit
    flat = [[c for g in context_templates(lm, ROME_TEMPLATES) for c in g]]
    torch.testing.assert_close(subject_keys(lm, 1, REQUESTS[:1], flat)[0], record.key)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memit_one_layer_is_the_regularised_least_squares_solution(corpus, family):
    lm = tiny(family)
    lam = 50.0
    delta = edit(lm, REQUESTS, "memit", layers=(2,), stats_source=corpus, stats_tokens=1000, mom2_update_weight=lam)
    (record,) = delta.records
    c = key_statistics(lm, [2], corpus, 1000)[2].mom2
    k = record.keys.double().T  # [d_ff, N]
    r = record.assigned.double().T  # [d_model, N]
    direct = r @ k.T @ torch.linalg.inv(lam * c + k @ k.T)
    torch.testing.assert_close(record.update.double(), direct, rtol=1e-4, atol=1e-6)
    # it minimises ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ): the gradient vanishes
    grad = (direct @ k - r) @ k.T + lam * direct @ c
    assert grad.abs().max() < 1e-6 * max(1.0, r.abs().max().item())
    stored = delta.update(f"{lm.values_path(2)}.weight").double()
    torch.testing.assert_close(
        stored.T if lm.arch.transposed else stored, direct.float().double(), rtol=1e-4, atol=1e-5
    )
    # the keys it used are the template-averaged keys of the unedited model
    delta.revert(lm)
    keys = subject_keys(lm, 2, REQUESTS, context_templates(lm, MEMIT_TEMPLATES))
    torch.testing.assert_close(record.keys, keys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, spread", [("pmet", "sqrt"), ("pmet-even-spread", "even")])
def test_pmet_spreads_the_residual_as_eq_11(corpus, method, spread):
    lm = tiny("llama")
    layers = (0, 1, 2)
    delta = edit(lm, REQUESTS, method, layers=layers, stats_source=corpus, stats_tokens=1000, mom2_update_weight=1e-3)
    records = delta.records.ffn
    assert [r.layer for r in records] == list(layers)
    # eq. 11: layer i of L writes R/√(L−i) (PMET) or R/(L−i) (MEMIT's even spread), by hand for L = 3
    by_hand = {"sqrt": [3**-0.5, 2**-0.5, 1.0], "even": [1 / 3, 1 / 2, 1.0]}[spread]
    for i, rec in enumerate(records):
        assert spread_fraction(i, len(layers), spread) == pytest.approx(by_hand[i])
        torch.testing.assert_close(rec.assigned, rec.remaining * by_hand[i])
        # with a tiny λ the layer writes (almost) exactly its share for every request's key
        torch.testing.assert_close((rec.update @ rec.keys.T).T, rec.assigned, rtol=1e-3, atol=1e-3)
    # the residual left after layer i is what layer i+1 sees (the model is re-measured between layers)
    for before, after in zip(records, records[1:]):
        assert after.remaining.norm() < before.remaining.norm()


def test_pmet_ablations_touch_the_right_weights(corpus):
    lm = tiny("llama")
    kw = dict(layers=(1, 2), stats_source=corpus, stats_tokens=1000)
    both = edit(lm, REQUESTS, "pmet-update-attn", **kw)
    assert sorted(both.names) == sorted(
        [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
        + [f"model.layers.{l}.self_attn.o_proj.weight" for l in (1, 2)]
    )
    both.revert(lm)
    ffn_only = edit(lm, REQUESTS, "pmet-no-attn-delta", **kw)
    assert all("down_proj" in n for n in ffn_only.names)
    assert ffn_only.metadata["hparams"]["attn_delta"] is False


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "pmet-update-attn"])
def test_every_method_reverts_bit_exactly(corpus, method):
    lm = tiny("gpt2")
    original = snapshot(lm)
    layers = (1,) if method == "rome" else (1, 2)
    requests = REQUESTS[:1] if method == "rome" else REQUESTS
    delta = edit(lm, requests, method, layers=layers, stats_source=corpus, stats_tokens=1000)
    assert any(not torch.equal(original[n], t) for n, t in lm.model.state_dict().items())
    delta.revert(lm)
    assert all(torch.equal(original[n], t) for n, t in lm.model.state_dict().items())


@pytest.mark.parametrize("method", ["rome", "memit", "pmet"])
def test_failure_during_the_update_restores_weights(corpus, method, monkeypatch):
    """Ctrl-C after the first layer was already written leaves the model as it was."""
    import kvedit.editing.memit as memit_module
    import kvedit.editing.rome as rome_module

    lm = tiny("llama")
    original = snapshot(lm)
    module = rome_module if method == "rome" else memit_module
    real = module.subject_keys
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "subject_keys", interrupting)
    with pytest.raises(KeyboardInterrupt):
        edit(lm, REQUESTS, method, layers=(1,) if method == "rome" else (1, 2), stats_source=corpus, stats_tokens=1000)
    assert all(torch.equal(original[n], t) for n, t in lm.model.state_dict().items())


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("memit", dict(layers=()), "no edit layer is set"),
        ("pmet", dict(layers=()), "no edit layer is set"),
        ("memit", dict(layers=(1, 9)), "out of range"),
        ("rome", dict(layers=(9,)), "out of range"),
        ("rome", dict(layers=(1, 2)), "ROME edits one layer"),
        ("memit", dict(layers=(1,), mom2_update_weight=0.0), "must be > 0"),
        ("pmet", dict(layers=(1,), mom2_update_weight=-1.0), "must be > 0"),
        ("memit", dict(layers=(2, 1)), "increasing"),
        ("pmet", dict(layers=(1,), spread="cubic"), "spread"),
        ("memit", dict(preset="gpt-5"), "unknown preset"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(corpus, method, overrides, message):
    lm = tiny("llama")
    with pytest.raises(ValueError, match=message):
        edit(lm, REQUESTS, method, stats_source=corpus, stats_tokens=1000, **overrides)


@pytest.mark.parametrize("method", ["rome", "memit", "pmet-update-attn", "ft-keys"])
def test_prepare_leaves_no_statistics_or_templates_to_the_edit(corpus, method, monkeypatch):
    """`kvedit bench` times edits after `prepare`: the edit itself must find everything cached."""
    lm = tiny("llama")
    kw = dict(layers=(1,) if method == "rome" else (1, 2))
    if method != "ft-keys":
        kw |= dict(stats_source=corpus, stats_tokens=1000)
    prepare(lm, method, **kw)

    def forbidden(*args, **kwargs):
        raise AssertionError("the edit computed statistics or templates that prepare should have cached")

    monkeypatch.setattr(stats_module, "_accumulate", forbidden)
    monkeypatch.setattr(context_module, "_generate", forbidden)
    before = snapshot(lm)
    edit(lm, REQUESTS[0], method, **kw).revert(lm)
    assert all(torch.equal(before[k], v) for k, v in snapshot(lm).items())


CAUSAL_FAMILIES = [f for f in TINY_CONFIGS if f != "bert"]


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_split_batch_suffix_pass_equals_the_full_forward(family, start):
    """The KV-cached suffix pass from layer `start` up (the layers below replayed) gives the same hidden
    states as running every row in full, with a vector added at the lookup token of layer `start`."""
    from kvedit.models.split import SplitBatch

    lm = tiny(family)
    texts = ["the eiffel tower is located in the city of paris", "berlin is the capital of germany", "rome is in italy"]
    rows = [lm.tokenizer(t)["input_ids"] for t in texts]
    lookups = [2, 0, 1]
    delta = torch.randn(len(rows), lm.d_model, generator=torch.Generator().manual_seed(0))
    site = ("residual", start)
    layers_before = list(lm.module(lm.arch.layers))
    split = SplitBatch(lm, rows, lookups, start)
    with torch.no_grad():
        with Trace(lm, add={site: Addition(delta, torch.zeros(len(rows), dtype=torch.long))}):
            suffix = split.forward_suffix()
            again = split.forward_suffix()  # the prefix cache is copied, so a second pass is identical
        for i, (row, p) in enumerate(zip(rows, lookups)):
            with Trace(lm, add={site: Addition(delta[i : i + 1], torch.tensor([p]))}):
                full = lm.model.base_model(input_ids=torch.tensor([row])).last_hidden_state[0]
            torch.testing.assert_close(suffix[i, : len(row) - p], full[p:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, suffix)
    assert list(lm.module(lm.arch.layers)) == layers_before  # the real layers are back


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_requests_optimised_together_match_one_at_a_time(family):
    """Grouping requests in one batched pass changes only the speed: the same δ and steps per request."""
    from kvedit.editing.targets import TargetOptions, optimize_targets

    lm = tiny(family)
    templates = context_templates(lm, MEMIT_TEMPLATES)
    sites = [("residual", 2), ("attn_out", 2)]
    requests = REQUESTS + [EditRequest("{} is the capital of", "rome", target_new="france", target_true="italy")]
    # a tiny random model barely moves its NLL (≈ ln 52): a threshold just under it makes requests stop apart
    opts = TargetOptions(steps=12, lr=0.5, kl_factor=0.01, weight_decay=0.01, clamp_norm_factor=20, early_stop_loss=3.9)
    alone, alone_steps = optimize_targets(lm, requests, sites, templates, opts, group_size=1)
    grouped, grouped_steps = optimize_targets(lm, requests, sites, templates, opts, group_size=3)
    assert grouped_steps == alone_steps and len(set(alone_steps)) > 1  # requests stop at different steps
    for a, g in zip(alone, grouped):
        for site in sites:
            torch.testing.assert_close(g[site][0], a[site][0], atol=1e-4, rtol=1e-4)  # init
            torch.testing.assert_close(g[site][1], a[site][1], atol=1e-4, rtol=1e-4)  # δ
            assert a[site][1].norm() <= 20 * a[site][0].norm() + 1e-4  # clamp


@pytest.mark.parametrize("n", [1, 7])
def test_update_keys_equals_the_direct_solve(n):
    """MEMIT's (λC + KᵀK)⁻¹Kᵀ from C⁻¹ (push-through identity) equals solving the d×d system directly."""
    from kvedit.editing.memit import update_keys

    g = torch.Generator().manual_seed(n)
    basis = torch.randn(40, 24, generator=g, dtype=torch.float64)
    c = basis.T @ basis / 40 + 1e-3 * torch.eye(24, dtype=torch.float64)  # E[kkᵀ]-like, SPD
    keys = torch.randn(n, 24, generator=g, dtype=torch.float64)
    direct = torch.linalg.solve(15.0 * c + keys.T @ keys, keys.T)
    torch.testing.assert_close(update_keys(torch.linalg.inv(c), keys, 15.0), direct, rtol=1e-9, atol=1e-12)


def test_fast_variants_double_the_rate_and_stop_on_the_target_nll():
    from kvedit.editing import make_settings
    from kvedit.editing.targets import TargetOptions, optimize_targets

    lm = tiny("llama")
    for method in ("rome", "memit"):
        reference, fast = make_settings(lm, method, layers=(1,)), make_settings(lm, f"{method}-fast", layers=(1,))
        assert fast.lr == 2 * reference.lr and fast.stop_nll == 0.1 and reference.stop_nll is None
        assert make_settings(lm, f"{method}-fast", layers=(1,), lr=0.3).lr == 0.3  # a given setting wins
    templates = context_templates(lm, MEMIT_TEMPLATES)
    site = ("residual", 2)
    opts = TargetOptions(
        steps=12, lr=0.5, kl_factor=0.01, weight_decay=0.01, clamp_norm_factor=20, early_stop_loss=0.0
    )  # the reference rule never stops these
    _, full = optimize_targets(lm, REQUESTS, [site], templates, opts)
    stopped, at_once = optimize_targets(
        lm, REQUESTS, [site], templates, opts.__class__(**{**opts.__dict__, "stop_nll": 100.0})
    )
    assert full == [11, 11] and at_once == [0, 0]  # an NLL below 100 nats stops at the first step, before any change
    assert all(float(r[site][1].norm()) == 0.0 for r in stopped)
    # a threshold inside the random model's NLLs (≈ ln 52) stops only the request already under it
    _, crossing = optimize_targets(
        lm, REQUESTS, [site], templates, opts.__class__(**{**opts.__dict__, "stop_nll": 3.9})
    )
    assert sorted(crossing) == [0, 11]
