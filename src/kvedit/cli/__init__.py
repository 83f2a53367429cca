"""Command line: argument parsing only; everything else is the library's.

Each module here registers its sub-commands with `register(sub) -> {name: handler}`; a handler takes the parsed
arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import analyze, edit, explore, runs, tune

DESCRIPTION = "Locate, inspect, edit and tune the key-value memories of transformer feed-forward layers."
EPILOG = "Run `kvedit COMMAND --help` for a command's options."
COMMAND_MODULES = (edit, runs, analyze, tune, explore)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The parser of every command, and the handler of each command name."""
    parser = argparse.ArgumentParser(prog="kvedit", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for module in COMMAND_MODULES:
        handlers.update(module.register(sub))
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading from the cache takes well under a second
    from ..data.requests import RequestError
    from ..distributed import DistributedError
    from ..editing.delta import EditError, PatchMismatchError
    from ..models.architectures import UnsupportedModelError
    from ..models.loading import ModelLoadError

    try:
        return handlers[args.command](args)
    except (RequestError, EditError, PatchMismatchError, UnsupportedModelError, ModelLoadError, FileNotFoundError,
            DistributedError, ValueError) as err:
        print(f"kvedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the model's weights were restored", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
