"""CPU benchmark of the Mamba-3 SISO scan: the step recurrence (backend="ref") vs the chunked PyTorch form
(backend="torch"), forward and forward+backward (gradients to every input), one JSON row per case and form.

Each row: the case (batch, seqlen, nheads, headdim, d_state, n_angles, chunk_size, dtype), the form, the median
forward and forward+backward times in ms, and the chunked form's relative error against the recurrence (output
and gradients) when both ran. The recurrence runs only up to --ref-max-seqlen (it is one Python step per token).

Usage::

    python benchmarks/bench_mamba3_cpu.py [--threads 2] [--seqlens 256 1024 4096] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from _common import Rows, rel_err, time_ms

from mambakit.ops.mamba3 import mamba3_scan


def _inputs(batch: int, seqlen: int, nheads: int, headdim: int, d_state: int, n_angles: int,
            dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    DT = F.softplus(rnd(batch, nheads, seqlen) - 3)
    return dict(Q=rnd(batch, seqlen, 1, d_state), K=rnd(batch, seqlen, 1, d_state), V=rnd(batch, seqlen, nheads,
                headdim), ADT=-torch.rand(batch, nheads, seqlen, generator=g, dtype=dtype) * 4 * DT, DT=DT,
                Trap=rnd(batch, nheads, seqlen), Q_bias=torch.ones(nheads, d_state, dtype=dtype),
                K_bias=torch.ones(nheads, d_state, dtype=dtype), Angles=rnd(batch, seqlen, nheads, n_angles),
                D=torch.ones(nheads, dtype=dtype), Z=rnd(batch, seqlen, nheads, headdim))


def _run(inputs: dict, backend: str, chunk_size: int, repeats: int) -> dict:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    weight = torch.randn(inputs["V"].shape, generator=torch.Generator().manual_seed(1), dtype=inputs["V"].dtype)

    def forward():
        with torch.no_grad():
            return mamba3_scan(**leaves, chunk_size=chunk_size, backend=backend)

    def forward_backward():
        y = mamba3_scan(**leaves, chunk_size=chunk_size, backend=backend)
        return torch.autograd.grad((y * weight).sum(), list(leaves.values()))

    y = forward()
    grads = forward_backward()
    return dict(fwd_ms=time_ms(forward, repeats, warmup=1), fwd_bwd_ms=time_ms(forward_backward, repeats, warmup=1),
                y=y, grads=grads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--rope-fraction", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-max-seqlen", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n_angles = int(args.d_state * args.rope_fraction) // 2
    rows = Rows("bench_mamba3_cpu")
    for seqlen in args.seqlens:
        case = dict(batch=args.batch, seqlen=seqlen, nheads=args.nheads, headdim=args.headdim, d_state=args.d_state,
                    n_angles=n_angles, chunk_size=args.chunk_size, dtype=args.dtype, threads=args.threads)
        inputs = _inputs(args.batch, seqlen, args.nheads, args.headdim, args.d_state, n_angles, dtype)
        chunked = _run(inputs, "torch", args.chunk_size, args.repeats)
        ref = _run(inputs, "ref", args.chunk_size, 1) if seqlen <= args.ref_max_seqlen else None
        for form, res in (("chunked", chunked), ("ref", ref)):
            if res is None:
                continue
            row = dict(case, form=form, fwd_ms=res["fwd_ms"], fwd_bwd_ms=res["fwd_bwd_ms"])
            if form == "chunked" and ref is not None:
                row["rel_err_y"] = rel_err(chunked["y"], ref["y"])
                row["rel_err_grad_max"] = max((rel_err(a, b) for a, b in zip(chunked["grads"], ref["grads"])),
                                              default=math.nan)
            rows.add(**row)
    rows.save()


if __name__ == "__main__":
    main()
