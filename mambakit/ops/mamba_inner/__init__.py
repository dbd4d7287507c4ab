"""Mamba-1's inner path as one op: from the in_proj output xz to the out_proj output.

    x, z = xz split over channels                       xz: (batch, 2 * d_inner, seqlen)
    u = silu(causal_conv1d(x))                          (batch, d_inner, seqlen)
    dt_low, B, C = x_proj(u)                            (dt_rank, d_state, d_state) per token
    delta = dt_proj(dt_low)  (its bias and softplus applied inside the scan)
    y = selective_scan(u, delta, A, B, C, D, z)         (batch, d_inner, seqlen)
    out = out_proj(y)                                   (batch, seqlen, d_model)

Forms: `naive` (the composition of the public ops; the reference) and `fused` (one autograd function over the Triton
conv and scan kernels: channel-last buffers that the projections read in place, nothing of size (batch, seqlen,
d_inner) copied or transposed, the conv output and delta recomputed in the backward instead of saved).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.backends import check_backend, kernels
from mambakit.ops.mamba_inner.naive import mamba_inner_torch
from mambakit.ops.triton.device import interpreted

__all__ = ["fused_available", "mamba_inner", "mamba_inner_fused_inference", "mamba_inner_torch"]


def fused_available() -> bool:
    """Whether the fused Triton form imports (Triton installed)."""
    return kernels("mambakit.ops.mamba_inner.fused") is not None


def _check(xz: Tensor, conv1d_weight: Tensor, x_proj_weight: Tensor, delta_proj_weight: Tensor,
           out_proj_weight: Tensor, A: Tensor, a_name: str = "A") -> None:
    if not isinstance(xz, Tensor) or xz.dim() != 3 or xz.shape[1] % 2:
        raise MambaKitError("xz must be a tensor of shape (batch, 2 * d_inner, seqlen), got "
                            f"{tuple(xz.shape) if isinstance(xz, Tensor) else type(xz).__name__}")
    d_inner = xz.shape[1] // 2
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise MambaKitError(f"{a_name} must have shape (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    rank, n = delta_proj_weight.shape[1] if delta_proj_weight.dim() == 2 else -1, A.shape[1]
    expected = {"conv1d_weight": (d_inner, conv1d_weight.shape[-1]), "x_proj_weight": (rank + 2 * n, d_inner),
                "delta_proj_weight": (d_inner, rank), "out_proj_weight": (out_proj_weight.shape[0], d_inner)}
    got = {"conv1d_weight": tuple(conv1d_weight.shape[:1]) + tuple(conv1d_weight.shape[-1:]),
           "x_proj_weight": tuple(x_proj_weight.shape), "delta_proj_weight": tuple(delta_proj_weight.shape),
           "out_proj_weight": tuple(out_proj_weight.shape)}
    for name, shape in expected.items():
        if got[name] != shape:
            raise MambaKitError(f"{name} must have shape {shape}, got {got[name]}")


def mamba_inner_fused_inference(*args, **kwargs):
    """The fused forward continuing a recurrent state, for a prefill (no autograd): see
    `mambakit.ops.mamba_inner.fused.mamba_inner_fused_inference`. Returns (out, last SSM state)."""
    from mambakit.ops.mamba_inner.fused import mamba_inner_fused_inference as run

    return run(*args, **kwargs)


def mamba_inner(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
                delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor],
                A: Optional[Tensor], D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                delta_softplus: bool = True, seq_idx: Optional[Tensor] = None, backend: str = "auto", *,
                A_log: Optional[Tensor] = None) -> Tensor:
    """xz: (batch, 2 * d_inner, seqlen), any strides (the transposed view of an in_proj output (batch, seqlen,
    2 * d_inner) is read in place) -> (batch, seqlen, d_model).

    conv1d_weight: (d_inner, width) or (d_inner, 1, width); x_proj_weight: (dt_rank + 2 * d_state, d_inner);
    delta_proj_weight: (d_inner, dt_rank); out_proj_weight: (d_model, d_inner); A: (d_inner, d_state) (real,
    negative); D, delta_bias: (d_inner,); seq_idx: (batch, seqlen) packed-sequence index. A_log: (d_inner,
    d_state), given instead of A (A None): A = -exp(A_log), formed inside the op (the fused form: in the scan
    kernels, which also give A_log's gradient: no PyTorch kernels or autograd nodes for it).
    backend: "auto" (the fused Triton form for CUDA tensors when Triton is available, else the composition),
    "triton" (fused), "torch" (composition with the chunked scan) or "ref" (composition with the sequential scan).
    The projections' weights are used in xz's dtype (as autocast would), the conv's weight and bias in their own
    (as `causal_conv1d_fn` takes them: the conv computes in float32), A, D and delta_bias in float32 (float64
    stays).
    """
    if (A is None) == (A_log is None):
        raise MambaKitError("mamba_inner takes exactly one of A and A_log, got "
                            f"{'both' if A is not None else 'neither'}")
    _check(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A if A is not None else A_log,
           "A" if A is not None else "A_log")
    conv_w = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight
    backend = check_backend(backend)
    if backend == "auto":
        usable = (xz.is_cuda or interpreted()) and xz.dtype != torch.float64 and fused_available()
        backend = "triton" if usable else "torch"
    if backend in ("torch", "ref"):
        if A is None:
            A = -torch.exp(A_log if A_log.dtype == torch.float64 else A_log.float())
        return mamba_inner_torch(xz, conv_w, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                                 out_proj_bias, A, D, delta_bias, delta_softplus, seq_idx, scan_backend=backend)
    if not (xz.is_cuda or interpreted()):
        raise MambaKitError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); got tensors on "
                            f"{xz.device}")
    if xz.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise MambaKitError(f"xz must be float32, float16 or bfloat16 for the fused form, got {xz.dtype}")
    from mambakit.ops.mamba_inner.fused import mamba_inner_fused

    return mamba_inner_fused(xz, conv_w, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                             out_proj_bias, A if A is not None else A_log, D, delta_bias, delta_softplus, seq_idx,
                             a_is_log=A is None)
