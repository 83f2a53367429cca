"""Helpers shared by the tests (imported like tiny_models: `from helpers import tiny, snapshot, same, run`).

- `tiny(family, seed=0)`: a fresh tiny model, built once per session and handed out as a deep copy;
- `snapshot(lm)` / `same(a, b)`: a copy of a model's weights, and bit-exact comparison of two copies;
- `write_facts(path, rows)`: a CounterFact-style facts JSON (the tests' usual paraphrase and neighbour);
- `run(*argv)`: the CLI's exit code (argparse's SystemExit included), stdout and stderr;
- `leaf_parsers(parser)`: every leaf command of an argparse tree (sub-commands of sub-commands);
- `need_shared(path)`: a file of `../shared/data`, or a skip (a failure under CI=true) when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_lm

from kvedit.models import LM

#: the shared data sets, checked out beside the project (not part of it)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: (family, seed) -> the pristine model (never handed out) and torch's RNG state right after building it
_BUILT: dict[tuple[str, int], tuple[LM, torch.Tensor]] = {}


def tiny(family: str, seed: int = 0) -> LM:
    """`tiny_lm(family, seed)` without building it again: a deep copy of a model built once per session.

    The copy shares nothing mutable with the pristine model or with other copies (weights, config, tokenizer,
    memo), so a test that edits its model cannot leak into another. torch's global RNG is left as `tiny_lm`
    leaves it (seeded with `seed`, then advanced by the initialisation), so code drawing random numbers after
    getting its model sees the same numbers as with a freshly built one."""
    key = (family, seed)
    if key not in _BUILT:
        lm = tiny_lm(family, seed)
        _BUILT[key] = (lm, torch.get_rng_state())
    pristine, rng = _BUILT[key]
    # the architecture row is an immutable table entry (and holds a mappingproxy, which cannot be copied)
    lm = copy.deepcopy(pristine, memo={id(pristine.arch): pristine.arch})
    torch.set_rng_state(rng)
    return lm


def snapshot(lm: LM) -> dict[str, torch.Tensor]:
    """A copy of every weight and buffer of `lm` (its state dict, detached and cloned)."""
    return {name: t.detach().clone() for name, t in lm.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-exact equality of two snapshots: the same names, equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#: five CounterFact-style facts (prompt, subject, target_new, target_true) the bench, lifelong and compare tests edit
FACTS = (
    ("{} is located in the city of", "the eiffel tower", "rome", "paris"),
    ("{} is located in the city of", "the colosseum", "london", "rome"),
    ("{} is the capital of", "berlin", "spain", "germany"),
    ("{} is located in the city of", "big ben", "madrid", "london"),
    ("the official language of {} is", "france", "german", "french"),
)


def write_facts(path: Path, rows: Iterable, **extra) -> Path:
    """Write CounterFact-style facts to `path` (JSON): `rows` are (prompt, subject, target_new, target_true)
    tuples or EditRequests; each record gets its index as case_id, "<subject> lies in" as paraphrase and
    "the louvre is located in" as neighbour, plus the `extra` fields."""
    records = []
    for i, row in enumerate(rows):
        p, s, n, t = (row.prompt, row.subject, row.target_new, row.target_true) if hasattr(row, "prompt") else row
        records.append(
            {
                "prompt": p,
                "subject": s,
                "target_new": n,
                "target_true": t,
                "case_id": i,
                "paraphrase_prompts": [f"{s} lies in"],
                "neighborhood_prompts": ["the louvre is located in"],
                **extra,
            }
        )
    path.write_text(json.dumps(records))
    return path


#: one record in zsRE's (MEND) format
ZSRE_RECORD = {
    "subject": "rome",
    "src": "where is rome?",
    "answers": ["italy"],
    "rephrase": "rome is in?",
    "loc": "nq question: who is",
    "loc_ans": "paris",
}


def write_zsre(path: Path) -> Path:
    """A zsRE-format file at `path` holding `ZSRE_RECORD` alone."""
    path.write_text(json.dumps([ZSRE_RECORD]))
    return path


def run(*argv: object) -> tuple[int, str, str]:
    """Run the CLI on `argv`: (the exit code a shell would see, stdout, stderr). An argument error exits while
    parsing (SystemExit 2): that is returned as the code, with argparse's message in stderr."""
    from kvedit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every leaf parser under `parser` (depth first): the commands a user can run."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for s in subs:
        for child in s.choices.values():
            yield from leaf_parsers(child)


def need_shared(*paths: Path) -> Path:
    """The first of `paths` (files or folders under `../shared/data`) once all exist. A missing one skips the test
    with the reason, except under CI (`CI=true`), where it fails: a CI without the data must not pass having tested
    nothing there."""
    for path in paths:
        if not path.exists():
            if os.environ.get("CI", "").strip().lower() == "true":
                pytest.fail(
                    f"{path} is missing: under CI the tests need the shared data sets in {SHARED_DATA} "
                    "(checked out beside the project)",
                    pytrace=False,
                )
            pytest.skip(f"{path} is missing (the shared data sets are not checked out beside the project)")
    return paths[0]
