"""Device names as users type them (`cpu`, `cuda`, `cuda:1`, `mps`, `auto`), checked against the machine."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """The torch device for `name`; "auto" is the first accelerator present (CUDA, then MPS), else the CPU.

    A device this machine does not have is an error that says so, never a silent fall-back.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N, mps or auto") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} asked for, but this machine has no CUDA GPU (torch "
                f"{torch.__version__}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} asked for, but MPS is not available here; use --device cpu or auto")
    return device


def float64_device(device: torch.device) -> torch.device:
    """Where float64 linear algebra for a weight on `device` runs: that device, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device
