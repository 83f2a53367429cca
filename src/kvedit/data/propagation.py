"""Load the propagation sets — does an edit carry over to questions that use the new fact?

Four formats, each read from any path (the official files or copies of them):

- ``counterfact-portability``: original CounterFact records (`requested_rewrite`, paraphrase, neighborhood and
  generation prompts) plus ``portability`` {``Recalled Relation``, ``New Question``, ``New Answer``}; EasyEdit's
  one-hop portability data.
- ``zsre-portability``: MEND zsRE records (`src`, `alt`, `answers`, `rephrase`, `loc`, `loc_ans`) plus ``cond``
  and ``portability`` as above. The edit is EasyEdit's, not MEMIT's: target_new = ``alt`` (the portability
  question is written around it), target_true = ``answers[0]``.
- ``knowedit``: KnowEdit records (`subject`, `target_new`, `prompt`, `ground_truth` list, `rephrase_prompt`,
  ``locality`` {``Relation_Specificity``: [{prompt, ground_truth}]}, ``portability`` {``Reasoning``,
  ``Subject_Aliasing``, ``Logical_Generalization``}: lists of {prompt, ground_truth}).
- ``mquake``: MQuAKE records (``requested_rewrite``: CounterFact-style edits each with a ``question``;
  ``questions``: phrasings of one multi-hop question; ``answer``/``new_answer`` with aliases; ``single_hops``,
  ``new_single_hops``).

The first three give `PortabilityCase`s (one `EditRequest` and its probes), MQuAKE gives `MquakeCase`s (all of a
case's edits, applied together). Problems raise `DatasetError` naming the file, the record index (and case_id)
and the field, as `data/loaders.py` does; CounterFact's requests come from its `load_counterfact`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fields import RecordProblem, field
from .loaders import DatasetError, PathLike, detect_format, load_counterfact, read_records
from .propagation_records import (
    CONVERTERS,
    PORTABILITY_KINDS,
    PROPAGATION_FORMATS,
    Hop,
    MquakeCase,
    PortabilityCase,
    Probe,
    from_counterfact_portability,
)
from .requests import EditRequest, RequestError

__all__ = [
    "PORTABILITY_KINDS",
    "PROPAGATION_FORMATS",
    "Hop",
    "MquakeCase",
    "PortabilityCase",
    "Probe",
    "case_edits",
    "dataset_format",
    "detect_propagation_format",
    "load_counterfact_portability",
    "load_knowedit",
    "load_mquake",
    "load_propagation",
    "load_zsre_portability",
]


def _convert(path: Path, records: Sequence[Any], fmt: str, skip_invalid: bool) -> list[Any]:
    """Each record through its converter; problems become `DatasetError`s naming the record. CounterFact
    records get their `EditRequest` from `load_counterfact` (which names a bad record itself and, with
    `skip_invalid`, warns about the records it leaves out; their cases are left out too)."""
    requests: dict[Any, EditRequest] = {}
    if fmt == "counterfact-portability":
        requests = {r.case_id: r for r in load_counterfact(path, len(records), skip_invalid=skip_invalid)}
    cases: list[Any] = []
    skipped: list[int] = []
    seen: dict[Any, int] = {}
    for index, record in enumerate(records):
        where = f"{path} record {index}"
        if isinstance(record, dict) and isinstance(record.get("case_id"), (int, str)):
            where += f" (case_id {record['case_id']})"
        try:
            if not isinstance(record, dict):
                raise RecordProblem(f"expected a JSON object, got {type(record).__name__}")
            convert = CONVERTERS[fmt]
            if convert is None:
                request = requests.get(field(record, "case_id", (int, str)))
                if request is None:  # load_counterfact skipped it (and said so)
                    continue
                case = from_counterfact_portability(record, index, request)
            else:
                case = convert(record, index)
            if case.case_id in seen:
                raise RecordProblem(
                    f"case_id {case.case_id!r} was already used by record {seen[case.case_id]}; "
                    "every case needs its own id"
                )
            seen[case.case_id] = index
            cases.append(case)
        except RecordProblem as e:
            raise DatasetError(f"{where}: {e}") from None
        except RequestError as e:
            if not skip_invalid:
                raise DatasetError(
                    f"{where}: invalid edit request: {e} (skip_invalid=True leaves such records out with a warning)"
                ) from e
            skipped.append(index)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} record(s) that cannot be edit requests: {shown}", stacklevel=3)
    return cases


def _match(first: Any) -> str | None:
    """The propagation format of a first record, from its keys; None when it is none of them."""
    if not isinstance(first, dict):
        return None
    keys = set(first)
    rewrite = first.get("requested_rewrite")
    if isinstance(rewrite, list) and {"questions", "new_answer"} <= keys:
        return "mquake"
    if isinstance(rewrite, dict) and "portability" in keys:
        return "counterfact-portability"
    if {"src", "alt", "answers", "portability"} <= keys:
        return "zsre-portability"
    if {"subject", "target_new", "prompt", "ground_truth", "portability"} <= keys:
        return "knowedit"
    return None


def _detect(path: Path, first: Any) -> str:
    if not isinstance(first, dict):
        raise DatasetError(f"{path} record 0: expected a JSON object, got {type(first).__name__}")
    found = _match(first)
    if found is None:
        raise DatasetError(
            f"{path} record 0: cannot tell the propagation format from its keys {sorted(first)}; supported: "
            "'counterfact-portability' (dict 'requested_rewrite' + 'portability'), 'zsre-portability' ('src', "
            "'alt', 'answers', 'portability'), 'knowedit' ('subject', 'target_new', 'prompt', 'ground_truth', "
            "'portability'), 'mquake' (list 'requested_rewrite', 'questions', 'new_answer'); pass format= to force one"
        )
    return found


def dataset_format(path: PathLike) -> str | None:
    """The format of any dataset file kvedit reads: one of `PROPAGATION_FORMATS` when its first record has a
    propagation set's keys (checked first: a portability file is also a CounterFact or zsRE file), else one of
    `data.loaders.SUPPORTED_FORMATS` (`detect_format`, which names what it cannot read); None when empty."""
    path = Path(path)
    records = read_records(path, 1)
    if not records:
        return None
    return _match(records[0]) or detect_format(path)


def case_edits(case: Any) -> tuple[EditRequest, ...]:
    """The requests one edit call applies for a bench case: an `EditRequest` is its own, a propagation case
    names them (`PortabilityCase.edits`: its request; `MquakeCase.edits`: all of its requests)."""
    return case.edits if hasattr(case, "edits") else (case,)


def detect_propagation_format(path: PathLike) -> str | None:
    """The format (one of `PROPAGATION_FORMATS`) `load_propagation(path)` reads the file as, from its first
    record's keys; None for an empty record list."""
    path = Path(path)
    records = read_records(path, 1)
    return _detect(path, records[0]) if records else None


def load_propagation(
    path: PathLike, format: str = "auto", limit: int | None = None, *, skip_invalid: bool = False
) -> list[Any]:
    """Load any propagation set: `PortabilityCase`s, or `MquakeCase`s for ``mquake``. `format` is ``"auto"``
    or one of `PROPAGATION_FORMATS`; `limit` keeps the first records; with `skip_invalid`, records that cannot
    be edit requests (e.g. a KnowEdit prompt without its subject) are left out with a warning."""
    if format != "auto" and format not in CONVERTERS:
        raise DatasetError(f"unknown format {format!r}; expected 'auto' or one of {list(PROPAGATION_FORMATS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    path = Path(path)
    records = read_records(path, limit)
    if not records:
        return []
    fmt = _detect(path, records[0]) if format == "auto" else format
    return _convert(path, records, fmt, skip_invalid)


def load_counterfact_portability(
    path: PathLike, limit: int | None = None, *, skip_invalid: bool = False
) -> list[PortabilityCase]:
    """CounterFact + one-hop portability (EasyEdit's ``counterfact_portability_gpt4.json``)."""
    return load_propagation(path, "counterfact-portability", limit, skip_invalid=skip_invalid)


def load_zsre_portability(
    path: PathLike, limit: int | None = None, *, skip_invalid: bool = False
) -> list[PortabilityCase]:
    """MEND zsRE + one-hop portability (``zsre_mend_eval_portability_gpt4.json``): target_new = alt."""
    return load_propagation(path, "zsre-portability", limit, skip_invalid=skip_invalid)


def load_knowedit(path: PathLike, limit: int | None = None, *, skip_invalid: bool = False) -> list[PortabilityCase]:
    """KnowEdit (``benchmark_ZsRE_ZsRE-test-all.json`` and files of its format)."""
    return load_propagation(path, "knowedit", limit, skip_invalid=skip_invalid)


def load_mquake(path: PathLike, limit: int | None = None, *, skip_invalid: bool = False) -> list[MquakeCase]:
    """MQuAKE (``MQuAKE-hard.json``, ``MQuAKE-CF-3k-v2.json``, ``MQuAKE-T.json``)."""
    return load_propagation(path, "mquake", limit, skip_invalid=skip_invalid)
