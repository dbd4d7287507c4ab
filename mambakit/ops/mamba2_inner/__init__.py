"""Mamba-2's inner path as one op: from the in_proj output zxbcdt to the out_proj output.

    z, xBC, dt = zxbcdt split over channels             zxbcdt: (batch, seqlen, d_inner + conv_dim + nheads)
    x, B, C = silu(causal_conv1d(xBC)) split             x: (.., nheads, headdim); B, C: (.., ngroups, d_state)
    y = ssd(x, softplus(dt + dt_bias) clamped, A, B, C) + D * x
    out = out_proj(rms_norm_gated(y, z))                 (batch, seqlen, d_model)

This is the official `mamba_split_conv1d_scan_combined` with the norm and the out projection, for training (no
initial or final states, no d_mlp part). Forms: `naive` (the composition of the public ops; the reference) and
`fused` (one autograd function over the Triton conv, SSD and norm kernels: the SSD reads the conv output in place,
the gradient of zxbcdt is written into one buffer instead of concatenated, the conv output, the SSD's chunk states
and the normed y are recomputed in the backward instead of saved: it keeps zxbcdt, y and the norm's rstd, as the
official does).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.backends import check_backend, kernels
from mambakit.ops.dt import DEFAULT_DT_LIMIT
from mambakit.ops.mamba2_inner.naive import mamba2_inner_torch
from mambakit.ops.triton.device import interpreted

__all__ = ["fused_available", "mamba2_inner", "mamba2_inner_torch"]


def fused_available() -> bool:
    """Whether the fused Triton form imports (Triton installed)."""
    return kernels("mambakit.ops.mamba2_inner.fused") is not None


def _check(zxbcdt: Tensor, conv_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Optional[Tensor],
           norm_weight: Tensor, out_weight: Tensor, headdim: int, ngroups: int, seq_idx: Optional[Tensor],
           a_name: str = "A") -> None:
    if not isinstance(zxbcdt, Tensor) or zxbcdt.dim() != 3:
        raise MambaKitError("zxbcdt must be a tensor of shape (batch, seqlen, d_in_proj), got "
                            f"{tuple(zxbcdt.shape) if isinstance(zxbcdt, Tensor) else type(zxbcdt).__name__}")
    if A.dim() != 1:
        raise MambaKitError(f"{a_name} must have shape (nheads,), got {tuple(A.shape)}")
    nheads = A.shape[0]
    d_inner = nheads * headdim
    conv_dim = conv_weight.shape[0]
    if zxbcdt.shape[-1] != d_inner + conv_dim + nheads:
        raise MambaKitError(f"zxbcdt's last dim must be d_inner + conv_dim + nheads = {d_inner} + {conv_dim} + "
                            f"{nheads} (headdim={headdim}), got {zxbcdt.shape[-1]}")
    if ngroups <= 0 or nheads % ngroups or (conv_dim - d_inner) <= 0 or (conv_dim - d_inner) % (2 * ngroups):
        raise MambaKitError(f"conv_dim - d_inner must be 2 * ngroups * d_state with ngroups dividing nheads={nheads}, "
                            f"got conv_dim={conv_dim}, d_inner={d_inner}, ngroups={ngroups}")
    expected = {"dt_bias": (nheads,), "norm_weight": (d_inner,), "out_weight": (out_weight.shape[0], d_inner)}
    got = {"dt_bias": tuple(dt_bias.shape), "norm_weight": tuple(norm_weight.shape),
           "out_weight": tuple(out_weight.shape)}
    if D is not None:
        expected["D"], got["D"] = ((nheads,) if D.dim() == 1 else (nheads, headdim)), tuple(D.shape)
    for name, shape in expected.items():
        if got[name] != shape:
            raise MambaKitError(f"{name} must have shape {shape}, got {got[name]}")
    if seq_idx is not None and tuple(seq_idx.shape) != tuple(zxbcdt.shape[:2]):
        raise MambaKitError(f"seq_idx must have shape {tuple(zxbcdt.shape[:2])}, got {tuple(seq_idx.shape)}")


def mamba2_inner(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], dt_bias: Tensor,
                 A: Optional[Tensor], D: Optional[Tensor], norm_weight: Tensor, out_weight: Tensor,
                 out_bias: Optional[Tensor] = None, *, headdim: int, ngroups: int = 1, chunk_size: int = 256,
                 eps: float = 1e-5, norm_before_gate: bool = False, dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
                 seq_idx: Optional[Tensor] = None, A_log: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """zxbcdt: (batch, seqlen, d_inner + conv_dim + nheads) -> (batch, seqlen, d_model).

    conv_weight: (conv_dim, width) or (conv_dim, 1, width), conv_dim = d_inner + 2 * ngroups * d_state; conv_bias:
    (conv_dim,); dt_bias, A: (nheads,) (A negative); D: (nheads,) or (nheads, headdim); norm_weight: (d_inner,),
    the gated RMSNorm per group of d_inner / ngroups channels (norm_before_gate as in `rms_norm_gated`);
    out_weight: (d_model, d_inner); seq_idx: (batch, seqlen) packed-sequence index (< 0: padding, whose conv
    output is 0, as `causal_conv1d_fn` defines it).
    A_log: (nheads,), given instead of A (A None): A = -exp(A_log), formed inside the op (the fused form: in the
    SSD kernels, which also give A_log's gradient: no PyTorch kernels or autograd nodes for it).
    backend: "auto" (the fused Triton form for CUDA tensors when Triton is available, else the composition),
    "triton" (fused), "torch" (composition with the chunked SSD) or "ref" (composition with the recurrence).
    The out weight is used in zxbcdt's dtype (as autocast would), the conv's weight and bias in their own (as
    `causal_conv1d_fn` takes them: the conv computes in float32); A, D, dt_bias in float32.
    """
    if (A is None) == (A_log is None):
        raise MambaKitError("mamba2_inner takes exactly one of A and A_log, got "
                            f"{'both' if A is not None else 'neither'}")
    _check(zxbcdt, conv_weight, dt_bias, A if A is not None else A_log, D, norm_weight, out_weight, headdim, ngroups,
           seq_idx, "A" if A is not None else "A_log")
    conv_w = conv_weight.squeeze(1) if conv_weight.dim() == 3 else conv_weight
    backend = check_backend(backend)
    if backend == "auto":
        usable = (zxbcdt.is_cuda or interpreted()) and zxbcdt.dtype != torch.float64 and fused_available()
        backend = "triton" if usable else "torch"
    if backend in ("torch", "ref"):
        if A is None:
            A = -torch.exp(A_log if A_log.dtype == torch.float64 else A_log.float())
        return mamba2_inner_torch(zxbcdt, conv_w, conv_bias, dt_bias, A, D, norm_weight, out_weight, out_bias,
                                  headdim=headdim, ngroups=ngroups, chunk_size=chunk_size, eps=eps,
                                  norm_before_gate=norm_before_gate, dt_limit=dt_limit, seq_idx=seq_idx,
                                  ssd_backend=backend)
    if not (zxbcdt.is_cuda or interpreted()):
        raise MambaKitError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); got tensors on "
                            f"{zxbcdt.device}")
    if zxbcdt.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise MambaKitError(f"zxbcdt must be float32, float16 or bfloat16 for the fused form, got {zxbcdt.dtype}")
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    from mambakit.ops.mamba2_inner.fused import mamba2_inner_fused

    limit = None if tuple(dt_limit) == tuple(DEFAULT_DT_LIMIT) else tuple(dt_limit)
    return mamba2_inner_fused(zxbcdt, conv_w, conv_bias, dt_bias, A if A is not None else A_log, D, norm_weight,
                              out_weight, out_bias, ngroups=ngroups, chunk_size=chunk_size, eps=eps,
                              norm_before_gate=norm_before_gate, dt_limit=limit, seq_idx=seq_idx,
                              a_is_log=A is None)
