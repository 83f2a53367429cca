"""Tests for kvedit.data.loaders on small fixtures and the shared editing datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SHARED_DATA, need_shared

from kvedit.data import (
    DatasetError,
    EditRequest,
    load_counterfact,
    load_easyedit_counterfact,
    load_requests,
    load_zsre,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_CF = SHARED_DATA / "editing" / "counterfact" / "counterfact-edit-1k.json"
SHARED_ZSRE = SHARED_DATA / "editing" / "zsre" / "zsre_mend_train-1k.json"

FIXTURE_FILES = {
    "counterfact": FIXTURES / "counterfact_small.json",
    "easyedit": FIXTURES / "easyedit_cf_small.json",
    "zsre": FIXTURES / "zsre_small.json",
    "kvedit": FIXTURES / "kvedit_requests.json",
}
FIXTURE_COUNTS = {"counterfact": 4, "easyedit": 3, "zsre": 3, "kvedit": 2}

# the shared copies: skipped when missing, a failure under CI (helpers.need_shared)
needs_cf = pytest.mark.usefixtures("shared_cf")
needs_zsre = pytest.mark.usefixtures("shared_zsre")


@pytest.fixture
def shared_cf() -> Path:
    return need_shared(SHARED_CF)


@pytest.fixture
def shared_zsre() -> Path:
    return need_shared(SHARED_ZSRE)


def _records(fmt: str) -> list[dict]:
    return json.loads(FIXTURE_FILES[fmt].read_text())


def _write(path: Path, records: list, jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=2))
    return path


# ---------------------------------------------------------------- field mapping


def test_counterfact_field_mapping() -> None:
    reqs = load_counterfact(FIXTURE_FILES["counterfact"])
    assert len(reqs) == 4
    assert reqs[0] == EditRequest(
        prompt="{} was founded in the city of",
        subject="Fjordlight Bakery",
        target_new="Lisbon",
        target_true="Oslo",
        paraphrase_prompts=(
            "The guild met twice that winter. Fjordlight Bakery was established in",
            "Fjordlight Bakery first opened its doors in",
        ),
        neighborhood_prompts=(
            "Nordvik Shipping was founded in the city of",
            "Kaldera Records was founded in the city of",
        ),
        generation_prompts=("Fjordlight Bakery's bread is famous because", "The story of Fjordlight Bakery begins"),
        neighborhood_target=None,
        case_id=0,
        attribute="P740/Q597",  # relation_id/target_new id: the key of its attribute snippets
    )
    assert [r.case_id for r in reqs] == [0, 7, 12, 20]
    assert reqs[1].rewrite_prompt == "The mother tongue of Marta Velloso is"


def test_easyedit_field_mapping() -> None:
    reqs = load_easyedit_counterfact(FIXTURE_FILES["easyedit"])
    assert reqs[0] == EditRequest(
        prompt="{} works in the field of",
        subject="Harlow Pennick",
        target_new="astronomy",
        target_true="botany",
        paraphrase_prompts=("The research of Harlow Pennick is about",),
        neighborhood_prompts=("Odile Marchetti works in the field of",),
        neighborhood_target=None,  # locality_ground_truth == ground_truth
        case_id=501,
    )
    # subject in the middle of the prompt; locality answer differs from ground_truth
    assert reqs[1].prompt == "The capital city of {} is"
    assert reqs[1].neighborhood_target == "Millhaven"
    assert reqs[2].neighborhood_target is None


def test_zsre_field_mapping() -> None:
    reqs = load_zsre(FIXTURE_FILES["zsre"])
    assert reqs[0] == EditRequest(
        prompt="In which county is {} located?",
        subject="Pellinor Abbey",
        target_new="Kentshire",  # answers[0], as the MEMIT reference
        target_true=None,
        paraphrase_prompts=("Which county contains Pellinor Abbey?",),
        neighborhood_prompts=("nq question: who painted the ceiling of the old library?",),
        neighborhood_target="Ada Rensford",
        case_id=0,
    )
    assert [r.case_id for r in reqs] == [0, 1, 2]
    assert reqs[2].prompt == "Who is the author of {}?"


def test_kvedit_round_trip() -> None:
    reqs = load_requests(FIXTURE_FILES["kvedit"])
    assert [r.to_dict() for r in reqs] == _records("kvedit")
    assert reqs[0].paraphrase_prompts == ("The walls of The Lantern Spire are built from",)


# ---------------------------------------------------------------- detection, limit, JSONL


@pytest.mark.parametrize("fmt", sorted(FIXTURE_FILES))
def test_auto_detection_matches_explicit_format(fmt: str) -> None:
    auto = load_requests(FIXTURE_FILES[fmt])
    assert len(auto) == FIXTURE_COUNTS[fmt]
    assert auto == load_requests(FIXTURE_FILES[fmt], format=fmt)


@pytest.mark.parametrize("fmt", sorted(FIXTURE_FILES))
def test_jsonl_gives_same_requests(fmt: str, tmp_path: Path) -> None:
    path = _write(tmp_path / f"{fmt}.jsonl", _records(fmt), jsonl=True)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are ignored
    assert load_requests(path) == load_requests(FIXTURE_FILES[fmt])


def test_limit() -> None:
    assert [r.case_id for r in load_counterfact(FIXTURE_FILES["counterfact"], limit=2)] == [0, 7]
    assert load_zsre(FIXTURE_FILES["zsre"], limit=0) == []
    assert len(load_requests(FIXTURE_FILES["easyedit"], limit=10)) == 3
    with pytest.raises(ValueError, match="limit"):
        load_zsre(FIXTURE_FILES["zsre"], limit=-1)


def test_limit_jsonl(tmp_path: Path) -> None:
    path = _write(tmp_path / "cf.jsonl", _records("counterfact"), jsonl=True)
    assert [r.case_id for r in load_requests(path, limit=3)] == [0, 7, 12]


def test_forced_format_wrong_for_file() -> None:
    with pytest.raises(DatasetError, match=r"record 0 \(case_id 501\): missing key 'requested_rewrite'"):
        load_requests(FIXTURE_FILES["easyedit"], format="counterfact")
    with pytest.raises(DatasetError, match="unknown format 'rome'.*counterfact"):
        load_requests(FIXTURE_FILES["easyedit"], format="rome")


def test_empty_list(tmp_path: Path) -> None:
    assert load_requests(_write(tmp_path / "empty.json", [])) == []


# ---------------------------------------------------------------- shared datasets


@needs_cf
def test_shared_easyedit_counterfact_all_load() -> None:
    reqs = load_easyedit_counterfact(SHARED_CF)
    assert len(reqs) == 1000
    first = json.loads(SHARED_CF.read_text())[0]
    assert reqs[0].rewrite_prompt == first["prompt"]
    assert reqs[0].case_id == first["case_id"]
    assert all(r.prompt.count("{}") == 1 and r.target_true for r in reqs)
    assert load_requests(SHARED_CF, limit=5) == reqs[:5]


@needs_zsre
def test_shared_zsre_all_records_map() -> None:
    # Three records ("Is {} a male or female?" -> "female", ...) state their answer in the
    # question, which EditRequest.validate rejects; strict loading names the first.
    with pytest.raises(DatasetError, match=r"zsre_mend_train-1k\.json record 204: .*'female'"):
        load_zsre(SHARED_ZSRE)
    with pytest.warns(UserWarning, match=r"skipped 3 record\(s\).*204, 656, 725"):
        reqs = load_zsre(SHARED_ZSRE, skip_invalid=True)
    assert len(reqs) == 997
    assert [r.case_id for r in reqs if r.case_id >= 203][:4] == [203, 205, 206, 207]
    assert all(r.target_true is None and r.neighborhood_prompts[0].endswith("?") for r in reqs)


@needs_zsre
def test_shared_zsre_auto_detect_and_limit() -> None:
    reqs = load_requests(SHARED_ZSRE, limit=200)
    assert len(reqs) == 200
    assert reqs == load_zsre(SHARED_ZSRE, limit=200)


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.json: no such file"):
        load_requests(tmp_path / "nope.json")


def test_truncated_json_names_record(tmp_path: Path) -> None:
    text = FIXTURE_FILES["counterfact"].read_text()
    cut = text.index('"case_id": 12')  # inside record 2
    path = tmp_path / "counterfact.json"
    path.write_text(text[: cut + 20])
    with pytest.raises(DatasetError, match=r"counterfact\.json record 2: invalid JSON at line \d+.*truncated"):
        load_counterfact(path)
    path.write_text(text[: text.rindex("{", 0, text.index('"case_id": 7'))])  # ends after "record 0,"
    with pytest.raises(DatasetError, match=r"record 1: invalid JSON"):
        load_requests(path)
    path.write_text(text.rstrip().rstrip("]"))  # all records, no closing bracket
    with pytest.raises(DatasetError, match=r"record 3: file ends after this record"):
        load_counterfact(path)


def test_invalid_jsonl_line_names_record(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in _records("zsre")]
    path = tmp_path / "zsre.jsonl"
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2][:40] + "\n")
    with pytest.raises(DatasetError, match=r"zsre\.jsonl record 2 \(line 4\): invalid JSON"):
        load_zsre(path)


def test_missing_nested_key_names_record_and_case_id(tmp_path: Path) -> None:
    records = _records("counterfact")
    del records[3]["requested_rewrite"]["subject"]
    path = _write(tmp_path / "counterfact.json", records)
    with pytest.raises(DatasetError) as info:
        load_counterfact(path)
    msg = str(info.value)
    assert "counterfact.json record 3 (case_id 20): missing key 'requested_rewrite.subject'" in msg


def test_wrong_type_names_key(tmp_path: Path) -> None:
    records = _records("counterfact")
    records[1]["paraphrase_prompts"] = "just one string"
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 7\): key 'paraphrase_prompts' should be list"):
        load_counterfact(_write(tmp_path / "cf.json", records))


def test_missing_key_easyedit(tmp_path: Path) -> None:
    records = _records("easyedit")
    del records[2]["locality_ground_truth"]
    with pytest.raises(DatasetError, match=r"record 2 \(case_id 503\): missing key 'locality_ground_truth'"):
        load_easyedit_counterfact(_write(tmp_path / "ee.json", records))


def test_subject_not_in_src(tmp_path: Path) -> None:
    records = _records("zsre")
    records[1]["subject"] = "Saint Brevus"
    with pytest.raises(DatasetError, match=r"zs\.json record 1: subject 'Saint Brevus' does not occur in src"):
        load_zsre(_write(tmp_path / "zs.json", records))


def test_request_validation_error_is_dataset_error(tmp_path: Path) -> None:
    records = _records("counterfact")
    records[2]["requested_rewrite"]["target_new"]["str"] = "midfielder"  # same as target_true
    path = _write(tmp_path / "cf.json", records)
    with pytest.raises(DatasetError, match=r"record 2 \(case_id 12\): invalid edit request: .*nothing to edit"):
        load_counterfact(path)
    with pytest.warns(UserWarning, match="skipped 1 record"):
        assert [r.case_id for r in load_counterfact(path, skip_invalid=True)] == [0, 7, 20]


def test_record_not_an_object(tmp_path: Path) -> None:
    records: list = _records("kvedit")
    records.append(["prompt", "subject"])
    with pytest.raises(DatasetError, match=r"record 2: expected a JSON object, got list"):
        load_requests(_write(tmp_path / "kv.json", records), format="kvedit")


def test_unknown_format_lists_formats_and_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "qna.json", [{"case_index": 0, "question": "Who?", "answer": "Me"}])
    with pytest.raises(DatasetError) as info:
        load_requests(path)
    msg = str(info.value)
    assert "qna.json record 0" in msg
    assert "['answer', 'case_index', 'question']" in msg
    for fmt in ("counterfact", "zsre", "easyedit", "kvedit"):
        assert repr(fmt) in msg
