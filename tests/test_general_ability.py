"""General ability during long runs: perplexity on fixed text, zero-shot label ranking, weight change."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kvedit
from kvedit.evaluation.general_ability import GeneralAbilityProbe, weight_change, weight_snapshot
from kvedit.tuning.evaluate import predict
from tiny_models import WORDS, tiny_lm

TASKS = Path(__file__).parent / "fixtures" / "tuning"


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    return path


def test_perplexity_is_exp_of_the_mean_token_nll_over_whole_windows(text):
    lm = tiny_lm("llama")
    probe = GeneralAbilityProbe.build(lm, text, tokens=250, window=64)
    assert probe.windows.shape == (3, 64)  # 250 tokens: three full windows, the tail dropped
    with torch.no_grad():
        losses = [float(lm.model(input_ids=w[None], labels=w[None]).loss) for w in probe.windows]
    assert probe.perplexity(lm, batch_size=2) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_label_accuracy_is_the_share_of_examples_whose_gold_label_ranks_first(text):
    lm = tiny_lm("llama")
    probe = GeneralAbilityProbe.build(lm, text, TASKS, tokens=64, window=64, per_task=3, tasks=("cb", "copa"))
    got = probe.label_accuracy(lm)
    predictions = predict(lm, probe.examples, probe.labels)
    for task in ("cb", "copa"):
        mine = [p for p in predictions if p.task == task]
        assert 1 <= len(mine) <= 3 and got[task] == sum(p.ranked == p.gold for p in mine) / len(mine)
    assert got["mean"] == pytest.approx((got["cb"] + got["copa"]) / 2)
    assert set(probe.measure(lm)) == {"perplexity", "label_accuracy"}


def test_weight_change_against_a_snapshot_counts_grown_memories(text):
    lm = tiny_lm("llama")
    name = f"{lm.values_path(1)}.weight"
    snapshot = weight_snapshot(lm, [name])
    assert weight_change(lm, snapshot) == {name: 0.0}
    with torch.no_grad():
        lm.model.get_parameter(name)[0, 0] += 3.0
    assert weight_change(lm, snapshot)[name] == pytest.approx(3.0 / float(snapshot[name].norm()), rel=1e-5)
    from kvedit.models.ffn_width import grow

    grow(lm, {name: torch.full((1, lm.d_model), 4.0)})
    expected = math.sqrt(9.0 + 16.0 * lm.d_model) / float(snapshot[name].norm())
    assert weight_change(lm, snapshot)[name] == pytest.approx(expected, rel=1e-5)


def test_a_probe_needs_a_full_window(text):
    with pytest.raises(ValueError, match="tokens >= window"):
        GeneralAbilityProbe.build(tiny_lm("llama"), text, tokens=10, window=64)
    assert kvedit  # the package imports lazily; the probe pulls in what it needs
