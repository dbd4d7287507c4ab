"""Causal depthwise conv1d and its one-step update (rolling conv state) for decoding: the public dispatchers.

x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); conv_state: (batch, dim, width) holding the last `width`
inputs (the layout of the official `causal_conv1d` package). CUDA tensors go to the Triton kernels (`triton`) when
Triton imports; everything else to the PyTorch code (`naive`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.backends import kernels
from mambakit.ops.checks import require_tensors
from mambakit.ops.conv1d.naive import (
    ACTIVATIONS, causal_conv1d_torch, check_seq_idx, conv1d_update_torch, conv_state_after, zero_padding,
)

__all__ = ["ACTIVATIONS", "causal_conv1d_fn", "causal_conv1d_update", "conv_state_after"]


def _triton_conv():
    """The Triton conv kernel when Triton is importable (used for CUDA tensors), else None."""
    module = kernels("mambakit.ops.conv1d.triton")
    return None if module is None else module.causal_conv1d_triton


def causal_conv1d_fn(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
    conv_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
) -> Tensor:
    """y_t = act(bias + sum_k weight[:, k] * x_{t - width + 1 + k}), causal (inputs before t = 0 are zero, or the
    last inputs held in `conv_state` when continuing a sequence).

    seq_idx: (batch, seqlen) integer; taps that reach into another packed sequence are dropped, and positions with
    seq_idx < 0 are padding (output 0), as in the official `causal_conv1d`.
    conv_state, if given, is read (not modified); use `conv_state_after` to get the state after x.
    Half-precision inputs accumulate in float32 on every path (forward and gradients).
    Returns y: (batch, dim, seqlen) in x's dtype.
    """
    require_tensors(x=x, weight=weight, bias=bias, conv_state=conv_state, seq_idx=seq_idx)
    if x.dim() != 3:
        raise MambaKitError(f"x must have shape (batch, dim, seqlen), got {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise MambaKitError(f"weight must have shape (dim={dim}, width), got {tuple(weight.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, batch, seqlen)
    if x.is_cuda and _triton_conv() is not None and x.dtype != torch.float64:
        if conv_state is None:
            y = _triton_conv()(x, weight, bias, activation, seq_idx=seq_idx)
        else:
            from mambakit.ops.conv1d.triton import causal_conv1d_triton_from_state  # a prefill continuing a state

            y = causal_conv1d_triton_from_state(x, weight, bias, activation, conv_state, seq_idx)
        return zero_padding(y, seq_idx)  # the kernel drops cross-sequence taps but does not zero the padding
    return causal_conv1d_torch(x, weight, bias, activation, conv_state, seq_idx)


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
) -> Tensor:
    """One decoding step. x: (batch, dim); conv_state: (batch, dim, width), shifted left and updated in place.

    Returns y: (batch, dim) in x's dtype.
    """
    require_tensors(x=x, conv_state=conv_state, weight=weight, bias=bias)
    if conv_state.dim() != 3 or conv_state.shape[:2] != x.shape or conv_state.shape[2] != weight.shape[1]:
        raise MambaKitError(
            f"conv_state must have shape (batch, dim, width) = {(*x.shape, weight.shape[1])}, "
            f"got {tuple(conv_state.shape)}")
    if conv_state.is_cuda and not (x.requires_grad and torch.is_grad_enabled()) and _triton_conv() is not None:
        from mambakit.ops.triton.decode import conv1d_update_triton  # one kernel instead of seven

        return conv1d_update_triton(x, conv_state, weight, bias, activation)
    return conv1d_update_torch(x, conv_state, weight, bias, activation)
