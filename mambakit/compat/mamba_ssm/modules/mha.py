"""`mamba_ssm.modules.mha.MHA`: mambakit's attention layer (`mambakit.layers.attention.MHA`: in_proj packing q,
k, v, out_proj, rotary on the leading rotary_emb_dim features) with the official signatures, variants and cache.

Variants (official): causal=False (the official default: every query sees every key); rotary_emb_interleaved (pairs
(2i, 2i + 1) instead of (i, i + rotary_emb_dim / 2)); mlp_dim > 0 (rounded up to a multiple of 256): in_proj also
gives [up, gate] of mlp_dim, and out_proj reads cat([attention, up * silu(gate)]); d_conv > 0: a depthwise causal
conv (no activation) over the packed q, k, v before the heads. The cache in
inference_params.key_value_memory_dict[layer_idx] is the official (kv_cache (batch, max_seqlen, 2, num_heads_kv,
head_dim), conv_state (batch, qkv_dim, d_conv) or None); the conv state holds the last d_conv conv INPUTS (the
official stores conv outputs after a prefill, so its decode then differs from its own full forward); the decode step
attends to every cached key (the official PyTorch fallback without flash_attn aligns its causal mask top-left and
sees only the first).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA as MambaKitMHA
from mambakit.layers.attention import KVState
from mambakit.ops.conv1d import causal_conv1d_fn, conv_state_after

__all__ = ["MHA"]


class MHA(MambaKitMHA):
    """Input and output: (batch, seqlen, embed_dim)."""

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: Optional[int] = None,
                 head_dim: Optional[int] = None, mlp_dim: int = 0, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: Optional[float] = None, causal: bool = False,
                 layer_idx: Optional[int] = None, d_conv: int = 0, rotary_emb_dim: int = 0,
                 rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False, device=None, dtype=None):
        for name, value in (("mlp_dim", mlp_dim), ("d_conv", d_conv)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MambaKitError(f"MHA {name} must be an integer >= 0, got {value!r}")
        super().__init__(embed_dim, num_heads=num_heads, num_heads_kv=num_heads_kv, head_dim=head_dim,
                         rotary_emb_dim=rotary_emb_dim, rotary_emb_base=rotary_emb_base, qkv_proj_bias=qkv_proj_bias,
                         out_proj_bias=out_proj_bias, causal=causal, softmax_scale=softmax_scale, layer_idx=layer_idx,
                         rotary_emb_interleaved=rotary_emb_interleaved, device=device, dtype=dtype)
        self.embed_dim, self.d_conv, self.mlp_dim = embed_dim, d_conv, math.ceil(mlp_dim / 256) * 256
        factory = {"device": device, "dtype": dtype}
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_proj = self.out_proj
        del self.out_proj  # registered again below, after conv1d, in the official order
        if self.mlp_dim:
            self.in_proj = nn.Linear(embed_dim, self.qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
            out_proj = nn.Linear(self.head_dim * self.num_heads + self.mlp_dim // 2, embed_dim, bias=out_proj_bias,
                                 **factory)
        if d_conv:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, kernel_size=d_conv, padding=d_conv - 1,
                                    groups=self.qkv_dim, **factory)
        self.out_proj = out_proj

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """(kv_cache (batch_size, max_seqlen, 2, num_heads_kv, head_dim), conv_state (batch_size, qkv_dim, d_conv)
        or None without d_conv), zeros."""
        weight = self.out_proj.weight
        factory = {"device": weight.device, "dtype": weight.dtype if dtype is None else dtype}
        kv = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, **factory)
        conv = torch.zeros(batch_size, self.qkv_dim, self.d_conv, **factory) if self.d_conv else None
        return kv, conv

    def forward(self, x: Tensor, inference_params=None, **kwargs) -> Tensor:
        """x (batch, seqlen, embed_dim) -> same. With inference_params: attend to the cached tokens
        [0, seqlen_offset) too, and write this call's keys and values (and conv inputs) after them. mambakit's
        keywords state= (a KVState, without inference_params) and mask= (without d_conv) pass through."""
        state, mask = kwargs.pop("state", None), kwargs.pop("mask", None)
        if kwargs.get("seq_idx") is not None:
            raise MambaKitError("MHA does not support seq_idx (packed sequences); use SSM layers or unpack")
        if mask is not None and self.d_conv:
            raise MambaKitError("MHA with d_conv > 0 takes no padding mask (the conv would mix pads in), got a mask")
        rows, conv_rows, start = None, None, 0
        if inference_params is not None:
            rows, conv_rows, start = self._cache_rows(x, inference_params)
            past = rows[:, :start]
            state = KVState(k=past[:, :, 0].transpose(1, 2), v=past[:, :, 1].transpose(1, 2),
                            valid=torch.ones(x.shape[0], start, dtype=torch.bool, device=x.device))
        qkv = self.in_proj(x)
        if self.mlp_dim:
            qkv, up, gate = torch.split(qkv, [self.qkv_dim, self.mlp_dim // 2, self.mlp_dim // 2], dim=-1)
        if self.d_conv:
            qkv = self._conv(qkv, conv_rows if start > 0 else None, conv_rows)
        context = self.attend(*self.split_heads(qkv), state, mask)
        if self.mlp_dim:
            context = torch.cat([context, up * F.silu(gate)], dim=-1)
        out = self.out_proj(context)
        if rows is not None:
            with torch.no_grad():
                rows[:, start:start + x.shape[1], 0] = state.k[:, :, start:].transpose(1, 2)
                rows[:, start:start + x.shape[1], 1] = state.v[:, :, start:].transpose(1, 2)
        return out

    def _cache_rows(self, x: Tensor, inference_params) -> Tuple[Tensor, Optional[Tensor], int]:
        """This call's rows of the kv cache and the conv state (allocated on first use), and seqlen_offset."""
        if self.layer_idx is None:
            raise MambaKitError("MHA needs layer_idx (constructor) to decode with inference_params, got None")
        store = inference_params.key_value_memory_dict
        if self.layer_idx not in store:
            store[self.layer_idx] = self.allocate_inference_cache(x.shape[0], inference_params.max_seqlen, x.dtype)
        start, first = inference_params.seqlen_offset, inference_params.batch_size_offset
        kv, conv = store[self.layer_idx]
        rows = kv[first:first + x.shape[0]]
        if rows.shape[0] != x.shape[0] or start + x.shape[1] > rows.shape[1]:
            raise MambaKitError(f"the kv cache {tuple(rows.shape[:2])} (batch, max_seqlen from batch_size_offset) "
                                f"cannot hold batch {x.shape[0]} and tokens up to {start + x.shape[1]}")
        return rows, None if conv is None else conv[first:first + x.shape[0]], start

    def _conv(self, qkv: Tensor, history: Optional[Tensor], conv_rows: Optional[Tensor]) -> Tensor:
        """The depthwise causal conv of qkv (batch, seqlen, qkv_dim), continuing from history (batch, qkv_dim,
        d_conv) of earlier inputs, or from zeros; conv_rows, if given, get the last d_conv inputs."""
        weight = self.conv1d.weight[:, 0]
        inputs = qkv.transpose(1, 2)
        out = causal_conv1d_fn(inputs, weight, self.conv1d.bias, None, history).transpose(1, 2)
        if conv_rows is not None:
            with torch.no_grad():
                conv_rows.copy_(conv_state_after(inputs, self.d_conv, history))
        return out
