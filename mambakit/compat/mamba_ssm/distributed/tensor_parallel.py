"""`mamba_ssm.distributed.tensor_parallel`: ColumnParallelLinear and RowParallelLinear with the official signatures,
on mambakit's differentiable collectives (`mambakit.distributed.collectives`; any backend, gloo on CPU included).

Sizes (official): a layer of `out_features` (column) or `in_features` (row) split in units of `multiple_of` over the
group, the first `units % world` ranks taking one unit more. With `sequence_parallel`, inputs of the column layer
and outputs of the row layer are this rank's rows (dim 0) of the whole: the column layer all-gathers its input, the
row layer reduce-scatters its output (here an all-reduce and a slice); otherwise inputs are replicated and the row
layer all-reduces. The embeddings (`VocabParallelEmbedding`, `ColumnParallelEmbedding`, `ParallelEmbeddings`) are
not mirrored: keep the embedding replicated (mambakit's tensor parallelism shards the Mamba-2 blocks,
`mambakit.distributed.tensor_parallel.parallelize_mamba2`).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.distributed.collectives import (
    copy_to_parallel, gather_dim0, group_rank_world, reduce_from_parallel, split_dim0,
)
from mambakit.errors import MambaKitError

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]

_NOT_MIRRORED = ("VocabParallelEmbedding", "ColumnParallelEmbedding", "ParallelEmbeddings")


def __getattr__(name: str):
    if name in _NOT_MIRRORED:
        raise MambaKitError(f"mambakit.compat does not mirror mamba_ssm.distributed.tensor_parallel.{name}: keep the "
                            f"embedding replicated and shard the Mamba-2 blocks (Mamba2(process_group=...) or "
                            f"mambakit.distributed.tensor_parallel.parallelize_mamba2)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def local_size(features: int, multiple_of: int, group: Optional[dist.ProcessGroup], what: str) -> int:
    """This rank's share of `features`, split in units of `multiple_of` (the first ranks take the remainder)."""
    if features % multiple_of:
        raise MambaKitError(f"{what} must be a multiple of multiple_of={multiple_of}, got {features}")
    rank, world = group_rank_world(group)
    units = features // multiple_of
    return (units // world + int(rank < units % world)) * multiple_of


class ColumnParallelLinear(nn.Linear):
    """This rank's rows of a Linear(in_features, out_features): weight (local out_features, in_features).
    forward: x (..., in_features), replicated, or this rank's rows along dim 0 with sequence_parallel ->
    (..., local out_features) over the whole dim 0."""

    def __init__(self, in_features: int, out_features: int, process_group: Optional[dist.ProcessGroup],
                 bias: bool = True, sequence_parallel: bool = True, multiple_of: int = 1, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, local_size(out_features, multiple_of, process_group, "out_features"),
                         bias=bias, device=device, dtype=dtype)
        self.process_group, self.sequence_parallel = process_group, sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            x = gather_dim0(x, self.process_group)
        return F.linear(copy_to_parallel(x, self.process_group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """This rank's columns of a Linear(in_features, out_features): weight (out_features, local in_features); the
    bias lives on rank 0 only (as official). forward: x (..., local in_features) -> (..., out_features), summed over
    the ranks: replicated, or this rank's rows along dim 0 with sequence_parallel (dim 0 divisible by the world)."""

    def __init__(self, in_features: int, out_features: int, process_group: Optional[dist.ProcessGroup],
                 bias: bool = True, sequence_parallel: bool = True, multiple_of: int = 1, device=None,
                 dtype=None) -> None:
        rank, _ = group_rank_world(process_group)
        super().__init__(local_size(in_features, multiple_of, process_group, "in_features"), out_features,
                         bias=bias and rank == 0, device=device, dtype=dtype)
        self.process_group, self.sequence_parallel = process_group, sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        out = reduce_from_parallel(F.linear(x, self.weight, self.bias), self.process_group)
        return split_dim0(out, self.process_group) if self.sequence_parallel else out
