"""Command line: argument parsing only; everything else is the library's.

Each module here registers its sub-commands with `register(sub) -> {name: handler}`; a handler takes the parsed
arguments and returns the exit code. Parsing imports neither torch nor transformers, so `--help` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import os
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


#: (module, class) of the errors a command reports as one line and exit code 2, not a traceback
USER_ERRORS = (
    ("kvedit.data.requests", "RequestError"),
    ("kvedit.editing.delta", "EditError"),
    ("kvedit.editing.delta", "PatchMismatchError"),
    ("kvedit.models.architectures", "UnsupportedModelError"),
    ("kvedit.models.loading", "ModelLoadError"),
    ("kvedit.bench.ray", "DistributedError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The error classes of `USER_ERRORS` whose modules were imported (an error cannot come from a module that
    never loaded, and importing one here would load torch just to answer `kvedit report`), plus
    FileNotFoundError and ValueError."""
    loaded = [getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules]
    return (*loaded, FileNotFoundError, ValueError)


def quiet_transformers() -> None:
    """transformers' warnings at error level and its progress bars off (loading from the cache takes well under
    a second). Set through its environment variables when it is not loaded yet, so that commands which never load
    a model (report, compare) do not import it; a user's own TRANSFORMERS_VERBOSITY is kept."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    from ..runtime import configure_threads

    configure_threads(args.threads)  # before torch loads: its thread pool reads the settings once
    quiet_transformers()
    out = getattr(args, "out", None)
    folder = claimed(out, args.command) if out is not None and args.command in WRITES_INTO else nullcontext()
    try:
        with folder:
            return handlers[args.command](args)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
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
