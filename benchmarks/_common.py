"""Shared pieces of the benchmarks: one GPU timer, one relative error, the official package's import, JSON rows.

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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a non-finite value (NaN never passes)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


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
