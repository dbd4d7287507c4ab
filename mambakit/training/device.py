"""Where a run computes and in which precision: the device from a name, and the autocast context."""
from __future__ import annotations

import contextlib

import torch

from mambakit.errors import MambaKitError


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'; errors when CUDA is asked but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MambaKitError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise MambaKitError(f"invalid device {name!r}: {exc}") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MambaKitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise MambaKitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


def precision_context(bf16: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when `bf16` (parameters, gradients and optimizer state stay fp32); else nothing.

    The returned context can be entered again and again (once per forward)."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise MambaKitError(f"--bf16 needs a CUDA device (bf16 autocast is off on CPU), but the device is {device}; "
                            "drop --bf16 or use --device cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16)
