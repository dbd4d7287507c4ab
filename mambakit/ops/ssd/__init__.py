"""SSD (structured state-space duality): the sequence-mixing op of Mamba-2: one public dispatcher over its forms.

The restricted SSM of Mamba-2 has, per head ``h``, a scalar decay ``a_t = exp(dt_t * A_h)`` and a state of shape
``(headdim, d_state)``::

    state_t = a_t * state_{t-1} + dt_t * x_t B_t^T        (x_t: (headdim,), B_t: (d_state,))
    y_t     = state_t C_t + D * x_t
    y_t    *= silu(z_t)                                    (only if z is given)

``B`` and ``C`` are shared by the heads of a group: with ``nheads = ngroups * r`` head ``h`` uses group ``h // r``.

Three forms of the same function are provided, all with the official ``mamba_ssm`` layout and ONE signature
(so that ``ssd_chunked(**kw)`` can be checked against ``ssd_recurrent(**kw)``):

* :func:`ssd_recurrent` -- the sequential recurrence above (the reference; slow, plain autograd).
* :func:`ssd_quadratic` -- the "attention" (dual) form ``y = (L o C B^T)(dt x)`` over the whole sequence
  (quadratic in seqlen; plain autograd); its matrix is :func:`ssd_attention_matrix`.
* :func:`ssd_chunked` -- the block decomposition used by Mamba-2 (linear in seqlen), with a hand-written backward
  that recomputes the chunk-local quadratic blocks instead of storing them.

:func:`mamba_chunk_scan_combined` is the public dispatcher with the official signature and
validation; :func:`ssd_step` is the one-token decode step. Modules: `naive` (recurrent), `quadratic`, `chunked`,
`triton` (kernels, imported only when used), `validate`, `common`.

Layouts (official ``mamba_ssm``)::

    x, z           (batch, seqlen, nheads, headdim)
    dt             (batch, seqlen, nheads)
    A              (nheads,)                       A < 0
    B, C           (batch, seqlen, ngroups, d_state)
    D              (nheads,) or (nheads, headdim)
    dt_bias        (nheads,)
    states         (batch, nheads, headdim, d_state)
    seq_idx        (batch, seqlen) integer; the state is reset to zero wherever seq_idx[:, t] != seq_idx[:, t-1],
                   so the initial state only reaches the positions before the first change.

dt processing (as the official op; `mambakit.ops.dt`): ``dt = dt + dt_bias``; ``dt = softplus(dt)`` if
``dt_softplus``; clamp to
``dt_limit`` unless it is the default ``(0, inf)``.

Precision: inputs in float16/bfloat16/float32 are computed in float32, float64 inputs in float64. ``y`` has x's
dtype; the final state has the compute dtype (float32 or float64), like the official op's float32 final state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.backends import BACKENDS, check_backend, kernels
from mambakit.ops.dt import DEFAULT_DT_LIMIT, compute_dtype, process_dt
from mambakit.ops.segments import segments
from mambakit.ops.triton.device import interpreted
from mambakit.ops.ssd.chunked import ssd_chunked
from mambakit.ops.ssd.common import SSDOutput, add_skip
from mambakit.ops.ssd.naive import recurrence_step, ssd_recurrent
from mambakit.ops.ssd.quadratic import ssd_attention_matrix, ssd_quadratic
from mambakit.ops.ssd.validate import check_ssd_inputs, check_ssd_step_inputs

__all__ = [
    "BACKENDS",
    "DEFAULT_DT_LIMIT",
    "check_ssd_inputs",
    "compute_dtype",
    "mamba_chunk_scan_combined",
    "ssd_attention_matrix",
    "ssd_chunked",
    "ssd_quadratic",
    "ssd_recurrent",
    "ssd_step",
    "triton_available",
]

def triton_available() -> bool:
    """Whether the Triton kernels of SSD import (Triton installed)."""
    return kernels("mambakit.ops.ssd.triton") is not None


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    log_decay: Optional[Tensor] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
) -> SSDOutput:
    """The Mamba-2 SSD op with the official ``mamba_ssm`` signature, plus ``backend`` and ``log_decay``.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads); processed as ``softplus(dt + dt_bias)`` (each part optional), then clamped
            to ``dt_limit`` unless that is the default (0, inf).
        A: (nheads,), negative; None with ``log_decay``.
        B, C: (batch, seqlen, ngroups, d_state), ngroups dividing nheads.
        chunk_size: positive int (any, not only powers of two).
        D: (nheads,) or (nheads, headdim) skip connection, optional.
        z: (batch, seqlen, nheads, headdim) gate, optional: ``y *= silu(z)``.
        dt_bias: (nheads,), optional.
        initial_states: (batch, nheads, headdim, d_state), optional.
        seq_idx: (batch, seqlen) int, optional: packed sequences; the state is reset where it changes.
        dt_softplus, dt_limit: see ``dt``.
        return_final_states: also return the state after the last position.
        log_decay: (batch, seqlen, nheads), optional, with A None: a per-position log-decay (<= 0 for a stable
            scan) in place of ``dt * A``: ``state_t = exp(log_decay_t) state_{t-1} + dt_t x_t B_t^T`` (dt, after
            its processing, only scales the input); differentiable like every other input.
        backend: "auto" (Triton kernels for CUDA tensors that are not float64, else PyTorch), "torch" (the chunked
            PyTorch form, any device), "triton" (mambakit.ops.ssd.triton; chunk_size is then an upper bound on
            its internal chunk of 16..64 positions, which changes nothing but speed) or "ref" (the recurrence).
        allow_tf32: with the Triton kernels, float32 x, B and C multiply on the tensor cores in tf32 (10-bit
            mantissas, float32 sums) instead of exactly; other backends and 16-bit inputs do not read it.

    Returns:
        y (batch, seqlen, nheads, headdim) in x's dtype, or ``(y, final_states)`` with final_states
        (batch, nheads, headdim, d_state) in float32 (float64 for float64 inputs).

    Raises:
        MambaKitError: an argument has the wrong type, shape, dtype or device.
    """
    check_backend(backend)
    if not isinstance(allow_tf32, bool):
        raise MambaKitError(f"allow_tf32 must be a bool, got {allow_tf32!r}")
    if backend == "auto":
        use_triton = isinstance(x, Tensor) and x.is_cuda and x.dtype != torch.float64 and triton_available()
        backend = "triton" if use_triton else "torch"
    if backend == "ref":
        return ssd_recurrent(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                             seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
                             return_final_states=return_final_states, log_decay=log_decay)
    if backend == "triton":
        return _triton_form(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                            dt_limit, return_final_states, log_decay, allow_tf32)
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                       seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
                       return_final_states=return_final_states, log_decay=log_decay)


def _triton_form(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                 return_final_states, log_decay=None, allow_tf32=False) -> SSDOutput:
    """The Triton kernels (mambakit.ops.ssd.triton) for dt processing, the scan and the D skip; the gate in PyTorch."""
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                     need_chunk_size=True, log_decay=log_decay)
    if x.dtype == torch.float64:
        raise MambaKitError("backend='triton' takes float16, bfloat16 or float32 x, got float64 (use 'torch')")
    if not x.is_cuda and not interpreted():
        raise MambaKitError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), "
                            f"got x on {x.device} (use backend='torch' or 'auto')")
    from mambakit.ops.ssd.triton import kernel_chunk_size, ssd_triton_core

    chunk_size = kernel_chunk_size(x.shape[1], chunk_size)
    limit = tuple(dt_limit) if tuple(dt_limit) != DEFAULT_DT_LIMIT else None  # the bias, softplus, clamp: in-kernel
    # non-finite values stay causal inside the kernels (their chunks mask the future after the products)
    y, final = ssd_triton_core(x, dt, A, B, C, D, initial_states, segments(seq_idx), chunk_size, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, dt_limit=limit, log_decay=log_decay, allow_tf32=allow_tf32)
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_states else y


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    backend: str = "auto",
) -> Tensor:
    """One-token decode step; updates ``state`` IN PLACE.

    Args:
        state: (batch, nheads, headdim, d_state), updated in place (computed in float32, or float64 if state or an
            input is float64, then stored in state's dtype).
        x: (batch, nheads, headdim); z: same shape, optional gate.
        dt: (batch, nheads); dt_bias: (nheads,); dt_softplus, dt_limit: as :func:`mamba_chunk_scan_combined`.
        A: (nheads,); B, C: (batch, ngroups, d_state); D: (nheads,) or (nheads, headdim), optional.
        backend: "auto" (the Triton decode kernel for contiguous CUDA states that are not float64 when dt_limit is
            the default, else PyTorch), "torch", "triton" or "ref" (the same as "torch": one step is its own
            reference).

    Returns:
        y (batch, nheads, headdim) in x's dtype: exactly one step of the recurrence of :func:`ssd_recurrent`.
    """
    check_ssd_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    check_backend(backend)
    if backend == "auto":
        fits = state.is_cuda and state.is_contiguous() and compute_dtype(state, x, dt, A, B, C) == torch.float32
        backend = "triton" if fits and tuple(dt_limit) == DEFAULT_DT_LIMIT and triton_available() else "torch"
    if backend == "triton":
        if tuple(dt_limit) != DEFAULT_DT_LIMIT:
            raise MambaKitError(f"backend='triton' supports only the default dt_limit (0, inf), got {dt_limit}")
        from mambakit.ops.triton.state_update import ssd_step_triton

        return ssd_step_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    dtype = compute_dtype(state, x, dt, A, B, C)
    dt_c = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    x_c = x.to(dtype)
    new_state, y = recurrence_step(state.to(dtype), x_c, dt_c, A.to(dtype), B.to(dtype), C.to(dtype))
    state.copy_(new_state)
    y = add_skip(y, x_c, None if D is None else D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
