"""Host (CPU) time of the training step's pieces on a GPU: what the Python side, the launches and the torch ops cost
while the GPU waits (a step whose host time exceeds its kernel time is launch-bound).

    PYTHONUNBUFFERED=1 python3 benchmarks/host_overhead.py [--arch mamba2] [--top 30]

Host time = from the call until Python returns, the GPU synchronised before each call (so the launch queue is empty
and nothing blocks on it). Rows: one Triton launch of a no-op kernel with 24 arguments, torch.empty, a small
torch.sum, one mixer block forward and forward+backward (bf16 autocast, 8 x 2048, the 130M width), each with its
kernel count; then cProfile of the block's forward+backward by cumulative time (mambakit and triton functions), and
the torch profiler's CPU table by self time.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from _common import Rows, device_line, sync, table  # noqa: E402


@triton.jit
def _noop(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11,
          FLAG: tl.constexpr):
    if FLAG:
        tl.store(p0 + i0, tl.load(p1 + i1))


def host_us(fn, repeats: int = 30) -> float:
    """Median host microseconds of fn(), the GPU idle at each start."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    sync()
    return statistics.median(times)


def kernels_of(fn) -> tuple[int, float]:
    """(kernel launches, kernel ms) of one call of fn."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return len(ev), sum(e.device_time_total for e in ev) / 1e3


def block(arch: str):
    if arch == "mamba2":
        from mambakit.layers.mamba2 import Mamba2
        return Mamba2(768, d_state=128, headdim=64, device="cuda")
    from mambakit.layers.mamba import Mamba
    return Mamba(768, device="cuda")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mamba2", choices=["mamba1", "mamba2"])
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    print(f"# {device_line()}")
    rows = Rows("host_overhead")
    a = torch.zeros(16, device="cuda")
    ints = [16] * 12
    rows.add(piece="triton no-op launch (24 args)",
             host_us=host_us(lambda: _noop[(1,)](*([a] * 12), *ints, FLAG=False)))
    rows.add(piece="torch.empty (8, 2048, 1536) bf16",
             host_us=host_us(lambda: torch.empty(8, 2048, 1536, device="cuda", dtype=torch.bfloat16)))
    s = torch.randn(8, 24, 16, device="cuda")
    rows.add(piece="torch.sum of (8, 24, 16) over dim 0", host_us=host_us(lambda: s.sum(0)))
    w = torch.randn(64, 64, device="cuda")
    rows.add(piece="fp32 -> bf16 cast of a (64, 64) weight", host_us=host_us(lambda: w.to(torch.bfloat16)))
    m = block(args.arch)
    x = torch.randn(args.batch, args.seqlen, 768, device="cuda", requires_grad=True)
    g = torch.randn_like(x)

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            m(x)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        out.backward(g)
        m.zero_grad(set_to_none=True)
        x.grad = None

    for name, fn in ((f"{args.arch} block forward (no grad)", fwd), (f"{args.arch} block forward+backward", fwd_bwd)):
        n, kms = kernels_of(fn)
        rows.add(piece=name, host_us=host_us(fn, repeats=10), kernels=n, kernel_ms=kms)
    rows.save()
    print(table(rows.rows, ["piece", "host_us", "kernels", "kernel_ms"]))

    prof = cProfile.Profile()
    fwd_bwd()
    sync()
    prof.enable()
    for _ in range(3):
        fwd_bwd()
    sync()
    prof.disable()
    print("# cProfile of 3 block forward+backward calls, by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"mambakit|triton/runtime", args.top)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            fwd_bwd()
        sync()
    print("# torch profiler, CPU, 3 block forward+backward calls, by self CPU time")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
