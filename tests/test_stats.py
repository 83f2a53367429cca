"""Key statistics: exact accumulation, merging halves, cache hits, corrupt and mismatched caches."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from safetensors.torch import load_file, save_file
from tiny_models import WORDS

import kvedit.editing.stats as stats_module
from kvedit.editing.context import ROME_TEMPLATES, context_templates
from kvedit.editing.stats import KeyStats, key_statistics
from kvedit.models import memory_coefficients

SEQ = 16  # each paragraph below is 15 words + EOS = 16 tokens, so sequences never straddle files


def paragraphs(seed: int, count: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "\n\n".join(
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (15,), generator=g)) for _ in range(count)
    )


@pytest.fixture
def cache(kvedit_cache):
    return kvedit_cache


def test_statistics_equal_a_direct_computation(tmp_path, cache):
    lm = tiny("llama")
    text = paragraphs(0, 6)
    (tmp_path / "c.txt").write_text(text)
    got = key_statistics(lm, [1, 3], str(tmp_path / "c.txt"), 6 * SEQ, seq_len=SEQ, progress=False)
    rows = [p + " </s>" for p in text.split("\n\n")]
    coeffs, mask = memory_coefficients(lm, rows, [1, 3])
    for layer in (1, 3):
        k = coeffs[layer][mask.bool()].double()
        assert got[layer].count == k.shape[0] == 6 * SEQ
        torch.testing.assert_close(got[layer].mom2, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-7)
        assert got[layer].mom2.dtype == torch.float64


def test_two_halves_merge_into_the_whole(tmp_path, cache):
    lm = tiny("gpt2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "1.txt").write_text(paragraphs(1, 5))
    (tmp_path / "b" / "2.txt").write_text(paragraphs(2, 5))
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "1.txt").write_text(paragraphs(1, 5))
    (tmp_path / "whole" / "2.txt").write_text(paragraphs(2, 5))
    kw = dict(seq_len=SEQ, progress=False, use_cache=False)
    a = key_statistics(lm, [2], str(tmp_path / "a"), 5 * SEQ, **kw)[2]
    b = key_statistics(lm, [2], str(tmp_path / "b"), 5 * SEQ, **kw)[2]
    whole = key_statistics(lm, [2], str(tmp_path / "whole"), 10 * SEQ, **kw)[2]
    merged = a.merge(b)
    assert merged.count == whole.count == 10 * SEQ
    torch.testing.assert_close(merged.mom2, whole.mom2, rtol=1e-6, atol=1e-9)


def test_cache_hit_is_identical_and_skips_the_model(tmp_path, cache, monkeypatch):
    lm = tiny("llama")
    (tmp_path / "c.txt").write_text(paragraphs(3, 4))
    source = str(tmp_path / "c.txt")
    first = key_statistics(lm, [0, 2], source, 4 * SEQ, seq_len=SEQ, progress=False)
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: pytest.fail("cache was not used"))
    second = key_statistics(tiny("llama"), [0, 2], source, 4 * SEQ, seq_len=SEQ, progress=False)  # from disk
    assert key_statistics(lm, [0], source, 4 * SEQ, seq_len=SEQ, progress=False)[0] is first[0]  # from memory
    for layer in (0, 2):
        assert torch.equal(first[layer].sum_kkT, second[layer].sum_kkT) and first[layer].count == second[layer].count


@pytest.mark.parametrize("damage", ["bytes", "values", "settings"])
def test_corrupt_or_mismatched_cache_is_recomputed(tmp_path, cache, damage):
    lm = tiny("llama")
    (tmp_path / "c.txt").write_text(paragraphs(4, 4))
    source = str(tmp_path / "c.txt")
    fresh = key_statistics(lm, [1], source, 4 * SEQ, seq_len=SEQ, progress=False)[1]
    (path,) = list(cache.glob("stats/*/*.safetensors"))
    if damage == "bytes":
        path.write_bytes(path.read_bytes()[:100])
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(path))
        if damage == "values":
            tensors["sum_kkT"][0, 0] += 1.0  # checksum no longer matches
        else:
            meta["n_tokens"] = "999"  # made for other settings
        save_file(tensors, str(path), metadata=meta)
    lm = tiny("llama")  # a new process's model: nothing held in memory
    again = key_statistics(lm, [1], source, 4 * SEQ, seq_len=SEQ, progress=False)[1]
    assert torch.equal(again.sum_kkT, fresh.sum_kkT)


def test_bad_arguments_are_clear_errors(tmp_path, cache):
    lm = tiny("llama")
    with pytest.raises(ValueError, match="kind must be one of"):
        key_statistics(lm, [0], "self", 10, kind="queries")
    with pytest.raises(ValueError, match="n_tokens must be > 0"):
        key_statistics(lm, [0], "self", 0)
    with pytest.raises(FileNotFoundError, match="corpus source"):
        key_statistics(lm, [0], str(tmp_path / "nope.txt"), 10, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        key_statistics(lm, [7], "self", 10)


def test_merge_and_empty_stats():
    a, b = KeyStats.zeros(3), KeyStats.zeros(3)
    a.add(torch.ones(2, 3))
    b.add(torch.eye(3))
    m = a.merge(b)
    assert m.count == 5
    torch.testing.assert_close(m.mom2, (2 * torch.ones(3, 3) + torch.eye(3)).double() / 5)
    with pytest.raises(ValueError, match="no tokens"):
        _ = KeyStats.zeros(2).mom2


def test_context_templates_are_cached_and_seeded(cache):
    lm = tiny("llama")
    first = context_templates(lm, ROME_TEMPLATES)
    assert first[0] == ["{}"] and [len(g) for g in first[1:]] == [10, 10]
    assert all(t.endswith(". {}") for g in first[1:] for t in g)
    assert context_templates(lm, ROME_TEMPLATES) == first
    (path,) = list(cache.glob("templates/*.json"))
    path.write_text("{broken")
    assert context_templates(lm, ROME_TEMPLATES) == first  # regenerated with the same seed


def test_self_corpus_is_sampled_once_and_grows_deterministically(cache, monkeypatch):
    import kvedit.editing.self_corpus as self_corpus

    lm = tiny("llama")
    small_ids, small_mask = self_corpus.self_token_rows(lm, 40, seq_len=16, block_rows=2, progress=False)
    big_ids, big_mask = self_corpus.self_token_rows(lm, 100, seq_len=16, block_rows=2, progress=False)
    fresh_ids, _ = self_corpus.self_token_rows(lm, 100, seq_len=16, block_rows=2, use_cache=False, progress=False)
    assert int(small_mask.sum()) >= 40 and int(big_mask.sum()) >= 100
    assert torch.equal(big_ids[: len(small_ids)], small_ids)  # a larger request extends the cached rows
    assert torch.equal(big_ids, fresh_ids)  # cached or sampled now: the same tokens
    assert list((cache / "self-corpus").rglob("*.txt"))  # the text, for people


def test_self_statistics_for_a_new_layer_set_never_resample(cache, monkeypatch):
    import kvedit.editing.self_corpus as self_corpus

    lm = tiny("llama")
    first = key_statistics(lm, [1], "self", 100, seq_len=16, progress=False)[1]
    assert first.count == 100
    monkeypatch.setattr(self_corpus, "sample_block", lambda *a, **k: pytest.fail("resampled the self corpus"))
    both = key_statistics(tiny("llama"), [1, 2], "self", 100, seq_len=16, progress=False)
    assert both[2].count == 100 and torch.equal(both[1].sum_kkT, first.sum_kkT)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_first_pass_says_what_it_computes_how_long_and_how_to_prepare_it(capsys, cache, family):
    lm = tiny(family)
    key_statistics(lm, [0, 1], "self", 300, seq_len=SEQ, batch_size=4)
    err = capsys.readouterr().err
    notice = next(line for line in err.splitlines() if line.startswith("kvedit: key statistics"))
    assert "layers 0,1 are not cached yet" in notice and "300 tokens of text the model samples itself" in notice
    assert "(300 of them to sample first)" in notice
    assert "min on this machine" in notice and "cached for every later edit" in notice
    assert "`kvedit stats --layers 0,1 --source self --tokens 300` prepares them ahead" in notice
    key_statistics(lm, [0, 1], "self", 300, seq_len=SEQ, batch_size=4)  # cached now: nothing to say
    assert "kvedit: key statistics" not in capsys.readouterr().err
