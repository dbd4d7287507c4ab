"""Tests of the Triton kernels, run on the CPU interpreter: TRITON_INTERPRET=1 is set here, once, before any test
module of this package imports triton (Triton decides when a kernel is decorated whether it is interpreted; the
ops read the variable at call time)."""
from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _compiled_kernel_modules() -> list:
    """Loaded mambakit modules that define a kernel decorated without TRITON_INTERPRET (imported before it was set:
    those kernels would compile instead of running on the interpreter)."""
    from triton.runtime.jit import JITFunction

    return [m for name, m in list(sys.modules.items()) if name.startswith("mambakit.") and m is not None
            and any(isinstance(v, JITFunction) and getattr(v.fn, "__module__", None) == m.__name__
                    for v in vars(m).values())]


def interpreted_module(name: str):
    """Import `name` with every mambakit kernel interpreted: modules whose kernels were decorated before
    TRITON_INTERPRET was set are imported again (twice, so that each one also picks up its re-imported helpers)."""
    importlib.import_module(name)
    stale = _compiled_kernel_modules()
    for _ in range(2 if stale else 0):
        for m in stale:
            importlib.reload(m)
    return sys.modules[name]
