"""The records of the propagation sets as cases: `Probe`, `PortabilityCase`, `Hop`, `MquakeCase`, and one
converter per format (`CONVERTERS`) from a JSON record to its case (`data/propagation.py` reads the files)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .fields import RecordProblem, field, strings
from .requests import EditRequest, RequestError

PROPAGATION_FORMATS: tuple[str, ...] = ("counterfact-portability", "zsre-portability", "knowedit", "mquake")
#: probe kinds: the one-hop question of the portability files, and KnowEdit's three portability kinds
PORTABILITY_KINDS: tuple[str, ...] = ("one_hop", "reasoning", "subject_aliasing", "logical_generalization")
_KNOWEDIT_KINDS: Mapping[str, str] = {
    "Reasoning": "reasoning",
    "Subject_Aliasing": "subject_aliasing",
    "Logical_Generalization": "logical_generalization",
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

    @property
    def edits(self) -> tuple[EditRequest, ...]:
        """The requests one edit call applies for this case: its one request."""
        return (self.request,)


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

    @property
    def edits(self) -> tuple[EditRequest, ...]:
        """The requests one edit call applies for this case: all of them (a batch; ROME applies them in order)."""
        return self.requests


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


def from_counterfact_portability(record: Mapping[str, Any], index: int, request: EditRequest) -> PortabilityCase:
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
        prompt=_template(field(record, "src"), subject, "src"),
        subject=subject,
        target_new=alt,
        target_true=None if answers[0].strip() == alt.strip() else answers[0],
        paraphrase_prompts=(field(record, "rephrase"),),
        neighborhood_prompts=(field(record, "loc") + "?",),
        neighborhood_target=field(record, "loc_ans"),
        case_id=index,
    )
    return PortabilityCase(request, probes, true_answers=answers, recalled_relation=relation)


def _probe_list(record: Mapping[str, Any], dotted: str, kind: str) -> tuple[Probe, ...]:
    probes = []
    for j, item in enumerate(field(record, dotted, list)):
        where = f"{dotted}[{j}]"
        if not isinstance(item, dict):
            raise RecordProblem(
                f"key {where!r} should be an object with 'prompt' and 'ground_truth', got {type(item).__name__}"
            )
        try:
            prompt = field(item, "prompt")
        except RecordProblem as e:
            raise RecordProblem(f"{where}: {e}") from None
        truth = item.get("ground_truth")
        answers = (truth,) if isinstance(truth, str) else tuple(truth) if isinstance(truth, list) else ()
        # nested lists (KnowEdit's counterfact split: [["a", "alias"]]) flatten to answer + aliases
        answers = tuple(
            a for x in answers for a in ((x,) if isinstance(x, str) else x if isinstance(x, list) else (x,))
        )
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise RecordProblem(
                f"key '{where}.ground_truth' should be a non-empty string or list of strings, got {truth!r:.80}"
            )
        probes.append(Probe(kind, prompt, answers))
    return tuple(probes)


def _from_knowedit(record: Mapping[str, Any], index: int) -> PortabilityCase:
    subject, prompt = field(record, "subject"), field(record, "prompt")
    truth = (
        strings(record, "ground_truth")
        if isinstance(record.get("ground_truth"), list)
        else (field(record, "ground_truth"),)
    )
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
    relation = (
        _probe_list(record, "locality.Relation_Specificity", "relation_specificity")
        if "Relation_Specificity" in locality
        else ()
    )
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
                prompt=field(rewrite, "prompt"),
                subject=field(rewrite, "subject"),
                target_new=target_new,
                target_true=field(rewrite, "target_true.str"),
                case_id=f"{case_id}/{j}",
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
        case_id=case_id,
        requests=tuple(requests),
        edit_questions=tuple(edit_questions),
        edit_answers=tuple(edit_answers),
        questions=questions,
        answers=_aliases(record, "answer", "answer_alias"),
        new_answers=_aliases(record, "new_answer", "new_answer_alias"),
        single_hops=_hops(record, "single_hops"),
        new_single_hops=new_hops,
    )


CONVERTERS: Mapping[str, Callable[[Mapping[str, Any], int], Any] | None] = {
    "counterfact-portability": None,  # needs the record's EditRequest from `load_counterfact`, see `_convert`
    "zsre-portability": _from_zsre_portability,
    "knowedit": _from_knowedit,
    "mquake": _from_mquake,
}


# ---------------------------------------------------------------- loading
