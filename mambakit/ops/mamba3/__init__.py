"""Mamba-3: the trapezoidal two-term recurrence with data-dependent rotations of B and C (SISO here; MIMO of rank R
in :mod:`.mimo`, its dispatcher :func:`.mimo.mamba3_mimo_scan`, its Triton kernels :mod:`.triton_mimo`).

* :func:`mamba3_scan` -- the public scan with the official ``mamba3_siso_combined`` argument names (``seq_idx``
  in place of ``cu_seqlens``) and a ``backend``.
* :mod:`.ssd_form` -- the SISO scan as Mamba-2's SSD with a per-position log-decay (its Triton kernels on the GPU:
  the fast path, backend "ssd", what "auto" picks for CUDA tensors; the layer enters it from its raw in_proj
  columns, :func:`.ssd_form.mamba3_ssd_raw`, the per-position terms fused in :mod:`.triton_prep`).
* :func:`mamba3_step` -- one token from the four state parts, updated in place (decoding); on CUDA one fused
  Triton kernel (:mod:`.triton_step`).
* :func:`.prep_step.mamba3_prep_step` -- the same step from the layer's raw in_proj row (the per-token prep: RMSNorm
  of B and C, dt, A dt, angles, inside it); on CUDA one fused Triton kernel (:mod:`.triton_prep_step`), what a SISO
  layer's decoding step runs there.
* :mod:`.naive` (the step recurrence, the reference), :mod:`.chunked` (the block decomposition, fast on CPU) and
  :mod:`.triton` (portable Triton kernels, forward and deterministic backward) share the scan's signature, so
  every test can be ``chunked(**kw) == naive(**kw)``.

The math, the layouts and the precision rules are in :mod:`mambakit.ops.mamba3.common`.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3.chunked import mamba3_chunked
from mambakit.ops.mamba3.common import Mamba3States, compute_dtype, heads_of_groups, validate, validate_states
from mambakit.ops.mamba3.naive import mamba3_scan_ref, step_core

__all__ = ["BACKENDS", "STEP_BACKENDS", "Mamba3States", "mamba3_chunked", "mamba3_scan", "mamba3_scan_ref",
           "mamba3_step"]

#: "auto": "ssd" for float32 and 16-bit CUDA tensors (in CUDA-graph captures too) when Triton imports, else the
#: chunked PyTorch form; "torch": the chunked PyTorch form; "triton": the Mamba-3 Triton kernels
#: (mambakit.ops.mamba3.triton; CUDA or TRITON_INTERPRET=1, differentiable); "ssd": the SSD Triton kernels with a
#: per-position log-decay (mambakit.ops.mamba3.ssd_form; CUDA or TRITON_INTERPRET=1; SISO only); "ref": the step
#: recurrence.
BACKENDS = ("auto", "torch", "triton", "ssd", "ref")

#: of :func:`mamba3_step`: "auto": "triton" for CUDA tensors computed in float32 (no float64 input or state) when
#: Triton imports and no input requires grad, else "torch"; "triton": one fused kernel
#: (mambakit.ops.mamba3.triton_step; CUDA or TRITON_INTERPRET=1); "torch": the PyTorch step
#: (:func:`mambakit.ops.mamba3.naive.step_core`).
STEP_BACKENDS = ("auto", "torch", "triton")


def mamba3_scan(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, chunk_size: int = 64,
    return_final_states: bool = False, seq_idx: Optional[Tensor] = None, backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The Mamba-3 SISO scan.

    Args:
        Q, K: (batch, seqlen, ngroups, d_state), C and B after their RMSNorm; ngroups divides nheads.
        V: (batch, seqlen, nheads, headdim), x.
        ADT, DT: (batch, nheads, seqlen), A * dt and dt (dt after softplus, A < 0).
        Trap: (batch, nheads, seqlen), the trapezoid's logit (lambda = sigmoid(Trap)).
        Q_bias, K_bias: (nheads, d_state).
        Angles: (batch, seqlen, nheads, n_angles), the raw angle projections, 2 * n_angles <= d_state.
        D: (nheads,) skip, optional. Z: (batch, seqlen, nheads, headdim) gate ``y *= silu(Z)``, optional.
        Input_States: (angle, ssm, k, v) as :class:`Mamba3States` (batch, nheads, n_angles),
            (batch, nheads, headdim, d_state), (batch, nheads, d_state), (batch, nheads, headdim), optional:
            the state before the first position (of the first packed sequence).
        chunk_size: positive int; changes only speed and memory.
        return_final_states: also return the four parts after the last position.
        seq_idx: (batch, seqlen) int, optional: packed sequences; every state part restarts at each change.
        backend: one of :data:`BACKENDS`.

    Returns:
        y (batch, seqlen, nheads, headdim) in V's dtype, or (y, angle, ssm, k, v) with the final states in float32
        (float64 for float64 inputs).

    Raises:
        MambaKitError: an argument has the wrong type, shape, dtype or device, or an unknown backend.
    """
    if backend not in BACKENDS:
        raise MambaKitError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "ssd" if _ssd_fits(V) else "torch"
    if backend == "ssd":
        from mambakit.ops.mamba3.ssd_form import mamba3_ssd

        return mamba3_ssd(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Z=Z, Input_States=Input_States,
                          chunk_size=chunk_size, return_final_states=return_final_states, seq_idx=seq_idx,
                          ssd_backend="triton")
    if backend == "triton":
        from mambakit.ops.mamba3.triton import mamba3_scan_triton as form
    else:
        form = mamba3_scan_ref if backend == "ref" else mamba3_chunked
    return form(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Z=Z, Input_States=Input_States,
                chunk_size=chunk_size, return_final_states=return_final_states, seq_idx=seq_idx)


def _ssd_fits(V: object) -> bool:
    """Whether "auto" runs the SSD Triton kernels: V a float32, bfloat16 or float16 CUDA tensor, Triton importable
    (inside a CUDA-graph capture too: the form never synchronises the host)."""
    return isinstance(V, Tensor) and ssd_form_fits(V.device, V.dtype)


def ssd_form_fits(device: torch.device, dtype: torch.dtype) -> bool:
    """`_ssd_fits` for a V of that device and dtype (asked by the layer before its projection)."""
    if not (device.type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return False
    from mambakit.ops.ssd import triton_available

    return triton_available()


def mamba3_step(
    states: Tuple[Tensor, Tensor, Tensor, Tensor], Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor,
    Trap: Tensor, Q_bias: Tensor, K_bias: Tensor, Angles: Tensor, D: Optional[Tensor] = None,
    Z: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    """One token; updates the four tensors of ``states`` IN PLACE (computed in float32, or float64 when a state or
    an input is float64, then stored in each state's dtype). The "triton" kernel is inference only (nothing is
    recorded for autograd: "auto" takes the PyTorch step while an input requires grad).

    Args:
        states: (angle, ssm, k, v) as in :func:`mamba3_scan`'s Input_States.
        Q, K: (batch, ngroups, d_state); V, Z: (batch, nheads, headdim); ADT, DT, Trap: (batch, nheads);
        Q_bias, K_bias: (nheads, d_state); Angles: (batch, nheads, n_angles); D: (nheads,), optional.
        backend: one of :data:`STEP_BACKENDS`.

    Returns:
        y (batch, nheads, headdim) in V's dtype: exactly one step of the recurrence of :func:`mamba3_scan_ref`.

    Raises:
        MambaKitError: an argument has the wrong type, shape or device, an unknown backend, or "triton" for float64.
    """
    if backend not in STEP_BACKENDS:
        raise MambaKitError(f"backend must be one of {STEP_BACKENDS}, got {backend!r}")
    dims = validate(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, None, None, seq_dims=False)
    validate_states(states, dims, "states")
    fp = compute_dtype(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, *states)
    inputs = (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if backend == "auto":
        backend = "triton" if fp == torch.float32 and V.is_cuda and not grad and _step_kernel_imports() else "torch"
    if backend == "triton":
        if fp == torch.float64:
            raise MambaKitError("backend='triton' computes in float32: no float64 input or state, got float64")
        if grad:
            raise MambaKitError("backend='triton' is inference only: an input requires grad (use torch.no_grad() "
                                "or backend='torch')")
        for part, value in zip(Mamba3States._fields, states):
            if value.device != V.device:
                raise MambaKitError(f"states.{part} must be on V's device ({V.device}), got {value.device}")
        from mambakit.ops.mamba3.triton_step import mamba3_step_triton

        return mamba3_step_triton(states, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Z=Z)
    # autograd keeps the old states (a copy: they are overwritten below)
    before = Mamba3States(*(s.to(fp, copy=grad) for s in states))
    y, after = step_core(before, heads_of_groups(Q.to(fp), dims.nheads), heads_of_groups(K.to(fp), dims.nheads),
                         V.to(fp), ADT.to(fp), DT.to(fp), Trap.to(fp), Q_bias.to(fp), K_bias.to(fp), Angles.to(fp),
                         None if D is None else D.to(fp))
    for target, value in zip(states, after):
        target.copy_(value)
    if Z is not None:
        y = y * F.silu(Z.to(fp))
    return y.to(V.dtype)


@functools.lru_cache(maxsize=None)
def _step_kernel_imports() -> bool:
    """Whether the step's Triton kernel imports (asked once: "auto" decides on every decoding step)."""
    from mambakit.ops.backends import kernels

    return kernels("mambakit.ops.mamba3.triton_step") is not None
