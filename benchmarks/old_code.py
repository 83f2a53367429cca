"""Import a kvedit module as it was at an earlier commit, beside the current one, for before/after benchmarks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def module_at(commit: str, module: str) -> ModuleType:
    """`module` (e.g. "kvedit.analysis.neurons") as committed at `commit`, imported as the sibling
    `<package>._<name>_before`, so its relative imports resolve against the current package."""
    package, _, name = module.rpartition(".")
    path = f"src/{module.replace('.', '/')}.py"
    source = subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    alias = f"{package}._{name}_before"
    loaded = importlib.util.module_from_spec(importlib.util.spec_from_loader(alias, loader=None))
    loaded.__package__ = package
    sys.modules[alias] = loaded
    exec(compile(source, f"{commit}:{path}", "exec"), loaded.__dict__)
    return loaded
