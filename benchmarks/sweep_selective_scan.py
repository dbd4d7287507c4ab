"""Sweep the Triton selective scan's launch configurations (lanes per channel, channels per program, time tile) on a
GPU, check every configuration against the default one, and time forward and forward+backward side by side with the
official CUDA scan when `mamba_ssm` is importable.

Run on a CUDA machine:
    PYTHONUNBUFFERED=1 python3 benchmarks/sweep_selective_scan.py [--dims 1536 2048] [--seqlens 2048]
Shape: batch 8, d_state 16; u, delta, z, B, C bf16; A, D, delta_bias fp32; softplus; with z. Two layouts:
"time" (u/delta/z (batch, dim, seqlen) contiguous, the op benchmark's form) and "channel" (views of channel-last
(batch, seqlen, dim) tensors, the upstream gradient too, with B/C strided views of one (batch, seqlen,
2 d_state + 48) buffer: the Mamba-1 block's form). Prints one JSON row per (layout, dim, seqlen, config) and a
markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _common import gpu_ms, rel_err  # noqa: E402

from mambakit.ops.triton import selective_scan as tss  # noqa: E402

# (NH, NL, fwd_block_d, fwd_block_t, fwd_warps, bwd_block_d, bwd_block_t, bwd_warps[, bwd_NH, bwd_NL]): d_state 16
# = NH * NL; the backward splits the states its own way where bwd_NH / bwd_NL are given
CONFIGS = {
    "base": None,
    "NL2 f16x8 b16x4": (8, 2, 16, 8, 1, 16, 4, 1),
    "NL2 f16x4 b16x2": (8, 2, 16, 4, 1, 16, 2, 1),
    "NL2 f16x16 b16x1": (8, 2, 16, 16, 1, 16, 1, 1),
    "NL4 f16x8 b16x2": (4, 4, 16, 8, 1, 16, 2, 1),
    "NL4 f16x8 b16x1": (4, 4, 16, 8, 1, 16, 1, 1),
    "NL4 f16x8 b8x2": (4, 4, 16, 8, 1, 8, 2, 1),
    "NL4 f16x8 b32x2w2": (4, 4, 16, 8, 1, 32, 2, 2),
    "f NL2 16x8, b NL4 16x2": (8, 2, 16, 8, 1, 16, 2, 1, 4, 4),
    "f NL2 16x8, b NL4 16x4": (8, 2, 16, 8, 1, 16, 4, 1, 4, 4),
    "f NL2 16x8, b NL8 32x2": (8, 2, 16, 8, 1, 32, 2, 1, 2, 8),
    "f NL2 16x8, b NL8 32x4": (8, 2, 16, 8, 1, 32, 4, 1, 2, 8),
    "f NL2 16x8, b NL16 32x2w2": (8, 2, 16, 8, 1, 32, 2, 2, 1, 16),
    # 8 channels per program: twice the programs (the 130M training shape's 768 one-warp programs fill 0.73 of one
    # wave of the backward and 0.36 of the forward: ncu, benchmarks/RESULTS.md)
    "f NL2 16x8, b NL4 8x4": (8, 2, 16, 8, 1, 8, 4, 1, 4, 4),
    "f NL2 16x8, b NL8 8x4": (8, 2, 16, 8, 1, 8, 4, 1, 2, 8),
    "f NL2 16x8, b NL4 8x8": (8, 2, 16, 8, 1, 8, 8, 1, 4, 4),
    "f NL4 8x8, b NL4 16x4": (4, 4, 8, 8, 1, 16, 4, 1, 4, 4),
    "f NL4 8x16, b NL4 16x4": (4, 4, 8, 16, 1, 16, 4, 1, 4, 4),
    "f NL8 8x8, b NL4 16x4": (2, 8, 8, 8, 1, 16, 4, 1, 4, 4),
}


def _config(c: tuple, chunk: int):
    return tss.ScanConfig(*c[:8], chunk, *c[8:])


def make_inputs(batch, dim, N, L, layout, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16

    def act(scale=1.0):
        if layout == "time":
            return (torch.randn(batch, dim, L, generator=g, device=dev) * scale).to(bf)
        return (torch.randn(batch, L, dim, generator=g, device=dev) * scale).to(bf).transpose(1, 2)

    if layout == "time":
        B = torch.randn(batch, N, L, generator=g, device=dev).to(bf)
        C = torch.randn(batch, N, L, generator=g, device=dev).to(bf)
    else:
        buf = torch.randn(batch, L, 48 + 2 * N, generator=g, device=dev).to(bf)
        B = buf[:, :, 48:48 + N].transpose(1, 2)
        C = buf[:, :, 48 + N:].transpose(1, 2)
    A = -torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1)
    dt = torch.exp(torch.rand(dim, generator=g, device=dev) * 4.6 - 6.9)
    return dict(u=act(), delta=act(0.5), A=A, B=B, C=C, D=torch.ones(dim, device=dev), z=act(),
                delta_bias=dt + torch.log(-torch.expm1(-dt)), delta_softplus=True)


def leaves(kw):
    return [v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def run_once(kw, cfg, gy, fn):
    for t in leaves(kw):
        t.requires_grad_(True)
        t.grad = None
    y = fn(kw, cfg)
    y.backward(gy)
    out = [y.detach()] + [t.grad.detach().clone() for t in leaves(kw)]
    for t in leaves(kw):
        t.requires_grad_(False)
        t.grad = None
    return out


def ours(kw, cfg):
    return tss.selective_scan_triton(**kw, config=cfg)


def official_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001
        print(f"official mamba_ssm not importable ({type(e).__name__}: {e}); timing mambakit only", flush=True)
        return None
    return lambda kw, cfg: selective_scan_fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                             kw["delta_bias"], kw["delta_softplus"])


def times(kw, cfg, gy, fn):
    def f():
        with torch.no_grad():
            fn(kw, cfg)
    t_f = gpu_ms(f, warmup=25, rep=150)
    for t in leaves(kw):
        t.requires_grad_(True)

    def fb():
        fn(kw, cfg).backward(gy)
    t_fb = gpu_ms(fb, warmup=25, rep=250, grad_to_none=leaves(kw))
    for t in leaves(kw):
        t.requires_grad_(False)
        t.grad = None
    return t_f, t_fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", nargs="+", type=int, default=[1536, 2048])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[2048])
    ap.add_argument("--layouts", nargs="+", default=["channel", "time"], choices=["channel", "time"])
    ap.add_argument("--configs", nargs="*", default=None, help="names from CONFIGS (default: all)")
    args = ap.parse_args()
    batch, N = 8, 16
    official = official_fn()
    names = args.configs or list(CONFIGS)
    table = ["| layout | dim | seqlen | config | fwd ms | fwd+bwd ms | bwd ms | max rel err vs base |",
             "|---|---|---|---|---|---|---|---|"]
    for layout in args.layouts:
        for dim in args.dims:
            for L in args.seqlens:
                kw = make_inputs(batch, dim, N, L, layout)
                gy = torch.randn(batch, dim, L, device="cuda").to(torch.bfloat16)
                if layout == "channel":  # the upstream gradient in the block's layout too
                    gy = gy.transpose(1, 2).contiguous().transpose(1, 2)
                base = tss.pick_config(N, dim, dim, 1)
                ref = run_once(kw, base, gy, ours)
                entries = [(n, _config(CONFIGS[n], base.chunk) if CONFIGS[n] else base, ours) for n in names]
                if official is not None:
                    entries.append(("official", None, official))
                for name, cfg, fn in entries:
                    try:
                        got = run_once(kw, cfg, gy, fn)
                        err = max(rel_err(a, b) for a, b in zip(got, ref))
                        t_f, t_fb = times(kw, cfg, gy, fn)
                    except Exception as e:  # noqa: BLE001
                        print(f"{layout} {dim} {L} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    row = dict(layout=layout, batch=batch, dim=dim, seqlen=L, d_state=N, config=name,
                               fwd_ms=round(t_f, 4), fwd_bwd_ms=round(t_fb, 4), max_rel_err_vs_base=err)
                    print(json.dumps(row), flush=True)
                    table.append(f"| {layout} | {dim} | {L} | {name} | {t_f:.3f} | {t_fb:.3f} | {t_fb - t_f:.3f} | "
                                 f"{err:.1e} |")
                del kw, gy
                torch.cuda.empty_cache()
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
