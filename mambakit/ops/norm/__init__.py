"""RMSNorm and the gated RMSNorm of Mamba-2: the public dispatchers.

CUDA inputs (float32 / float16 / bfloat16, weight on the same device) go to the fused Triton kernels (`triton`) when
Triton imports; everything else (CPU, float64) to the PyTorch code (`naive`), which is also the reference.
backend: "auto" (that choice), "torch" or "triton" ("ref" is the same as "torch").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.ops.backends import BACKENDS, check_backend, kernels
from mambakit.ops.checks import require_tensors
from mambakit.ops.norm.naive import gated_norm_input, group_rms_scale, norm_dtype, rms_norm_gated_torch, rms_norm_torch

__all__ = ["BACKENDS", "add_rms_norm", "gated_norm_input", "group_rms_scale", "norm_dtype", "rms_norm",
           "rms_norm_gated",
           "use_triton"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    """The Triton norm module when Triton is importable, else None."""
    return kernels("mambakit.ops.norm.triton")


def use_triton(x: Tensor, weight: Tensor, z: Optional[Tensor] = None) -> bool:
    """Whether backend="auto" sends x, z (..., d) and weight (d,) to the Triton kernels: all on one CUDA device, x
    and z not float64, Triton importable."""
    return (x.is_cuda and x.dtype in _TRITON_DTYPES and weight.device == x.device
            and (z is None or (z.dtype in _TRITON_DTYPES and z.device == x.device)) and _kernels() is not None)


def _backend(backend: str, x: Tensor, weight: Tensor, z: Optional[Tensor]) -> str:
    require_tensors(x=x, weight=weight, z=z)
    if check_backend(backend) == "auto":
        return "triton" if use_triton(x, weight, z) else "torch"
    return backend


def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: str = "auto") -> Tensor:
    """x: (..., d) normalised in float32 (float64 for float64 x) by its root mean square over d, scaled by weight (d,);
    returns x's dtype."""
    if _backend(backend, x, weight, None) == "triton":
        return _kernels().rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_gated(y: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: Optional[int] = None,
                   norm_before_gate: bool = False, backend: str = "auto") -> Tensor:
    """norm(y * silu(z)) * weight (norm_before_gate=False) or norm(y) * weight * silu(z), normalised per group of
    group_size channels (None: all d). y, z: (..., d), z optional; weight: (d,). Returns (..., d) in y's dtype."""
    group_size = group_size or y.shape[-1]
    if _backend(backend, y, weight, z) == "triton":
        return _kernels().rms_norm_gated_triton(y, z, weight, eps, group_size, norm_before_gate)
    return rms_norm_gated_torch(y, z, weight, eps, group_size, norm_before_gate)


def add_rms_norm(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, residual_in_fp32: bool,
                 backend: str = "auto", out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The pre-norm block's residual add and RMSNorm.

    hidden, residual: (..., d) (residual None for the first block). Returns (normed, residual'), residual' =
    residual + hidden (hidden if residual is None), normed = rms_norm(residual'.to(weight.dtype)) in out_dtype
    (default: weight's dtype; e.g. the autocast dtype, which saves the cast before the next projection), residual'
    in float32 when residual_in_fp32. backend "auto": one fused Triton kernel for CUDA tensors (and one for the
    backward under autograd), else the PyTorch composition.
    """
    require_tensors(hidden=hidden, residual=residual, weight=weight)
    backend = check_backend(backend)
    if backend == "auto":
        backend = "triton" if use_triton(hidden, weight) else "torch"
    if backend == "triton":
        from mambakit.ops.norm.add_triton import add_rms_norm_triton

        return add_rms_norm_triton(hidden, residual, weight, eps, residual_in_fp32, out_dtype)
    residual = hidden if residual is None else residual + hidden
    normed = rms_norm(residual.to(weight.dtype), weight, eps, backend="torch")
    if out_dtype is not None:
        normed = normed.to(out_dtype)
    return normed, residual.float() if residual_in_fp32 else residual
