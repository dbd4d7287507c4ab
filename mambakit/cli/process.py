"""The process-wide settings the command line makes (and the library never does)."""
from __future__ import annotations

import os
import sys


def headless_plots() -> None:
    """Make matplotlib draw into files only (the Agg backend, no display needed), in this process and in the ones it
    starts. Costs nothing when matplotlib is not imported yet: the backend is then chosen through MPLBACKEND."""
    os.environ["MPLBACKEND"] = "Agg"
    matplotlib = sys.modules.get("matplotlib")
    if matplotlib is not None:
        matplotlib.use("Agg")


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory instead of returning it to the OS (mallopt M_TRIM_THRESHOLD and
    M_MMAP_THRESHOLD to 1 GiB), for the rest of the process.

    The CPU training steps of ``mambakit tasks`` allocate and free the same large temporaries every step; with the
    default policy each step page-faults them in again, a sizeable share of a run's CPU time (see
    benchmarks/RESULTS.md). Returns True when both settings were made, False where there is no glibc (macOS,
    Windows, musl).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-1, 1 << 30)) and bool(mallopt(-3, 1 << 30))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
