"""Zamba2's shared transformer block: one attention + MLP block whose weights are reused at several layers, each use
with its own low-rank adapters and its own output projection (transformers' `Zamba2HybridLayer`).

At a use, with h the layer's input (batch, seqlen, d_model) and e the original token embeddings (same shape):
x = RMSNorm(cat([h, e], -1)) (width 2 * d_model); a = attention(x) (queries, keys and values from 2 * d_model,
adapters added, the softmax scale (head_dim / 2) ** -0.5, output back to d_model); m = MLP(RMSNorm(a)) (a packed
gate_up_proj plus its adapter, no residual anywhere in the block); the use returns linear(m), which the layer adds
to the input of its Mamba-2 mixer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA, KVState
from mambakit.layers.mlp import MLP
from mambakit.layers.norm import RMSNorm
from mambakit.layers.state import SSMState


class AdaptedLinear(nn.Linear):
    """nn.Linear plus the output of the adapter installed for the current call (`SharedBlock.forward` installs the
    use's adapters around its attention and MLP), none otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        adapter = self.__dict__.get("_adapter")  # kept out of the module tree: it belongs to the use
        return out if adapter is None else out + adapter(x)


def _adapted(linear: nn.Linear) -> AdaptedLinear:
    out = AdaptedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def _low_rank(d_in: int, rank: int, d_out: int, factory: dict) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, rank, bias=False, **factory), nn.Linear(rank, d_out, bias=False, **factory))


class SharedBlock(nn.Module):
    """The shared weights: norm (2 * d_model), attn (`MHA` on 2 * d_model with head_dim 2 * d_model / num_heads,
    out_proj to d_model), norm2 and mlp (packed gated `MLP` on d_model)."""

    def __init__(self, d_model: int, num_heads: int, d_intermediate: int, num_heads_kv: Optional[int] = None,
                 activation: str = "gelu", bias: bool = False, rotary: bool = False, rotary_emb_base: float = 10000.0,
                 norm_epsilon: float = 1e-5, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        width = 2 * d_model
        if num_heads <= 0 or width % num_heads:
            raise MambaKitError(f"SharedBlock num_heads must divide 2 * d_model = {width}, got {num_heads}")
        head_dim = width // num_heads
        self.d_model = d_model
        self.norm = RMSNorm(width, eps=norm_epsilon, **factory)
        self.attn = MHA(width, num_heads=num_heads, num_heads_kv=num_heads_kv, head_dim=head_dim,
                        rotary_emb_dim=head_dim if rotary else 0, rotary_emb_base=rotary_emb_base,
                        qkv_proj_bias=False, separate_qkv=True, softmax_scale=(head_dim / 2) ** -0.5, **factory)
        self.attn.out_proj = nn.Linear(width, d_model, bias=False, **factory)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self.attn, name, _adapted(getattr(self.attn, name)))
        self.norm2 = RMSNorm(d_model, eps=norm_epsilon, **factory)
        self.mlp = MLP(d_model, d_intermediate, activation=activation, gated=True, bias=bias, packed=True, **factory)
        self.mlp.gate_up_proj = _adapted(self.mlp.gate_up_proj)

    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None) -> KVState:
        return self.attn.allocate_state(batch_size, dtype=dtype, device=device)

    def _install(self, adapters: Optional["UseAdapters"]) -> None:
        for target, name in ((self.attn.q_proj, "q"), (self.attn.k_proj, "k"), (self.attn.v_proj, "v"),
                             (self.mlp.gate_up_proj, "gate_up")):
            if not isinstance(target, AdaptedLinear):  # a wrapper would drop the use's adapter silently
                raise MambaKitError(f"SharedBlock's {name} projection must stay an AdaptedLinear (it adds each use's "
                                    f"adapter), got {type(target).__name__}")
            target.__dict__["_adapter"] = None if adapters is None else getattr(adapters, name, None)

    def forward(self, hidden: Tensor, embeddings: Tensor, adapters: Optional["UseAdapters"] = None,
                state: Optional[KVState] = None, mask: Optional[Tensor] = None,
                seq_idx: Optional[Tensor] = None) -> Tensor:
        """hidden, embeddings: (batch, seqlen, d_model) -> (batch, seqlen, d_model). state: this use's KV cache
        (appended to); mask: (batch, seqlen) 1 = token, 0 = padding; seq_idx: refused, as by MHA."""
        x = self.norm(torch.cat([hidden, embeddings], dim=-1))
        self._install(adapters)
        try:
            a = self.attn(x, state=state, mask=mask, seq_idx=seq_idx)
            return self.mlp(self.norm2(a))
        finally:
            self._install(None)


class UseAdapters(nn.Module):
    """One use's low-rank adapters (each a Sequential of Linear(d_in, rank), Linear(rank, d_out), no bias): gate_up
    on the MLP's packed input projection, and q, k, v on the attention's (when attention is True)."""

    def __init__(self, d_model: int, rank: int, d_intermediate: int, attention: bool, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if attention:
            width = 2 * d_model
            self.q, self.k, self.v = (_low_rank(width, rank, width, factory) for _ in range(3))
        self.gate_up = _low_rank(d_model, rank, 2 * d_intermediate, factory)


@dataclass
class SharedUseState:
    """The cache entry of a layer that uses a shared block: its Mamba-2 mixer's state and this use's KV cache."""

    ssm: SSMState
    kv: KVState

    def reorder(self, index: Tensor) -> None:
        self.ssm.reorder(index)
        self.kv.reorder(index)


class SharedUse(nn.Module):
    """What one layer adds around a shared block: its adapters (None with rank 0) and its output projection
    linear (d_model -> d_model, no bias). `block` is the index of the shared block it uses."""

    def __init__(self, d_model: int, block: int, adapter_rank: int, d_intermediate: int, attention_adapters: bool,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.block = block
        self.adapters = (UseAdapters(d_model, adapter_rank, d_intermediate, attention_adapters, **factory)
                         if adapter_rank else None)
        self.linear = nn.Linear(d_model, d_model, bias=False, **factory)

    def forward(self, shared: SharedBlock, hidden: Tensor, embeddings: Tensor, state: Optional[KVState] = None,
                mask: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None) -> Tensor:
        """hidden, embeddings: (batch, seqlen, d_model) -> what the layer adds to its mixer's input, same shape."""
        return self.linear(shared(hidden, embeddings, self.adapters, state=state, mask=mask, seq_idx=seq_idx))


def shared_block_kwargs(shared: dict[str, Any]) -> dict[str, Any]:
    """The `SharedBlock` keyword arguments of a HybridConfig.shared dict (which also holds the per-use fields)."""
    per_use = ("num_blocks", "adapter_rank", "attention_adapters")
    return {k: v for k, v in shared.items() if k not in per_use}
