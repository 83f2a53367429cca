"""Results folders: each command's `--out` is checked before any work, and marked as that command's.

A folder holds one kind of results (a bench run, a tuning run, analyses, a comparison, an inspection). A mark
file records which command wrote it, so that another command refuses it instead of mixing its files in; folders
written before the mark existed are recognised by the files their command writes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARK = ".kvedit-folder.json"

#: folder kind -> files only that kind's command writes (to recognise folders from before the mark)
SIGNATURES: dict[str, tuple[str, ...]] = {
    "bench": ("cases.jsonl",),
    "tune": ("predictions.jsonl", "runs/untuned"),
    "analyze": ("triggers.safetensors", "values.md", "layers.md", "components.md", "keys.html"),
    "compare": ("compare.md", "compare.json"),
    "inspect": ("inspect.json", "inspect.md", "patch.json", "patch.md"),
}

#: command -> the folder kinds it may add to (inspect may write beside the analyses it reads)
WRITES_INTO: dict[str, tuple[str, ...]] = {
    "bench": ("bench",),
    "demo": ("bench",),
    "tune": ("tune",),
    "analyze": ("analyze",),
    "compare": ("compare",),
    "inspect": ("inspect", "analyze"),
}


def folder_kind(folder: Path) -> str | None:
    """The kind of results `folder` holds: its mark's, else the first kind whose files it has; None if neither."""
    mark = folder / MARK
    if mark.is_file():
        try:
            kind = json.loads(mark.read_text()).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            kind = None
        if isinstance(kind, str):
            return kind
    for kind, files in SIGNATURES.items():
        if any((folder / f).exists() for f in files):
            return kind
    return None


def check_results_folder(out: Path, command: str) -> Path:
    """Refuse `--out` when it is an existing file or a folder another command wrote. Raises ValueError."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is an existing file; expected a folder (new, or one `kvedit {command}` wrote before)"
        )
    if out.is_dir():
        kind = folder_kind(out)
        if kind is not None and kind not in WRITES_INTO[command]:
            raise ValueError(
                f"--out {out} holds the results of `kvedit {kind}`; `kvedit {command}` would mix its "
                "files in. Choose another folder"
            )
    return out


def results_folder(command: str) -> Callable[[str], Path]:
    """An argparse type for `command`'s `--out`: the check runs while the arguments are parsed."""

    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
        try:
            return check_results_folder(Path(text), command)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("--out ")) from None

    return parse


@contextmanager
def claimed(out: Path, command: str) -> Iterator[Path]:
    """Mark `out` as `command`'s results folder while the command runs (creating it if needed). A folder this
    call created and the command left empty is removed again, so a failed start leaves nothing behind."""
    check_results_folder(out, command)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    mark = out / MARK
    if not mark.exists():
        mark.write_text(json.dumps({"kind": WRITES_INTO[command][0], "command": command}) + "\n")
    try:
        yield out
    finally:
        if created and [p.name for p in out.iterdir()] == [MARK]:
            mark.unlink()
            out.rmdir()
