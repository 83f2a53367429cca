"""Task loaders: the seed's prompt formats character for character, official and llm-foundry formats, user
task files, splits, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_DATA, need_shared

from kvedit.tuning.instruct import alpaca_prompt, load_alpaca, load_mmlu
from kvedit.tuning.records import RecordFormatError, read_records
from kvedit.tuning.tasks import (
    TASKS,
    TaskDataError,
    load_task,
    load_user_task,
    parse_boolq,
    parse_copa,
    parse_label_words,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tuning"

# The seed repo's prompts (REFERENCE §7), written out for the fixture records, label appended.
SEED_TEXTS = {
    "cb": "### Premise:He ran to the station. ### Hypothesis:He moved. ### Relationship (entailment, contradiction "
    "or neutral):entailment",
    "boolq": "Read the Passage and answer the Question with true or false ### Question:can fish swim ### Passage: "
    "Most fish swim using their fins. ### Answer:true",
    "copa": "### Premise:My body cast a shadow over the grass. ### Choice1:The sun was rising. ### Choice2:The grass "
    "was cut. ### Question:cause ### Choice:Choice1",
    "qnli": "### Premise:What came into force after the new constitution was herald? ### Hypothesis:As of that day, "
    "the new constitution heralding the Second Republic came into force. ### Relationship (choose between "
    "'entailment' and 'not entailment'):entailment",
    "race": "Read Context and answer question ### Context:The sky is blue. A dog has four legs. ### Question:What "
    "colour is the sky? ### Options:A.red. B.blue. C.green. D.black### Choice:B",
    "20ng": "### Sentence:The new graphics card renders fast. ### Class:comp.graphics",
}


@pytest.mark.parametrize("task", sorted(SEED_TEXTS))
def test_seed_prompt_formats_character_for_character(task):
    data = load_task(TASKS[task], FIXTURES / task, n_train=10, n_test=10)
    assert data.test[0].text == SEED_TEXTS[task]
    assert data.test[0].prompt + data.test[0].label == SEED_TEXTS[task]
    assert data.test[0].prompt.endswith(":")


def test_official_splits_clean_records_and_counts():
    cb = load_task(TASKS["cb"], FIXTURES / "cb", n_train=10, n_test=10)
    assert [e.label for e in cb.train] == ["entailment", "contradiction", "neutral"]  # the empty premise dropped
    assert [e.label for e in cb.test] == ["entailment", "contradiction"]  # integer labels 0, 1
    assert cb.note == "train from train.jsonl, test from val.jsonl"
    first = load_task(TASKS["cb"], FIXTURES / "cb", n_train=2, n_test=1)
    assert [e.uid for e in first.train] == ["cb:0", "cb:1"] and len(first.test) == 1
    boolq = load_task(TASKS["boolq"], FIXTURES / "boolq", 10, 10)
    assert [e.label for e in boolq.train] == ["true", "false"]  # JSON booleans
    race = load_task(TASKS["race"], FIXTURES / "race", 10, 10)
    assert race.labels == ("A", "B", "C", "D") and "dev/high" in race.note
    news = load_task(TASKS["20ng"], FIXTURES / "20ng", 10, 10)
    assert news.labels == ("comp.graphics", "rec.sport.baseball", "rec.sport.hockey") and len(news.test) == 2


def test_20ng_folder_tree(tmp_path):
    for group, text in (("sci.space", "The orbit decayed."), ("rec.autos", "New brakes.")):
        (tmp_path / "test" / group).mkdir(parents=True)
        (tmp_path / "test" / group / "1001").write_text(text)
    data = load_task(TASKS["20ng"], tmp_path, 10, 10)
    assert {(e.prompt, e.label) for e in data.test} == {
        ("### Sentence:New brakes. ### Class:", "rec.autos"),
        ("### Sentence:The orbit decayed. ### Class:", "sci.space"),
    }


def test_only_a_validation_split_is_split_with_a_fixed_seed():
    a = load_task(TASKS["copa"], FIXTURES / "copa", n_train=10, n_test=2, seed=0)
    b = load_task(TASKS["copa"], FIXTURES / "copa", n_train=10, n_test=2, seed=0)
    assert [e.uid for e in a.test] == [e.uid for e in b.test]
    assert sorted(e.uid for e in a.train + a.test) == [f"copa:{i}" for i in range(4)]
    assert not {e.uid for e in a.train} & {e.uid for e in a.test}
    assert "split with seed 0 into 2 train / 2 test" in a.note


def test_llm_foundry_records_recover_the_seed_fields():
    boolq = read_records(FIXTURES / "boolq_foundry.jsonl")[0]
    assert parse_boolq(boolq) == {
        "question": "is ice hot",
        "passage": "Ice is frozen water and is cold.",
        "label": "false",
    }
    effect, cause = read_records(FIXTURES / "copa_foundry.jsonl")
    assert parse_copa(effect) == {
        "premise": "The man turned on the faucet.",
        "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.",
        "question": "effect",
        "label": "Choice2",
    }
    assert parse_copa(cause)["question"] == "cause" and parse_copa(cause)["label"] == "Choice1"


def test_user_task_from_csv():
    data = load_user_task(
        FIXTURES / "user_task.csv",
        "### Review:{review} ### Sentiment:",
        "stars",
        parse_label_words("1=negative,5=positive"),
        n_train=10,
        n_test=2,
    )
    assert data.labels == ("negative", "positive")
    assert len(data.test) == 2 and len(data.train) == 4
    texts = {e.text for e in data.train + data.test}
    assert "### Review:A great, moving film. ### Sentiment:positive" in texts
    assert parse_label_words("neg,pos") == {"neg": "neg", "pos": "pos"}


def test_user_task_errors_name_the_problem(tmp_path):
    with pytest.raises(TaskDataError, match=r"no field \['text'\]"):
        load_user_task(FIXTURES / "user_task.csv", "### {text}:", "stars", {"1": "neg"}, 10, 2)
    with pytest.raises(TaskDataError, match="names no fields"):
        load_user_task(FIXTURES / "user_task.csv", "### Review:", "stars", {"1": "neg"}, 10, 2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskDataError, match="no records"):
        load_user_task(empty, "{text}:", "label", {"a": "a"}, 10, 2)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "label": "a"}\nnot json\n')
    with pytest.raises(RecordFormatError, match="line 2"):
        load_user_task(broken, "{text}:", "label", {"a": "a"}, 10, 2)


def test_wrong_format_and_missing_splits(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"sentence": "no premise here", "label": 0}\n')
    with pytest.raises(TaskDataError, match="no clean records"):
        load_task(TASKS["cb"], tmp_path, 10, 10)
    (tmp_path / "only-train").mkdir()
    (tmp_path / "only-train" / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n')
    with pytest.raises(TaskDataError, match="no evaluation split"):
        load_task(TASKS["cb"], tmp_path / "only-train", 10, 10)
    with pytest.raises(TaskDataError, match="does not exist"):
        load_task(TASKS["cb"], tmp_path / "nope", 10, 10)


def test_alpaca_prompt_and_mmlu_round_robin(tmp_path):
    assert alpaca_prompt({"instruction": "Add 2 and 3.", "input": ""}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert alpaca_prompt({"instruction": "Translate.", "input": "Hallo"}).endswith(
        "### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:\n"
    )
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(
        "\n".join(
            f'{{"subject": "{s}", "input": "Q{i}\\nAnswer:", "output": "{"ABCD"[i % 4]}"}}'
            for i, s in enumerate(["x", "x", "x", "y", "y", "z"])
        )
    )
    assert [it.subject for it in load_mmlu(mmlu, 4)] == ["x", "x", "y", "z"]
    assert len(load_mmlu(mmlu)) == 6


def test_shared_copies_load():
    need_shared(SHARED_DATA / "tasks", SHARED_DATA / "instruct" / "alpaca_en_demo.json")
    for task, n_test in (("cb", 56), ("boolq", 5), ("copa", 5), ("qnli", 5)):
        data = load_task(TASKS[task], SHARED_DATA / "tasks" / task, n_train=5, n_test=n_test)
        assert len(data.test) == n_test and all(e.label in TASKS[task].labels for e in data.train + data.test)
    assert len(load_alpaca(SHARED_DATA / "instruct" / "alpaca_en_demo.json", 3)) == 3
