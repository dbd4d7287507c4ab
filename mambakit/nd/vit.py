"""The ViT baseline for Mamba-ND: same patch embedding, position embedding and heads, standard pre-norm transformer
encoder blocks (non-causal multi-head self-attention through PyTorch SDPA, GELU MLP). Its width is chosen by
:func:`vit_config_matching` so that its parameter count matches a Mamba-ND model of the same depth."""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.nd.model import NDConfig, NDModel


class EncoderBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)). x: (batch, L, d_model); attention sees every token (no mask)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        if d_model % n_heads:
            raise MambaKitError(f"ViT d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        hidden = max(1, int(round(mlp_ratio * d_model)))
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor, grid: Sequence[int] = ()) -> Tensor:
        b, L, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, L, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, L, head_dim)
        a = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, L, head_dim), non-causal
        x = x + self.proj(a.transpose(1, 2).reshape(b, L, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTND(NDModel):
    """A ViT on 1-D/2-D/3-D patches (no class token; mean pooling like Mamba-ND). ``config.mixer`` and
    ``config.order_mode`` are ignored."""

    def __init__(self, config: NDConfig, n_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__(config)
        self.n_heads, self.mlp_ratio = n_heads, mlp_ratio
        for _ in range(config.depth):
            self.blocks.append(EncoderBlock(config.d_model, n_heads, mlp_ratio, config.norm_eps))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.apply(_init_vit)

    def _final_norm(self, x: Tensor) -> Tensor:
        return self.norm_f(x)


def _init_vit(m: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases, as in the original (Flax) ViT. (timm's trunc-normal std 0.02
    starts the attention so close to uniform that this small ViT trained several times slower on the digits.)"""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def vit_config_matching(config: NDConfig, target_params: int, n_heads: int = 4,
                        mlp_ratio: float = 4.0) -> Tuple[NDConfig, int]:
    """The ViT config with config's depth, patching and head whose d_model (a multiple of n_heads) gives the
    parameter count closest to target_params; returns (config, its parameter count)."""
    if target_params <= 0:
        raise MambaKitError(f"target_params must be positive, got {target_params}")
    best = None
    step = n_heads
    for d in range(step, 16 * config.d_model + 1, step):
        cand = dataclasses.replace(config, d_model=d)
        n = ViTND(cand, n_heads, mlp_ratio).num_params()
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (cand, n)
        if n > target_params:
            break
    return best
