"""Facts about the device and the Triton runtime that launch plans depend on, read when a call asks."""
from __future__ import annotations

import functools
import os

import torch


def interpreted() -> bool:
    """Whether Triton runs kernels on its CPU interpreter (``TRITON_INTERPRET`` set to anything but "" or "0").

    Read at call time, never cached: tests and tools may set the variable after this module is imported. (Triton
    itself decides when a kernel is decorated whether it is interpreted; a module imported with another setting
    must be re-imported for its kernels to follow.)
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the Triton interpreter: few programs, so that each
    one walks several blocks and those loops get tested)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
