"""docs/requests.md and its example files: the examples load and bench on a tiny model, and the page documents
every field a kvedit-format record may have."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import BenchError
from kvedit.bench.harness import Bench
from kvedit.data.loaders import DatasetError, detect_format, load_requests
from kvedit.data.requests import EditRequest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "requests.md"
FACTS = ROOT / "examples" / "my_facts.json"
QUESTIONS = ROOT / "examples" / "my_questions.jsonl"


def test_the_page_documents_every_field_and_links_the_examples():
    text = DOC.read_text()
    table = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", text, flags=re.MULTILINE)}
    assert table >= {f.name for f in fields(EditRequest)}
    for example in (FACTS, QUESTIONS):
        assert f"](../examples/{example.name})" in text and example.exists()


def test_the_examples_load_in_kvedit_format_with_neighbours_sharing_the_true_object():
    facts, questions = load_requests(FACTS), load_requests(QUESTIONS)
    assert detect_format(FACTS) == detect_format(QUESTIONS) == "kvedit"
    assert [r.case_id for r in facts] == ["golden-gate", "victor-hugo", "tokyo"]
    assert all(r.target_true and r.paraphrase_prompts and r.neighborhood_prompts for r in facts)
    assert all(r.target_true is None and r.neighborhood_target for r in questions)
    assert facts[0].rewrite_prompt == "The Golden Gate Bridge is located in the city of"


def test_my_facts_benches_as_counterfact_on_a_tiny_model(tiny_llama, tmp_path):
    out = tmp_path / "facts"
    summary = Bench(tiny_llama, BenchConfig(dataset=str(FACTS), methods=("ft-keys",)), out, progress=False).run()
    assert summary["complete"] and summary["suite"] == "counterfact"
    run = summary["runs"]["ft-keys"]
    assert run["n"] == 3 and run["metrics"]["score"]["count"] == 3  # every record has all three groups
    assert (out / "table.md").read_text().startswith("my_facts.json, CounterFact metrics on ")


def test_my_questions_bench_as_zsre_only_when_asked(tiny_llama, tmp_path):
    with pytest.raises(BenchError, match="case 'fuji' has no target_true.*--suite zsre"):
        Bench(tiny_llama, BenchConfig(dataset=str(QUESTIONS), methods=("ft-keys",)), tmp_path / "a", progress=False)
    summary = Bench(
        tiny_llama,
        BenchConfig(dataset=str(QUESTIONS), methods=("ft-keys",), suite="zsre"),
        tmp_path / "b",
        progress=False,
    ).run()
    assert summary["suite"] == "zsre" and summary["runs"]["ft-keys"]["metrics"]["score"]["count"] == 2


def test_a_record_with_an_unknown_field_is_an_error_naming_it(tmp_path):
    record = json.loads(FACTS.read_text())[0] | {"neighbours": ["The Presidio is in"]}
    path = tmp_path / "typo.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match=r"record 0: .*unknown key\(s\) \['neighbours'\]"):
        load_requests(path)
