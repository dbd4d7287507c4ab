"""One token of the selective scan (decoding) in PyTorch: the state updated in place."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.dt import process_dt
from mambakit.ops.selective_scan.common import shape_error


def selective_state_update_torch(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
) -> Tensor:
    """One step of the recurrence for decoding in PyTorch, updating `state` in place (any device).

    state: (batch, dim, d_state); x, dt, z: (batch, dim); A: (dim, d_state); B, C: (batch, d_state) or
    (batch, groups, d_state); D, dt_bias: (dim,). Returns y: (batch, dim) in x's dtype.
    """
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and t.shape != (batch, dim):
            raise shape_error(name, f"(batch={batch}, dim={dim})", t)
    if A.shape != (dim, d_state):
        raise shape_error("A", f"(dim={dim}, d_state={d_state})", A)
    dtype = state.dtype
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    if B.dim() != C.dim() or B.dim() not in (2, 3):
        raise MambaKitError(f"B and C must both be (batch, d_state) or both (batch, groups, d_state), got B of shape "
                            f"{tuple(B.shape)} and C of shape {tuple(C.shape)}")
    if Bg.shape[0] != batch or Bg.shape[2] != d_state or dim % Bg.shape[1] != 0 or Cg.shape != Bg.shape:
        raise shape_error("B", f"(batch={batch}, d_state={d_state}) or (batch, groups, d_state), C alike", B)
    reps = dim // Bg.shape[1]
    Bd = Bg.to(dtype).repeat_interleave(reps, dim=1)  # (batch, dim, d_state)
    Cd = Cg.to(dtype).repeat_interleave(reps, dim=1)
    dt = process_dt(dt, dt_bias, dt_softplus, dtype=dtype)  # (batch, dim)
    xf = x.to(dtype)
    state.mul_(torch.exp(dt[..., None] * A.to(dtype))).add_((dt * xf)[..., None] * Bd)
    y = (state * Cd).sum(-1)
    if D is not None:
        y = y + xf * D.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)

