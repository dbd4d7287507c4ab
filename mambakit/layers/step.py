"""What the mixers' one-token steps share: the projections' matrix product (with the norm before it fused in where
it can be; on the CPU, 16-bit weights keep the activations float32 between the products: `mambakit.ops.cpu_linear`),
and A = -exp(A_log) kept per weight version instead of formed at every token."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from mambakit.layers.norm import RMSNormGated
from mambakit.ops.cpu_linear import cpu_linear, use_cpu_linear
from mambakit.ops.mixer_step import linear_step
from mambakit.ops.norm import add_rms_norm, rms_norm
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
        return (gemv_linear if gemv else linear_step)(x, linear.weight, linear.bias)
    return linear(x)


def norm_project_step(linear: nn.Module, x: Tensor, pre_norm: Optional[PreNorm]) -> tuple[Tensor, Optional[Tensor]]:
    """(linear(normed), residual') for one token x (batch, in_features): with pre_norm, (normed, residual') =
    add_rms_norm(x, pre_norm.residual, ...), fused with the product for a plain nn.Linear (`add_rms_norm_linear`; on
    the CPU with 16-bit weights `fp32_add_rms_norm` then `cpu_linear`, all float32); without it,
    (project_step(linear, x), None)."""
    if pre_norm is None:
        return project_step(linear, x), None
    if plain_linear(linear) and use_cpu_linear(x, linear.weight):
        normed, residual = fp32_add_rms_norm(x, pre_norm.residual, pre_norm.weight, pre_norm.eps)
        return cpu_linear(normed, linear.weight, linear.bias), residual
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
    return rms_norm(residual, weight, eps, backend="torch"), residual


def gated_norm_project_step(norm: nn.Module, linear: nn.Module, y: Tensor, z: Tensor) -> Tensor:
    """linear(norm(y, z)) for one token, y, z (batch, d): one fused call (`rms_norm_gated_linear`) when norm is a
    hook-free RMSNormGated and linear a plain nn.Linear."""
    if type(norm) is RMSNormGated and plain_linear(linear) and not (norm._forward_hooks or norm._forward_pre_hooks):
        return rms_norm_gated_linear(y, z, norm.weight, norm.eps, norm.group_size, norm.norm_before_gate,
                                     linear.weight, linear.bias)
    return project_step(linear, norm(y, z))


def negative_exp(layer: nn.Module, name: str, dtype: torch.dtype) -> Tensor:
    """-exp(layer.<name>) in `dtype`, recomputed only when the parameter changes (its version counter, storage,
    device or the dtype asked for), so that decoding does not form it at every token."""
    param = getattr(layer, name)
    key = (param._version, param.data_ptr(), param.device, dtype)
    cache = layer.__dict__.get("_negative_exp_cache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, -torch.exp(param.detach().to(dtype)))
        layer.__dict__["_negative_exp_cache"] = cache
    return cache[1]
