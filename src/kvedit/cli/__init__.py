"""Command line: argument parsing only; everything else is the library's.

Each module here registers its sub-commands with `register(sub) -> {name: handler}`; a handler takes the parsed
arguments and returns the exit code. Parsing imports neither torch nor transformers, so `--help` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext

from . import analyze, edit, explore, runs, tune
from .common import add_threads_option
from .folders import WRITES_INTO, claimed

DESCRIPTION = "Locate, inspect, edit and tune the key-value memories of transformer feed-forward layers."
EPILOG = "Run `kvedit COMMAND --help` for a command's options."
COMMAND_MODULES = (edit, runs, analyze, tune, explore)

#: what a command keeps when Ctrl-C stops it (the weights in memory are restored by every editor either way)
KEPT_ON_INTERRUPT = {
    "bench": "the finished cases are kept in --out; run the same command again to resume",
    "demo": "the finished cases are kept in --out; run the same command again to resume",
    "tune": "finished runs and the last checkpoint (every --checkpoint-every steps) are kept in --out; run the same "
    "command again to resume from them",
    "analyze": "finished analyses are kept in --out (mined triggers only once mining is complete); run the same "
    "command again to reuse them",
    "stats": "statistics are cached only once complete; nothing was kept",
}
NOTHING_WRITTEN = "nothing was written"

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The parser of every command, and the handler of each command name."""
    parser = argparse.ArgumentParser(prog="kvedit", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for module in COMMAND_MODULES:
        handlers.update(module.register(sub))
    add_threads_option(parser)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    from ..runtime import configure_threads

    configure_threads(args.threads)  # before torch loads: its thread pool reads the settings once
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading from the cache takes well under a second
    from ..bench.ray import DistributedError
    from ..data.requests import RequestError
    from ..editing.delta import EditError, PatchMismatchError
    from ..models.architectures import UnsupportedModelError
    from ..models.loading import ModelLoadError

    out = getattr(args, "out", None)
    folder = claimed(out, args.command) if out is not None and args.command in WRITES_INTO else nullcontext()
    try:
        with folder:
            return handlers[args.command](args)
    except (
        RequestError,
        EditError,
        PatchMismatchError,
        UnsupportedModelError,
        ModelLoadError,
        FileNotFoundError,
        DistributedError,
        ValueError,
    ) as err:
        print(f"kvedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"kvedit {args.command}: interrupted; {KEPT_ON_INTERRUPT.get(args.command, NOTHING_WRITTEN)}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
