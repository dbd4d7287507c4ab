"""`mamba_ssm.ops.triton.mamba3.mamba3_siso_combined`: the Mamba-3 SISO scan with the official signature.

Layouts (official): Q, K (batch, seqlen, nheads_qk, headdim_qk); V, Z (batch, seqlen, nheads, headdim_v); ADT, DT,
Trap (batch, nheads, seqlen); Q_bias, K_bias (nheads, headdim_qk); Angles (batch, seqlen, nheads, headdim_angles);
D (nheads,); Input_States (angle, ssm, k, v) of (num_sequences, nheads, headdim_angles), (num_sequences, nheads,
headdim_v, headdim_qk), (num_sequences, nheads, headdim_qk), (num_sequences, nheads, headdim_v).

What differs: the official casts Q, K, V, Trap, Angles and Z to bfloat16 before its kernels; mambakit computes in
float32 (float64 for float64 inputs) from the given dtypes and returns the output in V's dtype. With cu_seqlens
(batch 1) each packed sequence is scanned on its own, from its own Input_States row, giving its own final states.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import check_cu_seqlens
from mambakit.errors import MambaKitError
from mambakit.ops.mamba3 import mamba3_scan
from mambakit.ops.mamba3.common import compute_dtype

__all__ = ["mamba3_siso_combined"]

States = Tuple[Tensor, Tensor, Tensor, Tensor]


def _zero_states(Q: Tensor, V: Tensor, Angles: Tensor) -> States:
    """(angle, ssm, k, v) zeros of one sequence, float32 (float64 for float64 V)."""
    nheads, headdim_v, d_state, n_angles = V.shape[2], V.shape[3], Q.shape[3], Angles.shape[3]
    fp = compute_dtype(Q, V)
    z = lambda *s: torch.zeros(1, nheads, *s, dtype=fp, device=V.device)  # noqa: E731
    return z(n_angles), z(headdim_v, d_state), z(d_state), z(headdim_v)


def mamba3_siso_combined(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[States] = None, chunk_size: int = 64, return_final_states: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Out (batch, seqlen, nheads, headdim_v) in V's dtype, or (Out, angle, ssm, k, v) with the final states
    (num_sequences, ...) in float32 (float64 for float64 inputs); num_sequences = batch, or len(cu_seqlens) - 1.
    Differentiable by autograd."""
    if Input_States is not None and (len(Input_States) != 4 or any(s is None for s in Input_States)):
        raise MambaKitError("Input_States must be the four tensors (angle, ssm, k, v) together, or None")
    if cu_seqlens is None:
        return mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Z=Z, Input_States=Input_States,
                           chunk_size=chunk_size, return_final_states=return_final_states)
    bounds = check_cu_seqlens(cu_seqlens, Q.shape[0], Q.shape[1])
    if Input_States is not None and any(s.shape[0] != len(bounds) - 1 for s in Input_States):
        raise MambaKitError(f"Input_States must have num_sequences={len(bounds) - 1} rows with cu_seqlens, got "
                            f"{[tuple(s.shape) for s in Input_States]}")
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        start = None if Input_States is None else tuple(s[i:i + 1] for s in Input_States)
        if b == a:
            finals.append(start if start is not None else _zero_states(Q, V, Angles))
            continue
        t, h = slice(a, b), (slice(None), slice(None), slice(a, b))
        y, *final = mamba3_scan(Q[:, t], K[:, t], V[:, t], ADT[h], DT[h], Trap[h], Q_bias, K_bias, Angles[:, t],
                                D=D, Z=None if Z is None else Z[:, t], Input_States=start, chunk_size=chunk_size,
                                return_final_states=True)
        outs.append(y)
        finals.append(final)
    out = torch.cat(outs, dim=1) if outs else V.new_zeros(V.shape)
    if not return_final_states:
        return out
    fp = compute_dtype(Q, K, V, *(Input_States or ()))
    return (out, *(torch.cat([p.to(fp) for p in parts], dim=0) for parts in zip(*finals)))
