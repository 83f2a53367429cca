"""What a bench runs: the config (checked once, when made), its runs (`RunSpec`), the named presets, and the suite
that scores a dataset."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..data.loaders import SUPPORTED_FORMATS, load_requests
from ..data.propagation import case_edits, load_propagation
from ..editing.method_names import METHOD_NAMES
from ..evaluation.suites import SUITES, Suite
from .folder import BenchError, file_sha256
from .lifelong import LifelongSettings

if TYPE_CHECKING:
    from ..models.lm import LM

#: `--preset table3`: the seed's Table 3 protocol, FT on keys vs values with 1 and 10 counterfacts per edit.
BENCH_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "table3": MappingProxyType({"methods": ("ft-keys", "ft-values"), "batch_sizes": (1, 10)}),
    }
)


@dataclass(frozen=True)
class RunSpec:
    """One method at one setting; `key` names it in cases.jsonl and the tables."""

    method: str
    batch_size: int = 1
    layer: int | None = None  # None: the method's preset layers
    sequential: bool = False

    @property
    def key(self) -> str:
        name = self.method if self.layer is None else f"{self.method}@L{self.layer}"
        if self.batch_size > 1 or self.sequential:
            name += f" x{self.batch_size}"
        return name + (" seq" if self.sequential else "")

    def overrides(self) -> dict[str, Any]:
        return {} if self.layer is None else {"layers": [self.layer]}


@dataclass
class BenchConfig:
    """What to run. `dataset`: an official name (counterfact, multi_counterfact, zsre) or a path."""

    dataset: str
    methods: tuple[str, ...]
    n: int | None = None
    skip: int = 0  # cases left out before the first N (after the known filter), e.g. a tuning split
    batch_sizes: tuple[int, ...] = (1,)
    sequential: bool = False
    known_only: bool = False
    layers: tuple[int, ...] | None = None
    stats_source: str | None = None
    stats_tokens: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # hparam overrides for every method
    reuse_targets: bool = False  # runs not sequential share target vectors (BatchRunner); scores unchanged
    group_targets: bool = False  # with reuse_targets: a run's target vectors optimised ahead in groups (BatchRunner)
    suite: str | None = None  # a name in SUITES; None: the dataset format's (FORMAT_SUITES)
    lifelong: LifelongSettings = field(default_factory=LifelongSettings)  # what --sequential measures per batch

    def __post_init__(self) -> None:
        """Every setting checked once, when the config is made (before any model or folder is touched)."""
        if self.suite is not None and self.suite not in SUITES:
            raise BenchError(f"--suite {self.suite!r}: expected one of {sorted(SUITES)}")
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise BenchError(f"--methods: unknown {unknown or 'none given'}; expected some of {sorted(METHOD_NAMES)}")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise BenchError(f"--batch-size must be positive integers, got {list(self.batch_sizes)}")
        if self.n is not None and self.n < 1:
            raise BenchError(f"--n must be >= 1, got {self.n}")
        if self.skip < 0:
            raise BenchError(f"--skip must be >= 0, got {self.skip}")
        if self.group_targets and not self.reuse_targets:
            raise BenchError("--group-targets stores the vectors it optimises ahead: it needs --reuse-targets too")

    def specs(self) -> list[RunSpec]:
        """The runs: every batch size × method × layer (None: the method's preset layers)."""
        layers: Sequence[int | None] = self.layers or (None,)
        return [
            RunSpec(m, b, layer, self.sequential) for b in self.batch_sizes for m in self.methods for layer in layers
        ]

    def resume_key(self, lm: LM, dataset_path: str | Path | None = None) -> dict[str, Any]:
        """Settings that change every number: a folder holding other values cannot be resumed.

        The dataset is keyed by its content (`dataset_sha256` of the resolved file), not only its path."""
        content = file_sha256(dataset_path) if dataset_path is not None else None
        key = {
            "dataset": _absolute(self.dataset),
            "dataset_sha256": content,
            "known_only": self.known_only,
            "skip": self.skip,
            "stats_source": None if self.stats_source is None else _absolute(self.stats_source),
            "stats_tokens": self.stats_tokens,
            "seed": self.seed,
            "extra": self.extra,
            "model": lm.name,
            "model_fingerprint": lm.fingerprint(),
            "compute_dtype": getattr(lm, "compute_dtype", "float32"),
        }
        return json.loads(json.dumps(key))  # as stored in config.json (tuples become lists)


def _absolute(name_or_path: str) -> str:
    """An existing path made absolute (so the same file matches from any folder); names unchanged."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


#: The suite a dataset format is scored with when none is asked for: kvedit's own files are CounterFact's; each
#: propagation set (`data.propagation.PROPAGATION_FORMATS`) has the suite of its name.
FORMAT_SUITES: Mapping[str, str] = MappingProxyType(
    {
        "counterfact": "counterfact",
        "easyedit": "counterfact",
        "kvedit": "counterfact",
        "zsre": "zsre",
        "counterfact-portability": "counterfact-portability",
        "zsre-portability": "zsre-portability",
        "knowedit": "knowedit",
        "mquake": "mquake",
    }
)


def suite_for(asked: str | None, fmt: str) -> Suite:
    """The suite `asked` for (--suite), else the one of the dataset's format."""
    name = asked or FORMAT_SUITES.get(fmt, "counterfact")
    if name not in SUITES:
        raise BenchError(f"--suite {name!r}: expected one of {sorted(SUITES)}")
    return SUITES[name]


def choose_suite(asked: str | None, fmt: str, cases: Sequence[Any], dataset: str | Path) -> Suite:
    """The suite that scores `cases` (`asked`, else the format's), checked against every request they edit
    (`Suite.needs_target_true`: CounterFact compares target_new with target_true; `needs_neighborhood_target`: zsRE
    scores each neighbourhood prompt's own answer). A misfit names the case."""
    suite = suite_for(asked, fmt)
    name = suite.name
    how = f"--suite {name}" if asked else f"the {name} suite ({fmt} format's default; --suite chooses another)"
    for request in (r for case in cases for r in case_edits(case)):
        where = f"{dataset}: case {request.case_id!r}"
        if suite.needs_target_true and request.target_true is None:
            raise BenchError(
                f"{where} has no target_true, which {how} needs (efficacy compares P(target_new) with "
                "P(target_true)); add target_true to every record, or pass --suite zsre to score the token "
                "accuracy of target_new instead"
            )
        if suite.needs_neighborhood_target and request.neighborhood_prompts and request.neighborhood_target is None:
            raise BenchError(
                f"{where} has neighborhood_prompts but no neighborhood_target, which {how} needs (zsRE "
                "specificity is the token accuracy of each neighbourhood prompt's own answer); add "
                "neighborhood_target, or use --suite counterfact"
            )
    return suite


def load_cases(path: Path, fmt: str, suite: Suite) -> list[Any]:
    """The cases of a dataset file as `suite` reads them: a propagation set's cases (`Suite.reads`), else edit
    requests in the file's format. Records that cannot be edit requests are left out with a warning."""
    if suite.reads is not None:
        return load_propagation(path, suite.reads, skip_invalid=True)
    return load_requests(path, fmt if fmt in SUPPORTED_FORMATS else "auto", skip_invalid=True)
