"""`mamba_ssm.ops.triton.layer_norm`: `layer_norm_fn`, `rms_norm_fn` (with residual, prenorm, residual_in_fp32)
and the `RMSNorm` module, on `mambakit.ops.norm`.

x, residual: (..., d); weight, bias: (d,). The sum x + residual is formed in float32 (float64 for float64 inputs)
and normalised unrounded; the output is in x's dtype, the returned residual (prenorm) in residual's dtype, float32
with residual_in_fp32, else x's. Not supported: the parallel second input (x1, weight1, bias1) and
return_dropout_mask (MambaKitError).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.ops.norm import rms_norm

__all__ = ["RMSNorm", "layer_norm_fn", "layer_norm_ref", "rms_norm_fn", "rms_norm_ref"]


def layer_norm_fn(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None, x1: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None, bias1: Optional[Tensor] = None, eps: float = 1e-6, dropout_p: float = 0.0,
    rowscale: Optional[Tensor] = None, prenorm: bool = False, residual_in_fp32: bool = False,
    is_rms_norm: bool = False, return_dropout_mask: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """norm(dropout(x * rowscale) + residual) * weight + bias over the last dim (official signature).

    Returns out (..., d) in x's dtype, or (out, residual_out) with prenorm, residual_out = the pre-norm sum."""
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1)):
        if value is not None:
            raise MambaKitError(f"{name} (the parallel second norm) is not supported by mambakit.compat, got a tensor")
    if return_dropout_mask:
        raise MambaKitError("return_dropout_mask is not supported by mambakit.compat, got True")
    if residual is not None and residual.shape != x.shape:
        raise MambaKitError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != x.shape[-1:]:
        raise MambaKitError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    fp = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    h = x.to(fp)
    if rowscale is not None:
        h = h * rowscale.to(fp)[..., None]
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p)
    if residual is not None:
        h = h + residual.to(fp)
    if is_rms_norm:
        out = rms_norm(h, weight.to(fp), eps)
        out = out if bias is None else out + bias.to(fp)
    else:
        out = F.layer_norm(h, h.shape[-1:], weight.to(fp), None if bias is None else bias.to(fp), eps)
    out = out.to(x.dtype)
    if not prenorm:
        return out
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    return out, h.to(res_dtype)


def rms_norm_fn(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None, x1: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None, bias1: Optional[Tensor] = None, eps: float = 1e-6, dropout_p: float = 0.0,
    rowscale: Optional[Tensor] = None, prenorm: bool = False, residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """`layer_norm_fn` with is_rms_norm=True (official signature)."""
    return layer_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                         residual_in_fp32, True, return_dropout_mask)


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None,
                   eps: float = 1e-6, prenorm: bool = False, upcast: bool = False):
    """The official reference's common arguments: the same computation as `layer_norm_fn` (always upcast)."""
    return layer_norm_fn(x, weight, bias, residual, eps=eps, prenorm=prenorm)


def rms_norm_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None,
                 eps: float = 1e-6, prenorm: bool = False, upcast: bool = False):
    """The official reference's common arguments: the same computation as `rms_norm_fn` (always upcast)."""
    return rms_norm_fn(x, weight, bias, residual, eps=eps, prenorm=prenorm)


class RMSNorm(nn.Module):
    """The official fused-add RMSNorm module: forward(x, residual=None, prenorm=False, residual_in_fp32=False)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dropout_p: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        """x, residual: (..., hidden_size); see `rms_norm_fn`."""
        p = self.drop.p if self.drop is not None and self.training else 0.0
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, dropout_p=p, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)
