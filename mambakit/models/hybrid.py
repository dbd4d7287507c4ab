"""Hybrid language models: a stack of layers, each listed with its own kinds, the way the Mamba-2 hybrids of
transformers (Bamba, Nemotron-H, Granite-4.0-H, Jamba, ...) are built.

Layer i is ``config.layers[i] = {"mixer": M, "mlp": F}`` with M one of "mamba2" (`mambakit.layers.mamba2.Mamba2`,
configured by ``config.mamba2``), "mamba" (`mambakit.layers.mamba.Mamba`, by ``config.mamba``), "attention"
(`mambakit.layers.attention.MHA`, by ``config.attention``) or None, and F one of "gated" / "plain"
(`mambakit.layers.mlp.MLP`, by ``config.mlp``), "moe" (`mambakit.layers.moe.SharedExpertMoE`: routed experts by
``config.moe`` plus the ``config.mlp`` MLP as the shared expert), "routed" (`mambakit.layers.moe.TopKMoE` by
``config.moe`` alone) or None; at least one of the two. Each present part is a pre-norm residual step:
h = h + residual_multiplier * part(RMSNorm(h)), the mixer first.

Two more mixer forms, for Falcon-H1 and Zamba2: M = "parallel" (`mambakit.layers.parallel_mixer.ParallelMixer`:
attention by ``config.attention`` and Mamba-2 by ``config.mamba2`` side by side, with ``config.parallel``'s widths
and multipliers; ``config.mlp["multipliers"] = [gate, down]`` scales its MLPs), and a Mamba-2 layer listed with
``"shared": b`` uses shared block b (`mambakit.layers.shared_block`, by ``config.shared``): the mixer's input is then
h + use(shared block b, h, the token embeddings), the residual still h.

Module names: backbone.embedding, backbone.layers.{i}.norm / .mixer (the mixer part), backbone.layers.{i}.norm2 /
.mlp (the MLP part), backbone.norm_f, lm_head (the keys that `mambakit.models.io` checks for every format).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.mlp import MLP
from mambakit.layers.moe import SharedExpertMoE, TopKMoE
from mambakit.layers.norm import RMSNorm
from mambakit.layers.parallel_mixer import ParallelMixer, scale_mlp_
from mambakit.layers.shared_block import SharedBlock, SharedUse, SharedUseState, shared_block_kwargs
from mambakit.layers.state import allocate_mixer_state
from mambakit.models.config import config_from_dict
from mambakit.models.lm import CausalLM, InferenceCache, _init_weights

MIXER_KINDS = ("mamba2", "mamba", "attention", "parallel")
MLP_KINDS = ("gated", "plain", "moe", "routed")


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class HybridConfig:
    """Configuration of `HybridLM`.

    layers: one {"mixer": "mamba2" | "mamba" | "attention" | "parallel" | None, "mlp": "gated" | "plain" | "moe" |
    "routed" | None} per layer, a Mamba-2 layer optionally with "shared": the index of the shared block it uses.
    mamba2 / mamba / attention: keyword arguments of `Mamba2` / `Mamba` / `MHA` (every such layer alike).
    mlp: {"d_intermediate": int, "activation": "silu" | "relu2" | ..., "bias": bool, "packed": bool}.
    moe: keyword arguments of `TopKMoE` (layers whose mlp is "moe" or "routed"); for "moe" layers optionally
    "shared": the shared expert's own `MLP` arguments (instead of `mlp`'s; see `SharedExpertMoE`).
    parallel: the other keyword arguments of `ParallelMixer` (layers whose mixer is "parallel").
    shared: {"num_blocks": int, "adapter_rank": int (0: none), "attention_adapters": bool} plus the keyword arguments
    of `SharedBlock` (without d_model): the shared blocks of layers listed with "shared".
    embedding_multiplier scales the embeddings, residual_multiplier every residual branch, and the logits are
    divided by logits_scaling (the µP multipliers of Granite; 1.0 elsewhere).
    """

    d_model: int = 256
    vocab_size: int = 256
    layers: list[dict[str, Optional[str]]] = field(default_factory=lambda: [{"mixer": "mamba2", "mlp": "gated"}])
    mamba2: dict[str, Any] = field(default_factory=dict)
    mamba: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    mlp: dict[str, Any] = field(default_factory=dict)
    moe: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    pad_vocab_size_multiple: int = 1
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    def __post_init__(self) -> None:
        for name in ("d_model", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MambaKitError(f"HybridConfig.{name} must be a positive integer, got {value!r}")
        for name in ("norm_epsilon", "embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if not _positive(getattr(self, name)):
                raise MambaKitError(f"HybridConfig.{name} must be a positive finite number, got "
                                    f"{getattr(self, name)!r}")
        for name in ("mamba2", "mamba", "attention", "mlp", "moe", "parallel", "shared"):
            if not isinstance(getattr(self, name), dict):
                raise MambaKitError(f"HybridConfig.{name} must be a JSON object, got {getattr(self, name)!r}")
        if not isinstance(self.layers, list) or not self.layers:
            raise MambaKitError(f"HybridConfig.layers must be a non-empty list, got {self.layers!r}")
        for i, spec in enumerate(self.layers):
            ok = (isinstance(spec, dict) and set(spec) - {"shared"} == {"mixer", "mlp"}
                  and spec["mixer"] in (None, *MIXER_KINDS) and spec["mlp"] in (None, *MLP_KINDS)
                  and (spec["mixer"], spec["mlp"]) != (None, None))
            if not ok:
                raise MambaKitError(f"HybridConfig.layers[{i}] must be {{'mixer': one of {[None, *MIXER_KINDS]}, "
                                    f"'mlp': one of {[None, *MLP_KINDS]}}}, not both None; got {spec!r}")
            self._check_shared(i, spec)
        if any(s["mlp"] not in (None, "routed") for s in self.layers) and "d_intermediate" not in self.mlp:
            raise MambaKitError("HybridConfig.mlp must give d_intermediate when a layer has an MLP")
        need = {"d_intermediate", "num_experts", "top_k"}
        if any(s["mlp"] in ("moe", "routed") for s in self.layers) and not need <= set(self.moe):
            raise MambaKitError("HybridConfig.moe must give d_intermediate, num_experts and top_k when a layer is "
                                f"'moe' or 'routed', got {self.moe!r}")

    def _check_shared(self, i: int, spec: dict[str, Any]) -> None:
        if spec.get("shared") is None:
            return
        blocks = self.shared.get("num_blocks", 0)
        b = spec["shared"]
        if spec["mixer"] != "mamba2" or not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < blocks:
            raise MambaKitError(f"HybridConfig.layers[{i}]: 'shared' must index one of the "
                                f"shared['num_blocks']={blocks} shared blocks, on a 'mamba2' layer; got {spec!r}")
        if not {"num_heads", "d_intermediate"} <= set(self.shared):
            raise MambaKitError(f"HybridConfig.shared must give num_heads and d_intermediate "
                                f"when a layer uses a shared "
                                f"block, got {self.shared!r}")

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def attn_layer_idx(self) -> list[int]:
        """The layers holding attention (whose KV cache grows with the context): attention and parallel mixers, and
        the layers using a shared block."""
        return [i for i, s in enumerate(self.layers)
                if s["mixer"] in ("attention", "parallel") or s.get("shared") is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HybridConfig":
        return config_from_dict(cls, data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


class HybridBlock(nn.Module):
    """Layer `layer_idx` of a HybridConfig: the mixer part and / or the MLP part, each pre-norm with a residual."""

    def __init__(self, config: HybridConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        spec = config.layers[layer_idx]
        factory = {"device": device, "dtype": dtype}
        self.residual_multiplier = float(config.residual_multiplier)
        self.norm = self.mixer = self.norm2 = self.mlp = None
        try:
            if spec["mixer"] is not None:
                self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon, **factory)
                mixer_cls, kwargs = {"mamba2": (Mamba2, config.mamba2), "mamba": (Mamba, config.mamba),
                                     "attention": (MHA, config.attention),
                                     "parallel": (ParallelMixer, dict(config.parallel, attention=config.attention,
                                                                      mamba2=config.mamba2))}[spec["mixer"]]
                self.mixer = mixer_cls(config.d_model, layer_idx=layer_idx, **kwargs, **factory)
            if spec["mlp"] is not None:
                self.norm2 = RMSNorm(config.d_model, eps=config.norm_epsilon, **factory)
                if spec["mlp"] == "moe":
                    self.mlp = SharedExpertMoE(config.d_model, config.moe, config.mlp, **factory)
                elif spec["mlp"] == "routed":
                    self.mlp = TopKMoE(config.d_model, **config.moe, **factory)
                else:
                    mlp = dict(config.mlp)
                    multipliers = mlp.pop("multipliers", None)
                    self.mlp = MLP(config.d_model, gated=spec["mlp"] == "gated", **mlp, **factory)
                    if multipliers is not None:
                        scale_mlp_(self.mlp, *multipliers)
            self.shared = None
            if spec.get("shared") is not None:
                s = config.shared
                self.shared = SharedUse(config.d_model, spec["shared"], s.get("adapter_rank", 0),
                                        s["d_intermediate"], s.get("attention_adapters", False), **factory)
        except TypeError as exc:
            raise MambaKitError(f"invalid HybridConfig for layer {layer_idx} ({spec}): {exc}") from exc

    def _residual(self, hidden: Tensor, branch: Tensor) -> Tensor:
        if self.residual_multiplier != 1.0:
            branch = branch * self.residual_multiplier
        return hidden + branch

    def forward(self, hidden: Tensor, state=None, step: bool = False, shared: Optional[nn.ModuleList] = None,
                embeddings: Optional[Tensor] = None, **mixer_kwargs) -> Tensor:
        """hidden: (batch, seqlen, d_model) -> (batch, seqlen, d_model). state: the layer's cache entry (or None).
        shared, embeddings: the backbone's shared blocks and the token embeddings (batch, seqlen, d_model), read by
        a layer that uses a shared block."""
        if self.mixer is not None:
            mixer_in = hidden
            if self.shared is not None:
                kv = None if state is None else state.kv
                state = None if state is None else state.ssm
                mixer_in = hidden + self.shared(shared[self.shared.block], hidden, embeddings, kv, **mixer_kwargs)
            normed = self.norm(mixer_in)
            out = self.mixer.step(normed, state) if step else self.mixer(normed, state=state, **mixer_kwargs)
            hidden = self._residual(hidden, out)
        if self.mlp is not None:
            hidden = self._residual(hidden, self.mlp(self.norm2(hidden)))
        return hidden


class HybridBackbone(nn.Module):
    def __init__(self, config: HybridConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(HybridBlock(config, i, device=device, dtype=dtype) for i in range(config.n_layer))
        self.shared_blocks = None
        if config.shared:
            kwargs = shared_block_kwargs(config.shared)
            try:
                self.shared_blocks = nn.ModuleList(SharedBlock(config.d_model, **kwargs, device=device, dtype=dtype)
                                                   for _ in range(config.shared.get("num_blocks", 0)))
            except TypeError as exc:
                raise MambaKitError(f"invalid HybridConfig.shared {config.shared}: {exc}") from exc
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)

    def forward(self, input_ids: Optional[Tensor], cache: Optional[InferenceCache] = None, step: bool = False,
                inputs_embeds: Optional[Tensor] = None, **mixer_kwargs) -> Tensor:
        """input_ids: (batch, seqlen), or inputs_embeds: (batch, seqlen, d_model) -> (batch, seqlen, d_model) after
        the final norm, divided by logits_scaling (so that the LM head's output is the logits)."""
        hidden = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.embedding_multiplier != 1.0:
            hidden = hidden * self.config.embedding_multiplier
        if self.shared_blocks is not None:
            mixer_kwargs.update(shared=self.shared_blocks, embeddings=hidden)
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            hidden = layer(hidden, state=state, step=step, **mixer_kwargs)
        hidden = self.norm_f(hidden)
        if self.config.logits_scaling != 1.0:
            hidden = hidden / self.config.logits_scaling
        return hidden


class HybridLM(CausalLM):
    """Hybrid language model. `model(input_ids).logits`: (batch, seqlen, padded_vocab_size); the cache holds each
    layer's own state (a KVState for attention, an SSMState for Mamba / Mamba-2, a ParallelState for a parallel mixer,
    a SharedUseState for a layer using a shared block, None for an MLP-only layer)."""

    def __init__(self, config: HybridConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise MambaKitError(f"HybridLM needs a HybridConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = HybridBackbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.apply(partial(_init_weights, n_layer=config.n_layer, n_residuals_per_layer=2))
        self.tie_weights()

    def allocate_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None,
                       state_dtype: Optional[torch.dtype] = None) -> InferenceCache:
        """Zero decoding state of every layer; dtype and state_dtype as `MambaLMHeadModel.allocate_cache` (the
        attention layers' KV caches stay in dtype)."""
        states = [None if layer.mixer is None else allocate_mixer_state(layer.mixer, batch_size, dtype, device,
                                                                        state_dtype)
                  for layer in self.backbone.layers]
        for i, layer in enumerate(self.backbone.layers):
            if layer.shared is not None:
                kv = self.backbone.shared_blocks[layer.shared.block].allocate_state(batch_size, dtype, device)
                states[i] = SharedUseState(ssm=states[i], kv=kv)
        return InferenceCache(states=states)
