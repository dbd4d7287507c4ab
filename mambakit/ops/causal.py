"""Causality of non-finite values for the block (matmul) forms of the scans.

A block form computes a chunk's outputs with matmuls over every position of the chunk, masking the future with
zero weights; but ``0 * nan`` is ``nan``, so a NaN or infinity at position t would reach the outputs before t in
its chunk. The recurrence never lets that happen: a non-finite input at t reaches only the outputs at t and after.

The guard reproduces that: the inputs that feed the state are zeroed where they are not finite (which leaves every
earlier output exactly as it was), the form runs, and every output of a (batch, head) lane from its
first non-finite input on is set to NaN, as are the final states of such lanes. Readout-only inputs (C) need no
guard: the forms read them at their own position only. The SSD Triton kernels need no guard: they mask the future
after the products and mark the positions from a non-finite x on themselves.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def poisoned_lanes(bad: Sequence[Tensor], time_dim: int) -> Tensor:
    """The positions at or after the first True of each lane along ``time_dim``, of the union of ``bad``.

    bad: bool tensors broadcastable to one shape (e.g. (batch, seqlen, nheads)). Returns that shape, bool.
    """
    union = bad[0]
    for other in bad[1:]:
        union = union | other
    return union.to(torch.int32).cummax(dim=time_dim).values.bool()


def not_finite(t: Tensor, reduce_dims: Sequence[int] = ()) -> Tensor:
    """Whether any entry of t over ``reduce_dims`` is NaN or infinite: t's shape without those dims, bool."""
    bad = ~torch.isfinite(t)
    return bad.any(dim=tuple(reduce_dims)) if reduce_dims else bad


def nan_where(mask: Tensor, t: Tensor) -> Tensor:
    """t with NaN wherever ``mask`` (broadcastable to t) is True."""
    return torch.where(mask, torch.full((), float("nan"), dtype=t.dtype, device=t.device), t)
