"""Launch-parameter sweep of the Triton SSD kernels: chunk length x block length x num_warps x num_stages x the
state pass (fused sequential pass with its state tile, or chunk states + state passing), bf16, 32 heads x 64,
65536 tokens, forward and forward+backward, plus a per-kernel breakdown of chosen settings.

    PYTHONUNBUFFERED=1 python3 benchmarks/sweep_ssd.py [--chunks 64 128 256] [--blocks 32 64] [--warps 4 8]
        [--stages 2] [--d-states 64 128] [--seqlens 2048] [--state-tiles auto 64x64 32x32 unfused] [--check]  (GPU)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _common import report  # noqa: E402
from bench_ssd import bench_ms, correctness, kernel_breakdown, ssd_inputs  # noqa: E402
from mambakit.ops.ssd import mamba_chunk_scan_combined  # noqa: E402
from mambakit.ops.triton import ssd as tssd  # noqa: E402

log = report.log


def configure(chunk: int, block: int, warps: int, stages: int) -> None:
    """Make every later launch use these settings."""
    tssd.MAX_CHUNK, tssd.MAX_BLOCK = chunk, block
    original = configure.original

    def init(self, x, B, chunk_size):
        original(self, x, B, chunk_size)
        self.warps, self.stages = warps, stages

    tssd._Plan.__init__ = init


configure.original = tssd._Plan.__init__


def configure_states(tile: str) -> None:
    """'unfused': chunk states + state passing; 'auto': the fused pass with the plan's tile; 'PxN': that tile;
    a suffix '+pairs' / '+single': two chunks / one chunk per step of the forward pass (none: the plan decides)."""
    tile, _, step = tile.partition("+")
    tssd.FUSED_STATES = tile != "unfused"
    tssd.STATE_TILE = tuple(int(v) for v in tile.split("x")) if "x" in tile else None
    tssd.STATE_PAIRS = {"pairs": True, "single": False}.get(step)


def time_one(N: int, L: int = 2048, tokens: int = 65536):
    kw = ssd_inputs(tokens // L, L, 32, 64, 1, N, torch.bfloat16, init=False)
    kw.pop("z")
    leaves = {k: kw[k].detach().requires_grad_() for k in ("x", "dt", "B", "C")}
    args = dict(kw, **leaves)
    gy = torch.randn_like(kw["x"])
    fwd = bench_ms(lambda: mamba_chunk_scan_combined(**args, backend="triton"), rep=100)
    fb = bench_ms(lambda: mamba_chunk_scan_combined(**args, backend="triton").backward(gy), rep=100,
                  grad_to_none=list(leaves.values()))
    return fwd, fb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2])
    p.add_argument("--d-states", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[2048])
    p.add_argument("--state-tiles", nargs="+", default=["auto"])
    p.add_argument("--check", action="store_true", help="run bench_ssd's correctness checks first (defaults)")
    p.add_argument("--breakdown", type=int, nargs=4, action="append", metavar=("CHUNK", "BLOCK", "WARPS", "STAGES"),
                   help="per-kernel times of these settings (d_state 64 and 128)")
    a = p.parse_args()
    log(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if a.check:
        correctness(quick=False)
    log("\n## sweep: ms, bf16, 32 x 64 heads, 65536 tokens")
    log(f"{'N':>4s} {'seqlen':>6s} {'chunk':>5s} {'block':>5s} {'warps':>5s} {'stages':>6s} {'states':>8s} "
        f"{'fwd':>7s} {'fwd+bwd':>8s}")
    for N, L, chunk, block, warps, stages, tile in itertools.product(a.d_states, a.seqlens, a.chunks, a.blocks,
                                                                     a.warps, a.stages, a.state_tiles):
        if block > chunk:
            continue
        configure(chunk, block, warps, stages)
        configure_states(tile)
        head = f"{N:4d} {L:6d} {chunk:5d} {block:5d} {warps:5d} {stages:6d} {tile:>8s}"
        try:
            f, fb = time_one(N, L)
            log(f"{head} {f:7.3f} {fb:8.3f}")
        except Exception as exc:  # out of shared memory or registers
            log(f"{head} failed: {type(exc).__name__}: {str(exc)[:80]}")
        torch.cuda.empty_cache()
    configure_states("auto")
    for chunk, block, warps, stages in a.breakdown or []:
        configure(chunk, block, warps, stages)
        log(f"\n# settings: chunk {chunk} block {block} warps {warps} stages {stages}")
        for N in a.d_states:
            kernel_breakdown(N)
    if report.fails:
        log("\nFAILED: " + "; ".join(report.fails))
        sys.exit(1)


if __name__ == "__main__":
    main()
