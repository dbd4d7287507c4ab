"""Tests of the Triton kernels, run on the CPU interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib
import sys


def interpreted_module(name: str):
    """Import `name`, reloading it if it was first imported without TRITON_INTERPRET (its kernels then compile)."""
    mod = importlib.import_module(name)
    if not getattr(mod, "_INTERPRETED", False):
        mod = importlib.reload(sys.modules[name])
    return mod
