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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loaders import DatasetError, PathLike, load_counterfact, read_records
from .fields import RecordProblem, field, strings
from .requests import EditRequest, RequestError

__all__ = [
    "PORTABILITY_KINDS",
    "PROPAGATION_FORMATS",
    "Hop",
    "MquakeCase",
    "PortabilityCase",
    "Probe",
    "detect_propagation_format",
    "load_counterfact_portability",
    "load_knowedit",
    "load_mquake",
    "load_propagation",
    "load_zsre_portability",
]

PROPAGATION_FORMATS: tuple[str, ...] = ("counterfact-portability", "zsre-portability", "knowedit", "mquake")
#: probe kinds: the one-hop question of the portability files, and KnowEdit's three portability kinds
PORTABILITY_KINDS: tuple[str, ...] = ("one_hop", "reasoning", "subject_aliasing", "logical_generalization")
_KNOWEDIT_KINDS: Mapping[str, str] = {
    "Reasoning": "reasoning", "Subject_Aliasing": "subject_aliasing", "Logical_Generalization": "logical_generalization",
}


@dataclass(frozen=True)
class Probe:
    """A question and its expected answer(s): `answers[0]` is the answer scored teacher-forced, the rest are
    accepted aliases. `kind` is one of `PORTABILITY_KINDS` or ``"relation_specificity"`` (locality)."""

    kind: str
    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass(frozen=True)
class PortabilityCase:
    """One edit (`request`) with the probes that judge whether it propagates.

    portability: questions whose answer should follow the edit (kinds from `PORTABILITY_KINDS`).
    locality: KnowEdit's relation-specificity probes (other relations of the same subject, whose true answer
        must survive the edit); empty for the portability files, whose neighborhood prompts are on `request`.
    true_answers: the unedited fact's answer(s) (zsRE/KnowEdit may list several); empty when unknown.
    recalled_relation: the portability files' ``Recalled Relation`` triple, as text (None for KnowEdit).
    """

    request: EditRequest
    portability: tuple[Probe, ...]
    locality: tuple[Probe, ...] = ()
    true_answers: tuple[str, ...] = ()
    recalled_relation: str | None = None

    @property
    def case_id(self) -> str | int | None:
        return self.request.case_id


@dataclass(frozen=True)
class Hop:
    """One single-hop fact of an MQuAKE chain: `question`, `cloze` statement, `answers` (answer + aliases)."""

    question: str
    cloze: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class MquakeCase:
    """An MQuAKE case: `requests` are applied together (MQuAKE-hard: 4), then `questions` (3 phrasings of the
    multi-hop question) should be answered with `new_answers` (new_answer + aliases) instead of `answers`.

    edit_questions[j]: the question form of `requests[j]` (its single-hop probe);
    edit_answers[j]: target_new of `requests[j]` with its aliases from the matching new single hop.
    """

    case_id: str | int
    requests: tuple[EditRequest, ...]
    edit_questions: tuple[str, ...]
    edit_answers: tuple[tuple[str, ...], ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    new_answers: tuple[str, ...]
    single_hops: tuple[Hop, ...]
    new_single_hops: tuple[Hop, ...]


# ---------------------------------------------------------------- field helpers


def _template(text: str, subject: str, field: str) -> str:
    """`text` with its first `subject` replaced by ``{}``; a `RequestError` (skippable) when it lacks it."""
    if not subject.strip():
        raise RecordProblem("key 'subject' is empty; expected the entity to edit")
    if subject not in text:  # locate-then-edit methods need the subject's tokens in the prompt
        raise RequestError(f"subject {subject!r} does not occur in {field} {text!r}")
    return text.replace(subject, "{}", 1)


# ---------------------------------------------------------------- record converters


def _one_hop(record: Mapping[str, Any]) -> tuple[tuple[Probe, ...], str | None]:
    question = field(record, "portability.New Question")
    answer = field(record, "portability.New Answer")
    if not question.strip() or not answer.strip():
        raise RecordProblem("key 'portability.New Question' or 'portability.New Answer' is empty")
    relation = record["portability"].get("Recalled Relation")
    return (Probe("one_hop", question, (answer,)),), relation if isinstance(relation, str) else None


def _from_counterfact_portability(record: Mapping[str, Any], index: int, request: EditRequest) -> PortabilityCase:
    probes, relation = _one_hop(record)
    return PortabilityCase(request, probes, true_answers=(request.target_true or "",), recalled_relation=relation)


def _from_zsre_portability(record: Mapping[str, Any], index: int) -> PortabilityCase:
    probes, relation = _one_hop(record)
    alt = field(record, "alt")
    if not alt.strip():
        raise RecordProblem("key 'alt' is empty; expected the new answer the edit writes")
    subject, answers = field(record, "subject"), strings(record, "answers")
    if not answers:
        raise RecordProblem("key 'answers' is empty; expected the true answer(s)")
    # EasyEdit's zsRE edit (target_new = alt, ground truth = answers[0]); neighborhood as kvedit's zsRE loader
    request = EditRequest(
        prompt=_template(field(record, "src"), subject, "src"), subject=subject, target_new=alt,
        target_true=None if answers[0].strip() == alt.strip() else answers[0],
        paraphrase_prompts=(field(record, "rephrase"),), neighborhood_prompts=(field(record, "loc") + "?",),
        neighborhood_target=field(record, "loc_ans"), case_id=index,
    )
    return PortabilityCase(request, probes, true_answers=answers, recalled_relation=relation)


def _probe_list(record: Mapping[str, Any], dotted: str, kind: str) -> tuple[Probe, ...]:
    probes = []
    for j, item in enumerate(field(record, dotted, list)):
        where = f"{dotted}[{j}]"
        if not isinstance(item, dict):
            raise RecordProblem(f"key {where!r} should be an object with 'prompt' and 'ground_truth', "
                                 f"got {type(item).__name__}")
        try:
            prompt = field(item, "prompt")
        except RecordProblem as e:
            raise RecordProblem(f"{where}: {e}") from None
        truth = item.get("ground_truth")
        answers = (truth,) if isinstance(truth, str) else tuple(truth) if isinstance(truth, list) else ()
        # nested lists (KnowEdit's counterfact split: [["a", "alias"]]) flatten to answer + aliases
        answers = tuple(a for x in answers for a in ((x,) if isinstance(x, str) else x if isinstance(x, list) else (x,)))
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise RecordProblem(f"key '{where}.ground_truth' should be a non-empty string or list of strings, "
                                 f"got {truth!r:.80}")
        probes.append(Probe(kind, prompt, answers))
    return tuple(probes)


def _from_knowedit(record: Mapping[str, Any], index: int) -> PortabilityCase:
    subject, prompt = field(record, "subject"), field(record, "prompt")
    truth = strings(record, "ground_truth") if isinstance(record.get("ground_truth"), list) \
        else (field(record, "ground_truth"),)
    if not truth:
        raise RecordProblem("key 'ground_truth' is empty; expected the unedited answer(s)")
    target_new = field(record, "target_new")
    portability: list[Probe] = []
    sections = field(record, "portability", dict)
    for key in sections:
        if key not in _KNOWEDIT_KINDS:
            raise RecordProblem(f"unknown portability kind {key!r}; expected some of {sorted(_KNOWEDIT_KINDS)}")
        portability += _probe_list(record, f"portability.{key}", _KNOWEDIT_KINDS[key])
    locality = record.get("locality") or {}
    relation = _probe_list(record, "locality.Relation_Specificity", "relation_specificity") \
        if "Relation_Specificity" in locality else ()
    request = EditRequest(
        prompt=_template(prompt, subject, "prompt"),
        subject=subject,
        target_new=target_new,
        target_true=None if truth[0].strip() == target_new.strip() else truth[0],
        paraphrase_prompts=(field(record, "rephrase_prompt"),) if "rephrase_prompt" in record else (),
        case_id=record["case_id"] if isinstance(record.get("case_id"), (int, str)) else index,
    )
    return PortabilityCase(request, tuple(portability), relation, true_answers=truth)


def _aliases(record: Mapping[str, Any], answer_key: str, alias_key: str) -> tuple[str, ...]:
    answer = field(record, answer_key)
    aliases = strings(record, alias_key) if alias_key in record else ()
    return (answer, *aliases)


def _hops(record: Mapping[str, Any], key: str) -> tuple[Hop, ...]:
    hops = []
    for j, item in enumerate(field(record, key, list)):
        if not isinstance(item, dict):
            raise RecordProblem(f"key '{key}[{j}]' should be an object, got {type(item).__name__}")
        try:
            hops.append(Hop(field(item, "question"), field(item, "cloze"), _aliases(item, "answer", "answer_alias")))
        except RecordProblem as e:
            raise RecordProblem(f"{key}[{j}]: {e}") from None
    return tuple(hops)


def _from_mquake(record: Mapping[str, Any], index: int) -> MquakeCase:
    case_id = field(record, "case_id", (int, str))
    rewrites = field(record, "requested_rewrite", list)
    if not rewrites:
        raise RecordProblem("key 'requested_rewrite' is empty; expected the case's edits")
    questions = strings(record, "questions")
    if not questions:
        raise RecordProblem("key 'questions' is empty; expected the multi-hop question(s)")
    new_hops = _hops(record, "new_single_hops")
    by_question = {hop.question: hop for hop in new_hops}
    requests, edit_questions, edit_answers = [], [], []
    for j, rewrite in enumerate(rewrites):
        key = f"requested_rewrite[{j}]"
        if not isinstance(rewrite, dict):
            raise RecordProblem(f"key {key!r} should be an object, got {type(rewrite).__name__}")
        try:
            question = field(rewrite, "question")
            target_new = field(rewrite, "target_new.str")
            relation, target_id = rewrite.get("relation_id"), rewrite.get("target_new", {}).get("id")
            request = EditRequest(
                prompt=field(rewrite, "prompt"), subject=field(rewrite, "subject"), target_new=target_new,
                target_true=field(rewrite, "target_true.str"), case_id=f"{case_id}/{j}",
                attribute=f"{relation}/{target_id}" if relation and target_id else None,
            )
        except RecordProblem as e:
            raise RecordProblem(f"{key}: {e}") from None
        except RequestError as e:
            raise RequestError(f"{key}: {e}") from None
        hop = by_question.get(question)
        requests.append(request)
        edit_questions.append(question)
        edit_answers.append(hop.answers if hop is not None and hop.answers[0] == target_new else (target_new,))
    return MquakeCase(
        case_id=case_id, requests=tuple(requests), edit_questions=tuple(edit_questions),
        edit_answers=tuple(edit_answers), questions=questions,
        answers=_aliases(record, "answer", "answer_alias"),
        new_answers=_aliases(record, "new_answer", "new_answer_alias"),
        single_hops=_hops(record, "single_hops"), new_single_hops=new_hops,
    )


_CONVERTERS: Mapping[str, Callable[[Mapping[str, Any], int], Any] | None] = {
    "counterfact-portability": None,  # needs the record's EditRequest from `load_counterfact`, see `_convert`
    "zsre-portability": _from_zsre_portability,
    "knowedit": _from_knowedit,
    "mquake": _from_mquake,
}


# ---------------------------------------------------------------- loading


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
            convert = _CONVERTERS[fmt]
            if convert is None:
                request = requests.get(field(record, "case_id", (int, str)))
                if request is None:  # load_counterfact skipped it (and said so)
                    continue
                case = _from_counterfact_portability(record, index, request)
            else:
                case = convert(record, index)
            if case.case_id in seen:
                raise RecordProblem(f"case_id {case.case_id!r} was already used by record {seen[case.case_id]}; "
                                     "every case needs its own id")
            seen[case.case_id] = index
            cases.append(case)
        except RecordProblem as e:
            raise DatasetError(f"{where}: {e}") from None
        except RequestError as e:
            if not skip_invalid:
                raise DatasetError(f"{where}: invalid edit request: {e} (skip_invalid=True leaves such records "
                                   "out with a warning)") from e
            skipped.append(index)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} record(s) that cannot be edit requests: {shown}", stacklevel=3)
    return cases


def _detect(path: Path, first: Any) -> str:
    if not isinstance(first, dict):
        raise DatasetError(f"{path} record 0: expected a JSON object, got {type(first).__name__}")
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
    raise DatasetError(
        f"{path} record 0: cannot tell the propagation format from its keys {sorted(keys)}; supported: "
        "'counterfact-portability' (dict 'requested_rewrite' + 'portability'), 'zsre-portability' ('src', 'alt', "
        "'answers', 'portability'), 'knowedit' ('subject', 'target_new', 'prompt', 'ground_truth', 'portability'), "
        "'mquake' (list 'requested_rewrite', 'questions', 'new_answer'); pass format= to force one"
    )


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
    if format != "auto" and format not in _CONVERTERS:
        raise DatasetError(f"unknown format {format!r}; expected 'auto' or one of {list(PROPAGATION_FORMATS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    path = Path(path)
    records = read_records(path, limit)
    if not records:
        return []
    fmt = _detect(path, records[0]) if format == "auto" else format
    return _convert(path, records, fmt, skip_invalid)


def load_counterfact_portability(path: PathLike, limit: int | None = None, *,
                                 skip_invalid: bool = False) -> list[PortabilityCase]:
    """CounterFact + one-hop portability (EasyEdit's ``counterfact_portability_gpt4.json``)."""
    return load_propagation(path, "counterfact-portability", limit, skip_invalid=skip_invalid)


def load_zsre_portability(path: PathLike, limit: int | None = None, *,
                          skip_invalid: bool = False) -> list[PortabilityCase]:
    """MEND zsRE + one-hop portability (``zsre_mend_eval_portability_gpt4.json``): target_new = alt."""
    return load_propagation(path, "zsre-portability", limit, skip_invalid=skip_invalid)


def load_knowedit(path: PathLike, limit: int | None = None, *, skip_invalid: bool = False) -> list[PortabilityCase]:
    """KnowEdit (``benchmark_ZsRE_ZsRE-test-all.json`` and files of its format)."""
    return load_propagation(path, "knowedit", limit, skip_invalid=skip_invalid)


def load_mquake(path: PathLike, limit: int | None = None, *, skip_invalid: bool = False) -> list[MquakeCase]:
    """MQuAKE (``MQuAKE-hard.json``, ``MQuAKE-CF-3k-v2.json``, ``MQuAKE-T.json``)."""
    return load_propagation(path, "mquake", limit, skip_invalid=skip_invalid)
