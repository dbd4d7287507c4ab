"""`mamba_ssm.ops.triton.selective_state_update`: one decoding step of the selective SSM, both official layouts.

Mamba-1: state (batch, dim, dstate); x, dt, z (batch, dim); A (dim, dstate); B, C (batch, dstate) or
(batch, ngroups, dstate); D, dt_bias (dim,). Out: (batch, dim).
Heads (Mamba-2): state (batch, nheads, dim, dstate); x, dt, z (batch, nheads, dim) (dt usually per head, expanded
with stride 0 over dim); A (nheads, dim, dstate) (usually broadcast); B, C (batch, ngroups, dstate); D, dt_bias
(nheads, dim). Out: (batch, nheads, dim).
state_batch_indices: (batch,) integer, the state row of each batch row (a negative index marks padding: its
output is 0 and no state row is touched). The update is computed in float32 (float64 for float64 inputs) whatever
the state's dtype, and the new state stored in the state's dtype.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from mambakit.ops.selective_scan import selective_state_update as state_update
from mambakit.ops.selective_scan.step import selective_state_update_torch

__all__ = ["selective_state_update", "selective_state_update_ref"]


def selective_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """One step of the recurrence (official signature), `state` updated in place; returns out in x's dtype."""
    return state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def selective_state_update_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """The step in PyTorch, both layouts (see the module docstring); state updated in place."""
    return selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
