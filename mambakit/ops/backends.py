"""The one backend vocabulary of the ops' dispatchers, and the lazy import of an op's Triton kernels.

backend="auto": the Triton kernels for CUDA tensors when Triton imports, else PyTorch; "torch": the PyTorch fast
path (any device); "triton": the kernels; "ref": the reference form (for tests; ops whose fast path is exact take
it as "torch").
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from mambakit.errors import MambaKitError

BACKENDS = ("auto", "torch", "triton", "ref")


def check_backend(backend: object) -> str:
    """Raise unless backend is one of BACKENDS; return it."""
    if backend not in BACKENDS:
        raise MambaKitError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def kernels(module: str) -> Optional[ModuleType]:
    """The module of an op's Triton kernels (e.g. "mambakit.ops.ssd.triton"), or None where it does not import
    (Triton not installed)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
