"""The decode step's norm-fused GEMV kernels against the unfused pair (the norm kernel, then cuBLAS), per launch.

    python benchmarks/bench_gemv.py                               # GPU: bf16, batches 1-16, the issue-20 shapes
    python benchmarks/bench_gemv.py --batches 1 8 --shapes 768x3072
    python benchmarks/bench_gemv.py --device cpu --tiny           # smoke test: the interpreter, tiny shapes
    python benchmarks/bench_gemv.py --variants                    # also time launch_config's neighbours

Ops, each fused (one `mambakit.ops.triton.gemv` launch) and unfused (what the decode step ran before):
  add_norm: add_rms_norm(hidden, residual) -> F.linear (the in_proj shapes, in_features = d_model);
  gated:    rms_norm_gated(y, z) -> F.linear (the out_proj shapes);
  plain:    F.linear alone against the plain GEMV kernel (the out_proj shapes; PLAIN_GEMV's choice).
Timing on CUDA: one CUDA graph replaying the op over enough copies of the weight that they do not fit in L2 (as in
a decode step, where every weight is read once), CUDA events around the replays; us per op. Also reported: the
rate over the weight bytes, and the relative error of fused against unfused. With --variants each fused op is also
timed under a few neighbours of `gemv.launch_config`'s choice (VARIANTS: the other warp count, half the warps, half /
twice the output rows per program, no k split, one pipeline stage less / more; "looped": the k loop where the default
takes the whole row in one block), each variant checked against the unfused
result too, and a second table names the fastest per shape, op and batch.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

#: (in_features, out_features) -> the op kinds timed on it
SHAPES = {"768x3072": ("add_norm",), "768x3352": ("add_norm",), "2048x8192": ("add_norm",),
          "1536x768": ("gated", "plain"), "4096x2048": ("gated", "plain")}
TINY = {"24x40": ("add_norm",), "40x24": ("gated", "plain")}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, batches 1 2 (the CPU smoke test)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--shapes", nargs="+", default=None, help=f"of {sorted(SHAPES)}")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on cuda, float32 on cpu (the interpreter's bf16 tl.dot is broken)")
    p.add_argument("--ngroups", type=int, default=1, help="groups of the gated norm")
    p.add_argument("--l2-bytes", type=float, default=256e6, help="weight copies per graph reach at least this")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--variants", action="store_true", help="also time neighbours of launch_config's choice")
    return p.parse_args()


ARGS = parse()
ARGS.dtype = ARGS.dtype or ("bfloat16" if ARGS.device == "cuda" else "float32")
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import Rows, device_line, graph_us, rel_err, report, table, time_ms  # noqa: E402
from mambakit.ops import norm_linear  # noqa: E402
from mambakit.ops.norm import add_rms_norm, rms_norm_gated  # noqa: E402
from mambakit.ops.triton import gemv  # noqa: E402


def _half_rows(c):
    return c._replace(block_n=max(16 if c.block_b > 1 else 1, c.block_n // 2))


#: name -> the variant of launch_config's choice c it times
VARIANTS = {
    "warps": lambda c: c._replace(num_warps=4 if c.num_warps == 8 else 8),
    "warps/2": lambda c: c._replace(num_warps=max(1, c.num_warps // 2)),
    "rows/2": _half_rows,
    "rows*2": lambda c: c._replace(block_n=c.block_n * 2),
    "nosplit": lambda c: c._replace(split=1),
    "stages-1": lambda c: c._replace(num_stages=max(1, c.num_stages - 1)),
    "stages+1": lambda c: c._replace(num_stages=c.num_stages + 1),
}


def ops(kind: str, x, x2, nw, w, eps: float, group: int, config=None) -> tuple[Callable, Callable]:
    """(fused, unfused) zero-argument calls of one op kind on one weight copy w (the fused one under config, None:
    launch_config's)."""
    if kind == "add_norm":
        def unfused():
            normed, res = add_rms_norm(x, x2, nw, eps, True)
            return F.linear(normed, w), res
        return (lambda: gemv.add_rms_norm_gemv_triton(x, x2, nw, eps, True, w, config=config)), unfused
    if kind == "gated":
        return ((lambda: gemv.rms_norm_gated_gemv_triton(x, x2, nw, eps, group, False, w, config=config)),
                (lambda: F.linear(rms_norm_gated(x, x2, nw, eps, group, False), w)))
    return (lambda: gemv.gemv_triton(x, w, config=config)), (lambda: F.linear(x, w))


def variants(batch: int, n: int, k: int, group: int, device: str) -> dict:
    """{name: config} of the variants that differ from launch_config's choice ("default" first)."""
    base = gemv.launch_config(batch, n, k, group, torch.device(device))
    out = {"default": base}
    saved = gemv.ONE_SHOT_MAX_K, gemv.ONE_SHOT_BATCHED_MAX_K
    gemv.ONE_SHOT_MAX_K = gemv.ONE_SHOT_BATCHED_MAX_K = 0
    try:
        looped = gemv.launch_config(batch, n, k, group, torch.device(device))  # the k loop, without the one shot
    finally:
        gemv.ONE_SHOT_MAX_K, gemv.ONE_SHOT_BATCHED_MAX_K = saved
    if looped != base:
        out["looped"] = looped
        if looped.block_b > 1:
            # one 16 x 16 (n x batch) tensor-core tile per warp, so that no warp holds a copy of another's inputs;
            # wider k blocks with fewer stages (each stage holds the padded input rows too)
            for bn, warps in ((64, 4), (32, 2), (16, 1), (128, 8), (128, 4)):
                for bk, stages in ((64, 4), (128, 4), (256, 3)):
                    c = looped._replace(block_n=bn, num_warps=warps, block_k=bk, num_stages=stages, split=1)
                    out[f"looped-n{bn}w{warps}k{bk}"] = c
    for name, fn in VARIANTS.items():
        c = fn(base)
        if c not in out.values():
            out[name] = c
    return out


def main() -> int:
    device, dtype = ARGS.device, getattr(torch, ARGS.dtype)
    shapes = TINY if ARGS.tiny else {s: SHAPES[s] for s in (ARGS.shapes or SHAPES)}
    batches = [1, 2] if ARGS.tiny else ARGS.batches
    rows, vrows, brows = Rows("gemv"), Rows("gemv_variants"), []
    report.log(f"# {device_line() if device == 'cuda' else 'cpu (Triton interpreter)'}; {ARGS.dtype}; "
               f"GEMV_MAX_BATCH = {norm_linear.GEMV_MAX_BATCH}")
    g = torch.Generator(device=device).manual_seed(0)
    for shape, kinds in shapes.items():
        k, n = (int(v) for v in shape.split("x"))
        wbytes = n * k * torch.finfo(dtype).bits // 8
        copies = 1 if device == "cpu" else max(1, int(ARGS.l2_bytes // wbytes))
        weights = [(torch.randn(n, k, generator=g, device=device) * k ** -0.5).to(dtype) for _ in range(copies)]
        nw = (torch.rand(k, generator=g, device=device) + 0.5).to(dtype)
        for kind in kinds:
            for batch in batches:
                x = torch.randn(batch, k, generator=g, device=device).to(dtype)
                second = {"add_norm": torch.randn(batch, k, generator=g, device=device),
                          "gated": torch.randn(batch, 2 * k, generator=g, device=device).to(dtype)[:, :k]}.get(kind)
                pairs = [ops(kind, x, second, nw, w, 1e-5, k // ARGS.ngroups) for w in weights]
                out_f, out_u = pairs[0][0](), pairs[0][1]()
                first = (lambda o: o[0] if isinstance(o, tuple) else o)
                err = rel_err(first(out_f), first(out_u))
                report.check(f"{shape} {kind} batch {batch}", err, 2e-2 if dtype != torch.float32 else 1e-5)
                if device == "cuda":
                    fused_us = graph_us([p[0] for p in pairs], ARGS.replays)
                    unfused_us = graph_us([p[1] for p in pairs], ARGS.replays)
                else:
                    fused_us = time_ms(pairs[0][0], repeats=1, warmup=0) * 1e3
                    unfused_us = time_ms(pairs[0][1], repeats=1, warmup=0) * 1e3
                if ARGS.variants:
                    timed = {}
                    configs = variants(batch, n, k, k // ARGS.ngroups, device)
                    for name, cfg in configs.items():
                        calls = [ops(kind, x, second, nw, w, 1e-5, k // ARGS.ngroups, cfg)[0] for w in weights]
                        report.check(f"{shape} {kind} batch {batch} {name}", rel_err(first(calls[0]()), first(out_u)),
                                     2e-2 if dtype != torch.float32 else 1e-5)
                        timed[name] = (graph_us(calls, ARGS.replays) if device == "cuda"
                                       else time_ms(calls[0], repeats=1, warmup=0) * 1e3)
                        vrows.add(bench="gemv_variants", shape=shape, op=kind, batch=batch, variant=name,
                                  config=" ".join(str(v) for v in cfg), us=timed[name],
                                  GBps=wbytes / timed[name] / 1e3)
                    best = min(timed, key=timed.get)
                    brows.append(dict(shape=shape, op=kind, batch=batch, best=best, best_us=timed[best],
                                      default_us=timed["default"], config=" ".join(str(v) for v in configs[best])))
                rows.add(bench="gemv", shape=shape, op=kind, batch=batch, dtype=ARGS.dtype, device=device,
                         fused_us=fused_us, unfused_us=unfused_us, speedup=unfused_us / fused_us,
                         fused_GBps=wbytes / fused_us / 1e3, rel_err=err)
    rows.save()
    report.log("\n" + table(rows.rows, ["shape", "op", "batch", "fused_us", "unfused_us", "speedup", "fused_GBps",
                                        "rel_err"]))
    if ARGS.variants:
        vrows.save()
        report.log("\n" + table(vrows.rows, ["shape", "op", "batch", "variant", "config", "us", "GBps"]))
        report.log("\nfastest variant (config = block_b block_n block_k num_warps num_stages split):\n"
                   + table(brows, ["shape", "op", "batch", "best", "config", "best_us", "default_us"]))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
