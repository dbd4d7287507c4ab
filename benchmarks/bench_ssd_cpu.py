"""CPU benchmark: mambakit's chunked SSD vs the SSD part of transformers' Mamba-2 torch path.

Compares ``mambakit.ops.ssd.mamba_chunk_scan_combined`` with ``transformers``' ``mamba2_chunk_scan`` (the pure-torch
fallback that ``Mamba2Mixer.torch_forward`` runs on CPU), same inputs and options (dt_bias, softplus, D), forward
only and forward+backward (gradients to every input), best of a few interleaved runs.

Usage::

    python3 benchmarks/bench_ssd_cpu.py [--threads 2] [--seqlens 512 1024 2048 4096] [--repeats 5]
    python3 benchmarks/bench_ssd_cpu.py --threads 1 --cpu-time    # robust on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable, Dict, List

import torch

from mambakit.ops.ssd import mamba_chunk_scan_combined


def _transformers_ssd() -> Callable:
    from transformers.models.mamba2 import modeling_mamba2 as hf

    fn = hf.mamba2_chunk_scan
    return getattr(fn, "__wrapped__", fn)  # the torch fallback, without the kernel-hub dispatch


def _inputs(batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, d_state: int,
            dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {
        "x": rnd(batch, seqlen, nheads, headdim),
        "dt": rnd(batch, seqlen, nheads),
        "A": -torch.rand(nheads, generator=g, dtype=dtype) * 4 - 0.5,
        "B": rnd(batch, seqlen, ngroups, d_state),
        "C": rnd(batch, seqlen, ngroups, d_state),
        "D": rnd(nheads),
        "dt_bias": rnd(nheads),
    }


def _clock(cpu_time: bool) -> Callable[[], float]:
    return time.thread_time if cpu_time else time.perf_counter


def _make_calls(op: Callable, inputs: Dict[str, torch.Tensor], chunk_size: int) -> tuple[Callable, Callable]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def call(kw: Dict[str, torch.Tensor]) -> torch.Tensor:
        return op(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk_size=chunk_size, D=kw["D"],
                  dt_bias=kw["dt_bias"], dt_softplus=True)

    def forward() -> None:
        with torch.no_grad():
            call(inputs)

    def forward_backward() -> None:
        for v in leaves.values():
            v.grad = None
        call(leaves).square().mean().backward()

    return forward, forward_backward


def _bench_pair(ours: Callable, ref: Callable, inputs: Dict[str, torch.Tensor], chunk_size: int, repeats: int,
                cpu_time: bool) -> List[float]:
    """Min over ``repeats`` (after a warm-up) of [ours fwd, ref fwd, ours fwd+bwd, ref fwd+bwd], interleaved so
    that a busy machine disturbs both sides alike."""
    clock = _clock(cpu_time)
    calls = [*_make_calls(ours, inputs, chunk_size), *_make_calls(ref, inputs, chunk_size)]
    calls = [calls[0], calls[2], calls[1], calls[3]]
    best = [float("inf")] * 4
    for fn in calls:
        fn()  # warm-up
    for _ in range(repeats):
        for i, fn in enumerate(calls):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--ngroups", type=int, default=1)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-time", action="store_true",
                        help="measure thread CPU time instead of wall time (use with --threads 1 on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    reference = _transformers_ssd()
    print(f"SSD fp32, batch {args.batch}, nheads {args.nheads}, headdim {args.headdim}, ngroups {args.ngroups}, "
          f"d_state {args.d_state}, chunk {args.chunk_size}, {torch.get_num_threads()} thread(s); best of "
          f"{args.repeats}, {'CPU' if args.cpu_time else 'wall'} seconds")
    header = (f"{'seqlen':>7} | {'ours fwd':>9} {'hf fwd':>9} {'speedup':>7} | "
              f"{'ours f+b':>9} {'hf f+b':>9} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for seqlen in args.seqlens:
        inputs = _inputs(args.batch, seqlen, args.nheads, args.headdim, args.ngroups, args.d_state, torch.float32)
        ours_f, hf_f, ours_fb, hf_fb = _bench_pair(mamba_chunk_scan_combined, reference, inputs, args.chunk_size,
                                                   args.repeats, args.cpu_time)
        print(f"{seqlen:>7} | {ours_f:>9.4f} {hf_f:>9.4f} {hf_f / ours_f:>6.2f}x | "
              f"{ours_fb:>9.4f} {hf_fb:>9.4f} {hf_fb / ours_fb:>6.2f}x")


if __name__ == "__main__":
    main()
