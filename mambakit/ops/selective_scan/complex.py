"""Complex A in the selective scan (the official `mamba_ssm` semantics): the input forms and their check.

With A complex (dim, d_state) the state h is complex and each step reads out y_t = 2 * Re(<C_t, h_t>) (the real
signal of h and its conjugate). B and C are either complex, (batch, d_state, seqlen) or grouped
(batch, groups, d_state, seqlen), or real with (re, im) pairs interleaved along time, (batch, d_state, 2 * seqlen) or
(batch, groups, d_state, 2 * seqlen) (the official kernel's layout), or time-invariant complex (dim, d_state), in any
combination as for real A. The last state is complex (batch, dim, d_state).
There are no Triton kernels for complex A: the dispatcher runs the sequential PyTorch form on every device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan.common import check_selective_scan_inputs, compute_dtype

__all__ = ["as_complex_bc", "check_complex_scan_inputs", "complex_dtype"]


def complex_dtype(u: Tensor) -> torch.dtype:
    """The state's dtype: complex128 for float64 u, else complex64."""
    return torch.complex128 if compute_dtype(u) == torch.float64 else torch.complex64


def as_complex_bc(name: str, t: Tensor, seqlen: int, dtype: torch.dtype) -> Tensor:
    """B or C for complex A as a complex tensor (..., d_state, seqlen) of `dtype`.

    t: complex (..., d_state, seqlen), or real (..., d_state, 2 * seqlen) holding (re, im) pairs along time;
    time-invariant (dim, d_state) complex or real (taken as complex with zero imaginary part).
    """
    if t.is_complex() or t.dim() == 2:
        return t.to(dtype)
    if t.dim() not in (3, 4) or t.shape[-1] != 2 * seqlen:
        raise MambaKitError(
            f"{name} must be complex (batch, [groups,] d_state, seqlen={seqlen}) or real (batch, [groups,] d_state, "
            f"2 * seqlen={2 * seqlen}) with (re, im) pairs along time when A is complex, got real {name} of shape "
            f"{tuple(t.shape)}")
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.view_as_complex(t.to(real).unflatten(-1, (seqlen, 2)).contiguous())


def check_complex_scan_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], initial_state: Optional[Tensor], seq_idx: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Validate the inputs of a complex-A scan (as `check_selective_scan_inputs` does for real A); return B and C as
    complex (batch, [groups,] d_state, seqlen) tensors of `complex_dtype(u)`."""
    if u.dim() != 3:
        raise MambaKitError(f"u must have shape (batch, dim, seqlen), got {tuple(u.shape)}")
    for name, t in (("u", u), ("delta", delta), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.is_complex():
            raise MambaKitError(f"{name} must be real (only A, B, C and initial_state may be complex), got dtype "
                                f"{t.dtype}")
    dtype = complex_dtype(u)
    seqlen = u.shape[-1]
    Bc, Cc = as_complex_bc("B", B, seqlen, dtype), as_complex_bc("C", C, seqlen, dtype)
    h0 = initial_state.real if initial_state is not None and initial_state.is_complex() else initial_state
    # the shapes, devices and the rest checked once, on real views of the same shapes
    try:
        check_selective_scan_inputs(u, delta, A.real, Bc.real, Cc.real, D, z, delta_bias, h0, seq_idx)
    except MambaKitError as exc:
        raise MambaKitError(f"{exc} (complex A: the shapes of B and C count complex entries, seqlen along time)") \
            from None
    return Bc, Cc
