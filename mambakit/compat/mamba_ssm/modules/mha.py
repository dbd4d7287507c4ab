"""`mamba_ssm.modules.mha.MHA`: mambakit's attention layer (`mambakit.layers.attention.MHA`: in_proj packing q,
k, v, out_proj, GPT-NeoX rotary on the leading rotary_emb_dim features) with the official signatures and cache.

The official defaults are kept, so causal=False must be overridden (mamba_ssm's own blocks pass causal=True):
refused with MambaKitError, like mlp_dim > 0, d_conv > 0 and rotary_emb_interleaved=True. The cache in
inference_params.key_value_memory_dict[layer_idx] is the official (kv_cache (batch, max_seqlen, 2, num_heads_kv,
head_dim), None); the decode step attends to every cached key (the official PyTorch fallback without flash_attn
aligns its causal mask top-left and sees only the first).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA as MambaKitMHA
from mambakit.layers.attention import KVState

__all__ = ["MHA"]


class MHA(MambaKitMHA):
    """Input and output: (batch, seqlen, embed_dim)."""

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: Optional[int] = None,
                 head_dim: Optional[int] = None, mlp_dim: int = 0, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: Optional[float] = None, causal: bool = False,
                 layer_idx: Optional[int] = None, d_conv: int = 0, rotary_emb_dim: int = 0,
                 rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False, device=None, dtype=None):
        for name, value, ok in (("causal", causal, True), ("mlp_dim", mlp_dim, 0), ("d_conv", d_conv, 0),
                                ("rotary_emb_interleaved", rotary_emb_interleaved, False)):
            if value != ok:
                raise MambaKitError(f"MHA {name} must be {ok!r} in mambakit.compat (causal attention without the "
                                    f"MLP, conv or interleaved-rotary variants), got {value!r}")
        super().__init__(embed_dim, num_heads=num_heads, num_heads_kv=num_heads_kv, head_dim=head_dim,
                         rotary_emb_dim=rotary_emb_dim, rotary_emb_base=rotary_emb_base, qkv_proj_bias=qkv_proj_bias,
                         out_proj_bias=out_proj_bias, causal=True, softmax_scale=softmax_scale, layer_idx=layer_idx,
                         device=device, dtype=dtype)
        self.embed_dim, self.causal, self.mlp_dim, self.d_conv = embed_dim, causal, mlp_dim, d_conv

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, None]:
        """(kv_cache (batch_size, max_seqlen, 2, num_heads_kv, head_dim), None: no conv state), zeros."""
        weight = self.out_proj.weight
        kv = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, device=weight.device,
                         dtype=weight.dtype if dtype is None else dtype)
        return kv, None

    def forward(self, x: Tensor, inference_params=None, **kwargs) -> Tensor:
        """x (batch, seqlen, embed_dim) -> same. With inference_params: attend to the cached tokens
        [0, seqlen_offset) too, and write this call's keys and values after them."""
        if inference_params is None:
            return super().forward(x, **kwargs)
        if self.layer_idx is None:
            raise MambaKitError("MHA needs layer_idx (constructor) to decode with inference_params, got None")
        store = inference_params.key_value_memory_dict
        if self.layer_idx not in store:
            store[self.layer_idx] = self.allocate_inference_cache(x.shape[0], inference_params.max_seqlen, x.dtype)
        start, first = inference_params.seqlen_offset, inference_params.batch_size_offset
        rows = store[self.layer_idx][0][first:first + x.shape[0]]
        if rows.shape[0] != x.shape[0] or start + x.shape[1] > rows.shape[1]:
            raise MambaKitError(f"the kv cache {tuple(rows.shape[:2])} (batch, max_seqlen from batch_size_offset) "
                                f"cannot hold batch {x.shape[0]} and tokens up to {start + x.shape[1]}")
        past = rows[:, :start]
        state = KVState(k=past[:, :, 0].transpose(1, 2), v=past[:, :, 1].transpose(1, 2),
                        valid=torch.ones(x.shape[0], start, dtype=torch.bool, device=x.device))
        out = super().forward(x, state=state, **kwargs)
        with torch.no_grad():
            rows[:, start:start + x.shape[1], 0] = state.k[:, :, start:].transpose(1, 2)
            rows[:, start:start + x.shape[1], 1] = state.v[:, :, start:].transpose(1, 2)
        return out
