"""Selective scan (the S6 recurrence of Mamba-1): one public dispatcher over its forms.

Layout follows the official `mamba_ssm.selective_scan_fn`:
    u, delta, z: (batch, dim, seqlen)
    A:           (dim, d_state), real and negative, or complex (negative real part; see `complex.py`)
    B, C:        each (batch, d_state, seqlen), grouped (batch, groups, d_state, seqlen) or time-invariant
                 (dim, d_state), in any combination (a group row serves dim / groups consecutive channels)
    D, delta_bias: (dim,)
    initial_state / last state: (batch, dim, d_state)
    seq_idx:     (batch, seqlen) integer; the state is reset wherever it changes (packed sequences)

Per step t:  delta = softplus(delta + bias) if asked
             h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
             y_t = <C_t, h_t> + D * u_t,   y_t *= silu(z_t) if z is given

Forms: `naive` (the sequential reference), `chunked` (the PyTorch fast path), `triton` (the GPU kernels, imported
only when used), `step` (one decoding token). `selective_scan_fn` and `selective_state_update` choose among them.
Complex A (`complex.py`: y_t = 2 * Re(<C_t, h_t>), B/C complex or real (re, im) pairs along time) has only the
sequential form, which runs on every device.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.backends import BACKENDS, check_backend, kernels
from mambakit.ops.checks import require_tensors
from mambakit.ops.selective_scan.chunked import selective_scan_chunked
from mambakit.ops.selective_scan.common import check_selective_scan_inputs, compute_dtype, prepare_delta
from mambakit.ops.selective_scan.naive import selective_scan_ref
from mambakit.ops.selective_scan.step import selective_state_update_torch

__all__ = [
    "BACKENDS", "check_selective_scan_inputs", "compute_dtype", "prepare_delta", "selective_scan_chunked",
    "selective_scan_fn", "selective_scan_ref", "selective_state_update", "triton_available",
]

def triton_available() -> bool:
    """Whether the Triton kernels of the selective scan import (Triton installed)."""
    return kernels("mambakit.ops.selective_scan.triton") is not None


def selective_scan_fn(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None, backend: str = "auto",
):
    """Selective scan with the official `mamba_ssm` signature (plus initial_state, seq_idx and backend).

    backend: "auto" (Triton kernels for CUDA tensors when available, else the chunked PyTorch path), "torch" (chunked
    PyTorch), "triton" or "ref" (the sequential loop). Returns y (batch, dim, seqlen), or (y, last_state) with
    `return_last_state=True`.

    Complex A (dim, d_state): there are no Triton kernels for it; "auto" and "torch" run the sequential PyTorch form
    (`selective_scan_ref`, differentiable by autograd; it keeps every step's state for the backward) on any device,
    "triton" raises MambaKitError. B, C are then complex (batch, [groups,] d_state, seqlen) or real
    (batch, [groups,] d_state, 2 * seqlen) with (re, im) pairs along time; the last state is complex.
    """
    require_tensors(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                    seq_idx=seq_idx)
    if A.is_complex():
        if check_backend(backend) == "triton":
            raise MambaKitError("backend='triton' does not take complex A (no Triton kernels for it); use "
                                "backend='auto', 'torch' or 'ref'")
        backend = "ref"
    if check_backend(backend) == "auto":
        backend = "triton" if (u.is_cuda and triton_available()) else "torch"
    if backend == "triton":
        from mambakit.ops.selective_scan.triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state, seq_idx)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, seq_idx)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, seq_idx)


def selective_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
) -> Tensor:
    """One step of the recurrence for decoding, updating `state` in place (official `selective_state_update`).

    Mamba-1 layout: state (batch, dim, d_state); x, dt, z: (batch, dim); A: (dim, d_state); B, C: (batch, d_state)
    or (batch, groups, d_state); D, dt_bias: (dim,). Returns y: (batch, dim) in x's dtype.
    Heads layout (Mamba-2): state (batch, nheads, headdim, d_state); x, dt, z: (batch, nheads, headdim); A:
    (nheads, headdim, d_state); B, C: (batch, ngroups, d_state); D, dt_bias: (nheads, headdim). Returns y:
    (batch, nheads, headdim). state_batch_indices: (batch,) integer state row per batch row, negative = padding
    (y 0, no state touched). Computed in float32 (float64 for float64 state or x) whatever the state's dtype.
    Mamba-1 CUDA states without indices go to the Triton decode kernel when Triton is available.
    """
    require_tensors(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if state.dim() == 3 and state_batch_indices is None and state.is_cuda and triton_available():
        from mambakit.ops.triton.state_update import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
