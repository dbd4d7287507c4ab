"""`mamba_ssm.ops.triton.mamba3.mamba3_siso_step`: one Mamba-3 SISO decode step with the official signature.

Q, K (batch, nheads_qk, headdim_qk); V, Z (batch, nheads, headdim_v); ADT, DT, Trap (batch, nheads); Q_bias,
K_bias (nheads, headdim_qk); Angles (batch, nheads, headdim_angles); D (nheads,); Input_States (angle, ssm, k, v)
of (batch, nheads, headdim_angles), (batch, nheads, headdim_v, headdim_qk), (batch, nheads, headdim_qk),
(batch, nheads, headdim_v). As the official: the input states are left unchanged and new ones returned (angle, ssm,
k in float32, float64 for float64 inputs; v is V itself). mambakit's in-place form is mambakit.ops.mamba3.mamba3_step.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3 import mamba3_step
from mambakit.ops.mamba3.common import compute_dtype

__all__ = ["mamba3_siso_step"]


def mamba3_siso_step(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tuple[Tensor, List[Tensor]]:
    """(Out (batch, nheads, headdim_v) in V's dtype, [angle, ssm, k, v] after the step)."""
    if Input_States is None or len(Input_States) != 4 or any(not isinstance(s, Tensor) for s in Input_States):
        raise MambaKitError("Input_States must be the four tensors (angle, ssm, k, v) (the official requires them), "
                            f"got {type(Input_States).__name__}")
    fp = compute_dtype(Q, K, V, *Input_States)
    states = tuple(s.detach().to(fp).clone() for s in Input_States)
    out = mamba3_step(states, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Z=Z)
    return out, [states[0], states[1], states[2], V]
