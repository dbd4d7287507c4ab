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

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan import selective_state_update as mamba1_update

__all__ = ["selective_state_update", "selective_state_update_ref"]


def _expect(name: str, t: Optional[Tensor], shape: tuple) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise MambaKitError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def selective_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """One step of the recurrence (official signature), `state` updated in place; returns out in x's dtype."""
    if (state.dim() == 3 and state_batch_indices is None and state.is_cuda and state.dtype == torch.float32
            and B.dim() == 2):
        return mamba1_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)  # mambakit's decode kernel
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def selective_state_update_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """The step in PyTorch, both layouts (see the module docstring); state updated in place."""
    has_heads = state.dim() == 4
    if state.dim() not in (3, 4):
        raise MambaKitError(f"state must have shape (batch, dim, dstate) or (batch, nheads, dim, dstate), got "
                            f"{tuple(state.shape)}")
    s4 = state if has_heads else state.unsqueeze(1)
    lift = (lambda t: t) if has_heads else (lambda t: None if t is None else t.unsqueeze(1))
    lift0 = (lambda t: t) if has_heads else (lambda t: None if t is None else t.unsqueeze(0))
    x4, dt4, z4 = lift(x), lift(dt), lift(z)
    A4, D4, bias4 = lift0(A), lift0(D), lift0(dt_bias)
    B4 = B.unsqueeze(1) if B.dim() == 2 else B
    C4 = C.unsqueeze(1) if C.dim() == 2 else C
    _, nheads, dim, dstate = s4.shape
    batch = x.shape[0]
    _expect("x", x4, (batch, nheads, dim))
    _expect("dt", dt4, (batch, nheads, dim))
    _expect("z", z4, (batch, nheads, dim))
    _expect("A", A4, (nheads, dim, dstate))
    _expect("D", D4, (nheads, dim))
    _expect("dt_bias", bias4, (nheads, dim))
    ngroups = B4.shape[1]
    if B4.shape != (batch, ngroups, dstate) or nheads % ngroups:
        raise MambaKitError(f"B must have shape (batch={batch}, ngroups, dstate={dstate}) with ngroups dividing "
                            f"nheads={nheads}, got {tuple(B.shape)}")
    _expect("C", C4, tuple(B4.shape))
    if state_batch_indices is None:
        if state.shape[0] != batch:
            raise MambaKitError(f"state must have batch {batch} like x (or give state_batch_indices), got "
                                f"{state.shape[0]}")
        rows = torch.arange(batch, device=x.device)
    else:
        _expect("state_batch_indices", state_batch_indices, (batch,))
        rows = state_batch_indices.long()
    valid = rows >= 0
    fp = torch.float64 if torch.float64 in (state.dtype, x.dtype) else torch.float32
    h = s4.index_select(0, rows.clamp(min=0)).to(fp)  # (batch, nheads, dim, dstate)
    delta = dt4.to(fp) if bias4 is None else dt4.to(fp) + bias4.to(fp)
    if dt_softplus:
        delta = F.softplus(delta)
    per_group = nheads // ngroups
    Bh = B4.to(fp).repeat_interleave(per_group, dim=1)[:, :, None, :]  # (batch, nheads, 1, dstate)
    Ch = C4.to(fp).repeat_interleave(per_group, dim=1)[:, :, None, :]
    xf = x4.to(fp)
    h = h * torch.exp(delta[..., None] * A4.to(fp)) + (delta * xf)[..., None] * Bh
    out = (h * Ch).sum(-1)  # (batch, nheads, dim)
    if D4 is not None:
        out = out + xf * D4.to(fp)
    if z4 is not None:
        out = out * F.silu(z4.to(fp))
    s4.index_copy_(0, rows[valid], h[valid].to(state.dtype))
    out = out.masked_fill(~valid[:, None, None], 0.0).to(x.dtype)
    return out if has_heads else out[:, 0]
