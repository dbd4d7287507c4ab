"""The attention layers' own attention: the softmax matrices of an `MHA` mixer (the attention layers of the hybrid
models), in the same terms as the Mamba layers' hidden attention.

Per batch element and query head h (grouped-query: key/value head h // (num_heads / num_heads_kv))::

    P_h = softmax_j(scale * q_i . k_j, j <= i)          o_h = P_h v          (o: the input of out_proj)

with q and k rotated as the layer rotates them. P is exactly the layer's token mixing for that input (as alpha is
a Mamba layer's), so the rollout and the gradient-weighted maps of `mambakit.interpret.attribution` take it as they
take a Mamba layer's matrices: ``d logit / d P_h[i, j] = g_h[i] . v_h[j]`` with g = d logit / d o.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA, rotary

__all__ = ["attention_values", "softmax_attention"]


def _check(layer: MHA, hidden_states: Tensor) -> None:
    if not isinstance(layer, MHA):
        raise MambaKitError(f"softmax_attention needs an MHA layer, got {type(layer).__name__}")
    d_model = layer.out_proj.out_features
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != d_model:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
        raise MambaKitError(f"hidden_states must have shape (batch, seqlen, {d_model}), got {got}")


def _qkv(layer: MHA, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (batch, heads, L, head_dim) and k, v repeated to the query heads, q and k rotated."""
    batch, seqlen, _ = hidden_states.shape
    if layer.separate_qkv:
        q, k, v = layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)
    else:
        width = layer.head_dim * layer.num_heads_kv
        q, k, v = layer.in_proj(hidden_states).split([layer.head_dim * layer.num_heads, width, width], dim=-1)
    q, k, v = (t.view(batch, seqlen, -1, layer.head_dim).transpose(1, 2) for t in (q, k, v))
    positions = torch.arange(seqlen, device=hidden_states.device).expand(batch, seqlen)
    q = rotary(q, positions, layer.rotary_emb_dim, layer.rotary_emb_base)
    k = rotary(k, positions, layer.rotary_emb_dim, layer.rotary_emb_base)
    rep = layer.num_heads // layer.num_heads_kv
    return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


@torch.no_grad()
def softmax_attention(layer: MHA, hidden_states: Tensor) -> Tensor:
    """The causal softmax attention of `layer` on hidden_states (batch, L, d_model) (the layer's input, after the
    block's norm): (batch, num_heads, L, L), rows summing to 1, zero above the diagonal; in float64 for float64
    layers, float32 otherwise."""
    _check(layer, hidden_states)
    q, k, _ = _qkv(layer, hidden_states)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = layer.softmax_scale if layer.softmax_scale is not None else 1.0 / math.sqrt(layer.head_dim)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    L = scores.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=scores.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


@torch.no_grad()
def attention_values(layer: MHA, hidden_states: Tensor) -> Tensor:
    """The values the attention mixes, repeated to the query heads: (batch, num_heads, L, head_dim), so that
    ``softmax_attention(layer, h) @ attention_values(layer, h)`` is the input of out_proj per head."""
    _check(layer, hidden_states)
    return _qkv(layer, hidden_states)[2]
