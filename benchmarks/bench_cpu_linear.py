"""CPU decode projections at batch 1: the ways torch offers to multiply a (1, K) activation by a 16-bit (N, K) weight,
time and accuracy, interleaved in one process.

    python benchmarks/bench_cpu_linear.py                      # the 130M shapes, 1 and 2 threads, 7 rounds
    python benchmarks/bench_cpu_linear.py --threads 1 --rounds 3

Candidates: "fp32 F.linear" (float32 weight: MKL), "bf16 mv" (torch.mv, the previous bfloat16 decode product:
float32 accumulation, output rounded to bfloat16), "bf16 F.linear" (oneDNN/MKL bfloat16 GEMM, output bfloat16),
"cpu_linear" (`mambakit.ops.cpu_linear`: fbgemm's float16-weight product, float32 input and output). Each round
times every candidate (median of --reps calls) in turn; the table gives the median over rounds of ms per call and
the relative error max|y - y64| / max|y64| against the float64 product of the same bfloat16 weight and the float32
activation (for "fp32 F.linear" the float32 weight itself: its own rounding, for scale).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from _common import Rows, table
from mambakit.ops.cpu_linear import cpu_linear

# (K, N): in_proj Mamba-1 (768 -> 2 * 1536), out_proj (1536 -> 768), in_proj Mamba-2 (768 -> 3352), lm_head
SHAPES = [(768, 3072), (1536, 768), (768, 3352), (768, 50280)]


def candidates(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    wb, xb = w.bfloat16(), x.bfloat16()
    cpu_linear(x, wb)  # packs once, outside the timing
    return {"fp32 F.linear": lambda: F.linear(x, w), "bf16 mv": lambda: torch.mv(wb, xb[0])[None],
            "bf16 F.linear": lambda: F.linear(xb, wb), "cpu_linear": lambda: cpu_linear(x, wb)}


def time_call(f: Callable[[], torch.Tensor], reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=20, help="calls per candidate and round (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="two small shapes (smoke test)")
    parser.add_argument("--json", help="rows as JSON lines (default: $OUT/cpu_linear.jsonl)")
    args = parser.parse_args()
    rows = Rows("cpu_linear", args.json)
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for k, n in [(48, 80), (96, 40)] if args.tiny else SHAPES:
            g = torch.Generator().manual_seed(k + n)
            x, w = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5
            fs = candidates(x, w)
            ref = F.linear(x.double(), w.bfloat16().double())
            errs = {name: float((f().double() - (F.linear(x.double(), w.double()) if name.startswith("fp32") else ref))
                                .abs().max() / ref.abs().max()) for name, f in fs.items()}
            ms: dict[str, list[float]] = {name: [] for name in fs}
            for _ in range(args.rounds):
                for name, f in fs.items():
                    ms[name].append(1e3 * time_call(f, args.reps))
            for name in fs:
                rows.add(threads=threads, K=k, N=n, candidate=name, ms=statistics.median(ms[name]),
                         rel_err=errs[name], load_1min=os.getloadavg()[0])
    rows.save()
    shown = [{**r, "rel_err": f"{r['rel_err']:.1e}"} for r in rows.rows]
    print(table(shown, ["threads", "K", "N", "candidate", "ms", "rel_err", "load_1min"]))


if __name__ == "__main__":
    main()
