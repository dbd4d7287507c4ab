"""`mamba_ssm.distributed.tensor_parallel`: ColumnParallelLinear and RowParallelLinear with the official signatures,
on mambakit's differentiable collectives (`mambakit.distributed.collectives`; any backend, gloo on CPU included).

Sizes (official): a layer of `out_features` (column) or `in_features` (row) split in units of `multiple_of` over the
group, the first `units % world` ranks taking one unit more. With `sequence_parallel`, inputs of the column layer
and outputs of the row layer are this rank's rows (dim 0) of the whole: the column layer all-gathers its input, the
row layer reduce-scatters its output (here an all-reduce and a slice); otherwise inputs are replicated and the row
layer all-reduces. The embeddings: `VocabParallelEmbedding` holds this rank's rows of the vocabulary (ids outside
them embed to 0), `ColumnParallelEmbedding` this rank's columns, and `ParallelEmbeddings` sums both over the ranks
(all-reduce, or reduce-scatter along dim 0 with sequence_parallel).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.distributed.collectives import (
    copy_to_parallel, gather_dim0, group_rank_world, reduce_from_parallel, split_dim0,
)
from mambakit.errors import MambaKitError

__all__ = ["ColumnParallelEmbedding", "ColumnParallelLinear", "ParallelEmbeddings", "RowParallelLinear",
           "VocabParallelEmbedding"]


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


def _split_evenly(size: int, group: Optional[dist.ProcessGroup], what: str) -> int:
    """size // world for a group (1 without one), which must divide size."""
    world = 1 if group is None else group_rank_world(group)[1]
    if size % world:
        raise MambaKitError(f"{what} must be divisible by the world size {world}, got {size}")
    return size // world


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [rank * n, (rank + 1) * n) of an embedding of num_embeddings (n = num_embeddings / world):
    input ids (any shape) -> (..., embedding_dim), 0 for the ids of other ranks (sum over the ranks for the whole
    embedding). Without a process_group, a plain nn.Embedding."""

    def __init__(self, num_embeddings: int, *args, process_group: Optional[dist.ProcessGroup] = None,
                 padding_idx: Optional[int] = None, **kwargs):
        local = _split_evenly(num_embeddings, process_group, "num_embeddings")
        if process_group is not None and local != num_embeddings and padding_idx is not None:
            raise MambaKitError(f"VocabParallelEmbedding over several ranks takes no padding_idx (as official), got "
                                f"{padding_idx}")
        super().__init__(local, *args, padding_idx=padding_idx, **kwargs)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        if self.process_group is None:
            return super().forward(input)
        start = group_rank_world(self.process_group)[0] * self.num_embeddings
        outside = (input < start) | (input >= start + self.num_embeddings)
        out = super().forward(torch.where(outside, torch.zeros_like(input), input - start))
        return out.masked_fill(outside[..., None], 0.0)


class ColumnParallelEmbedding(nn.Embedding):
    """This rank's embedding_dim / world columns of an embedding (a plain one without a process_group)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *args,
                 process_group: Optional[dist.ProcessGroup] = None, **kwargs):
        super().__init__(num_embeddings, _split_evenly(embedding_dim, process_group, "embedding_dim"), *args, **kwargs)
        self.process_group = process_group


class ParallelEmbeddings(nn.Module):
    """Word embeddings split over the vocabulary plus (max_position_embeddings > 0) position embeddings split over
    the columns, summed over the ranks. forward: input_ids (batch, seqlen), position_ids (batch, seqlen) or None
    (0..seqlen-1) -> (batch, seqlen, embed_dim), or (batch * seqlen, embed_dim) with combine_batch_seqlen_dim;
    with sequence_parallel this rank's rows of dim 0 (dim 0 divisible by the world size)."""

    def __init__(self, embed_dim: int, vocab_size: int, max_position_embeddings: int,
                 process_group: Optional[dist.ProcessGroup], padding_idx: Optional[int] = None,
                 sequence_parallel: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.process_group, self.sequence_parallel = process_group, sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(vocab_size, embed_dim, padding_idx=padding_idx,
                                                      process_group=process_group, **factory)
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings > 0:
            self.position_embeddings = ColumnParallelEmbedding(max_position_embeddings, embed_dim,
                                                               process_group=process_group, **factory)

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                combine_batch_seqlen_dim: bool = False) -> Tensor:
        rank, world = group_rank_world(self.process_group)
        embeddings = self.word_embeddings(input_ids)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
            part = self.position_embeddings.embedding_dim
            # this rank's columns of the position embedding, in place among the others' zeros
            embeddings = embeddings + F.pad(self.position_embeddings(position_ids),
                                            (rank * part, (world - rank - 1) * part))
        if combine_batch_seqlen_dim:
            embeddings = embeddings.flatten(0, 1)
        if world <= 1:
            return embeddings
        out = reduce_from_parallel(embeddings, self.process_group)
        return split_dim0(out, self.process_group) if self.sequence_parallel else out
