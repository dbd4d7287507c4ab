"""A decode step's projection with 16-bit weights on the CPU, accumulated and returned in float32.

torch's own CPU products with bfloat16 weights (`torch.mv`, `F.linear`) accumulate in float32 but round their
output to bfloat16, and need a bfloat16 input, so a bfloat16 decode step loses precision at every projection.
fbgemm's `quantized::linear_dynamic_fp16` (in the x86 builds of torch) reads a float32 input and a float16 weight
packed once, accumulates and writes in float32, and reads the weight at least as fast as `torch.mv` does in
bfloat16. A bfloat16 weight converts to float16 without loss where float16 has normal numbers (bfloat16's 8
mantissa bits fit in float16's 11); below 2**-14 float16 has subnormals (at most 2**-25 off), so a weight with a
row whose largest magnitude is below 2**-6 (or above float16's largest) is packed with each row scaled by a power
of two (exact) that brings its largest magnitude into [1, 2), and the product is scaled back. A weight with a
non-finite value is not packed and takes the plain product (which propagates it).

A small weight (at most SMALL elements, e.g. x_proj and dt_proj) is kept as a float32 copy instead: there the
fixed cost of fbgemm's call outweighs reading half the bytes, and MKL's float32 product gives the same values.

The packed copy (the weight's size again in float16, twice that for a small one in float32) is kept per weight and
per weight version (in-place updates and `load_state_dict` repack it) for as long as the weight lives.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FP16_MAX", "cpu_linear", "fp32_accumulation_available", "packs_fp16", "split_linear", "use_cpu_linear",
           "use_split_linear"]

#: float16's largest finite value: a weight beyond it is not packed
FP16_MAX = 65504.0

#: whether `use_cpu_linear` may choose the fbgemm product (read at each call; False keeps torch's bfloat16 products).
#: On by default: on an idle 2-core Xeon it decodes a 130M bfloat16 model 1.7-3.2x faster than torch's bfloat16
#: products, with logits 1.6x closer to float32's (benchmarks/RESULTS.md, fourteenth session); the cost is the packed
#: float16 copy of every large weight (the weights' size again), made at the first decode step of each weight
#: version. Set it to False for the plain products (no copy).
ENABLED = True

#: weights of at most this many elements are multiplied as a float32 copy (see the module docstring)
SMALL = 1 << 18

#: whether `use_split_linear` may choose the split float32 product (read at each call)
SPLIT_ENABLED = True

#: the largest batch that takes the split float32 product (a decode step's; prefill keeps F.linear)
SPLIT_MAX_BATCH = 16

_AVAILABLE: Optional[bool] = None
# id(weight) -> (weakref to the weight, (version, data pointer, shape), packed weight or None when out of range)
_PACKS: dict[int, tuple[Any, tuple, Any]] = {}


def fp32_accumulation_available() -> bool:
    """Whether this torch has fbgemm's float16-weight product and this CPU runs it (checked once)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 3), None)
            y = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 3), packed)
            _AVAILABLE = y.dtype == torch.float32 and bool((y == 3).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            _AVAILABLE = False
    return _AVAILABLE


def use_cpu_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether `cpu_linear` applies to input x (..., in_features) and weight (out_features, in_features) (or the
    decode step keeps float32 activations ahead of a 16-bit norm weight (d,)): both on the CPU, a bfloat16 or
    float16 weight, a float input, nothing recorded for autograd, fbgemm available."""
    return (ENABLED and weight.device.type == "cpu" and x.device.type == "cpu"
            and weight.dtype in (torch.bfloat16, torch.float16)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and fp32_accumulation_available())


def _forget(key: int) -> None:
    _PACKS.pop(key, None)


def _packed(weight: Tensor) -> Optional[tuple[Any, Optional[Tensor]]]:
    """(weight (out, in) packed as float16 for fbgemm, the per-row factor (out,) float32 that undoes its scaling or
    None when unscaled), (its float32 copy, None) for a small weight, or None when a value is not finite; cached per
    weight version."""
    version = (weight._version, weight.data_ptr(), tuple(weight.shape), weight.dtype)
    entry = _PACKS.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == version:
        return entry[2]
    with torch.no_grad():
        w = weight.detach().float()
        packed = None
        if w.numel() <= SMALL:
            packed = (w, None)  # a plain tensor: F.linear in float32
        elif bool(torch.isfinite(w).all()):
            row_max = w.abs().amax(dim=1)
            unscale = None
            if w.numel() and not bool(((row_max == 0) | ((row_max >= 2 ** -6) & (row_max <= FP16_MAX))).all()):
                exponent = torch.frexp(torch.where(row_max == 0, 1.0, row_max))[1] - 1  # row_max in [2^e, 2^(e+1))
                w = torch.ldexp(w, -exponent[:, None].float())
                unscale = torch.ldexp(torch.ones_like(row_max), exponent.float())
            packed = (torch.ops.quantized.linear_prepack_fp16(w, None), unscale)
    _PACKS[id(weight)] = (weakref.ref(weight, lambda _, k=id(weight): _forget(k)), version, packed)
    return packed


def packs_fp16(weight: Tensor) -> bool:
    """Whether `cpu_linear` runs weight (out, in) through the float16 pack (all values finite, not small) rather than
    a float32 copy or the plain product."""
    packed = _packed(weight)
    return packed is not None and not isinstance(packed[0], Tensor)


def cpu_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) in float32 for a decode step on the CPU: x (batch, in_features) in any float dtype,
    weight (out_features, in_features) bfloat16 or float16, bias (out_features,). Returns (batch, out_features)
    float32, accumulated in float32 from the float32 input (see the module docstring). A weight with a non-finite
    value takes F.linear in the weight's dtype, then float32."""
    packed = _packed(weight)
    if packed is None:
        y = F.linear(x.to(weight.dtype), weight).float()
    elif isinstance(packed[0], Tensor):
        y = F.linear(x.float(), packed[0])
    else:
        y = torch.ops.quantized.linear_dynamic_fp16(x.float().contiguous(), packed[0])
        if packed[1] is not None:
            y = y.mul_(packed[1])
    return y if bias is None else y.add_(bias)


def use_split_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether `split_linear` applies: x (batch <= SPLIT_MAX_BATCH, in_features) and a contiguous weight (out, in)
    with an even number of rows and more than SMALL elements, both float32 on the CPU, nothing recorded for
    autograd."""
    return (SPLIT_ENABLED and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 2
            and x.shape[0] <= SPLIT_MAX_BATCH and weight.dim() == 2 and weight.shape[0] % 2 == 0
            and weight.numel() > SMALL and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def split_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) in float32 for a decode step on the CPU, as one batched product over the two halves
    of weight's rows (a view, no copy): x (batch, in), weight (out, in) with out even, bias (out,). Returns (batch,
    out). For a batch of a few rows the BLAS's batched product reads the weight 1.8x (one thread) to 3.6x (two)
    faster than the matrix-vector path that F.linear takes (benchmarks/RESULTS.md, fourteenth session); the sums
    are the same, in another order (float32 rounding)."""
    out, k = weight.shape
    batch = x.shape[0]
    y = torch.bmm(weight.view(2, out // 2, k), x.t().unsqueeze(0).expand(2, k, batch))  # (2, out / 2, batch)
    y = y.view(out, batch).t()
    if batch > 1:
        y = y.contiguous()
    return y if bias is None else y + bias
