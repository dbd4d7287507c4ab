"""Communication volume of Mamba-2 tensor parallelism and of context parallelism, on gloo CPU processes.

CPU processes say nothing about speed; what they do measure exactly is what each rank hands to torch.distributed
per call (counted by `mambakit.distributed.collectives.count_comm`), which is compared with the design:

* tensor parallel (Mamba-2 block): one all-reduce of (batch, seqlen, d_model) forward, one backward;
* context parallel: all-gathers of O(batch * state) per block, the same for every seqlen, plus a point-to-point
  halo of (batch, d_conv - 1, d_model) for the conv.

Also prints the relative error of each parallel block against the unsharded / single-process block (float32).

    python benchmarks/bench_distributed_comm.py [--worlds 2 4] [--seqlens 1024 4096]
"""
from __future__ import annotations

import argparse
import copy

import torch

from mambakit.distributed._testing import run_on_ranks
from mambakit.distributed.collectives import count_comm
from mambakit.distributed.context_parallel import context_parallel, sequence_shard
from mambakit.distributed.tensor_parallel import shard_mamba2
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2

BATCH, D_MODEL = 2, 256


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _measure(block, parallel, hidden, local_hidden, rank):
    """(fwd counts, fwd+bwd counts, rel err of this rank's output) for one call of `parallel`."""
    ref = block(hidden).detach()
    x = local_hidden.clone().requires_grad_(True)
    with count_comm() as total:
        with count_comm() as fwd:
            out = parallel(x)
        out.sum().backward()
    return fwd.snapshot(), total.snapshot(), out.detach(), ref


def _worker(rank: int, world: int, seqlens: list[int]) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    mamba2 = Mamba2(D_MODEL, d_state=64, headdim=32, ngroups=4, chunk_size=64)  # 16 heads, 4 groups
    mamba1 = Mamba(D_MODEL, d_state=16)
    for L in seqlens:
        hidden = torch.randn(BATCH, L, D_MODEL, generator=torch.Generator().manual_seed(L))
        fwd, tot, out, ref = _measure(mamba2, shard_mamba2(copy.deepcopy(mamba2)), hidden, hidden, rank)
        rows.append(dict(mode="TP Mamba-2", L=L, fwd=fwd, tot=tot, err=_rel(out, ref),
                         expected=BATCH * L * D_MODEL * 4))
        for name, block in (("CP Mamba-2", mamba2), ("CP Mamba-1", mamba1)):
            fwd, tot, out, ref = _measure(block, context_parallel(block), hidden, sequence_shard(hidden), rank)
            rows.append(dict(mode=name, L=L, fwd=fwd, tot=tot, err=_rel(out, sequence_shard(ref))))
    return rows


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k} {v / 1024:.1f} KiB x{counts['calls'][k]}" for k, v in sorted(counts["bytes"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    print("| W | mode | seqlen | per-rank forward (rank 0) | forward + backward (rank 0) | last rank fwd+bwd "
          "| max rel err (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for world in args.worlds:
        per_rank = run_on_ranks(_worker, world, args.seqlens)
        for i, row in enumerate(per_rank[0]):
            err = max(r[i]["err"] for r in per_rank)
            print(f"| {world} | {row['mode']} | {row['L']} | {_fmt(row['fwd'])} | {_fmt(row['tot'])} | "
                  f"{_fmt(per_rank[-1][i]['tot'])} | {err:.1e} |")


if __name__ == "__main__":
    main()
