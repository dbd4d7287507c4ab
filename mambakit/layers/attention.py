"""Multi-head attention with rotary positions (PyTorch SDPA; causal unless causal=False): the Transformer baseline
and the attention layers of hybrid stacks (`MambaConfig.attn_layer_idx`). Parameter names follow
`mamba_ssm.modules.mha.MHA` (in_proj packs q, k, v; out_proj), or, with separate_qkv=True, the q_proj / k_proj /
v_proj of transformers' Llama-style attention (the hybrid checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError


@dataclass
class KVState:
    """Keys and values seen so far: k, v (batch, num_heads_kv, seqlen_so_far, head_dim) and which of those positions
    are real tokens, valid (batch, seqlen_so_far). Unlike an SSM state, it grows with the context."""

    k: Tensor
    v: Tensor
    valid: Tensor

    @property
    def seqlen(self) -> int:
        return self.k.shape[2]

    def reorder(self, index: Tensor) -> None:
        self.k, self.v, self.valid = (t.index_select(0, index) for t in (self.k, self.v, self.valid))


def rotary(x: Tensor, positions: Tensor, rotary_dim: int, base: float, interleaved: bool = False) -> Tensor:
    """Rotate the first rotary_dim features of x (batch, heads, seqlen, head_dim) by positions (batch, seqlen):
    feature pairs (i, i + rotary_dim / 2), the GPT-NeoX half-split layout, or with `interleaved` (2i, 2i + 1), the
    GPT-J layout; pair i turns by positions * base ** (-2i / rotary_dim)."""
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    fp = torch.float64 if x.dtype == torch.float64 else torch.float32  # the angles of a float64 model in float64
    inv_freq = 1.0 / (base ** (torch.arange(0, half, device=x.device, dtype=fp) / half))
    angles = positions.to(fp)[..., None] * inv_freq  # (batch, seqlen, half)
    cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        turned = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([turned, rest], dim=-1)


class MHA(nn.Module):
    """Attention mixer (causal by default). Input and output: (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, num_heads: int = 8, num_heads_kv: Optional[int] = None,
                 head_dim: Optional[int] = None, rotary_emb_dim: Optional[int] = None, rotary_emb_base: float = 10000.0,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, causal: bool = True,
                 separate_qkv: bool = False, softmax_scale: Optional[float] = None,
                 layer_idx: Optional[int] = None, rotary_emb_interleaved: bool = False, device=None, dtype=None):
        """num_heads_kv < num_heads: grouped-query attention. rotary_emb_dim: the leading features of each head that
        are rotated (0: no positional encoding), in pairs (i, i + rotary_emb_dim / 2), or (2i, 2i + 1) with
        rotary_emb_interleaved. softmax_scale: the factor of q·k (default head_dim ** -0.5). causal=False: every
        query sees every key (of the call and of the state); not for language models."""
        super().__init__()
        num_heads_kv = num_heads_kv or num_heads
        if num_heads <= 0 or num_heads % num_heads_kv != 0:
            raise MambaKitError(f"MHA num_heads={num_heads} must be positive "
                                f"and divisible by num_heads_kv={num_heads_kv}")
        if head_dim is None:
            if d_model % num_heads != 0:
                raise MambaKitError(f"MHA d_model={d_model} must be divisible by num_heads={num_heads}")
            head_dim = d_model // num_heads
        rotary_emb_dim = head_dim if rotary_emb_dim is None else rotary_emb_dim
        if rotary_emb_dim % 2 or rotary_emb_dim > head_dim:
            raise MambaKitError(f"MHA rotary_emb_dim must be even and <= head_dim={head_dim}, got {rotary_emb_dim}")
        if not isinstance(causal, bool) or not isinstance(rotary_emb_interleaved, bool):
            raise MambaKitError(f"MHA causal and rotary_emb_interleaved must be bools, got {causal!r}, "
                                f"{rotary_emb_interleaved!r}")
        if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
            raise MambaKitError(f"MHA softmax_scale must be a positive number or None, got {softmax_scale!r}")
        self.num_heads, self.num_heads_kv, self.head_dim = num_heads, num_heads_kv, head_dim
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        self.rotary_emb_interleaved, self.causal = rotary_emb_interleaved, causal
        self.layer_idx, self.separate_qkv = layer_idx, separate_qkv
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        factory = {"bias": qkv_proj_bias, "device": device, "dtype": dtype}
        if separate_qkv:
            self.q_proj = nn.Linear(d_model, head_dim * num_heads, **factory)
            self.k_proj = nn.Linear(d_model, head_dim * num_heads_kv, **factory)
            self.v_proj = nn.Linear(d_model, head_dim * num_heads_kv, **factory)
        else:
            self.in_proj = nn.Linear(d_model, head_dim * (num_heads + 2 * num_heads_kv), **factory)
        self.out_proj = nn.Linear(head_dim * num_heads, d_model, bias=out_proj_bias, device=device, dtype=dtype)

    #: its state is a KV cache in the model dtype (an SSM state_dtype does not apply)
    kv_cache_only = True

    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None) -> KVState:
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        empty = torch.zeros(batch_size, self.num_heads_kv, 0, self.head_dim, device=device, dtype=dtype)
        return KVState(k=empty, v=empty.clone(), valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device))

    def forward(self, hidden_states: Tensor, state: Optional[KVState] = None, seq_idx: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """hidden_states: (batch, seqlen, d_model). state: attend to the cached keys/values too and append to them.
        mask: (batch, seqlen) 1 = token, 0 = padding (keys at pads are ignored; positions count real tokens only)."""
        if seq_idx is not None:
            raise MambaKitError("MHA does not support seq_idx (packed sequences); use SSM layers or unpack")
        if self.separate_qkv:
            heads = [(p(hidden_states), n) for p, n in ((self.q_proj, self.num_heads), (self.k_proj, self.num_heads_kv),
                                                        (self.v_proj, self.num_heads_kv))]
            q, k, v = (t.unflatten(-1, (n, self.head_dim)).transpose(1, 2) for t, n in heads)
        else:
            q, k, v = self.split_heads(self.in_proj(hidden_states))
        return self.out_proj(self.attend(q, k, v, state, mask))

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj's output (batch, seqlen, head_dim * (num_heads + 2 * num_heads_kv)) -> q (batch, num_heads,
        seqlen, head_dim), k, v (batch, num_heads_kv, seqlen, head_dim)."""
        sizes = [self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim, self.num_heads_kv * self.head_dim]
        q, k, v = torch.split(qkv, sizes, dim=-1)
        return tuple(t.unflatten(-1, (n, self.head_dim)).transpose(1, 2)
                     for t, n in ((q, self.num_heads), (k, self.num_heads_kv), (v, self.num_heads_kv)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: Optional[KVState] = None,
               mask: Optional[Tensor] = None) -> Tensor:
        """q (batch, num_heads, seqlen, head_dim), k, v (batch, num_heads_kv, seqlen, head_dim), before rotary ->
        the attention output (batch, seqlen, num_heads * head_dim), before out_proj. state, mask: as `forward`."""
        batch, _, seqlen, _ = q.shape
        device = q.device
        valid_new = mask.bool() if mask is not None else torch.ones(batch, seqlen, dtype=torch.bool, device=device)
        past_valid = state.valid if state is not None else torch.zeros(batch, 0, dtype=torch.bool, device=device)
        # positions count real tokens only, so a padded row matches the same row alone
        positions = (past_valid.sum(-1, keepdim=True) + valid_new.long().cumsum(-1) - 1).clamp(min=0)
        q = rotary(q, positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        k = rotary(k, positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
            state.k, state.v = k.detach(), v.detach()
            state.valid = torch.cat([past_valid, valid_new], dim=1)
        past, total = past_valid.shape[1], k.shape[2]
        query_pos = torch.arange(past, past + seqlen, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None]
        key_ok = torch.cat([past_valid, valid_new], dim=1)[:, None, :]  # (batch, 1, total)
        # real keys only (and, causal, not later ones); a padded query sees itself so its row is never all -inf
        seen = ((key_pos <= query_pos)[None] & key_ok) if self.causal else key_ok
        attn_mask = seen | (key_pos == query_pos)[None]
        rep = self.num_heads // self.num_heads_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None], scale=self.softmax_scale)
        return out.transpose(1, 2).reshape(batch, seqlen, -1)

    def step(self, hidden_states: Tensor, state: KVState) -> Tensor:
        """One decoding step: (batch, 1, d_model) or (batch, d_model)."""
        squeeze = hidden_states.dim() == 2
        out = self.forward(hidden_states[:, None] if squeeze else hidden_states, state=state)
        return out[:, 0] if squeeze else out
