"""What the PyTorch forms of SSD share: the D skip and the frame around a form (check, dt processing, gate)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.ops.causal import nan_where, not_finite, poisoned_lanes
from mambakit.ops.dt import compute_dtype, process_dt
from mambakit.ops.ssd.validate import check_ssd_inputs

SSDOutput = Union[Tensor, Tuple[Tensor, Tensor]]


def skip_weight(D: Tensor) -> Tensor:
    """D (nheads,) or (nheads, headdim) -> broadcastable against (..., nheads, headdim)."""
    return D[:, None] if D.dim() == 1 else D


def add_skip(y: Tensor, x: Tensor, D: Optional[Tensor]) -> Tensor:
    """``y + D * x``; y, x: (..., nheads, headdim)."""
    return y if D is None else y + x * skip_weight(D)


def run_form(core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
             return_final_states, *, need_chunk_size: bool, guard: bool = True,
             log_decay: Optional[Tensor] = None) -> SSDOutput:
    """Validate, process dt, cast to the compute dtype, run ``core`` (which adds D * x) and apply the gate.
    ``guard``: keep non-finite values causal (:func:`guard_inputs`); the recurrence needs no guard.
    ``log_decay`` (batch, seqlen, nheads), with A None: the per-position log-decay, passed to ``core`` as A."""
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                     need_chunk_size=need_chunk_size, log_decay=log_decay)
    dtype = compute_dtype(x, dt, A, B, C, log_decay)
    dt_c = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    x_c = x.to(dtype)
    init = None if initial_states is None else initial_states.to(dtype)
    D_c = None if D is None else D.to(dtype)
    B_c = B.to(dtype)
    decay = (A if log_decay is None else log_decay).to(dtype)
    if guard:
        x_c, dt_c, B_c, poison = guard_inputs(x_c, dt_c, B_c)
        if log_decay is not None:
            bad = ~torch.isfinite(decay)
            poison = poison | poisoned_lanes([bad], time_dim=1)
            decay = decay.masked_fill(bad, 0.0)
    y, final = core(x_c, dt_c, decay, B_c, C.to(dtype), D_c, init, seq_idx, chunk_size)
    if guard:
        y, final = guard_outputs(y, final, poison)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def guard_inputs(x: Tensor, dt: Tensor, B: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero the non-finite (x * dt, B) positions before a block form (see `mambakit.ops.causal`).

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); B: (batch, seqlen, ngroups, d_state).
    Returns (x, dt, B, poison) with poison (batch, seqlen, nheads) bool: True from a lane's first such position on.
    """
    bad_xdt = not_finite(x * dt[..., None], (3,))  # (b, L, h): NaN/inf in x or dt, or their product overflowing
    bad_B = not_finite(B, (3,))  # (b, L, g)
    per_head = bad_B.repeat_interleave(x.shape[2] // B.shape[2], dim=2)
    poison = poisoned_lanes([bad_xdt, per_head], time_dim=1)
    return (x.masked_fill(bad_xdt[..., None], 0.0), dt.masked_fill(bad_xdt, 0.0), B.masked_fill(bad_B[..., None], 0.0),
            poison)


def guard_outputs(y: Tensor, final: Optional[Tensor], poison: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """NaN in y (batch, seqlen, nheads, headdim) where poisoned, and in the final states (batch, nheads, headdim,
    d_state) of the lanes poisoned at the last position."""
    y = nan_where(poison[..., None], y)
    return y, None if final is None else nan_where(poison[:, -1, :, None, None], final)
