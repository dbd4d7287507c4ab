"""One token of the selective scan (decoding) in PyTorch: the state updated in place, both official layouts.

Mamba-1: state (batch, dim, d_state); x, dt, z (batch, dim); A (dim, d_state); B, C (batch, d_state) or
(batch, groups, d_state) with groups dividing dim; D, dt_bias (dim,). y: (batch, dim).
Heads (Mamba-2, the official Triton `selective_state_update`): state (batch, nheads, headdim, d_state); x, dt, z
(batch, nheads, headdim) (dt usually per head, expanded with stride 0); A (nheads, headdim, d_state) (usually
broadcast); B, C (batch, ngroups, d_state) with ngroups dividing nheads; D, dt_bias (nheads, headdim).
y: (batch, nheads, headdim).
state_batch_indices: (batch,) integer, the state row of each batch row (continuous batching); a negative index marks
padding: its y is 0 and no state row is touched.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan.common import shape_error


def _expect(name: str, t: Optional[Tensor], shape: tuple) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise shape_error(name, str(shape), t)


def selective_state_update_torch(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """One step of the recurrence for decoding in PyTorch, updating `state` in place (any device; layouts in the
    module docstring). Computed in float32 (float64 if state or x is float64) whatever the state's dtype, the new
    state stored once in its dtype. Returns y like x, in x's dtype."""
    if state.dim() == 3:  # Mamba-1: each group of channels is one head of the heads layout
        batch_state, dim, d_state = state.shape
        groups = 1 if B.dim() == 2 else B.shape[1]
        if B.dim() not in (2, 3) or dim % groups:
            raise shape_error("B", f"(batch, d_state={d_state}) or (batch, groups dividing dim={dim}, d_state)", B)
        split = lambda t: None if t is None else t.unflatten(-1 if t.dim() == 1 else 1, (groups, -1))  # noqa: E731
        for name, t in (("x", x), ("dt", dt), ("z", z)):
            _expect(name, t, (x.shape[0], dim))
        _expect("A", A, (dim, d_state))
        _expect("D", D, (dim,))
        _expect("dt_bias", dt_bias, (dim,))
        Bg = B.unsqueeze(1) if B.dim() == 2 else B
        Cg = C.unsqueeze(1) if C.dim() == 2 else C
        y = selective_state_update_torch(state.unflatten(1, (groups, -1)), split(x), split(dt),
                                         A.unflatten(0, (groups, -1)), Bg, Cg, split(D), split(z), split(dt_bias),
                                         dt_softplus, state_batch_indices)
        return y.flatten(1)
    if state.dim() != 4:
        raise shape_error("state", "(batch, dim, d_state) or (batch, nheads, headdim, d_state)", state)
    _, nheads, headdim, d_state = state.shape
    batch = x.shape[0]
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        _expect(name, t, (batch, nheads, headdim))
    _expect("A", A, (nheads, headdim, d_state))
    _expect("D", D, (nheads, headdim))
    _expect("dt_bias", dt_bias, (nheads, headdim))
    ngroups = B.shape[1] if B.dim() == 3 else 0
    if B.dim() != 3 or B.shape != (batch, ngroups, d_state) or nheads % ngroups:
        raise shape_error("B", f"(batch={batch}, ngroups dividing nheads={nheads}, d_state={d_state})", B)
    _expect("C", C, tuple(B.shape))
    if state_batch_indices is None:
        if state.shape[0] != batch:
            raise MambaKitError(f"state must have batch {batch} like x (or give state_batch_indices), got "
                                f"{state.shape[0]}")
    elif state_batch_indices.shape != (batch,) or state_batch_indices.is_floating_point():
        raise MambaKitError(f"state_batch_indices must be an integer tensor of shape (batch={batch},), got "
                            f"{tuple(state_batch_indices.shape)} {state_batch_indices.dtype}")
    fp = torch.float64 if torch.float64 in (state.dtype, x.dtype) else torch.float32
    rows = None if state_batch_indices is None else state_batch_indices.long()
    h = state.to(fp) if rows is None else state.index_select(0, rows.clamp(min=0)).to(fp)
    delta = dt.to(fp) if dt_bias is None else dt.to(fp) + dt_bias.to(fp)
    if dt_softplus:
        delta = F.softplus(delta)
    per_group = nheads // ngroups
    Bh = B.to(fp).repeat_interleave(per_group, dim=1)[:, :, None, :]  # (batch, nheads, 1, d_state)
    Ch = C.to(fp).repeat_interleave(per_group, dim=1)[:, :, None, :]
    xf = x.to(fp)
    h = h * torch.exp(delta[..., None] * A.to(fp)) + (delta * xf)[..., None] * Bh
    y = (h * Ch).sum(-1)  # (batch, nheads, headdim)
    if D is not None:
        y = y + xf * D.to(fp)
    if z is not None:
        y = y * F.silu(z.to(fp))
    if rows is None:
        state.copy_(h)
        return y.to(x.dtype)
    valid = rows >= 0
    state.index_copy_(0, rows[valid], h[valid].to(state.dtype))
    return y.masked_fill(~valid[:, None, None], 0.0).to(x.dtype)
