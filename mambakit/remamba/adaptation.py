"""Stage 2's selective adaptation: at the compressed positions every Mamba layer's pre-bias, pre-softplus delta
becomes ``w_t * delta_t + b`` (b one learned vector per layer); elsewhere delta is unchanged. Implemented through
the layers' public dt transform (`mambakit.layers.dt_transform`), never by copying a layer.

Mamba-1 hands the hook delta as (batch, d_inner, seqlen) and b has d_inner entries; Mamba-2 hands dt as
(batch, seqlen, nheads) and b has nheads entries (delta is per head there).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.dt_transform import DtTransformMixin


def delta_size(mixer: nn.Module) -> Optional[int]:
    """Entries of b for this mixer: its `dt_size` (d_inner for Mamba-1, nheads for Mamba-2), None for mixers
    without a dt (attention, S4)."""
    return int(mixer.dt_size) if isinstance(mixer, DtTransformMixin) else None


def _time_profile(weights: Tensor, start: int, total: int) -> tuple[Tensor, Tensor]:
    """weights (batch, K) -> scale (batch, total): w at [start, start + K), 1 elsewhere; and the indicator of those
    positions (batch, total), 1 there and 0 elsewhere."""
    batch, keep = weights.shape
    after = total - start - keep
    if after < 0:
        raise MambaKitError(f"the ReMamba delta hook needs at least start + K = {start + keep} time steps, got {total}")
    ones = weights.new_ones
    zeros = weights.new_zeros
    scale = torch.cat([ones(batch, start), weights, ones(batch, after)], dim=1)
    mark = torch.cat([zeros(batch, start), ones(batch, keep), zeros(batch, after)], dim=1)
    return scale, mark


def make_delta_hook(weights: Tensor, bias: Tensor, start: int, per_head: bool) -> Callable[[Tensor], Tensor]:
    """The hook of one layer. weights: (batch, K) the w of the K compressed positions starting at time `start`;
    bias: (d,) that layer's b. per_head: Mamba-2 layout (batch, seqlen, nheads), else Mamba-1 (batch, d, seqlen)."""

    def hook(delta: Tensor) -> Tensor:
        total = delta.shape[1] if per_head else delta.shape[2]
        scale, mark = _time_profile(weights.to(delta.dtype), start, total)
        b = bias.to(delta.dtype)
        if per_head:  # (batch, seqlen, nheads)
            return delta * scale[:, :, None] + mark[:, :, None] * b
        return delta * scale[:, None, :] + mark[:, None, :] * b[None, :, None]  # (batch, d_inner, seqlen)

    return hook


@contextmanager
def selective_adaptation(mixers: Sequence[nn.Module], biases: Sequence[Optional[Tensor]], weights: Tensor,
                         start: int) -> Iterator[None]:
    """Install the transforms on every mixer that has a dt for the duration of the block; restores the previous
    ones.

    mixers[i] pairs with biases[i] (None for a mixer without a delta, e.g. attention). weights: (batch, K).
    """
    with ExitStack() as stack:
        for mixer, b in zip(mixers, biases):
            if b is None:
                continue
            hook = make_delta_hook(weights, b, start, per_head=mixer.dt_time_dim == 1)
            stack.enter_context(mixer.transforming_dt(hook))
        yield
