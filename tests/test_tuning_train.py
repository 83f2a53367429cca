"""Training loop, evaluation and the runner on tiny models: resume equals an uninterrupted run, a saved adapter
reloads to identical predictions, label scores match a brute-force forward pass, F1 by hand, MMLU letters."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvedit.models import LM
from kvedit.tuning.adapters import load_adapter
from kvedit.tuning.evaluate import accuracy_and_f1, predict
from kvedit.tuning.instruct import MMLUItem, macro_accuracy, mmlu_predictions
from kvedit.tuning.presets import TrainConfig, preset
from kvedit.tuning.quantize import require_4bit
from kvedit.tuning.runner import TuneData, run_tune
from kvedit.tuning.targets import detach_adapter
from kvedit.tuning.tasks import Example, TaskData
from kvedit.tuning.tokens import encode_example
from kvedit.tuning.train import training_sequences

PROMPTS = [
    "the capital of france is",
    "rome is located in",
    "the language spoken in berlin is",
    "london is in",
    "the eiffel tower stands in",
    "madrid is the capital of",
    "the louvre is in",
    "big ben is in",
]
LABELS = ["paris", "italy", "german", "england", "paris", "spain", "paris", "london"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_data() -> TuneData:
    examples = [Example("toy", f"toy:{i}", p + " :", l) for i, (p, l) in enumerate(zip(PROMPTS, LABELS))]
    task = TaskData(
        "toy",
        examples[:6],
        examples[6:] + examples[:2],
        "inline",
        "inline",
        ("paris", "italy", "german", "england", "spain", "london"),
    )
    return TuneData(task.train, {"toy": task})


CONFIG = preset("default", max_steps=4, batch_size=2, grad_accum=2, max_length=32, checkpoint_every=1, lr=5e-3)


def test_label_loss_marks_exactly_the_label_and_eos():
    lm = tiny("llama")
    example = Example("toy", "toy:0", "the capital of france is :", "paris")
    (row,) = training_sequences(lm, [example], CONFIG)
    enc = encode_example(lm.tokenizer, example.prompt, example.label, eos=True)
    assert row.ids == enc.ids and row.ids[-1] == lm.tokenizer.eos_token_id
    assert [i for i, on in enumerate(row.loss) if on] == list(range(enc.n_prompt, len(enc.ids)))
    (everything,) = training_sequences(lm, [example], CONFIG.replace(loss_on="all"))
    assert everything.loss == (False,) + (True,) * (len(enc.ids) - 1)


def test_packing_keeps_every_token_in_order_of_a_seeded_shuffle():
    lm = tiny("llama")
    examples = [Example("toy", f"toy:{i}", p + " :", l) for i, (p, l) in enumerate(zip(PROMPTS, LABELS))]
    config = CONFIG.replace(packing=True, max_length=16, loss_on="all")
    rows = training_sequences(lm, examples, config)
    lengths = sum(len(encode_example(lm.tokenizer, e.prompt, e.label, eos=True).ids) for e in examples)
    assert all(len(r.ids) <= 16 for r in rows) and sum(len(r.ids) for r in rows) == lengths
    assert training_sequences(lm, examples, config) == rows


def test_resumed_run_equals_uninterrupted_and_saved_adapter_reloads(tmp_path):
    lm = tiny("llama")
    data = toy_data()
    full = run_tune(lm, ["keys"], data, tmp_path / "full", CONFIG, log=lambda _: None)
    killed = run_tune(lm, ["keys"], data, tmp_path / "cut", CONFIG, log=lambda _: None, stop_after=2)
    assert not killed["complete"] and (tmp_path / "cut" / "runs" / "keys" / "checkpoint").exists()
    resumed = run_tune(lm, ["keys"], data, tmp_path / "cut", CONFIG, log=lambda _: None)
    assert full["complete"] and resumed["complete"]
    a = json.loads((tmp_path / "full" / "runs" / "keys" / "train.json").read_text())
    b = json.loads((tmp_path / "cut" / "runs" / "keys" / "train.json").read_text())
    assert len(a["losses"]) == 4 and a["losses"] == b["losses"]
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full" / "runs" / "keys" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "cut" / "runs" / "keys" / "adapter" / "adapter_model.safetensors")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(w.abs().sum() > 0 for k, w in wa.items() if "lora_B" in k)  # it did train

    saved = [json.loads(line) for line in (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()]
    peft_model = load_adapter(lm, tmp_path / "full" / "runs" / "keys" / "adapter")
    try:
        again = predict(lm, data.test, {"toy": data.tasks["toy"].labels})
    finally:
        lm.model = detach_adapter(peft_model)
    tuned = [r for r in saved if r["run"] == "keys"]
    assert [p.record()["label_logprobs"] for p in again] == [r["label_logprobs"] for r in tuned]
    assert [p.generated for p in again] == [r["generated"] for r in tuned]
    manifest = json.loads((tmp_path / "full" / "runs" / "keys" / "adapter" / "data_manifest.json").read_text())
    assert manifest["train"] == 6 and manifest["tasks"]["toy"]["test"] == 4


def test_resume_refuses_other_settings_and_bad_targets_write_nothing(tmp_path):
    lm = tiny("llama")
    data = toy_data()
    with pytest.raises(ValueError, match="valid roles"):
        run_tune(lm, ["keys", "key"], data, tmp_path / "bad", CONFIG, log=lambda _: None)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="no training examples"):
        run_tune(lm, ["keys"], TuneData([], data.tasks), tmp_path / "empty", CONFIG)
    assert not (tmp_path / "empty").exists()
    run_tune(lm, ["values"], data, tmp_path / "run", CONFIG.replace(max_steps=1), log=lambda _: None)
    with pytest.raises(ValueError, match="train_config"):
        run_tune(lm, ["values"], data, tmp_path / "run", CONFIG.replace(max_steps=2), log=lambda _: None)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_label_scores_and_greedy_answers_match_brute_force(family):
    lm = tiny(family)
    examples = [Example("toy", f"toy:{i}", p, "paris") for i, p in enumerate(PROMPTS[:3])]
    labels = ["paris", "the eiffel tower", "london"]
    predictions = predict(lm, examples, {"toy": labels}, batch_size=3, max_new_tokens=4)
    for example, prediction in zip(examples, predictions):
        brute = []
        for word in labels:
            enc = encode_example(lm.tokenizer, example.prompt, word)
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(torch.tensor([enc.ids])).logits[0].float(), -1)
            brute.append(sum(float(logp[i - 1, enc.ids[i]]) for i in range(enc.n_prompt, len(enc.ids))))
        assert prediction.label_logprobs == pytest.approx(brute, abs=1e-4)
        assert prediction.ranked == labels[max(range(3), key=lambda j: brute[j])]
        prompt = encode_example(lm.tokenizer, example.prompt, "x")
        with torch.no_grad():
            out = lm.model.generate(
                torch.tensor([prompt.ids[: prompt.n_prompt]]),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        new = [t for t in out[0, prompt.n_prompt :].tolist()]
        if lm.tokenizer.eos_token_id in new:
            new = new[: new.index(lm.tokenizer.eos_token_id)]
        assert prediction.generated == lm.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_accuracy_and_macro_f1_by_hand():
    result = accuracy_and_f1(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "unparseable"], ["a", "b", "c"])
    # F1: a = 2·1/(2·1+0+1) = 2/3; b = 2·2/(2·2+1+0) = 4/5; c = 0
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)


def letters_lm() -> LM:
    """A tiny Llama whose word-level vocabulary holds the answer letters."""
    words = ["[PAD]", "[UNK]", "</s>", "question", "answer", ":", "a", "b", "c", "d", "x", "y"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    from tokenizers import normalizers

    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=2,
    )
    return LM.wrap(LlamaForCausalLM(config), tok, name="tiny-letters")


def test_mmlu_picks_the_highest_letter_logit_and_macro_averages():
    lm = letters_lm()
    items = [
        MMLUItem(f"mmlu:{i}", s, f"question {q} answer:", "A")
        for i, (s, q) in enumerate([("s1", "x"), ("s1", "y"), ("s2", "x y")])
    ]
    records = mmlu_predictions(lm, items, batch_size=2)
    letters = [lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    for item, record in zip(items, records):
        ids = lm.tokenizer(item.prompt)["input_ids"]
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1, letters]
        assert record["predicted"] == "ABCD"[int(logits.argmax())]
    fake = [{"subject": "s1", "correct": 1}, {"subject": "s1", "correct": 0}, {"subject": "s2", "correct": 1}]
    stat = macro_accuracy(fake)
    assert stat["mean"] == pytest.approx(100 * (0.5 + 1.0) / 2) and stat["micro"] == pytest.approx(200 / 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: 4-bit can run")
def test_4bit_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        require_4bit()


def test_bad_training_settings_are_clear_errors():
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        preset("fast")
