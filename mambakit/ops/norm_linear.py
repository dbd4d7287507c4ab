"""A decode step's projection with the norm before it, in one kernel at small batches: the public dispatchers.

    add_rms_norm_linear:   (F.linear(normed, W, b), residual') with (normed, residual') = add_rms_norm(...)
    rms_norm_gated_linear: F.linear(rms_norm_gated(y, z, ...), W, b)
    gemv_linear:           F.linear(x, W, b)

backend "auto": the Triton GEMV kernels (`mambakit.ops.triton.gemv`) for CUDA tensors outside autograd with at most
GEMV_MAX_BATCH rows, the weights in the dtype of what the unfused norm hands to F.linear (gemv_linear also needs
PLAIN_GEMV); otherwise today's two steps (the norm's own dispatcher, then `linear_step`), so CPU decoding and large
batches are unchanged. "torch" / "ref": the PyTorch composition (float64 capable: the reference); "triton": the
kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.ops.backends import check_backend, kernels
from mambakit.ops.mixer_step import linear_step
from mambakit.ops.norm import add_rms_norm, rms_norm_gated

__all__ = ["GEMV_MAX_BATCH", "PLAIN_GEMV", "add_rms_norm_linear", "gemv_linear", "rms_norm_gated_linear",
           "use_gemv"]

#: the most rows (batch x tokens) that backend="auto" sends to the GEMV kernels; more go to cuBLAS (read at each
#: call: a CUDA graph captured before a change keeps the kernels it captured). 1: the kernels win at batch 1 and lose
#: from batch 2 on against the norm kernel + cuBLAS on the H200 (benchmarks/RESULTS.md, bench_gemv / bench_decode).
GEMV_MAX_BATCH = 1

#: whether backend="auto" sends a plain projection (gemv_linear, e.g. out_proj) to the kernel too, not only the
#: norm-fused ones; on since the whole decode step was timed with it and its greedy tokens checked against the
#: official package (benchmarks/RESULTS.md, tenth session)
PLAIN_GEMV = True

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    return kernels("mambakit.ops.triton.gemv")


def use_gemv(x: Tensor, weight: Tensor, *others: Optional[Tensor],
             product_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether backend="auto" takes the kernel for input x (..., in_features) and weight (out_features,
    in_features): CUDA, at most GEMV_MAX_BATCH rows, what the product reads (product_dtype, default x's dtype) in
    weight's dtype (float32/16, bfloat16), every other tensor on x's device, no autograd, Triton importable."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, *others))
    return (x.is_cuda and (product_dtype or x.dtype) == weight.dtype and weight.dtype in _DTYPES
            and weight.dim() == 2 and x.numel() // max(x.shape[-1], 1) <= GEMV_MAX_BATCH and not grad
            and all(t is None or (t.device == x.device and t.dtype in _DTYPES) for t in (x, weight, *others))
            and _kernels() is not None)


def _pick(backend: str, ok: bool) -> str:
    """"triton" or the fallback: "auto" (the unfused ops' own dispatch, today's decode path) or "torch"."""
    backend = check_backend(backend)
    if backend == "triton" or (backend == "auto" and ok):
        return "triton"
    return "torch" if backend in ("torch", "ref") else "auto"


def gemv_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """F.linear(x, weight, bias) for a decode step: x (..., in_features), weight (out_features, in_features), bias
    (out_features,). Returns (..., out_features). "auto" takes the kernel only when PLAIN_GEMV is set."""
    if _pick(backend, PLAIN_GEMV and use_gemv(x, weight, bias)) == "triton":
        return _kernels().gemv_triton(x, weight, bias)
    return linear_step(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def add_rms_norm_linear(hidden: Tensor, residual: Optional[Tensor], norm_weight: Tensor, eps: float,
                        residual_in_fp32: bool, weight: Tensor, bias: Optional[Tensor] = None,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The pre-norm block's residual add and RMSNorm, then the mixer's in_proj, for inference.

    hidden, residual: (..., d) (residual None for the first block); norm_weight: (d,); weight: (out_features, d);
    bias: (out_features,). Returns (out, residual'): out (..., out_features) = F.linear(normed, weight, bias) and
    residual' (..., d), where (normed, residual') = `add_rms_norm(hidden, residual, norm_weight, eps,
    residual_in_fp32)`.
    """
    # the product reads the norm's output, in the norm weight's dtype
    picked = _pick(backend, use_gemv(hidden, weight, residual, norm_weight, bias, product_dtype=norm_weight.dtype))
    if picked == "triton":
        return _kernels().add_rms_norm_gemv_triton(hidden, residual, norm_weight, eps, residual_in_fp32, weight, bias)
    normed, residual = add_rms_norm(hidden, residual, norm_weight, eps, residual_in_fp32, backend=picked)
    return gemv_linear(normed, weight, bias, backend=picked), residual


def rms_norm_gated_linear(y: Tensor, z: Optional[Tensor], norm_weight: Tensor, eps: float,
                          group_size: Optional[int], norm_before_gate: bool, weight: Tensor,
                          bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Mamba-2's tail for inference: F.linear(rms_norm_gated(y, z, norm_weight, eps, group_size, norm_before_gate),
    weight, bias). y, z: (..., d) (z optional; a strided view is fine); norm_weight: (d,); weight: (out_features,
    d). Returns (..., out_features)."""
    group_size = group_size or y.shape[-1]
    picked = _pick(backend, use_gemv(y, weight, z, norm_weight, bias))
    if picked == "triton":
        return _kernels().rms_norm_gated_gemv_triton(y, z, norm_weight, eps, group_size, norm_before_gate, weight,
                                                     bias)
    normed = rms_norm_gated(y, z, norm_weight, eps, group_size, norm_before_gate, backend=picked)
    return gemv_linear(normed, weight, bias, backend=picked)
