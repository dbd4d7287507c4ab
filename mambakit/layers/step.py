"""What the mixers' one-token steps share: the projections' matrix product, and A = -exp(A_log) kept per weight
version instead of formed at every token."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mambakit.ops.mixer_step import linear_step


def project_step(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x) for one token x (batch, in_features): a plain nn.Linear goes through `linear_step` (the CPU's faster
    bfloat16 batch-1 product); anything else (LoRA wrappers, modules with hooks) is called as it is."""
    if type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks):
        return linear_step(x, linear.weight, linear.bias)
    return linear(x)


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
