"""Shared pieces of the benchmarks: the timers (median wall time, median CUDA-event time, a CUDA graph's time per
call, first-call seconds), one
relative error, the check report (log, check, failure list), the allocator poison, the official package's import,
JSON rows.

Benchmarks import this file as `from _common import ...` (they run as scripts from the repository root with
`python benchmarks/<name>.py`, so `benchmarks/` is on sys.path).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, synchronising the GPU around each call (CPU too)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100, grad_to_none: Optional[list] = None) -> float:
    """Median time of fn() in milliseconds from triton.testing.do_bench (CUDA events, L2 flushed between calls);
    warmup and rep are do_bench's budgets in milliseconds; the .grad of grad_to_none's tensors is reset per call."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def graph_us(calls: list[Callable[[], object]], replays: int) -> float:
    """us per call of one CUDA graph that runs every call once, replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # compiles, allocator warm-up
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def first_call_s(fn: Callable[[], Any]) -> float:
    """Seconds of one call of fn(), the device synchronised before and after (the first call pays any compile)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (||out|| when ref is zero); inf when either has a non-finite value."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(out64).all() and torch.isfinite(ref64).all()):
        return float("inf")
    den = torch.linalg.norm(ref64)
    return float(torch.linalg.norm(out64 - ref64) / den) if den > 0 else float(torch.linalg.norm(out64))


class Report:
    """The checks of a GPU benchmark: `log` prints (and writes to the log file, if one is open), `check` logs an error
    against its tolerance and records a failure; `finish` logs the verdict and returns the exit code."""

    def __init__(self) -> None:
        self.fails: list[str] = []
        self.file: Optional[Any] = None

    def open_log(self, path: Optional[str]) -> None:
        self.file = open(path, "w") if path else None

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.file is not None:
            self.file.write(msg + "\n")
            self.file.flush()

    def fail(self, what: str) -> None:
        self.fails.append(what)

    def check(self, name: str, err: float, tol: float) -> None:
        ok = err <= tol
        if not ok:
            self.fail(f"{name}: {err:.3e} > {tol:.0e}")
        self.log(f"    {name:<34s} {err:10.3e}  (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")

    def finish(self) -> int:
        self.log("\nFAILED: " + "; ".join(self.fails) if self.fails else "\nall checks passed")
        return 1 if self.fails else 0


#: The one report of the running benchmark (scripts that import another's functions share it).
report = Report()


def poison() -> None:
    """Fill the CUDA caching allocator's free memory with NaN bytes so that unwritten outputs show up as NaN."""
    free, _ = torch.cuda.mem_get_info()
    n = int(min(free * 0.5, 12 * 2**30))
    t = torch.empty(n, dtype=torch.uint8, device="cuda")
    t.fill_(0xFF)
    del t


def import_official() -> Optional[dict[str, Any]]:
    """The official mamba_ssm's LM classes and generation helpers, or None (and a note) when it is not importable."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as OfficialLM
        from mamba_ssm.utils.generation import InferenceParams, update_graph_cache
    except Exception as exc:  # any failure means "run without it"
        print(f"# official mamba_ssm not importable ({type(exc).__name__}: {exc}); mambakit only")
        return None
    import mamba_ssm

    print(f"# official mamba_ssm {mamba_ssm.__version__} imported")
    return {"Config": OfficialConfig, "LM": OfficialLM, "InferenceParams": InferenceParams,
            "update_graph_cache": update_graph_cache}


def official_function(module: str, name: str, log: Callable[[str], None] = print) -> Optional[Callable[..., Any]]:
    """module.name from the official packages (mamba_ssm, causal_conv1d), or None (and a note) when not importable."""
    try:
        fn = getattr(__import__(module, fromlist=[name]), name)
    except Exception as exc:  # any failure means "run without it"
        log(f"# official {module}.{name} not importable ({type(exc).__name__}: {exc}); mambakit only")
        return None
    log(f"# official {module}.{name} imported")
    return fn


def device_line() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import triton

    return f"{name}, torch {torch.__version__}, triton {triton.__version__}"


class Rows:
    """Benchmark rows: printed as they come, written as JSON lines to `path` (default $OUT/<name>.jsonl if $OUT is
    set) at the end."""

    def __init__(self, name: str, path: Optional[str] = None):
        out = os.environ.get("OUT")
        self.path = Path(path) if path else (Path(out) / f"{name}.jsonl" if out else None)
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print("ROW " + json.dumps(row), flush=True)

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of the given columns (missing values blank; floats with 3 significant decimals)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
