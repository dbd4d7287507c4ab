"""`mamba_ssm.distributed.distributed_utils`: the collectives along dim 0 that sequence parallelism uses, raw and
differentiable, and the helpers for shared / sequence-parallel parameters, on torch.distributed (any backend: gloo's
missing reduce-scatter is an all-reduce and a slice here).

    all_gather_raw(x, group, async_op=False) -> (out, handle)   x (n, ...) on each rank -> (world * n, ...)
    reduce_scatter_raw(x, group, async_op=False) -> (out, handle)  x (world * n, ...) -> this rank's (n, ...) of the sum
    all_reduce_raw(x, group, async_op=False) -> (x, handle)     the sum over ranks, in place
    all_gather / reduce_scatter / all_reduce: the same with autograd (backward: reduce-scatter / all-gather / identity)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mambakit.distributed.collectives import all_gather_stack, all_reduce_sum, group_rank_world
from mambakit.errors import MambaKitError

__all__ = ["AllGatherFunc", "AllReduceFunc", "ReduceScatterFunc", "all_gather", "all_gather_raw", "all_reduce",
           "all_reduce_raw", "allreduce_sequence_parallel_grad", "get_dim_for_local_rank", "reduce_scatter",
           "reduce_scatter_raw", "sync_shared_params"]


class _Done:
    """The handle of a collective that already finished (the official callers `.wait()` on it)."""

    def wait(self) -> None:
        return None


def all_gather_raw(input_: Tensor, process_group: Optional[dist.ProcessGroup], async_op: bool = False):
    return all_gather_stack(input_, process_group).flatten(0, 1), (_Done() if async_op else None)


def reduce_scatter_raw(input_: Tensor, process_group: Optional[dist.ProcessGroup], async_op: bool = False):
    rank, world = group_rank_world(process_group)
    if input_.shape[0] % world:
        raise MambaKitError(f"reduce_scatter: dim 0 of the input ({input_.shape[0]}) must be divisible by the world "
                            f"size {world}")
    out = all_reduce_sum(input_, process_group).chunk(world)[rank].contiguous()
    return out, (_Done() if async_op else None)


def all_reduce_raw(input_: Tensor, process_group: Optional[dist.ProcessGroup], async_op: bool = False):
    input_ = input_.contiguous()
    group_rank_world(process_group)
    handle = dist.all_reduce(input_, group=process_group, async_op=async_op)
    return input_, handle


class AllGatherFunc(torch.autograd.Function):
    """Gather along dim 0 in forward, reduce-scatter in backward."""

    @staticmethod
    def forward(ctx, input_: Tensor, process_group) -> Tensor:  # type: ignore[override]
        ctx.process_group = process_group
        return all_gather_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return reduce_scatter_raw(grad_output, ctx.process_group)[0], None


class ReduceScatterFunc(torch.autograd.Function):
    """Reduce-scatter along dim 0 in forward, gather in backward."""

    @staticmethod
    def forward(ctx, input_: Tensor, process_group) -> Tensor:  # type: ignore[override]
        ctx.process_group = process_group
        return reduce_scatter_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return all_gather_raw(grad_output, ctx.process_group)[0], None


class AllReduceFunc(torch.autograd.Function):
    """All-reduce in forward, identity in backward."""

    @staticmethod
    def forward(ctx, input_: Tensor, process_group) -> Tensor:  # type: ignore[override]
        return all_reduce_raw(input_.clone(), process_group)[0]

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return grad_output, None


all_gather = AllGatherFunc.apply
reduce_scatter = ReduceScatterFunc.apply
all_reduce = AllReduceFunc.apply


def sync_shared_params(model: nn.Module, process_group: Optional[dist.ProcessGroup]) -> None:
    """Copy the group's first rank's values of every parameter marked `_shared_params` to the other ranks."""
    group_rank_world(process_group)
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    with torch.no_grad():
        for p in model.parameters():
            if getattr(p, "_shared_params", False):
                dist.broadcast(p.data, src=src, group=process_group)


def allreduce_sequence_parallel_grad(model: nn.Module, process_group: Optional[dist.ProcessGroup]) -> None:
    """Sum over the group the gradients of the parameters marked `_sequence_parallel` (replicated parameters used
    on each rank's rows: each rank holds a partial gradient)."""
    group_rank_world(process_group)
    for p in model.parameters():
        if getattr(p, "_sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=process_group)


def get_dim_for_local_rank(dim: int, world_size: int, local_rank: int, multiple_of: int = 1) -> int:
    """This rank's share of `dim`, split in units of `multiple_of` (the first `units % world_size` ranks take one
    unit more)."""
    units = dim // multiple_of
    return (units // world_size + int(local_rank < units % world_size)) * multiple_of
