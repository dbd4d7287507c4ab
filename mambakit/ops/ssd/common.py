"""What the PyTorch forms of SSD share: the D skip and the frame around a form (check, dt processing, gate)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

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
             return_final_states, *, need_chunk_size: bool) -> SSDOutput:
    """Validate, process dt, cast to the compute dtype, run ``core`` (which adds D * x) and apply the gate."""
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                     need_chunk_size=need_chunk_size)
    dtype = compute_dtype(x, dt, A, B, C)
    dt_c = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    x_c = x.to(dtype)
    init = None if initial_states is None else initial_states.to(dtype)
    D_c = None if D is None else D.to(dtype)
    y, final = core(x_c, dt_c, A.to(dtype), B.to(dtype), C.to(dtype), D_c, init, seq_idx, chunk_size)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y

