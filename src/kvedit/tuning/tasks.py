"""Classification tasks in the seed's prompt formats (Qiu et al. 2024, REFERENCE §7), and a user's own task.

A task turns raw records (official SuperGLUE/GLUE/RACE/20 Newsgroups formats, llm-foundry's `query, choices,
gold` copies, or a user's JSONL/CSV) into `Example`s: the prompt ends at the colon where the label goes, and
the training text is `prompt + label`. Only *clean* records are kept (every field non-empty, a known label);
the first N clean ones per split are used.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .records import read_records


class TaskDataError(ValueError):
    """A task file is missing, empty or not in a format the task reads."""


@dataclass(frozen=True)
class Example:
    """One prompt and its label text; `uid` is unique across tasks (`task:index`)."""

    task: str
    uid: str
    prompt: str
    label: str

    @property
    def text(self) -> str:
        return self.prompt + self.label


@dataclass(frozen=True)
class TaskSpec:
    """A task's seed prompt template (fields in braces, ending at the label's colon) and label words."""

    name: str
    template: str
    labels: tuple[str, ...]
    parse: Callable[[Mapping[str, Any]], dict[str, str] | None]  # raw record -> fields + "label", None if unclean
    eval_splits: tuple[str, ...] = ("val", "validation", "dev")
    train_splits: tuple[str, ...] = ("train",)

    def fields(self) -> list[str]:
        import string

        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def example(self, fields: Mapping[str, str], index: int) -> Example:
        return Example(self.name, f"{self.name}:{index}", self.template.format(**fields), fields["label"])


# ---- record parsers: official fields, or llm-foundry's query/choices/gold copies -------------------------------

NLI3 = ("entailment", "contradiction", "neutral")


def _clean(fields: dict[str, Any], labels: Sequence[str] | None) -> dict[str, str] | None:
    out = {k: str(v).strip() if v is not None else "" for k, v in fields.items()}
    if any(not v for v in out.values()) or (labels is not None and out["label"] not in labels):
        return None
    return out


def _label_of(value: Any, names: Sequence[str]) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        i = int(value)
        return names[i] if 0 <= i < len(names) else None
    return str(value).strip() if value is not None else None


def parse_cb(r: Mapping[str, Any]) -> dict[str, str] | None:
    return _clean(
        {"premise": r.get("premise"), "hypothesis": r.get("hypothesis"), "label": _label_of(r.get("label"), NLI3)}, NLI3
    )


def parse_boolq(r: Mapping[str, Any]) -> dict[str, str] | None:
    if "query" in r:  # llm-foundry: "Passage: {passage}\nQuestion: {question}?" with choices ["no", "yes"]
        query = str(r["query"])
        passage, sep, question = query.rpartition("\nQuestion: ")
        if not sep or not passage.startswith("Passage: "):
            return None
        answer = str(r["choices"][int(r["gold"])]).strip().lower()
        label = {"yes": "true", "no": "false"}.get(answer)
        return _clean(
            {"question": question.removesuffix("?"), "passage": passage.removeprefix("Passage: "), "label": label},
            ("true", "false"),
        )
    value = r.get("label", r.get("answer"))
    label = str(value).strip().lower() if isinstance(value, (bool, str)) else {0: "false", 1: "true"}.get(value)
    return _clean({"question": r.get("question"), "passage": r.get("passage"), "label": label}, ("true", "false"))


COPA_CONNECTIVES = {", therefore": "effect", ", because": "cause"}


def parse_copa(r: Mapping[str, Any]) -> dict[str, str] | None:
    if "query" in r:  # llm-foundry: "{premise without its full stop}, therefore|because" with lower-cased choices
        query = str(r["query"]).strip()
        for connective, question in COPA_CONNECTIVES.items():
            if query.endswith(connective):
                premise = query.removesuffix(connective) + "."
                break
        else:
            return None
        c1, c2 = (c.strip() for c in r["choices"])
        return _clean(
            {
                "premise": premise,
                "choice1": c1[:1].upper() + c1[1:],
                "choice2": c2[:1].upper() + c2[1:],
                "question": question,
                "label": f"Choice{int(r['gold']) + 1}",
            },
            ("Choice1", "Choice2"),
        )
    return _clean(
        {
            "premise": r.get("premise"),
            "choice1": r.get("choice1"),
            "choice2": r.get("choice2"),
            "question": r.get("question"),
            "label": _label_of(r.get("label"), ("Choice1", "Choice2")),
        },
        ("Choice1", "Choice2"),
    )


def parse_qnli(r: Mapping[str, Any]) -> dict[str, str] | None:
    labels = ("entailment", "not_entailment")
    return _clean(
        {"question": r.get("question"), "sentence": r.get("sentence"), "label": _label_of(r.get("label"), labels)},
        labels,
    )


def parse_race(r: Mapping[str, Any]) -> dict[str, str] | None:
    options = r.get("options")
    if not isinstance(options, (list, tuple)) or len(options) != 4:
        return None
    fields = {"article": r.get("article"), "question": r.get("question"), "label": r.get("answer")}
    fields |= dict(zip("ABCD", options))
    return _clean(fields, tuple("ABCD"))


def parse_20ng(r: Mapping[str, Any]) -> dict[str, str] | None:
    label = r.get("label_text", r.get("label"))
    return _clean({"text": r.get("text"), "label": label}, None)


TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        "cb": TaskSpec(
            "cb",
            "### Premise:{premise} ### Hypothesis:{hypothesis} ### Relationship (entailment, "
            "contradiction or neutral):",
            NLI3,
            parse_cb,
        ),
        "boolq": TaskSpec(
            "boolq",
            "Read the Passage and answer the Question with true or false ### Question:{question} "
            "### Passage: {passage} ### Answer:",
            ("true", "false"),
            parse_boolq,
        ),
        "copa": TaskSpec(
            "copa",
            "### Premise:{premise} ### Choice1:{choice1} ### Choice2:{choice2} ### Question:{question} ### Choice:",
            ("Choice1", "Choice2"),
            parse_copa,
        ),
        "qnli": TaskSpec(
            "qnli",
            "### Premise:{question} ### Hypothesis:{sentence} ### Relationship (choose between "
            "'entailment' and 'not entailment'):",
            ("entailment", "not_entailment"),
            parse_qnli,
        ),
        "race": TaskSpec(
            "race",
            "Read Context and answer question ### Context:{article} ### Question:{question} "
            "### Options:A.{A}. B.{B}. C.{C}. D.{D}### Choice:",
            tuple("ABCD"),
            parse_race,
            eval_splits=("dev/high", "val", "validation", "dev"),
            train_splits=("train/high", "train"),
        ),
        "20ng": TaskSpec("20ng", "### Sentence:{text} ### Class:", (), parse_20ng, eval_splits=("test",)),
    }
)


# ---- locating split files ---------------------------------------------------------------------------------------

SUFFIXES = (".jsonl", ".json", ".tsv", ".csv", "")


def split_source(source: Path, names: Sequence[str]) -> Path | None:
    """The file (or RACE/20NG-style folder) for a split inside `source`: `{name}{suffix}` or `{name}/`."""
    for name in names:
        for suffix in SUFFIXES:
            path = source / f"{name}{suffix}"
            if path.exists():
                return path
    return None


def _race_records(article: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for q, opts, ans in zip(article["questions"], article["options"], article["answers"]):
        yield {"article": article["article"], "question": q, "options": opts, "answer": ans}


def raw_records(path: Path) -> list[dict[str, Any]]:
    """Records of one split: a JSONL/JSON/CSV/TSV file, a RACE folder (`*.txt` articles) or a 20NG folder tree."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        try:
            articles = [json.loads(p.read_text()) for p in files]  # RACE: one JSON article per file
        except (json.JSONDecodeError, UnicodeDecodeError):
            # 20 Newsgroups: <group>/<message> files
            return [{"text": p.read_text(errors="replace"), "label_text": p.parent.name} for p in files]
        return [q for a in articles if isinstance(a, dict) and "questions" in a for q in _race_records(a)]
    records = read_records(path)
    if records and "questions" in records[0]:  # RACE articles stored as a list or as JSON lines
        return [q for article in records for q in _race_records(article)]
    return records


@dataclass
class TaskData:
    """The train and test examples of one task and where they came from."""

    name: str
    train: list[Example]
    test: list[Example]
    source: str
    note: str  # how the split was made, for the output
    labels: tuple[str, ...] = ()  # label words to rank; the task's own, or those its data holds

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = tuple(sorted({e.label for e in [*self.train, *self.test]}))


def take_clean(spec: TaskSpec, records: Sequence[Mapping[str, Any]], start: int = 0) -> tuple[list[Example], int]:
    """(examples from every clean record in order, number of unclean records dropped)."""
    out, dropped = [], 0
    for i, r in enumerate(records):
        fields = spec.parse(r)
        if fields is None:
            dropped += 1
            continue
        out.append(spec.example(fields, start + i))
    return out, dropped


def load_task(spec: TaskSpec, source: str | Path, n_train: int, n_test: int, seed: int = 0) -> TaskData:
    """The first `n_train` / `n_test` clean examples of `spec` from `source` (a folder with split files, or
    one file). With only an evaluation split available, a fixed-seed split: the first `n_test` of a seeded
    shuffle are the test set, the rest (up to `n_train`) train."""
    source = Path(source)
    if not source.exists():
        raise TaskDataError(f"task {spec.name}: {source} does not exist")
    train_path = split_source(source, spec.train_splits) if source.is_dir() else None
    test_path = split_source(source, spec.eval_splits) if source.is_dir() else source
    if test_path is None:
        raise TaskDataError(
            f"task {spec.name}: no evaluation split in {source}; expected one of "
            f"{', '.join(n + s for n in spec.eval_splits for s in SUFFIXES[:4])}"
        )
    test_all, dropped = take_clean(spec, raw_records(test_path))
    if not test_all:
        raise TaskDataError(
            f"task {spec.name}: no clean records in {test_path} (dropped {dropped}); expected the "
            f"fields of {spec.template!r} and labels {list(spec.labels) or 'strings'}"
        )
    if train_path is not None:
        train, _ = take_clean(spec, raw_records(train_path))
        note = f"train from {_rel(train_path, source)}, test from {_rel(test_path, source)}"
        return TaskData(spec.name, train[:n_train], test_all[:n_test], str(source), note, spec.labels)
    order = list(range(len(test_all)))
    random.Random(seed).shuffle(order)
    test = [test_all[i] for i in sorted(order[:n_test])]
    train = [test_all[i] for i in sorted(order[n_test:])][:n_train]
    note = (
        f"only {_rel(test_path, source)} available: split with seed {seed} into {len(train)} train / "
        f"{len(test)} test of {len(test_all)} clean records"
    )
    return TaskData(spec.name, train, test, str(source), note, spec.labels)


def _rel(path: Path, source: Path) -> str:
    return path.name if path == source else str(path.relative_to(source))


def user_task(name: str, template: str, label_field: str, label_words: Mapping[str, str]) -> TaskSpec:
    """A task from a user's JSONL/CSV: `template` names the record's text fields in braces and ends where
    the label goes; `label_words` maps each value of `label_field` to the word the model should produce."""
    spec = TaskSpec(name, template, tuple(dict.fromkeys(label_words.values())), lambda r: None)
    fields = spec.fields()
    if not fields:
        raise TaskDataError(f"template {template!r} names no fields; write them in braces, e.g. '{{text}}'")
    if not label_words:
        raise TaskDataError("label words are empty; give them as value=word pairs or a list of words")

    def parse(r: Mapping[str, Any]) -> dict[str, str] | None:
        raw = r.get(label_field)
        word = label_words.get(str(raw).strip()) if raw is not None else None
        return _clean({**{f: r.get(f) for f in fields}, "label": word}, None)

    return TaskSpec(name, template, spec.labels, parse)


def check_user_records(
    spec: TaskSpec, records: Sequence[Mapping[str, Any]], label_field: str, path: Path, label_words: Mapping[str, str]
) -> None:
    """Raise a clear error if the file lacks a template field or the label field, or no record's label is one
    of `label_words` (the error lists the labels the file has)."""
    if not records:
        raise TaskDataError(f"{path} holds no records")
    missing = [f for f in [*spec.fields(), label_field] if f not in records[0]]
    if missing:
        raise TaskDataError(f"{path}: the first record has no field {missing}; it has {sorted(records[0])}")
    found = list(dict.fromkeys(str(r.get(label_field)).strip() for r in records))
    if not set(found) & {str(k) for k in label_words}:
        shown = ", ".join(map(repr, found[:10])) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise TaskDataError(
            f"{path}: no record's {label_field!r} is one of the --label-words values "
            f"{sorted(label_words)}; the file's labels are {shown}"
        )


def parse_label_words(text: str) -> dict[str, str]:
    """`neg,pos` (values are the words) or `0=negative,1=positive` (value=word)."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    return dict(_word_pair(p) for p in pairs)


def _word_pair(item: str) -> tuple[str, str]:
    """`value=word` → (value, word); `word` → (word, word)."""
    value, _, word = item.partition("=")
    return (value, word) if "=" in item else (item, item)


def load_user_task(
    path: str | Path,
    template: str,
    label_field: str,
    label_words: Mapping[str, str],
    n_train: int,
    n_test: int,
    test_path: str | Path | None = None,
    seed: int = 0,
    name: str | None = None,
) -> TaskData:
    """A user's task file (and optional separate test file) as train/test examples, with clear errors."""
    path = Path(path)
    spec = user_task(name or path.stem, template, label_field, label_words)
    if not path.is_file():
        raise TaskDataError(f"task file {path} does not exist")
    records = read_records(path)
    check_user_records(spec, records, label_field, path, label_words)
    if test_path is None:
        data = load_task(spec, path, n_train, n_test, seed)
        return TaskData(spec.name, data.train, data.test, str(path), data.note)
    test_records = read_records(Path(test_path))
    check_user_records(spec, test_records, label_field, Path(test_path), label_words)
    train, _ = take_clean(spec, records)
    test, _ = take_clean(spec, test_records)
    if not train or not test:
        raise TaskDataError(f"no clean records with a label in {sorted(label_words)} in {path} or {test_path}")
    return TaskData(
        spec.name, train[:n_train], test[:n_test], str(path), f"train {path.name}, test {Path(test_path).name}"
    )
