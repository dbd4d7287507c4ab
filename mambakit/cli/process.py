"""The process-wide settings the command line makes (and the library never does)."""
from __future__ import annotations

import os
import sys

MAX_THREADS = 4096  # beyond any machine's cores; torch.set_num_threads overflows on far larger numbers


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


def busy_cores(samples: int = 5, interval: float = 0.01) -> int:
    """How many cores other processes keep busy right now: the median over a few samples of the runnable tasks in
    /proc/loadavg (minus this one), or the 1-minute load average where there is no /proc."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(max(0, int(f.read().split()[3].split("/")[0]) - 1))
        except (OSError, ValueError, IndexError):
            break
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return int(statistics.median(counts))
    try:
        return int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):
        return 0


def auto_threads() -> int:
    """CPU threads for this process: the cores it may run on less those other processes keep busy, at least one.
    Fewer threads than cores when the others are busy: torch's threads wait for each other, and a thread that
    shares its core makes all of them wait (benchmarks/RESULTS.md, thread policy)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, cores - busy_cores()))


def set_threads(requested: "int | None") -> int:
    """Set torch's intra-op CPU threads for the command: `requested` (--threads), else OMP_NUM_THREADS when the
    environment sets it, else `auto_threads()`. Returns the number set."""
    import torch

    if requested is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        requested = int(env) if env.isdigit() and 0 < int(env) <= MAX_THREADS else auto_threads()
    torch.set_num_threads(requested)
    return requested
