"""Autograd-aware collectives for tensor and context parallelism, counted by :func:`count_comm`.

Every collective issued by the tensor- and context-parallel code goes through this module, so that
:func:`count_comm` reports exactly what a forward (or forward + backward) hands to torch.distributed, with the
conventions of `mambakit.distributed.comm`: the all-reduced buffer, the all-gather OUTPUT (world x the local
part), and for point-to-point the sent tensor, each as ``numel * element_size``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mambakit.distributed.comm import CommCounter
from mambakit.errors import MambaKitError

ProcessGroup = Optional[dist.ProcessGroup]

_ACTIVE: list[CommCounter] = []


@contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count the collectives issued inside the block (nested counters all see them)."""
    counter = CommCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        del _ACTIVE[next(i for i, c in enumerate(_ACTIVE) if c is counter)]  # by identity: counters compare by value


def _record(kind: str, tensor: Tensor) -> None:
    for counter in _ACTIVE:
        counter.add(kind, tensor)


def group_rank_world(group: ProcessGroup) -> tuple[int, int]:
    """(rank within group, group size); raises MambaKitError when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise MambaKitError("torch.distributed must be initialised (init_process_group) before using parallel "
                            "layers; got an uninitialised default process group")
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------------------------------------------------
# Plain (non-differentiable) collectives, counted
# ----------------------------------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Sum of `tensor` over the ranks of `group` (a new tensor; the input is left alone)."""
    out = tensor.contiguous().clone()
    _record("all_reduce", out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_stack(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """(*shape) from every rank -> (world, *shape), stacked in rank order. Every rank must pass the same shape."""
    tensor = tensor.contiguous()
    _, world = group_rank_world(group)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    out = torch.stack(parts)
    _record("all_gather", out)
    return out


def _shift(tensor: Tensor, group: ProcessGroup, step: int) -> Tensor:
    rank, world = group_rank_world(group)
    out = torch.zeros_like(tensor)
    src, dst = rank - step, rank + step
    requests = []
    if 0 <= dst < world:
        _record("send", tensor)
        requests.append(dist.isend(tensor, dist.get_global_rank(group, dst) if group is not None else dst,
                                   group=group))
    if 0 <= src < world:
        requests.append(dist.irecv(out, dist.get_global_rank(group, src) if group is not None else src,
                                   group=group))
    for request in requests:
        request.wait()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Differentiable versions
# ----------------------------------------------------------------------------------------------------------------------
class _ReduceForward(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (the gradient of a replicated output is already replicated)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        return all_reduce_sum(tensor, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


class _ReduceBackward(torch.autograd.Function):
    """Forward: identity. Backward: sum of the gradients over ranks (the input feeds every rank's shard)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return all_reduce_sum(grad, ctx.group), None


class _ShiftToNext(torch.autograd.Function):
    """Forward: receive rank - 1's tensor (zeros on rank 0). Backward: the gradient goes back to rank - 1."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _shift(tensor.contiguous(), group, +1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _shift(grad.contiguous(), ctx.group, -1), None


def reduce_from_parallel(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Differentiable all-reduce (sum) of partial results: forward all-reduce, backward identity."""
    return _ReduceForward.apply(tensor, group)


def copy_to_parallel(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Differentiable entry into a parallel region: forward identity, backward all-reduce of the gradients."""
    return _ReduceBackward.apply(tensor, group)


def halo_from_previous(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Differentiable point-to-point shift: returns rank - 1's `tensor` (zeros on rank 0); gradients flow back."""
    return _ShiftToNext.apply(tensor, group)


class _GatherDim0(torch.autograd.Function):
    """Forward: the ranks' tensors concatenated along dim 0 (rank order). Backward: this rank's rows of the
    gradient, which arrives replicated (the gathered tensor enters a parallel region, whose entry all-reduces it)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return all_gather_stack(tensor, group).flatten(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rank, world = group_rank_world(ctx.group)
        return grad.chunk(world)[rank].contiguous(), None


class _SplitDim0(torch.autograd.Function):
    """Forward: this rank's rows of a replicated tensor (dim 0 divisible by the world size). Backward: the ranks'
    row gradients gathered, so that every rank's (replicated) input gets the whole gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        rank, world = group_rank_world(group)
        if tensor.shape[0] % world:
            raise MambaKitError(f"sequence parallel: dim 0 of the output ({tensor.shape[0]}) must be divisible by "
                                f"the world size {world}")
        ctx.group = group
        return tensor.chunk(world)[rank].clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return all_gather_stack(grad, ctx.group).flatten(0, 1), None


def gather_dim0(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Differentiable all-gather along dim 0 into a parallel region (sequence parallelism's entry): (n, ...) on
    each rank -> (world * n, ...), the same on every rank; backward takes this rank's rows of the (all-reduced)
    gradient. Every rank must pass the same shape."""
    return _GatherDim0.apply(tensor, group)


def split_dim0(tensor: Tensor, group: ProcessGroup = None) -> Tensor:
    """Differentiable split along dim 0 of a replicated (already all-reduced) result (sequence parallelism's exit):
    (world * n, ...) -> this rank's (n, ...); backward all-gathers the row gradients. After `reduce_from_parallel`
    this is a reduce-scatter (done as an all-reduce and a slice)."""
    return _SplitDim0.apply(tensor, group)
