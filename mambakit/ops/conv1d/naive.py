"""Causal depthwise conv1d in PyTorch (the reference and the CPU path), its one-step update, the state after x.

x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); conv_state: (batch, dim, width) holding the last `width`
inputs (the layout of the official `causal_conv1d` package).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError

ACTIVATIONS = (None, "silu", "swish")


def activate(y: Tensor, activation: Optional[str]) -> Tensor:
    """y after the activation (None, "silu" or its alias "swish")."""
    if activation not in ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return F.silu(y) if activation in ("silu", "swish") else y


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 x, else float32: half-precision convs accumulate in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_conv1d_torch(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
    conv_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
) -> Tensor:
    """`mambakit.ops.conv1d.causal_conv1d_fn` in PyTorch (any device); weight already checked. Computed in float32
    (float64 for float64 x), forward and gradients; seq_idx < 0 marks padding (output 0). y: (batch, dim, seqlen)
    in x's dtype."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    fp = compute_dtype(x)
    if conv_state is not None:
        if conv_state.shape != (batch, dim, width):
            raise MambaKitError(
                f"conv_state must have shape (batch={batch}, dim={dim}, width={width}), got {tuple(conv_state.shape)}")
        history = conv_state[..., 1:].to(fp)
    else:
        history = x.new_zeros(batch, dim, width - 1, dtype=fp)
    xx = torch.cat([history, x.to(fp)], dim=-1)  # (batch, dim, width - 1 + seqlen)
    if seq_idx is None:
        y = F.conv1d(xx, weight.unsqueeze(1).to(fp), None, groups=dim)
    else:
        check_seq_idx(seq_idx, batch, seqlen)
        windows = xx.unfold(-1, width, 1)  # (batch, dim, seqlen, width): tap k reads x_{t - width + 1 + k}
        padded_idx = F.pad(seq_idx, (width - 1, 0), value=-1)
        padded_idx[:, : width - 1] = seq_idx[:, :1]  # history belongs to the first sequence
        tap_idx = padded_idx.unfold(-1, width, 1)  # (batch, seqlen, width)
        same = (tap_idx == seq_idx[..., None]).to(fp)
        y = torch.einsum("bdlk,blk,dk->bdl", windows, same, weight.to(fp))
    if bias is not None:
        y = y + bias.to(fp)[:, None]
    y = activate(y, activation)
    return zero_padding(y, seq_idx).to(x.dtype)


def check_seq_idx(seq_idx: Tensor, batch: int, seqlen: int) -> None:
    if seq_idx.shape != (batch, seqlen) or seq_idx.is_floating_point():
        raise MambaKitError(f"seq_idx must be an integer tensor of shape (batch={batch}, seqlen={seqlen}), got "
                            f"{tuple(seq_idx.shape)} {seq_idx.dtype}")


def zero_padding(y: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """y (batch, dim, seqlen) with the positions where seq_idx < 0 (padding, as in the official causal_conv1d) set
    to 0."""
    return y if seq_idx is None else y.masked_fill(seq_idx[:, None, :] < 0, 0.0)


def conv_state_after(x: Tensor, width: int, conv_state: Optional[Tensor] = None,
                     mask: Optional[Tensor] = None) -> Tensor:
    """The conv state (batch, dim, width) after feeding x (batch, dim, seqlen), continuing from `conv_state`.

    mask: (batch, seqlen), 1 for real tokens; each row's state ends at its last real token (right padding is skipped).
    """
    batch, dim, seqlen = x.shape
    prev = conv_state.to(x.dtype) if conv_state is not None else x.new_zeros(batch, dim, width)
    if mask is None:  # only the last width inputs matter: no copy of the whole sequence
        return torch.cat([prev, x[..., -width:]], dim=-1)[..., -width:]
    xx = torch.cat([prev, x], dim=-1)  # (batch, dim, width + seqlen)
    positions = torch.arange(1, seqlen + 1, device=x.device)
    end = (mask.to(torch.long) * positions).amax(dim=-1) + width  # (batch,) one past the last real input in xx
    idx = end[:, None] - width + torch.arange(width, device=x.device)  # (batch, width)
    return torch.gather(xx, -1, idx[:, None, :].expand(batch, dim, width))


def conv1d_update_torch(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        activation: Optional[str] = None) -> Tensor:
    """`mambakit.ops.conv1d.causal_conv1d_update` in PyTorch: conv_state (batch, dim, width) shifted left and updated
    in place; returns y (batch, dim) in x's dtype."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = x.to(conv_state.dtype)
    y = (conv_state.to(x.dtype) * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return activate(y, activation)
