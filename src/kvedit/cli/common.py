"""Argument types and options shared by every command."""

from __future__ import annotations

import argparse


def layer_list(text: str) -> tuple[int, ...]:
    """Parse `3` or `3,4,5` into a tuple of distinct layer numbers (negative numbers count from the last layer)."""
    parts = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 3,4,5; got {text!r}")
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 3,4,5; got {text!r}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"layer numbers must be distinct; got {text!r}")
    return layers


def positive_ints(text: str) -> tuple[int, ...]:
    """Parse `1` or `1,10` into a tuple of positive integers (batch sizes)."""
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,10; got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    """Parse an integer option, raising argparse's error (naming what was expected) below `minimum`."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """Check an integer option that must be >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """Check an integer option that must be >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def device_name(text: str) -> str:
    """Check a --device value: cpu, cuda, cuda:N, mps or auto."""
    if text in ("cpu", "cuda", "mps", "auto") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto; got {text!r}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF id, local folder or .gguf file (default: bundled SmolLM2-135M-Instruct)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument(
        "--device",
        default="cpu",
        type=device_name,
        help="cpu (default), cuda, cuda:N, mps, or auto (the first accelerator present, else cpu)",
    )
    p.add_argument(
        "--device-map",
        default=None,
        choices=["auto", "balanced", "sequential"],
        help="split a model too large for one device over every device present (transformers' "
        "device_map; replaces --device)",
    )
    p.add_argument(
        "--compute-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="precision of the editors' inner loops (target optimisation, fine-tuning steps); the "
        "weights written stay exact. bfloat16 needs bfloat16 matrix units (AMX, AVX512-BF16, a GPU); "
        "`kvedit models` says whether they were found",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder's own Python code to run (off by default: kvedit never runs it unless asked)",
    )


def load(args: argparse.Namespace):
    """Load the model the command's --model/--dtype options name."""
    from ..models.compute import check_compute_dtype, set_compute_dtype
    from ..models.devices import resolve_device
    from ..models.loading import load_model

    device = resolve_device(getattr(args, "device", "cpu"))
    compute = check_compute_dtype(getattr(args, "compute_dtype", "float32"), device)  # before the model loads
    lm = load_model(
        args.model,
        device=device,
        dtype=args.dtype,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        device_map=getattr(args, "device_map", None),
    )
    return set_compute_dtype(lm, compute)


def method_list(text: str) -> tuple[str, ...]:
    """Parse `ft-keys,ft-values` into method names, each one kvedit has (checked without importing torch)."""
    from ..editing.method_names import METHOD_NAMES

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated methods out of {', '.join(METHOD_NAMES)}; got {text!r}"
        )
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(map(repr, unknown))}; expected methods out of {', '.join(METHOD_NAMES)}"
        )
    return methods


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every sub-command under it `--threads` (torch's CPU threads)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        if not any("--threads" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "--threads",
                type=positive_int,
                default=None,
                help="CPU threads for torch (default: one per core, waiting without spinning so "
                "that two kvedit processes share the cores)",
            )
        return
    for child in {id(p): p for s in subs for p in s.choices.values()}.values():
        add_threads_option(child)
