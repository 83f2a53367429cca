"""Lazy package exports (PEP 562): a package names what it offers, and each name is imported on first use.

This keeps `import kvedit` and the command line's help and argument errors free of torch and transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose public names live in the modules `exports` maps them
    to (relative names such as ".registry")."""

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def dir_() -> list[str]:
        module = importlib.import_module(package)
        return sorted({*vars(module), *exports})

    return getattr_, dir_
