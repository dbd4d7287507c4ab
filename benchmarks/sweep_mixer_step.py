"""The one-token state-update kernels (`mambakit.ops.triton.mixer_step`) under several blocks, per launch.

    python benchmarks/sweep_mixer_step.py                      # GPU: bf16, the 130M shape, batches 1 16 64
    python benchmarks/sweep_mixer_step.py --shape 1.4b --layers 48 --batches 1 16
    python benchmarks/sweep_mixer_step.py --arch mamba2        # Mamba-2's state step: head-dim rows x warps
    python benchmarks/sweep_mixer_step.py --device cpu --tiny  # smoke test: the interpreter, a tiny shape

--arch mamba2 times the Mamba-2 state step alone (the conv update is its own kernel) on the 130M shape (24 heads of
64, d_state 128, one group), configurations (head-dim rows per program, warps).

Each configuration (channels per program, batch rows per program, warps) runs the whole step (conv + x_proj
partials, then the state update) over `--layers` copies of the states and weights in one CUDA graph, as a decode
step's layers do (nothing stays in L2 from one layer to the next); us per layer. Every configuration's output and
new state are checked against the default's (within 1e-2 in bf16: the warp count changes the order of the in-program
sums on the GPU; 1e-5 in float32).
"""
from __future__ import annotations

import argparse
import os
import sys


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--shape", default="130m", choices=["130m", "1.4b"],
                   help="d_inner 1536, dt_rank 48 (130m) or d_inner 4096, dt_rank 128 (1.4b); d_state 16")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--arch", default="mamba1", choices=["mamba1", "mamba2"])
    return p.parse_args()


ARGS = parse()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from _common import Rows, device_line, graph_us, rel_err, report, table, time_ms  # noqa: E402
from mambakit.ops.triton.mixer_step import (StepConfig, mamba1_step_config, mamba1_step_triton,  # noqa: E402
                                            mamba2_state_step_triton)

CONFIGS = [StepConfig(bd, 1, w, gemm) for gemm in (False, True) for bd in (32, 64)
           for w in (1, 2, 4, 8)]


def layer(g, batch, d_inner, d_state, dt_rank, dtype, device):
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale)  # noqa: E731
    p = dict(conv_weight=r(d_inner, 4, scale=0.5).to(dtype), conv_bias=r(d_inner, scale=0.3).to(dtype),
             x_proj_weight=r(dt_rank + 2 * d_state, d_inner, scale=d_inner ** -0.5).to(dtype),
             dt_proj_weight=r(d_inner, dt_rank, scale=dt_rank ** -0.5).to(dtype),
             dt_proj_bias=(r(d_inner, scale=0.5) - 3).to(dtype),
             A_log=torch.log(torch.rand(d_inner, d_state, generator=g, device=device) * 4 + 0.5), D=r(d_inner))
    xz = r(batch, 2 * d_inner).to(dtype)
    conv = r(batch, d_inner, 4).to(dtype)
    ssm = r(batch, d_inner, d_state)
    return p, xz, conv, ssm


def call(p, xz, conv, ssm, cfg):
    return lambda: mamba1_step_triton(xz, conv, p["conv_weight"], p["conv_bias"], p["x_proj_weight"],
                                      p["dt_proj_weight"], p["dt_proj_bias"], p["A_log"], p["D"], ssm, config=cfg)


M2_CONFIGS = [(bp, w) for bp in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)]


def mamba2_case(g, batch, nheads, headdim, d_state, dtype, device):
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale)  # noqa: E731
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * d_state
    p = dict(dt_bias=r(nheads, scale=0.5) - 2, A_log=torch.log(torch.rand(nheads, generator=g, device=device) * 8 + 1),
             D=r(nheads))
    xbc = r(batch, conv_dim).to(dtype)
    zxbcdt = r(batch, d_inner + conv_dim + nheads).to(dtype)
    return p, xbc, zxbcdt, r(batch, nheads, headdim, d_state)


def mamba2_call(p, xbc, zxbcdt, ssm, cfg):
    d_inner = ssm.shape[1] * ssm.shape[2]
    return lambda: mamba2_state_step_triton(xbc, zxbcdt, d_inner + xbc.shape[1], p["dt_bias"], p["A_log"], p["D"],
                                            ssm, 1, (0.0, float("inf")), True, block_p=cfg[0], num_warps=cfg[1])


def main_mamba2() -> int:
    device = ARGS.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    nheads, headdim, d_state = (3, 8, 5) if ARGS.tiny else (24, 64, 128)
    batches = [1, 3] if ARGS.tiny else ARGS.batches
    configs = [(0, 8), (4, 1), (8, 2)] if ARGS.tiny else [(0, 8)] + M2_CONFIGS
    layers = 1 if device == "cpu" else ARGS.layers
    rows, best = Rows("mamba2_state_step"), []
    report.log(f"# {device_line() if device == 'cuda' else 'cpu (Triton interpreter)'}; Mamba-2 state step, "
               f"{nheads} heads x {headdim}, d_state {d_state}, {layers} layers per graph")
    g = torch.Generator(device=device).manual_seed(0)
    for batch in batches:
        cases = [mamba2_case(g, batch, nheads, headdim, d_state, dtype, device) for _ in range(layers)]
        p, xbc, zx, ssm = cases[0]
        ssm = ssm.clone()
        s0 = ssm.clone()
        ref = mamba2_call(p, xbc, zx, s0, (0, 8))()
        timed = {}
        for cfg in dict.fromkeys(configs):
            s1 = ssm.clone()
            out = mamba2_call(p, xbc, zx, s1, cfg)()
            tol = 1e-2 if dtype != torch.float32 else 1e-5
            report.check(f"batch {batch} {cfg} against the default", max(rel_err(out, ref), rel_err(s1, s0)), tol)
            calls = [mamba2_call(*case, cfg) for case in cases]
            us = graph_us(calls, ARGS.replays) if device == "cuda" else time_ms(calls[0], repeats=1, warmup=0) * 1e3
            timed[cfg] = us
            rows.add(bench="mamba2_state_step", batch=batch, config=f"{cfg[0]} {cfg[1]}", default=cfg == (0, 8),
                     us=us, state_GBps=2 * ssm.numel() * 4 / us / 1e3)
        fastest = min(timed, key=timed.get)
        best.append(dict(batch=batch, best=f"{fastest[0]} {fastest[1]}", best_us=timed[fastest],
                         default_us=timed[(0, 8)]))
    rows.save()
    report.log("\n" + table(rows.rows, ["batch", "config", "default", "us", "state_GBps"]))
    report.log("\nfastest (config = block_p num_warps; 0 = the default's rows):\n"
               + table(best, ["batch", "best", "best_us", "default_us"]))
    return report.finish()


def main() -> int:
    if ARGS.arch == "mamba2":
        return main_mamba2()
    device = ARGS.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"130m": (1536, 16, 48), "1.4b": (4096, 16, 128)}
    d_inner, d_state, dt_rank = (40, 5, 3) if ARGS.tiny else shapes[ARGS.shape]
    batches = [1, 3] if ARGS.tiny else ARGS.batches
    configs = CONFIGS[:3] + [StepConfig(16, 4, 2)] if ARGS.tiny else CONFIGS
    layers = 1 if device == "cpu" else ARGS.layers
    rows, best = Rows("mixer_step"), []
    report.log(f"# {device_line() if device == 'cuda' else 'cpu (Triton interpreter)'}; d_inner {d_inner}, "
               f"d_state {d_state}, dt_rank {dt_rank}, {layers} layers per graph")
    g = torch.Generator(device=device).manual_seed(0)
    for batch in batches:
        cases = [layer(g, batch, d_inner, d_state, dt_rank, dtype, device) for _ in range(layers)]
        default = mamba1_step_config(batch, d_inner, torch.device(device))
        p, xz, conv, ssm = cases[0]
        conv, ssm = conv.clone(), ssm.clone()  # the states before any step (timing advances cases[0]'s)
        c0, s0 = conv.clone(), ssm.clone()
        ref = call(p, xz, c0, s0, default)()
        timed = {}
        for cfg in dict.fromkeys([default] + configs):
            c1, s1 = conv.clone(), ssm.clone()
            out = call(p, xz, c1, s1, cfg)()
            tol = 1e-2 if dtype != torch.float32 else 1e-5
            report.check(f"batch {batch} {tuple(cfg)} against the default", max(rel_err(out, ref), rel_err(s1, s0)),
                         tol)
            calls = [call(*case, cfg) for case in cases]
            us = graph_us(calls, ARGS.replays) if device == "cuda" else time_ms(calls[0], repeats=1, warmup=0) * 1e3
            timed[cfg] = us
            rows.add(bench="mixer_step", batch=batch, config=" ".join(map(str, cfg)), default=cfg == default,
                     us=us, state_GBps=2 * ssm.numel() * 4 / us / 1e3)
        fastest = min(timed, key=timed.get)
        best.append(dict(batch=batch, best=" ".join(map(str, fastest)), best_us=timed[fastest],
                         default=" ".join(map(str, default)), default_us=timed[default]))
    rows.save()
    report.log("\n" + table(rows.rows, ["batch", "config", "default", "us", "state_GBps"]))
    report.log("\nfastest (config = block_d rows num_warps xproj_gemm):\n"
               + table(best, ["batch", "best", "best_us", "default", "default_us"]))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
