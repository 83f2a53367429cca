"""New read points and interventions, attention vs FFN similarity, inspect, and the patch view."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny

from kvedit.analysis.components import component_similarity, jaccard
from kvedit.analysis.inspect import Intervention, inspect_prompt
from kvedit.analysis.patch_view import changed_memories, memory_major, patch_report
from kvedit.editing.delta import WeightDelta
from kvedit.models import ARCHITECTURES, Trace, ffn_memory
from kvedit.models.tracing import Scaling

PROMPTS = ["the eiffel tower is located in the city of", "berlin is the capital of"]
CAUSAL = sorted(k for k, a in ARCHITECTURES.items() if a.objective == "causal")


def encode(lm, prompts=PROMPTS):
    return lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")


@pytest.mark.parametrize("family", CAUSAL)
def test_sublayer_reads_add_up_to_the_residual(family):
    """layer output = layer input + attention output + FFN output (what refinement's subtraction relies on)."""
    lm = tiny(family)
    with torch.no_grad(), Trace(lm, read=[("residual", 1), ("residual", 2), ("attn_write", 2), ("ffn_write", 2)]) as tr:
        lm.model(**encode(lm))
    torch.testing.assert_close(
        tr["residual", 1] + tr["attn_write", 2] + tr["ffn_write", 2], tr["residual", 2], rtol=1e-4, atol=1e-5
    )


def test_attn_in_and_ffn_in_are_the_normalised_states_the_sublayers_read():
    lm = tiny("llama")
    seen = {}
    layer = lm.module(f"{lm.arch.layers}.1")
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o)),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("ffn", o)),
    ]
    with torch.no_grad(), Trace(lm, read=[("attn_in", 1), ("ffn_in", 1)]) as tr:
        lm.model(**encode(lm))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(tr["attn_in", 1], seen["attn"])
    torch.testing.assert_close(tr["ffn_in", 1], seen["ffn"])
    parallel = tiny("gptj")  # one layer norm feeds both sub-layers
    with torch.no_grad(), Trace(parallel, read=[("attn_in", 2), ("ffn_in", 2)]) as tr:
        parallel.model(**encode(parallel))
    torch.testing.assert_close(tr["attn_in", 2], tr["ffn_in", 2])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_scaling_changes_exactly_one_coefficient(family):
    lm = tiny(family)
    enc = encode(lm)
    with torch.no_grad(), Trace(lm, read=[("coefficients", 1), ("coefficients", 2)]) as base:
        lm.model(**enc)
    with (
        torch.no_grad(),
        Trace(
            lm,
            read=[("coefficients", 1), ("coefficients", 2)],
            scale={("coefficients", 1): Scaling(torch.tensor([7]), torch.tensor([3.0]))},
        ) as tr,
    ):
        lm.model(**enc)
    diff = (tr["coefficients", 1] - base["coefficients", 1]).abs().amax(dim=(0, 1))
    assert diff.nonzero().flatten().tolist() == [7]
    torch.testing.assert_close(tr["coefficients", 1][..., 7], 3 * base["coefficients", 1][..., 7])
    assert not torch.allclose(tr["coefficients", 2], base["coefficients", 2])  # later layers see the change


def test_jaccard_and_component_similarity_by_hand():
    assert jaccard(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 5]])).tolist() == [pytest.approx(1 / 5)]
    lm = tiny("llama")
    stats = component_similarity(lm, PROMPTS, top=10, progress=False)
    E = lm.model.get_input_embeddings().weight
    want = {"attention": 0.0, "ffn": 0.0, "attention_j": 0.0, "ffn_j": 0.0}
    for prompt in PROMPTS:  # one prompt at a time, no padding
        enc = lm.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad(), Trace(lm, read=[("attn_in", 2), ("attn_out", 2), ("ffn_in", 2), ("ffn_out", 2)]) as tr:
            lm.model(**enc)
        for name, a, b in (("attention", "attn_in", "attn_out"), ("ffn", "ffn_in", "ffn_out")):  # no post norms
            x, y = tr[a, 2][0, -1], tr[b, 2][0, -1]
            want[name] += float(F.cosine_similarity(x, y, dim=0)) / 2
            sx, sy = set((E @ x).topk(10).indices.tolist()), set((E @ y).topk(10).indices.tolist())
            want[name + "_j"] += len(sx & sy) / len(sx | sy) / 2
    assert stats[2]["attention_cos"] == pytest.approx(want["attention"], abs=1e-5)
    assert stats[2]["ffn_cos"] == pytest.approx(want["ffn"], abs=1e-5)
    assert stats[2]["attention_jaccard"] == pytest.approx(want["attention_j"], abs=1e-6)
    assert stats[2]["ffn_jaccard"] == pytest.approx(want["ffn_j"], abs=1e-6)
    with pytest.raises(ValueError, match="masked LM"):
        component_similarity(tiny("bert"), PROMPTS, progress=False)


def test_inspect_ranks_memories_by_contribution_and_intervenes():
    lm = tiny("llama")
    report = inspect_prompt(lm, PROMPTS[1], top_memories=3)
    enc = lm.tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad(), Trace(lm, read=[("coefficients", 2)]) as tr:
        lm.model(**enc)
    m = tr["coefficients", 2][0, -1]
    contribution = m.abs() * ffn_memory(lm, 2).values.detach().norm(dim=1)
    assert [e["key"] for e in report["layers"][2]["memories"]] == contribution.topk(3).indices.tolist()
    top = report["layers"][2]["memories"][0]
    unchanged = inspect_prompt(lm, PROMPTS[1], interventions=[Intervention(2, top["key"], 1.0)])
    assert unchanged["intervention"]["kl_before_after"] == pytest.approx(0.0, abs=1e-7)
    zeroed = inspect_prompt(lm, PROMPTS[1], interventions=[Intervention.parse(f"2:{top['key']}", zero=True)])
    assert zeroed["intervention"]["kl_before_after"] > 0
    assert Intervention.parse("-1:5=2.5") == Intervention(-1, 5, 2.5)
    with pytest.raises(ValueError, match="LAYER:MEMORY=FACTOR"):
        Intervention.parse("3:4")
    with pytest.raises(ValueError, match="out of range"):
        inspect_prompt(lm, PROMPTS[1], interventions=[Intervention(1, 64, 0.0)])


def hand_patch(lm, layer, role, rows):
    """A patch changing exactly memories `rows` of one FFN weight (`role`: "key:<r>" or "values")."""
    path = (lm.key_paths(layer)[role[4:]] if role.startswith("key:") else lm.values_path(layer)) + ".weight"
    before = lm.model.get_parameter(path).detach().clone()
    after = before.clone()
    view = memory_major(lm, after, role)  # a view: editing it edits `after`
    view[rows] += 0.5
    return WeightDelta(
        {path: before},
        {path: after},
        {
            "method": "hand",
            "requests": [
                {
                    "prompt": "{} is the capital of",
                    "subject": "berlin",
                    "neighborhood_prompts": ["madrid is the capital of"],
                }
            ],
        },
    )


@pytest.mark.parametrize(
    "family,role", [("llama", "key:gate"), ("gpt2", "key:key"), ("gpt2", "values"), ("opt", "values")]
)
def test_patch_view_finds_the_changed_rows_and_no_others(family, role):
    lm = tiny(family)
    delta = hand_patch(lm, 1, role, [3, 7])
    assert changed_memories(lm, delta) == {1: {role: [3, 7]}}
    report = patch_report(lm, delta, top=5)
    entry = report["layers"][1]
    assert report["prompts"] == ["berlin is the capital of"] and report["neighborhood"] == ["madrid is the capital of"]
    if role.startswith("key:"):  # the layer's input is unchanged, so only the changed keys' coefficients move
        move = entry["coefficients"]["prompts"]
        assert {t["key"] for t in move["top"] if t["mean_abs_change"] > 0} == {3, 7}
        assert move["share_on_changed_memories"] == pytest.approx(1.0)
        subject = entry["coefficients"]["subject"]  # at "berlin", the subject's last (and first) token
        assert {t["key"] for t in subject["top"] if t["mean_abs_change"] > 0} <= {3, 7}
        with torch.no_grad(), Trace(lm, read=[("coefficients", 1)]) as tr:
            lm.model(**lm.tokenizer("berlin is the capital of", return_tensors="pt"))
        at_subject = tr["coefficients", 1][0, 0]
        assert all(t["before"] == pytest.approx(float(at_subject[t["key"]]), abs=1e-6) for t in subject["top"])
    else:
        assert [t["key"] for t in entry["values"]["top"]] in ([3, 7], [7, 3])
        assert all(t["norm_change"] > 0 for t in entry["values"]["top"])
    assert torch.equal(lm.model.get_parameter(delta.names[0]), delta.before[delta.names[0]])  # reverted


def test_patch_of_other_parameters_is_a_clear_error():
    lm = tiny("llama")
    name = lm.attn_out_path(1) + ".weight"
    w = lm.model.get_parameter(name).detach().clone()
    with pytest.raises(ValueError, match="no FFN key or value"):
        patch_report(lm, WeightDelta({name: w}, {name: w + 1}, {}), ["berlin is"])
