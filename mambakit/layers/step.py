"""What the mixers' one-token steps share: the projections' matrix product (with the norm before it fused in where
it can be; on the CPU, 16-bit weights keep the activations float32 between the products: `mambakit.ops.cpu_linear`)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.layers.norm import RMSNormGated
from mambakit.ops.cpu_linear import cpu_linear, use_cpu_linear
from mambakit.ops.derived import float_copy
from mambakit.ops.mixer_step import linear_step
from mambakit.ops.norm import add_rms_norm
from mambakit.ops.norm.naive import rms_norm_gated_torch, rms_norm_torch
from mambakit.ops.norm_linear import add_rms_norm_linear, gemv_linear, rms_norm_gated_linear


class PreNorm(NamedTuple):
    """The pre-norm block's residual add + RMSNorm, handed to a mixer's step so that it can fuse them into its
    in_proj: residual (batch, d_model) or None (first block), the RMSNorm's weight (d_model,) and eps, and whether
    the residual is kept in float32."""

    residual: Optional[Tensor]
    weight: Tensor
    eps: float
    residual_in_fp32: bool


def plain_linear(linear: nn.Module) -> bool:
    """A bare nn.Linear without hooks (not a LoRA wrapper, a subclass or a tensor-parallel shard)."""
    return type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks)


def project_step(linear: nn.Module, x: Tensor, gemv: bool = False) -> Tensor:
    """linear(x) for one token x (batch, in_features): a plain nn.Linear goes through `linear_step` (on the CPU, 16-bit
    weights accumulate and return float32), or `gemv_linear` with gemv (the switchable GEMV kernel on CUDA); anything
    else (LoRA wrappers, modules with hooks) is called as it is."""
    if plain_linear(linear):
        return (gemv_linear if gemv and x.is_cuda else linear_step)(x, linear.weight, linear.bias)
    return linear(x)


_F_RMS_NORM = getattr(F, "rms_norm", None)


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`rms_norm_torch` (x (batch, d) and weight (d,) of one float dtype) as one call where torch has F.rms_norm (the
    same formula, in x's dtype)."""
    if _F_RMS_NORM is not None:
        return _F_RMS_NORM(x, (x.shape[-1],), weight, eps)
    return rms_norm_torch(x, weight, eps)



def norm_project_step(linear: nn.Module, x: Tensor, pre_norm: Optional[PreNorm]) -> tuple[Tensor, Optional[Tensor]]:
    """(linear(normed), residual') for one token x (batch, in_features): with pre_norm, (normed, residual') =
    add_rms_norm(x, pre_norm.residual, ...), fused with the product for a plain nn.Linear (`add_rms_norm_linear`; on
    the CPU with 16-bit weights `fp32_add_rms_norm` then `cpu_linear`, all float32; on the CPU with float32 weights and
    activations the same composition in fewer calls); without it, (project_step(linear, x), None)."""
    if pre_norm is None:
        return project_step(linear, x), None
    if plain_linear(linear) and not x.is_cuda:
        weight, residual = linear.weight, pre_norm.residual
        if use_cpu_linear(x, weight):
            normed, residual = fp32_add_rms_norm(x, residual, pre_norm.weight, pre_norm.eps)
            return cpu_linear(normed, weight, linear.bias), residual
        f32 = torch.float32
        if x.dtype == f32 and weight.dtype == f32 and pre_norm.weight.dtype == f32 \
                and (residual is None or residual.dtype == f32) and not torch.is_grad_enabled():
            residual = x if residual is None else residual + x
            return linear_step(_rms(residual, pre_norm.weight, pre_norm.eps), weight, linear.bias), residual
    if plain_linear(linear):
        return add_rms_norm_linear(x, pre_norm.residual, pre_norm.weight, pre_norm.eps, pre_norm.residual_in_fp32,
                                   linear.weight, linear.bias)
    normed, residual = add_rms_norm(x, pre_norm.residual, pre_norm.weight, pre_norm.eps, pre_norm.residual_in_fp32)
    return linear(normed), residual


def fp32_add_rms_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The CPU's 16-bit-weight decode step (`use_cpu_linear`): (normed, residual') with residual' = residual + x
    (x if residual is None) and normed its RMSNorm, both float32; unlike `add_rms_norm`, the sum is not rounded to
    the weight's dtype before the norm. x, residual: (batch, d); weight: (d,)."""
    residual = x.float() if residual is None else residual.float() + x
    return _rms(residual, float_copy(weight, torch.float32), eps), residual


def gated_norm_project_step(norm: nn.Module, linear: nn.Module, y: Tensor, z: Tensor) -> Tensor:
    """linear(norm(y, z)) for one token, y, z (batch, d): one fused call (`rms_norm_gated_linear`) when norm is a
    hook-free RMSNormGated and linear a plain nn.Linear (on the CPU with float32 / float64 y and z,
    `lean_rms_norm_gated` then `linear_step`)."""
    if type(norm) is RMSNormGated and plain_linear(linear) and not (norm._forward_hooks or norm._forward_pre_hooks):
        if not y.is_cuda and y.dtype in (torch.float32, torch.float64) and z.dtype == y.dtype \
                and not torch.is_grad_enabled():
            normed = lean_rms_norm_gated(y, z, norm.weight, norm.eps, norm.group_size or y.shape[-1],
                                         norm.norm_before_gate)
            return linear_step(normed, linear.weight, linear.bias)
        return rms_norm_gated_linear(y, z, norm.weight, norm.eps, norm.group_size, norm.norm_before_gate,
                                     linear.weight, linear.bias)
    return project_step(linear, norm(y, z))


def lean_rms_norm_gated(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int,
                        norm_before_gate: bool) -> Tensor:
    """`rms_norm_gated_torch` for y, z (..., d) of one float dtype (float32 / float64) in fewer calls: the weight (d,)
    in that dtype kept per weight version, each group's norm one F.rms_norm where torch has it. Returns (..., d) in
    y's dtype."""
    if _F_RMS_NORM is None:
        return rms_norm_gated_torch(y, z, weight, eps, group_size, norm_before_gate)
    gated = y if norm_before_gate else y * F.silu(z)
    out = _F_RMS_NORM(gated.unflatten(-1, (-1, group_size)), (group_size,), None, eps).flatten(-2)
    out = out.mul_(float_copy(weight, y.dtype))
    return out.mul_(F.silu(z)) if norm_before_gate else out
