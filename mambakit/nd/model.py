"""Mamba-ND: an unchanged 1-D Mamba (or Mamba-2) layer applied to N-D data by permuting the tokens.

    input (batch, C, *spatial)          1-D (L,), 2-D (H, W) or 3-D (T, H, W)
      -> PatchEmbed                      strided conv, kernel = stride = patch: (batch, prod(grid), d_model)
      -> + learned absolute position embedding (no class token)
      -> depth x NDBlock                 x + sum over routes of  unpermute(mixer(permute(norm(x))))
      -> head                            classify: norm, mean over tokens, linear -> (batch, num_outputs)
                                         dense:    norm, per-token linear          -> (batch, num_outputs, *grid)

Which scan order(s) each block reads is set by ``order_mode`` (see :func:`mambakit.nd.orders.layer_routes`).
Tokens live between blocks in natural row-major order of the grid; only the mixer sees them permuted.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.norm import RMSNorm
from mambakit.layers.registry import default_headdim, mixer_spec
from mambakit.nd.orders import ORDER_MODES, ScanOrder, from_scan_order, layer_routes, mixers_per_layer, to_scan_order

#: The mixers Mamba-ND lists (any spelling of them in `mambakit.layers.registry` is accepted, e.g. "Mamba2").
MIXERS = ("mamba1", "mamba2")
MIXER_NAMES = tuple(mixer_spec(m).name for m in MIXERS)  # their registry names
#: Mamba-ND's Mamba-2 head size: 32 when it divides d_inner (else gcd(d_inner, 64); `default_headdim`).
HEADDIM_PREFERENCE = (32,)
HEADS = ("classify", "dense")


def _as_tuple(name: str, value: Any, ndim: Optional[int] = None) -> Tuple[int, ...]:
    """An int or a sequence of positive ints as a tuple (an int is repeated ndim times)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if ndim is None:
            value = (value,)
        else:
            value = (value,) * ndim
    try:
        out = tuple(value)
    except TypeError:
        raise MambaKitError(f"{name} must be an int or a tuple of ints, got {value!r}") from None
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in out):
        raise MambaKitError(f"{name} must hold positive integers, got {value!r}")
    if ndim is not None and len(out) != ndim:
        raise MambaKitError(f"{name} must have {ndim} entries (one per spatial axis), got {value!r}")
    return out


def make_mixer(kind: str, d_model: int, layer_idx: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """A 1-D sequence mixer (batch, seqlen, d_model) -> same shape: ``mamba1`` = :class:`Mamba`
    (d_state 16, d_conv 4, expand 2 unless given), ``mamba2`` = :class:`Mamba2` (d_state 64, headdim 32 when it
    divides expand * d_model, chunk_size 64 unless given). The defaults are the registry's except the head size."""
    spec = mixer_spec(kind, allowed=MIXER_NAMES)
    kw = dict(kwargs)
    kw.setdefault("d_state", spec.d_state)
    if spec.has_heads:
        kw.setdefault("chunk_size", 64)
        if "headdim" not in kw:
            kw["headdim"] = default_headdim(kw.get("expand", 2) * d_model, HEADDIM_PREFERENCE)
    return spec.layer_class()(d_model, layer_idx=layer_idx, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Patch embedding and position embedding, shared with the ViT baseline
# ----------------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution (kernel = stride = patch_size), 1-D, 2-D or 3-D.

    x (batch, in_channels, *spatial) -> tokens (batch, prod(grid), d_model) in row-major grid order, and grid =
    spatial // patch_size."""

    def __init__(self, in_channels: int, d_model: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = _as_tuple("patch_size", patch_size)
        if len(self.patch_size) not in (1, 2, 3):
            raise MambaKitError(f"patch_size must have 1, 2 or 3 entries, got {patch_size!r}")
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(self.patch_size) - 1]
        self.in_channels = in_channels
        self.proj = conv(in_channels, d_model, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_for(self, spatial: Sequence[int]) -> Tuple[int, ...]:
        """The token grid of an input of this spatial size; MambaKitError unless the patches tile it exactly."""
        spatial = tuple(spatial)
        if len(spatial) != len(self.patch_size) or any(s <= 0 or s % p for s, p in zip(spatial, self.patch_size)):
            raise MambaKitError(f"input spatial size {spatial} must be a (non-zero) multiple of patch_size "
                                f"{self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        nd = len(self.patch_size)
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            raise MambaKitError(f"input must have shape (batch, {self.in_channels}, {', '.join('S' * nd)}) for "
                                f"{nd}-D patches, got {tuple(x.shape)}")
        grid = self.grid_for(x.shape[2:])
        y = self.proj(x)  # (batch, d_model, *grid)
        return y.flatten(2).transpose(1, 2), grid


def resize_pos_embed(pos: Tensor, grid: Tuple[int, ...], new_grid: Tuple[int, ...]) -> Tensor:
    """pos (1, prod(grid), d) resampled (linear / bilinear / trilinear) to (1, prod(new_grid), d)."""
    if tuple(grid) == tuple(new_grid):
        return pos
    mode = ("linear", "bilinear", "trilinear")[len(grid) - 1]
    p = pos.transpose(1, 2).reshape(1, pos.shape[-1], *grid)
    p = F.interpolate(p, size=tuple(new_grid), mode=mode, align_corners=False)
    return p.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# The ND block
# ----------------------------------------------------------------------------------------------------------------------
class NDBlock(nn.Module):
    """Pre-norm residual block around unchanged 1-D mixers:

        out = x + sum_r  from_scan_order( mixers[route_mixer[r]]( to_scan_order(norm(x), routes[r]) ), routes[r] )

    x, out: (batch, prod(grid), d_model) in natural row-major grid order. One route (Mamba-ND's alternating layers),
    two routes on one shared mixer (``bidirectional``), or one mixer per route (``multi``)."""

    def __init__(self, d_model: int, mixers: Sequence[nn.Module], routes: Sequence[ScanOrder],
                 route_mixer: Optional[Sequence[int]] = None, norm_eps: float = 1e-5):
        super().__init__()
        if not routes:
            raise MambaKitError("NDBlock needs at least one scan order")
        route_mixer = list(route_mixer) if route_mixer is not None else [0] * len(routes)
        if len(route_mixer) != len(routes) or any(not 0 <= i < len(mixers) for i in route_mixer):
            raise MambaKitError(f"route_mixer {route_mixer} must give one index into the {len(mixers)} mixers "
                                f"per route")
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixers = nn.ModuleList(mixers)
        self.routes = list(routes)
        self.route_mixer = route_mixer

    def mix(self, h: Tensor, grid: Sequence[int]) -> Tensor:
        """The permute -> mixer -> unpermute part, summed over routes: h (batch, L, d) -> (batch, L, d)."""
        out = None
        for order, m in zip(self.routes, self.route_mixer):
            y = from_scan_order(self.mixers[m](to_scan_order(h, grid, order)), grid, order)
            out = y if out is None else out + y
        return out

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        return x + self.mix(self.norm(x), grid)

    def extra_repr(self) -> str:
        return "routes=[" + ", ".join(f"{o}->mixer{m}" for o, m in zip(self.routes, self.route_mixer)) + "]"


# ----------------------------------------------------------------------------------------------------------------------
# Config and models
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class NDConfig:
    """A Mamba-ND (or ViT baseline) model. input_size: spatial size of the inputs it is built for, e.g. (16, 16) or
    (8, 16, 16) (other sizes work too: the position embedding is resampled); patch_size: one entry per spatial axis.
    num_outputs: classes (head ``classify``) or channels per token (head ``dense``)."""

    input_size: Tuple[int, ...]
    patch_size: Tuple[int, ...]
    in_channels: int = 1
    num_outputs: int = 10
    d_model: int = 64
    depth: int = 6
    head: str = "classify"
    mixer: str = "mamba1"
    order_mode: str = "alternate"
    mixer_kwargs: Dict[str, Any] = field(default_factory=dict)
    norm_eps: float = 1e-5

    def __post_init__(self):
        self.input_size = _as_tuple("input_size", self.input_size)
        if len(self.input_size) not in (1, 2, 3):
            raise MambaKitError(f"input_size must have 1, 2 or 3 entries, got {self.input_size!r}")
        self.patch_size = _as_tuple("patch_size", self.patch_size, len(self.input_size))
        for name in ("in_channels", "num_outputs", "d_model", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise MambaKitError(f"{name} must be a positive integer, got {v!r}")
        if self.head not in HEADS:
            raise MambaKitError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        mixer_spec(self.mixer, allowed=MIXER_NAMES)  # raises for a mixer Mamba-ND does not take
        if self.order_mode not in ORDER_MODES:
            raise MambaKitError(f"order_mode must be one of {', '.join(ORDER_MODES)}, got {self.order_mode!r}")
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise MambaKitError(f"input_size {self.input_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def ndim(self) -> int:
        return len(self.input_size)

    @property
    def grid(self) -> Tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.input_size, self.patch_size))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"], d["patch_size"] = list(self.input_size), list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "NDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MambaKitError(f"unknown NDConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)


class NDModel(nn.Module):
    """Patch embedding + position embedding + blocks + head; subclasses build ``self.blocks`` (each called as
    ``block(x, grid)``)."""

    def __init__(self, config: NDConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch_embed = PatchEmbed(config.in_channels, d, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(config.grid), d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList()
        self.head = nn.Linear(d, config.num_outputs)

    def _final_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """x (batch, in_channels, *spatial) -> normed tokens (batch, prod(grid), d_model) and grid."""
        tokens, grid = self.patch_embed(x)
        tokens = tokens + resize_pos_embed(self.pos_embed, self.config.grid, grid)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return self._final_norm(tokens), grid

    def forward(self, x: Tensor) -> Tensor:
        """classify: (batch, num_outputs) logits; dense: (batch, num_outputs, *grid)."""
        h, grid = self.forward_features(x)
        if self.config.head == "classify":
            return self.head(h.mean(dim=1))
        y = self.head(h)  # (batch, L, num_outputs)
        return y.transpose(1, 2).reshape(y.shape[0], -1, *grid)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MambaND(NDModel):
    """Mamba-ND: ``depth`` :class:`NDBlock` s of unchanged Mamba / Mamba-2 mixers, scan orders from
    ``config.order_mode``; RMSNorm before each mixer and before the head."""

    def __init__(self, config: NDConfig):
        super().__init__(config)
        routes = layer_routes(config.ndim, config.depth, config.order_mode)
        for i, layer_orders in enumerate(routes):
            n_mixers = mixers_per_layer(config.order_mode, len(layer_orders))
            mixers = [make_mixer(config.mixer, config.d_model, layer_idx=i, **config.mixer_kwargs)
                      for _ in range(n_mixers)]
            route_mixer = list(range(len(layer_orders))) if n_mixers > 1 else [0] * len(layer_orders)
            self.blocks.append(NDBlock(config.d_model, mixers, layer_orders, route_mixer, config.norm_eps))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)

    def _final_norm(self, x: Tensor) -> Tensor:
        return self.norm_f(x)

    def scan_orders(self) -> List[List[ScanOrder]]:
        """Each block's scan orders (for printing / checking)."""
        return [list(b.routes) for b in self.blocks]
