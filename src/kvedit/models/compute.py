"""Compute precision of the editors' inner loops: a bfloat16 copy of the frozen model to run them on.

`lm.compute_dtype` ("float32", the default, or "bfloat16") says in which precision the *loops* run: the target
optimisation of ROME/MEMIT/PMET/AlphaEdit (forward + backward through the layers above the edit site, tens of steps)
and the fine-tuning steps. Everything that is written stays exact: the optimised vectors (Adam's state, δ) are
float32; the values the closed-form solves start from (δ's initial site value, keys, current outputs) are read from
the float32 model; ΔW and the covariance are computed in float32/float64 as before, so a patch applies to the float32
model bit-exactly whatever the compute precision.

`compute_view(lm)` gives the model the loop runs on: `lm` itself in float32, else an `LM` around a copy of the model
whose parameters are bfloat16 (buffers such as rotary frequencies stay float32), built once per loaded model and
re-synchronised from the float32 weights on every call (an edit between two calls is seen). The copy adds half the
float32 weights' memory.

bfloat16 is only worth it with bfloat16 matrix units (AMX, AVX512-BF16, or a GPU with bf16 support): without them
torch's CPU bf16 matrix multiply runs a fallback kernel 30–70× slower than float32 (measured on an AMD EPYC without
AVX-512: 0.6–1.1 GFLOP/s vs 18–80). `check_compute_dtype` refuses it there with an error saying so.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from .lm import LM

COMPUTE_DTYPES = ("float32", "bfloat16")
#: /proc/cpuinfo flags of x86 bfloat16 matrix units, by what they are called
_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
_VIEW_KEY = "compute_view"  # lm.memo key of the bfloat16 copy


class ComputeDtypeError(ValueError):
    """The compute precision asked for is unknown, or the device has no matrix units for it."""


@dataclass(frozen=True)
class Bf16Support:
    """Whether `device` has bfloat16 matrix units (`units`), and what was found (`detail`, one line)."""

    units: bool
    detail: str


def _cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first CPU's feature flags, or None where /proc/cpuinfo is not readable (not Linux)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def _bf16_matmul_works(device: torch.device) -> bool:
    """A 16×16 bfloat16 matrix multiply on `device` gives the float32 result to bfloat16 accuracy."""
    a = torch.arange(256, dtype=torch.float32, device=device).reshape(16, 16) / 256
    try:
        got = (a.bfloat16() @ a.bfloat16()).float()
    except RuntimeError:
        return False
    return bool(torch.allclose(got, a.bfloat16().float() @ a.bfloat16().float(), rtol=2e-2, atol=1e-2))


def bf16_support(device: torch.device | str = "cpu") -> Bf16Support:
    """Detect bfloat16 matrix units: on CPU the AMX-BF16 / AVX512-BF16 flags (Linux; elsewhere Apple silicon and
    torch's capability report), on CUDA `torch.cuda.is_bf16_supported()`; and that a tiny bf16 matmul is right."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() and _bf16_matmul_works(device)
        return Bf16Support(
            ok, f"CUDA {torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
        )
    if device.type != "cpu":
        return Bf16Support(False, f"{device.type}: bf16 matrix units unknown")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if flags is None:
        arm_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        units = arm_mac and _bf16_matmul_works(device)
        return Bf16Support(
            units,
            f"CPU ({platform.machine()}, torch capability {capability}): "
            f"{'bf16 matrix instructions' if units else 'no bf16 matrix units known'}",
        )
    found = [name for flag, name in _CPU_FLAGS.items() if flag in flags]
    if not found and "bf16" in flags:  # aarch64 (BF16 dot products, e.g. Graviton 3)
        found = ["ARM BF16"]
    units = bool(found) and _bf16_matmul_works(device)
    detail = ", ".join(found) if found else "no AMX-BF16, AVX512-BF16 or ARM BF16"
    return Bf16Support(units, f"CPU (torch capability {capability}): {detail}")


def check_compute_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """`name` if it is a compute precision `device` can use for speed; raise `ComputeDtypeError` otherwise."""
    if name not in COMPUTE_DTYPES:
        raise ComputeDtypeError(f"compute dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if name == "bfloat16":
        support = bf16_support(device)
        if not support.units:
            raise ComputeDtypeError(
                f"--compute-dtype bfloat16 needs bfloat16 matrix units, and this device has none ({support.detail}): "
                "torch would emulate bfloat16 matrix multiplies, 30-70x slower than float32. Use --compute-dtype "
                "float32 (the default)."
            )
    return name


def set_compute_dtype(lm: LM, name: str) -> LM:
    """Make `lm`'s editors and passes run their inner loops in `name` (checked against its device); returns lm."""
    lm.compute_dtype = check_compute_dtype(name, lm.device)
    return lm


def _bf16_copy(model: PreTrainedModel, attn_implementation: str) -> PreTrainedModel:
    """A copy of `model` whose parameters are bfloat16 and frozen (tied parameters stay tied; buffers as they are),
    made without a float32 copy in between."""
    memo: dict[int, object] = {}
    for p in model.parameters():  # deepcopy takes the memo's entry for every parameter it meets (ties included)
        memo[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    view = copy.deepcopy(model, memo)
    if callable(setter := getattr(view, "set_attn_implementation", None)):
        setter(attn_implementation)
    else:
        view.config._attn_implementation = attn_implementation
    return view


def _sync(model: nn.Module, view: nn.Module) -> None:
    """Copy the current float32 parameters into the view's bfloat16 ones (by name: an edit since the last call)."""
    mine = dict(view.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            mine[name].copy_(p)


def compute_view(lm: LM, attn_implementation: str = "eager") -> LM:
    """The `LM` the inner loops run on: `lm` in float32; in bfloat16 a frozen bf16 copy (same tokenizer and
    architecture, `attn_implementation` attention: eager, because torch's CPU flash-attention backward took as long
    as every matrix multiply together in bf16 — issue 30's profile), its weights equal to `lm`'s rounded to bf16."""
    dtype = getattr(lm, "compute_dtype", "float32")
    if dtype == "float32":
        return lm
    if dtype not in COMPUTE_DTYPES:
        raise ComputeDtypeError(f"compute dtype {dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    key = (_VIEW_KEY, dtype, attn_implementation)
    view = lm.memo.get(key)
    if view is None:
        model = _bf16_copy(lm.model, attn_implementation)
        view = LM(
            model=model,
            tokenizer=lm.tokenizer,
            arch=lm.arch,
            name=lm.name,
            base_fingerprint=lm.base_fingerprint,
            compute_dtype=dtype,
        )
        lm.memo[key] = view
    else:
        _sync(lm.model, view.model)
    return view


def compute_torch_dtype(lm: LM) -> torch.dtype:
    """torch dtype of `lm.compute_dtype`."""
    return getattr(torch, getattr(lm, "compute_dtype", "float32"))


@contextmanager
def trained_through(view: LM, masters: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Within the block, each of the view's parameters named in `masters` is, at every forward of its module, the
    float32 master parameter cast to the view's precision, so gradients reach the masters (which the optimiser
    steps) and each step sees their current values. Nothing happens when `view` is the float32 model itself."""
    if all(view.model.get_parameter(name) is p for name, p in masters.items()):
        yield
        return
    handles, swapped = [], []
    try:
        for name, master in masters.items():
            owner_path, _, attr = name.rpartition(".")
            owner = view.model.get_submodule(owner_path)
            current = owner._parameters[attr]
            assert current is not None, f"{name} is registered as None"
            dtype = current.dtype
            swapped.append((owner, attr, owner._parameters.pop(attr)))

            def cast(
                module: nn.Module,
                args: object,
                attr: str = attr,
                master: nn.Parameter = master,
                dtype: torch.dtype = dtype,
            ) -> None:
                object.__setattr__(module, attr, master.to(dtype))

            cast(owner, ())
            handles.append(owner.register_forward_pre_hook(cast))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attr, parameter in swapped:
            owner.__dict__.pop(attr, None)
            owner._parameters[attr] = parameter
