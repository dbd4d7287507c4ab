"""`causal_conv1d.causal_conv1d_interface` with the official argument order, on `mambakit.ops.conv1d`.

Layouts: x (batch, dim, seqlen); weight (dim, width); bias (dim,); seq_idx (batch, seqlen) integer, -1 marking
padding (output 0); initial_states / final states (batch, dim, width - 1); the decode-time conv_state
(batch_state, dim, state_len) with state_len >= width - 1, holding the last state_len inputs (a circular buffer when
cache_seqlens is given). Half-precision inputs are computed in float32 (float64 inputs in float64) and returned in
x's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.conv1d import ACTIVATIONS, causal_conv1d_fn as conv1d, causal_conv1d_update as conv1d_step
from mambakit.ops.conv1d import conv_state_after
from mambakit.ops.conv1d.naive import compute_dtype

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]


def _check(x: Tensor, weight: Tensor, activation: Optional[str]) -> None:
    if activation not in ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise MambaKitError(f"x must have shape (batch, dim, seqlen), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise MambaKitError(f"weight must have shape (dim={x.shape[1]}, width), got {tuple(weight.shape)}")


def causal_conv1d_fn(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None, return_final_states: bool = False,
    final_states_out: Optional[Tensor] = None, activation: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Causal depthwise conv1d, official signature: out (batch, dim, seqlen) in x's dtype, and with
    `return_final_states` also the last width - 1 inputs (batch, dim, width - 1) (written into `final_states_out`
    when given). seq_idx: taps never cross a change of index; positions with seq_idx < 0 are padding (output 0).
    Differentiable by autograd in every input (initial_states too)."""
    _check(x, weight, activation)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if seq_idx is not None and (initial_states is not None or return_final_states):
        raise MambaKitError("seq_idx cannot be combined with initial_states or return_final_states (as official), "
                            f"got initial_states={'a tensor' if initial_states is not None else None}, "
                            f"return_final_states={return_final_states}")
    if initial_states is not None and initial_states.shape != (batch, dim, width - 1):
        raise MambaKitError(f"initial_states must have shape (batch={batch}, dim={dim}, width - 1={width - 1}), "
                            f"got {tuple(initial_states.shape)}")
    conv_state = None if initial_states is None else F.pad(initial_states, (1, 0))  # (batch, dim, width)
    out = conv1d(x, weight, bias, activation, conv_state, seq_idx)  # float32 accumulation, seq_idx < 0 -> 0
    if not return_final_states:
        return out
    final = conv_state_after(x, width - 1, initial_states).to(x.dtype)  # (batch, dim, width - 1)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
    return_final_states: bool = False, final_states_out: Optional[Tensor] = None, activation: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The official reference's signature (no seq_idx): the same computation as `causal_conv1d_fn`."""
    return causal_conv1d_fn(x, weight, bias, None, initial_states, return_final_states, final_states_out,
                            activation)


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
    cache_seqlens: Optional[Tensor] = None, conv_state_indices: Optional[Tensor] = None,
) -> Tensor:
    """Decoding step(s) of the conv, official signature; conv_state updated in place.

    x: (batch, dim) or (batch, dim, seqlen) (several new tokens); conv_state: (batch_state, dim, state_len),
    state_len >= width - 1; cache_seqlens: (batch,) integer, conv_state is then a circular buffer written from
    position cache_seqlens % state_len; conv_state_indices: (batch,) integer, the row of conv_state each batch row
    uses (continuous batching), a negative index marking padding (its output 0, no state touched).
    Returns out like x, in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    if x3.dim() != 3:
        raise MambaKitError(f"x must have shape (batch, dim) or (batch, dim, seqlen), got {tuple(x.shape)}")
    batch, dim, seqlen = x3.shape
    width = weight.shape[-1]
    if weight.shape != (dim, width):
        raise MambaKitError(f"weight must have shape (dim={dim}, width), got {tuple(weight.shape)}")
    if conv_state.dim() != 3 or conv_state.shape[1] != dim or conv_state.shape[2] < width - 1:
        raise MambaKitError(f"conv_state must have shape (batch, dim={dim}, state_len >= width - 1 = {width - 1}), "
                            f"got {tuple(conv_state.shape)}")
    if conv_state_indices is None and conv_state.shape[0] != batch:
        raise MambaKitError(f"conv_state must have batch {batch} like x (or give conv_state_indices), "
                            f"got {conv_state.shape[0]}")
    for name, t in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if t is not None and (t.shape != (batch,) or t.is_floating_point()):
            raise MambaKitError(f"{name} must be an integer tensor of shape (batch={batch},), got "
                                f"{tuple(t.shape)} {t.dtype}")
    if (squeeze and cache_seqlens is None and conv_state_indices is None and conv_state.shape[2] == width
            and (x.is_cuda or x.dtype in (torch.float32, torch.float64))):
        return conv1d_step(x, conv_state, weight, bias, activation)  # mambakit's own step (a kernel on CUDA)
    out = _update_rows(x3, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    return out.squeeze(-1) if squeeze else out


def _update_rows(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                 cache_seqlens: Optional[Tensor], indices: Optional[Tensor]) -> Tensor:
    """The general update in PyTorch: gather the rows, convolve in float32, scatter the new rows back."""
    batch, dim, seqlen = x.shape
    width, state_len = weight.shape[1], conv_state.shape[2]
    fp = compute_dtype(x)
    rows = torch.arange(batch, device=x.device) if indices is None else indices.long()
    valid = rows >= 0
    state = conv_state.index_select(0, rows.clamp(min=0))  # (batch, dim, state_len), a copy
    xs = x.to(state.dtype)
    if cache_seqlens is None:
        x_new = torch.cat([state, xs], dim=-1)  # (batch, dim, state_len + seqlen)
        new_state = x_new[..., -state_len:]
    else:
        start = cache_seqlens.long()[:, None]
        window = torch.remainder(start + torch.arange(-(width - 1), 0, device=x.device), state_len)
        x_new = torch.cat([state.gather(2, window[:, None].expand(-1, dim, -1)), xs], dim=-1)
        dest = torch.remainder(start + torch.arange(seqlen, device=x.device), state_len)
        new_state = state.scatter(2, dest[:, None].expand(-1, dim, -1), xs)
    out = F.conv1d(x_new.to(fp), weight.to(fp).unsqueeze(1), None if bias is None else bias.to(fp),
                   groups=dim)[..., -seqlen:]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    with torch.no_grad():
        conv_state.index_copy_(0, rows[valid], new_state[valid].to(conv_state.dtype))
    return out.masked_fill(~valid[:, None, None], 0.0).to(x.dtype)


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                             activation: Optional[str] = None, cache_seqlens: Optional[Tensor] = None) -> Tensor:
    """The official reference's signature: the general PyTorch update (conv_state updated in place)."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    out = _update_rows(x3, conv_state, weight, bias, activation, cache_seqlens, None)
    return out.squeeze(-1) if squeeze else out
