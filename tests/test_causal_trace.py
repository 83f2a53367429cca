"""Causal tracing against a brute-force restore: one full forward pass per (kind, layer, token), with plain hooks
on the model's own modules, no batching and no replayed layers."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from kvedit.analysis.causal_trace import (
    KIND_SITES,
    NOISE_SEED,
    embedding_noise_scale,
    subject_token_range,
    trace_fact,
)

PROMPT = "the eiffel tower is located in the city of"
SUBJECT = "eiffel tower"


def _module_for(lm, kind: str, layer: int):
    if kind == "residual":
        return lm.module(f"{lm.arch.layers}.{layer}")
    return lm.module(lm.values_path(layer) if kind == "ffn" else lm.attn_out_path(layer))


def _swap_first(output, fn):
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@torch.no_grad()
def brute_force(lm, prompt, subject, nu, samples, window):
    """scores[kind] `[T, L]`, high and low, restoring one state per full forward pass."""
    ids, (s0, s1) = subject_token_range(lm, prompt, subject)
    ids = torch.tensor([ids])
    n_layers, length = lm.num_layers, ids.shape[1]
    noise = nu * torch.randn(samples, s1 - s0, lm.d_model, generator=torch.Generator().manual_seed(NOISE_SEED))
    clean: dict = {}
    handles = []
    for kind in KIND_SITES:
        for layer in range(n_layers):

            def keep(mod, args, out, key=(kind, layer)):
                clean[key] = (out[0] if isinstance(out, tuple) else out).reshape(1, length, -1)[0].clone()

            handles.append(_module_for(lm, kind, layer).register_forward_hook(keep))
    probs = lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)
    for h in handles:
        h.remove()
    answer = int(probs.argmax())

    def noisy_run(restore):
        hooks = [
            lm.model.get_input_embeddings().register_forward_hook(
                lambda m, a, out: torch.cat([out[:, :s0], out[:, s0:s1] + noise, out[:, s1:]], dim=1)
            )
        ]
        for (kind, layer), token in restore:

            def put(mod, args, out, key=(kind, layer), t=token):
                def fn(h):
                    h = h.reshape(samples, length, -1).clone()
                    h[:, t] = clean[key][t]
                    return h.reshape(out[0].shape if isinstance(out, tuple) else out.shape)

                return _swap_first(out, fn)

            hooks.append(_module_for(lm, kind, layer).register_forward_hook(put))
        try:
            return lm.model(input_ids=ids.expand(samples, -1)).logits[:, -1].float().softmax(-1)[:, answer].mean()
        finally:
            for h in hooks:
                h.remove()

    scores = {k: torch.zeros(length, n_layers, dtype=torch.float64) for k in KIND_SITES}
    for kind in KIND_SITES:
        for layer in range(n_layers):
            if kind == "residual":
                layers = [layer]
            else:
                layers = range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))
            for t in range(length):
                scores[kind][t, layer] = noisy_run([((kind, l), t) for l in layers])
    return scores, float(probs[answer]), float(noisy_run([]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gpt_neox", "opt", "gptj", "olmo2"])
def test_tracing_equals_a_brute_force_restore(family):
    lm = tiny(family)
    nu = embedding_noise_scale(lm, [SUBJECT, "the louvre", "berlin"])
    fact = trace_fact(lm, PROMPT, SUBJECT, nu, samples=3, window=2)
    want, high, low = brute_force(lm, PROMPT, SUBJECT, nu, samples=3, window=2)
    assert fact.high == pytest.approx(high, abs=1e-6) and fact.low == pytest.approx(low, abs=1e-6)
    for kind in KIND_SITES:
        torch.testing.assert_close(fact.scores[kind], want[kind], atol=1e-5, rtol=1e-4)
    # restoring the last layer's output at the last token gives the clean run back
    assert fact.scores["residual"][-1, -1] == pytest.approx(high, abs=1e-5)


def test_tracing_a_prompt_longer_than_a_sliding_window_equals_a_brute_force_restore():
    """The noisy prefix's KV cache of a sliding-window layer keeps only the window: the restoration reads it so."""
    import copy

    from tiny_models import TINY_CONFIGS, tiny_lm
    from transformers import AutoModelForCausalLM

    from kvedit.models import LM

    config = copy.deepcopy(TINY_CONFIGS["gemma3_text"])
    config.sliding_window = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lm = LM.wrap(model, tiny_lm("gemma3_text").tokenizer, name="tiny-gemma3-window-4")
    prompt = "in the middle of paris the eiffel tower is located in the city of"
    nu = embedding_noise_scale(lm, [SUBJECT])
    fact = trace_fact(lm, prompt, SUBJECT, nu, samples=2, window=2)
    want, high, low = brute_force(lm, prompt, SUBJECT, nu, samples=2, window=2)
    assert len(fact.tokens) > 2 * config.sliding_window and fact.subject_range[0] > config.sliding_window
    assert fact.low == pytest.approx(low, abs=1e-6)
    for kind in KIND_SITES:
        torch.testing.assert_close(fact.scores[kind], want[kind], atol=1e-5, rtol=1e-4)


def test_the_subject_range_and_the_noise_scale():
    lm = tiny("llama")
    ids, span = subject_token_range(lm, PROMPT, SUBJECT)
    assert [lm.tokenizer.decode([i]) for i in ids[span[0] : span[1]]] == ["eiffel", "tower"]
    embed = lm.model.get_input_embeddings().weight
    words = [lm.tokenizer.convert_tokens_to_ids(w) for w in ("eiffel", "tower", "paris")]
    assert embedding_noise_scale(lm, ["eiffel tower", "paris", "paris"]) == pytest.approx(
        3 * embed[words].flatten().std().item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="not in the prompt"):
        subject_token_range(lm, PROMPT, "the colosseum")


def test_a_fact_the_model_does_not_predict_is_skipped():
    lm = tiny("llama")
    fact = trace_fact(lm, PROMPT, SUBJECT, 0.1, kinds=("residual",), samples=2)
    assert (
        trace_fact(lm, PROMPT, SUBJECT, 0.1, expected=fact.answer.strip(), kinds=("residual",), samples=2) is not None
    )
    wrong = "rome" if fact.answer.strip() != "rome" else "paris"
    assert trace_fact(lm, PROMPT, SUBJECT, 0.1, expected=wrong, samples=2) is None


def test_analyze_trace_end_to_end_resumes_and_averages_by_category(capsys, tiny_folder, tmp_path):
    import json

    from kvedit.analysis.causal_trace import FactTrace
    from kvedit.analysis.trace_effects import average_effects, token_categories
    from kvedit.cli import main
    from kvedit.models import load_model

    lm = load_model(str(tiny_folder))
    facts = [
        ("{} is located in the city of", "the eiffel tower"),
        ("{} is the capital of", "berlin"),
        ("the official language of {} is", "france"),
        ("{} was born in", "big ben"),
    ]
    records = []
    for i, (prompt, subject) in enumerate(facts):
        ids = lm.tokenizer(prompt.format(subject), return_tensors="pt")["input_ids"]
        top = lm.tokenizer.decode([int(lm.model(input_ids=ids).logits[0, -1].argmax())]).strip()
        true = top if i != 1 else ("rome" if top != "rome" else "paris")  # case 1: a fact the model gets wrong
        records.append(
            {"case_id": i, "prompt": prompt, "subject": subject, "target_new": "london", "target_true": true}
        )
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "trace"
    argv = [
        "analyze",
        "trace",
        "--dataset",
        str(data),
        "--model",
        str(tiny_folder),
        "--n",
        "2",
        "--samples",
        "2",
        "--plots",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2 facts the model predicts" in text and "| FFN output (window) |" in text
    lines = [json.loads(x) for x in (out / "facts.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2] and lines[1]["fact"] is None  # skipped, recorded
    assert (out / "aie.png").read_bytes()[:4] == b"\x89PNG" and (out / "fact-0.png").is_file()
    traced = [FactTrace.from_dict(x["fact"]) for x in lines if x["fact"]]
    effects = json.loads((out / "trace.json").read_text())
    # by hand: the last subject token's restored p, averaged over facts, minus the mean corrupted p
    for kind in ("residual", "ffn", "attn"):
        want = [
            sum(float(f.scores[kind][token_categories(f)["last subject token"][0], layer]) for f in traced) / 2
            - sum(f.low for f in traced) / 2
            for layer in range(lm.num_layers)
        ]
        assert effects["aie"][kind]["last subject token"]["mean"] == pytest.approx(want, abs=1e-9)
    assert effects == json.loads(json.dumps(average_effects(traced) | {"editor_layers": effects["editor_layers"]}))
    # a second run finds the facts done and traces nothing more
    assert main(argv) == 0
    assert len((out / "facts.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    other = [
        "analyze",
        "trace",
        "--dataset",
        str(data),
        "--model",
        str(tiny_folder),
        "--n",
        "2",
        "--samples",
        "3",
        "--out",
        str(out),
    ]
    assert main(other) == 2
    assert "other settings (samples)" in capsys.readouterr().err


def test_token_categories_follow_rome():
    from kvedit.analysis.causal_trace import FactTrace
    from kvedit.analysis.trace_effects import token_categories

    def fact(tokens, span):
        return FactTrace("p", "s", "a", tokens, span, 0.5, 0.1, {})

    assert token_categories(fact(list("abcdefg"), (1, 4))) == {
        "first subject token": [1],
        "middle subject tokens": [2],
        "last subject token": [3],
        "first subsequent token": [4],
        "further tokens": [5],
        "last token": [6],
    }
    one = token_categories(fact(list("abc"), (1, 2)))  # one-token subject, one token after it
    assert one["first subject token"] == one["last subject token"] == [1] and one["middle subject tokens"] == []
    assert one["first subsequent token"] == [] and one["last token"] == [2]
