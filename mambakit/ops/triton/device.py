"""Facts about the device that launch plans depend on."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the Triton interpreter: few programs, so that each
    one walks several blocks and those loops get tested)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
