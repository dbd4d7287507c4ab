"""The selective scan's reference: the plain sequential recurrence, differentiable by autograd; real or complex A."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.ops.segments import sequence_starts
from mambakit.ops.selective_scan.common import (
    check_selective_scan_inputs, compute_dtype, finish_output, grouped_pair, prepare_delta,
)
from mambakit.ops.selective_scan.complex import check_complex_scan_inputs, complex_dtype


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
):
    """The definition every fast path is tested against: a Python loop over time (differentiable by autograd).

    Returns y: (batch, dim, seqlen) in u's dtype, and with `return_last_state` also the state after the last step,
    (batch, dim, d_state) in float32 (float64 for float64 inputs).

    Complex A (dim, d_state) (the official semantics, `mambakit.ops.selective_scan.complex`): B, C complex
    (batch, [groups,] d_state, seqlen) or real (batch, [groups,] d_state, 2 * seqlen) with (re, im) pairs along time;
    initial_state real or complex; y_t = 2 * Re(<C_t, h_t>) + D * u_t (then the z gate); the last state complex64
    (complex128 for float64 u).
    """
    real_dtype = compute_dtype(u)
    if A.is_complex():
        B, C = check_complex_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        dtype = complex_dtype(u)
    else:
        check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        dtype = real_dtype
    batch, dim, seqlen = u.shape
    delta = prepare_delta(delta, delta_bias, delta_softplus, real_dtype)
    Bg, Cg = (t.to(dtype) for t in grouped_pair(B, C, u))  # (batch, groups, d_state, seqlen)
    heads_per_group = dim // Bg.shape[1]
    A = A.to(dtype)
    h = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    if initial_state is not None:
        h = initial_state.to(dtype)
    keep = (~sequence_starts(seq_idx)).to(real_dtype).unbind(-1) if seq_idx is not None else None
    # per-step slices via unbind: their backward stacks small gradients instead of scattering into full tensors
    steps = zip(delta.unbind(-1), u.to(real_dtype).unbind(-1), Bg.unbind(-1), Cg.unbind(-1))
    ys = []
    for t, (delta_t, u_t, B_t, C_t) in enumerate(steps):
        decay = torch.exp(delta_t[:, :, None] * A)  # (batch, dim, d_state)
        if keep is not None:
            decay = decay * keep[t][:, None, None]
        B_t = B_t.repeat_interleave(heads_per_group, dim=1)  # (batch, dim, d_state)
        C_t = C_t.repeat_interleave(heads_per_group, dim=1)
        h = decay * h + (delta_t * u_t)[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if y.is_complex():
        y = 2 * y.real  # h and its conjugate: the real signal
    y = finish_output(y, u, D, z)
    return (y, h) if return_last_state else y
