"""SSD's reference: the plain sequential recurrence (one Python step per position; plain autograd)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.ops.dt import DEFAULT_DT_LIMIT
from mambakit.ops.ssd.common import SSDOutput, add_skip, run_form


def recurrence_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
    """One step of the recurrence, without D and gate.

    state: (batch, nheads, headdim, d_state); x: (batch, nheads, headdim); dt: (batch, nheads); A: (nheads,), or
    (batch, nheads) the log-decay itself (the decay is then exp(A), dt only scales the input);
    B, C: (batch, ngroups, d_state). Returns (new state, y) with y: (batch, nheads, headdim).
    """
    batch, nheads, headdim, d_state = state.shape
    ngroups = B.shape[1]
    r = nheads // ngroups
    decay = torch.exp(A if A.dim() == 2 else dt * A)[:, :, None, None]  # (batch, nheads, 1, 1)
    xdt = (x * dt[:, :, None]).view(batch, ngroups, r, headdim, 1)
    update = (xdt * B[:, :, None, None, :]).view(batch, nheads, headdim, d_state)
    state = decay * state + update
    y = torch.matmul(state.view(batch, ngroups, r, headdim, d_state), C[:, :, None, :, None])
    return state, y.view(batch, nheads, headdim)


def _recurrent_core(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size=None) -> Tuple[Tensor, Tensor]:
    batch, seqlen, nheads, headdim = x.shape
    d_state = B.shape[-1]
    state = initial_states
    if state is None:
        state = x.new_zeros(batch, nheads, headdim, d_state)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)
            state = state * keep[:, None, None, None]
        a = A[:, t] if A.dim() == 3 else A  # the per-position log-decay, or A (nheads,)
        state, y = recurrence_step(state, x[:, t], dt[:, t], a, B[:, t], C[:, t])
        ys.append(y)
    return add_skip(torch.stack(ys, dim=1), x, D), state


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: Optional[int] = None,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    log_decay: Optional[Tensor] = None,
) -> SSDOutput:
    """SSD by the plain sequential recurrence (the reference; one Python step per position).

    Same arguments as :func:`mamba_chunk_scan_combined` (``chunk_size`` is accepted and ignored; with
    ``log_decay`` (batch, seqlen, nheads) and A None the decay at t is exp(log_decay_t)). Returns
    y (batch, seqlen, nheads, headdim), and the final state (batch, nheads, headdim, d_state) if
    ``return_final_states``.
    """
    return run_form(_recurrent_core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     dt_softplus, dt_limit, return_final_states, need_chunk_size=False, guard=False,
                     log_decay=log_decay)

