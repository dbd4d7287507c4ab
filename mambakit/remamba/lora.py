"""Low-rank adapters on a frozen nn.Linear, and which base parameters a ReMamba (or plain) fine-tune trains."""
from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.dt_transform import DtTransformMixin
from mambakit.layers.parallel_mixer import ParallelMixer

LORA_TARGETS = ("in_proj", "out_proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * x A^T B^T with A: (rank, in) random and B: (out, rank) zero, so that it starts as
    the base layer. (..., in) -> (..., out). The base layer's own weight stays as it is (frozen by the caller). A base
    that scales its outputs (`scale_output`, e.g. Falcon-H1's in_proj) scales the adapter's product too, so the
    adapter always acts as a change of the base weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise MambaKitError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """The effective weight (out, in)."""
        return self.base.weight + self.scale * self.lora_b @ self.lora_a

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        delta = self.scale * (x @ self.lora_a.t()) @ self.lora_b.t()
        scale_output = getattr(self.base, "scale_output", None)
        return self.base(x) + (delta if scale_output is None else scale_output(delta))

    def merged(self) -> nn.Linear:
        """A copy of the base layer (its class, bias and output scaling) with the adapter folded into its weight."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.copy_(self.weight)
        return out.requires_grad_(True)


def _targets(base: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(mixer, attribute name, linear layer) for in_proj and out_proj of every Mamba / Mamba-2 mixer of `base` (the
    Mamba-2 half of a Falcon-H1 parallel layer included)."""
    for layer in base.backbone.layers:
        mixer = layer.mixer.mamba if isinstance(layer.mixer, ParallelMixer) else layer.mixer
        if isinstance(mixer, DtTransformMixin):
            for name in LORA_TARGETS:
                yield mixer, name, getattr(mixer, name)


def add_lora(base: nn.Module, rank: int, alpha: float = 1.0) -> list[nn.Parameter]:
    """Wrap in_proj and out_proj of every Mamba / Mamba-2 mixer of `base` (a MambaLMHeadModel) in LoRALinear.
    Returns the new parameters."""
    params: list[nn.Parameter] = []
    for mixer, name, lin in _targets(base):
        if isinstance(lin, LoRALinear):
            raise MambaKitError(f"{name} of layer {mixer.layer_idx} already has a LoRA adapter")
        wrapped = LoRALinear(lin, rank, alpha)
        setattr(mixer, name, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(base: nn.Module) -> None:
    """Fold every LoRALinear of `base` back into a plain nn.Linear (for saving in the base formats)."""
    for mixer, name, lin in list(_targets(base)):
        if isinstance(lin, LoRALinear):
            setattr(mixer, name, lin.merged())


def dt_parameters(base: nn.Module) -> list[nn.Parameter]:
    """The dt projection of every mixer: Mamba-1 dt_proj (weight and bias); Mamba-2 dt_bias (its dt weights are
    rows of in_proj, which LoRA covers)."""
    params: list[nn.Parameter] = []
    for layer in base.backbone.layers:
        mixer = layer.mixer
        if hasattr(mixer, "dt_proj"):
            params += list(mixer.dt_proj.parameters())
        elif hasattr(mixer, "dt_bias"):
            params.append(mixer.dt_bias)
    return params


def lora_param_count(base: nn.Module, rank: int) -> int:
    """Parameters that `add_lora(base, rank)` would add."""
    return sum(rank * (lin.in_features + lin.out_features) for _, _, lin in _targets(base))


def rank_for_budget(base: nn.Module, budget: int) -> int:
    """The LoRA rank whose parameter count is closest to `budget` (at least 1)."""
    per_rank = lora_param_count(base, 1)
    if per_rank == 0:
        raise MambaKitError("the model has no Mamba layer to put LoRA adapters on")
    return max(1, round(budget / per_rank))
