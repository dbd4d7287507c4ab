"""Mamba-3 SISO by its step recurrence: the reference (one Python step per position, plain autograd, any dtype
including float64). The math and the layouts are in :mod:`mambakit.ops.mamba3.common`."""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.ops.mamba3.common import (
    TWO_PI,
    Mamba3States,
    angle_increment,
    compute_dtype,
    heads_of_groups,
    rotate,
    segment_starts,
    validate,
)


def step_core(states: Mamba3States, q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor,
              q_bias: Tensor, k_bias: Tensor, angles: Tensor, D: Optional[Tensor]) -> Tuple[Tensor, Mamba3States]:
    """One position, all in one dtype, without the gate.

    states: the parts after the previous position; q, k: (batch, nheads, d_state) before bias and rotation;
    v: (batch, nheads, headdim); adt, dt, trap: (batch, nheads); q_bias, k_bias: (nheads, d_state);
    angles: (batch, nheads, n_angles); D: (nheads,) or None.
    Returns y (batch, nheads, headdim) and the states after this position.
    """
    angle = torch.remainder(states.angle + angle_increment(angles, dt), TWO_PI)
    k_rot = rotate(k + k_bias, angle)
    q_rot = rotate(q + q_bias, angle)
    lam = torch.sigmoid(trap)
    alpha = torch.exp(adt)
    beta = ((1 - lam) * dt * alpha)[..., None, None]
    gamma = (lam * dt)[..., None, None]
    ssm = (alpha[..., None, None] * states.ssm + beta * states.v[..., :, None] * states.k[..., None, :]
           + gamma * v[..., :, None] * k_rot[..., None, :])
    y = torch.einsum("bhpn,bhn->bhp", ssm, q_rot)
    if D is not None:
        y = y + D[:, None] * v
    return y, Mamba3States(angle, ssm, k_rot, v)


def restart(states: Mamba3States, zero: Mamba3States, new: Tensor) -> Mamba3States:
    """The states with the batch rows where new (batch,) bool is True replaced by zero's."""
    return Mamba3States(*(torch.where(new.view(-1, *([1] * (s.dim() - 1))), z, s) for s, z in zip(states, zero)))


def run_steps(step: Callable[[Mamba3States, int], Tuple[Tensor, Mamba3States]], zero: Mamba3States,
              Input_States: Optional[Tuple[Tensor, ...]], seq_idx: Optional[Tensor], seqlen: int,
              fp: torch.dtype) -> Tuple[Tensor, Mamba3States]:
    """Run step(states, t) -> (y_t, states) over the positions from Input_States (or zero), restarting from zero
    where a packed sequence starts; returns (y stacked on dim 1, the final states)."""
    states = zero if Input_States is None else Mamba3States(*(s.to(fp) for s in Input_States))
    starts = segment_starts(seq_idx)
    ys = []
    for t in range(seqlen):
        if starts is not None:
            states = restart(states, zero, starts[:, t])
        y, states = step(states, t)
        ys.append(y)
    return torch.stack(ys, dim=1), states


def zero_states(batch: int, nheads: int, headdim: int, d_state: int, n_angles: int, dtype: torch.dtype,
                device: torch.device) -> Mamba3States:
    """All four parts zero (the state before a sequence)."""
    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)
    return Mamba3States(zeros(batch, nheads, n_angles), zeros(batch, nheads, headdim, d_state),
                        zeros(batch, nheads, d_state), zeros(batch, nheads, headdim))


def mamba3_scan_ref(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, chunk_size: int = 64,
    return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The Mamba-3 SISO scan by the sequential recurrence (chunk_size is accepted and ignored).

    Arguments and results as :func:`mambakit.ops.mamba3.mamba3_scan`: y (batch, seqlen, nheads, headdim) in V's
    dtype, or (y, angle, ssm, k, v) with the final states in the compute dtype.
    """
    dims = validate(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, seq_idx)
    fp = compute_dtype(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                       *(Input_States if Input_States is not None else ()))
    q, k = heads_of_groups(Q.to(fp), dims.nheads), heads_of_groups(K.to(fp), dims.nheads)
    v, adt, dt, trap, angles = V.to(fp), ADT.to(fp), DT.to(fp), Trap.to(fp), Angles.to(fp)
    q_bias, k_bias = Q_bias.to(fp), K_bias.to(fp)
    D_c = None if D is None else D.to(fp)
    zero = zero_states(dims.batch, dims.nheads, dims.headdim, dims.d_state, dims.n_angles, fp, V.device)
    y, states = run_steps(lambda st, t: step_core(st, q[:, t], k[:, t], v[:, t], adt[..., t], dt[..., t],
                                                  trap[..., t], q_bias, k_bias, angles[:, t], D_c),
                          zero, Input_States, seq_idx, dims.seqlen, fp)
    if Z is not None:
        y = y * F.silu(Z.to(fp))
    y = y.to(V.dtype)
    return (y, *states) if return_final_states else y
