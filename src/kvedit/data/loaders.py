"""Load edit datasets (CounterFact, EasyEdit CounterFact, MEND zsRE, kvedit) as `EditRequest`s.

Every loader takes a path to a JSON list of records or a JSON Lines file (one record per
line) and returns ``list[EditRequest]``. Anything wrong with the file or a record raises
`DatasetError` naming the file, the record index (and case_id if any) and what was expected.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .fields import RecordProblem, field, strings
from .requests import EditRequest, RequestError

__all__ = [
    "DatasetError",
    "SUPPORTED_FORMATS",
    "detect_format",
    "load_counterfact",
    "load_easyedit_counterfact",
    "load_zsre",
    "load_requests",
]

PathLike = str | os.PathLike[str]
SUPPORTED_FORMATS: tuple[str, ...] = ("counterfact", "easyedit", "zsre", "kvedit")


class DatasetError(ValueError):
    """A dataset file, or a record in it, that cannot be read as edit requests."""


# ---------------------------------------------------------------- reading files


def read_records(path: Path, limit: int | None) -> list[Any]:
    """Parse a JSON list or JSON Lines file; stop after `limit` records."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file; expected a dataset as a JSON list or JSON Lines")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the file as UTF-8 text ({e})") from e
    if not text.strip():
        raise DatasetError(f"{path}: file is empty; expected a JSON list of records or JSON Lines")
    if text.lstrip().startswith("["):
        return _parse_json_list(path, text, limit)
    return _parse_json_lines(path, text, limit)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _parse_json_list(path: Path, text: str, limit: int | None) -> list[Any]:
    """Parse ``[rec, rec, ...]`` record by record so errors can name the record."""
    decoder = json.JSONDecoder()
    records: list[Any] = []
    i = _skip_ws(text, 0) + 1  # past '['
    i = _skip_ws(text, i)
    if i < len(text) and text[i] == "]":
        return records
    while limit is None or len(records) < limit:
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path} record {len(records)}: invalid JSON at line {e.lineno} column {e.colno}: "
                f"{e.msg} (truncated file?)"
            ) from None
        records.append(record)
        i = _skip_ws(text, i)
        if i >= len(text):
            raise DatasetError(
                f"{path} record {len(records) - 1}: file ends after this record; expected ',' or ']' (truncated JSON?)"
            )
        if text[i] == "]":
            if _skip_ws(text, i + 1) < len(text):
                raise DatasetError(f"{path}: unexpected data after the closing ']' of the record list")
            break
        if text[i] != ",":
            raise DatasetError(
                f"{path} record {len(records) - 1}: expected ',' or ']' after the record, "
                f"got {text[i]!r} (invalid JSON)"
            )
        i = _skip_ws(text, i + 1)
    return records


def _parse_json_lines(path: Path, text: str, limit: int | None) -> list[Any]:
    """Parse JSON Lines: one record per non-blank line."""
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path} record {len(records)} (line {lineno}): invalid JSON: {e.msg} at column {e.colno}; "
                "expected a JSON list of records or JSON Lines (one JSON object per line)"
            ) from None
    return records


# ---------------------------------------------------------------- record helpers


def _template(text: str, subject: str, field: str) -> str:
    """`text` with the first occurrence of `subject` replaced by ``{}``."""
    if not subject.strip():
        raise RecordProblem("key 'subject' is empty; expected the entity to edit")
    if subject not in text:
        raise RecordProblem(f"subject {subject!r} does not occur in {field} {text!r}; cannot build the template")
    return text.replace(subject, "{}", 1)


def _convert_all(
    path: Path,
    records: list[Any],
    convert: Callable[[Mapping[str, Any], int], EditRequest],
    skip_invalid: bool,
) -> list[EditRequest]:
    """Apply `convert` to each record, turning problems into `DatasetError`s with context."""
    requests: list[EditRequest] = []
    skipped: list[int] = []
    seen: dict[Any, int] = {}  # case_id -> record index
    for index, record in enumerate(records):
        where = f"{path} record {index}"
        if isinstance(record, dict) and record.get("case_id") is not None:
            where += f" (case_id {record['case_id']})"
        try:
            if not isinstance(record, dict):
                raise RecordProblem(f"expected a JSON object, got {type(record).__name__}")
            request = convert(record, index)
            # a record without an id is known by its position in the file: stable across runs
            if request.case_id is None:
                request = replace(request, case_id=index)
            if request.case_id in seen:
                raise RecordProblem(
                    f"case_id {request.case_id!r} was already used by record "
                    f"{seen[request.case_id]}; every case needs its own id"
                )
            seen[request.case_id] = index
            requests.append(request)
        except RecordProblem as e:
            raise DatasetError(f"{where}: {e}") from None
        except RequestError as e:
            if not skip_invalid:
                raise DatasetError(f"{where}: invalid edit request: {e}") from e
            skipped.append(index)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"{path}: skipped {len(skipped)} record(s) that fail EditRequest validation: {shown}",
            stacklevel=3,
        )
    return requests


# ---------------------------------------------------------------- record converters


def _from_counterfact(record: Mapping[str, Any], index: int) -> EditRequest:
    return EditRequest(
        prompt=field(record, "requested_rewrite.prompt"),
        subject=field(record, "requested_rewrite.subject"),
        target_new=field(record, "requested_rewrite.target_new.str"),
        target_true=field(record, "requested_rewrite.target_true.str"),
        paraphrase_prompts=strings(record, "paraphrase_prompts"),
        neighborhood_prompts=strings(record, "neighborhood_prompts"),
        generation_prompts=strings(record, "generation_prompts"),
        case_id=field(record, "case_id", (int, str)),
        attribute=_attribute(record),
    )


def _attribute(record: Mapping[str, Any]) -> str | None:
    rewrite = record.get("requested_rewrite", {})
    relation, target = rewrite.get("relation_id"), rewrite.get("target_new", {}).get("id")
    return f"{relation}/{target}" if relation and target else None


def _from_easyedit(record: Mapping[str, Any], index: int) -> EditRequest:
    subject = field(record, "subject")
    ground_truth = field(record, "ground_truth")
    locality_truth = field(record, "locality_ground_truth")
    return EditRequest(
        prompt=_template(field(record, "prompt"), subject, "prompt"),
        subject=subject,
        target_new=field(record, "target_new"),
        target_true=ground_truth,
        paraphrase_prompts=(field(record, "rephrase_prompt"),),
        neighborhood_prompts=(field(record, "locality_prompt"),),
        neighborhood_target=None if locality_truth.strip() == ground_truth.strip() else locality_truth,
        case_id=field(record, "case_id", (int, str)),
    )


def _from_zsre(record: Mapping[str, Any], index: int) -> EditRequest:
    subject = field(record, "subject")
    answers = strings(record, "answers")
    if not answers:
        raise RecordProblem("key 'answers' is empty; expected at least one answer")
    return EditRequest(
        prompt=_template(field(record, "src"), subject, "src"),
        subject=subject,
        target_new=answers[0],
        target_true=None,
        paraphrase_prompts=(field(record, "rephrase"),),
        neighborhood_prompts=(field(record, "loc") + "?",),
        neighborhood_target=field(record, "loc_ans"),
        case_id=index,
    )


_KVEDIT_FIELDS = frozenset(EditRequest.__dataclass_fields__)
_KVEDIT_REQUIRED = ("prompt", "subject", "target_new")


def _from_kvedit(record: Mapping[str, Any], index: int) -> EditRequest:
    for key in _KVEDIT_REQUIRED:
        field(record, key)
    extra = set(record) - _KVEDIT_FIELDS
    if extra:
        raise RecordProblem(f"unknown key(s) {sorted(extra)}; expected EditRequest fields {sorted(_KVEDIT_FIELDS)}")
    try:
        return EditRequest.from_dict(dict(record))
    except (TypeError, AttributeError) as e:
        raise RecordProblem(f"a field has the wrong type ({e})") from None


_CONVERTERS: Mapping[str, Callable[[Mapping[str, Any], int], EditRequest]] = MappingProxyType(
    {"counterfact": _from_counterfact, "easyedit": _from_easyedit, "zsre": _from_zsre, "kvedit": _from_kvedit}
)


# ---------------------------------------------------------------- public loaders


def _load(path: PathLike, fmt: str, limit: int | None, skip_invalid: bool) -> list[EditRequest]:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    path = Path(path)
    records = read_records(path, limit)
    if fmt == "auto":
        if not records:
            return []
        fmt = _detect_format(path, records[0])
    return _convert_all(path, records, _CONVERTERS[fmt], skip_invalid)


def _detect_format(path: Path, first: Any) -> str:
    """Name the format from the keys of the first record."""
    if not isinstance(first, dict):
        raise DatasetError(f"{path} record 0: expected a JSON object, got {type(first).__name__}")
    keys = set(first)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "answers", "loc"} <= keys:
        return "zsre"
    if {"rephrase_prompt", "ground_truth"} <= keys:
        return "easyedit"
    if set(_KVEDIT_REQUIRED) <= keys <= _KVEDIT_FIELDS:
        return "kvedit"
    if set(_KVEDIT_REQUIRED) <= keys:
        raise DatasetError(
            f"{path} record 0: has kvedit's fields {list(_KVEDIT_REQUIRED)} but also unknown key(s) "
            f"{sorted(keys - _KVEDIT_FIELDS)}; expected only EditRequest fields {sorted(_KVEDIT_FIELDS)} "
            "(docs/requests.md)"
        )
    raise DatasetError(
        f"{path} record 0: cannot tell the dataset format from its keys {sorted(keys)}; supported formats: "
        "'counterfact' (key 'requested_rewrite'), 'zsre' (keys 'src', 'answers', 'loc'), "
        "'easyedit' (keys 'rephrase_prompt', 'ground_truth'), "
        f"'kvedit' (EditRequest fields, at least {list(_KVEDIT_REQUIRED)}); pass format= to force one"
    )


def detect_format(path: PathLike) -> str | None:
    """The format `load_requests(path)` would read the file as (one of `SUPPORTED_FORMATS`), from its first
    record's keys; None for an empty record list."""
    path = Path(path)
    records = read_records(path, 1)
    return _detect_format(path, records[0]) if records else None


def load_counterfact(path: PathLike, limit: int | None = None, *, skip_invalid: bool = False) -> list[EditRequest]:
    """Load ROME/MEMIT CounterFact (`counterfact.json`, `multi_counterfact.json`).

    `attribute_prompts`, `pararel_idx` and `relation_id` have no EditRequest field and are ignored.
    With `skip_invalid`, records failing `EditRequest` validation are skipped with a warning.
    """
    return _load(path, "counterfact", limit, skip_invalid)


def load_easyedit_counterfact(
    path: PathLike, limit: int | None = None, *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Load EasyEdit's CounterFact JSON (prompt with the subject written out)."""
    return _load(path, "easyedit", limit, skip_invalid)


def load_zsre(path: PathLike, limit: int | None = None, *, skip_invalid: bool = False) -> list[EditRequest]:
    """Load MEND zsRE the way the MEMIT reference does (target_new = answers[0], case_id = index)."""
    return _load(path, "zsre", limit, skip_invalid)


def load_requests(
    path: PathLike, format: str = "auto", limit: int | None = None, *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Load any supported dataset; `format` is "auto" (from the first record's keys) or one of
    `SUPPORTED_FORMATS`. An empty record list gives ``[]``."""
    if format != "auto" and format not in _CONVERTERS:
        raise DatasetError(f"unknown format {format!r}; expected 'auto' or one of {list(SUPPORTED_FORMATS)}")
    return _load(path, format, limit, skip_invalid)
