"""Falcon-H1's mixer: attention and a Mamba-2 mixer side by side on the same normed input, their outputs summed
(transformers' `FalconH1DecoderLayer`), with the µP multipliers of its config.

out = ssm_out_multiplier * mamba(ssm_in_multiplier * x) + attention_out_multiplier * attention(attention_in_multiplier
* x). The Mamba-2 mixer's inner width is d_ssm (not tied to expand * d_model: in_proj gives [z, x, B, C, dt] of
widths [d_ssm, d_ssm, ngroups * d_state, ngroups * d_state, nheads], each scaled by its entry of ssm_multipliers),
and the attention's keys are scaled by key_multiplier after their projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA, KVState
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.mlp import MLP
from mambakit.layers.state import SSMState, allocate_mixer_state


class ScaledLinear(nn.Linear):
    """nn.Linear whose output is multiplied, per run of output features, by a constant: ``segments`` lists
    (width, multiplier) pairs covering out_features in order. Parameters as nn.Linear (weight, bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, segments: Sequence[tuple[int, float]],
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if sum(w for w, _ in segments) != out_features:
            raise MambaKitError(f"ScaledLinear segments {list(segments)} must cover out_features={out_features}")
        self.segments = tuple((int(w), float(m)) for w, m in segments if w)

    def _scale(self, y: Tensor) -> Tensor:
        key = (y.dtype, y.device)
        cached = self.__dict__.get("_scale_cache")
        if cached is None or cached[0] != key:
            parts = [torch.full((w,), m, dtype=torch.float32) for w, m in self.segments]
            cached = (key, torch.cat(parts).to(device=y.device, dtype=y.dtype))
            self.__dict__["_scale_cache"] = cached
        return cached[1]

    def scale_output(self, y: Tensor) -> Tensor:
        """y (..., out_features) times each output feature's multiplier (what forward applies after the product;
        a LoRA adapter on this layer scales its own product with it too)."""
        if len(self.segments) == 1:
            return y if self.segments[0][1] == 1.0 else y * self.segments[0][1]
        return y * self._scale(y)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale_output(F.linear(x, self.weight, self.bias))


def scaled(linear: nn.Linear, segments: Sequence[tuple[int, float]]) -> ScaledLinear:
    """A ScaledLinear of linear's shape, bias and device / dtype (its own fresh parameters)."""
    return ScaledLinear(linear.in_features, linear.out_features, linear.bias is not None, segments,
                        device=linear.weight.device, dtype=linear.weight.dtype)


def scale_mlp_(mlp: MLP, gate_multiplier: float, down_multiplier: float) -> MLP:
    """Make a gated, unpacked `mlp` compute down_multiplier * down_proj(act(gate_multiplier * gate_proj(x)) *
    up_proj(x)) (Falcon-H1's mlp_multipliers); returns it."""
    if not mlp.gated or mlp.packed:
        raise MambaKitError("MLP multipliers need a gated MLP with separate gate_proj and up_proj")
    mlp.gate_proj = scaled(mlp.gate_proj, [(mlp.gate_proj.out_features, gate_multiplier)])
    mlp.down_proj = scaled(mlp.down_proj, [(mlp.down_proj.out_features, down_multiplier)])
    return mlp


class NarrowMamba2(Mamba2):
    """`Mamba2` whose inner width d_inner is d_ssm (any multiple of headdim) rather than expand * d_model, whose
    in_proj output is scaled by ssm_multipliers = [z, x, B, C, dt] and whose out_proj has its own bias flag.
    Parameters and surface as Mamba2; ``d_model`` is the layer's input and output width."""

    def __init__(self, d_model: int, d_ssm: int, ssm_multipliers: Sequence[float] = (1.0,) * 5,
                 out_proj_bias: Optional[bool] = None, device=None, dtype=None, **kwargs: Any):
        kwargs.pop("expand", None)
        if len(ssm_multipliers) != 5:
            raise MambaKitError(f"ssm_multipliers must hold 5 numbers (z, x, B, C, dt), got {list(ssm_multipliers)}")
        # Mamba2 sizes everything inside from d_inner = expand * d_model: build it at d_inner = d_ssm, then give
        # in_proj and out_proj the real model width
        super().__init__(d_ssm, expand=1, device=device, dtype=dtype, **kwargs)
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model  # d_ssm is Mamba2's: nheads * headdim
        self.ssm_multipliers = tuple(float(m) for m in ssm_multipliers)
        gn = self.ngroups * self.d_state
        widths = (d_ssm, d_ssm, gn, gn, self.nheads)
        bias = self.in_proj.bias is not None
        self.in_proj = ScaledLinear(d_model, sum(widths), bias, list(zip(widths, self.ssm_multipliers)), **factory)
        self.out_proj = nn.Linear(d_ssm, d_model, bias=bias if out_proj_bias is None else out_proj_bias, **factory)


@dataclass
class ParallelState:
    """The cache entry of a parallel layer: its Mamba-2 mixer's state and its attention's KV cache."""

    ssm: SSMState
    kv: KVState

    def reorder(self, index: Tensor) -> None:
        self.ssm.reorder(index)
        self.kv.reorder(index)


class ParallelMixer(nn.Module):
    """Attention (`attn`, an MHA) and Mamba-2 (`mamba`, a NarrowMamba2) on the same input, outputs summed with
    their multipliers. Input and output: (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, attention: dict[str, Any], mamba2: dict[str, Any], d_ssm: Optional[int] = None,
                 ssm_multipliers: Sequence[float] = (1.0,) * 5, out_proj_bias: Optional[bool] = None,
                 key_multiplier: float = 1.0, attention_in_multiplier: float = 1.0,
                 attention_out_multiplier: float = 1.0, ssm_in_multiplier: float = 1.0, ssm_out_multiplier: float = 1.0,
                 layer_idx: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_ssm = d_ssm or mamba2.get("expand", 2) * d_model
        self.d_model, self.layer_idx = d_model, layer_idx
        self.mamba = NarrowMamba2(d_model, d_ssm, ssm_multipliers, out_proj_bias, layer_idx=layer_idx, **mamba2,
                                  **factory)
        self.attn = MHA(d_model, layer_idx=layer_idx, **attention, **factory)
        if not self.attn.separate_qkv:
            raise MambaKitError("ParallelMixer's attention needs separate_qkv=True (its key_multiplier scales k_proj)")
        k = self.attn.k_proj
        self.attn.k_proj = scaled(k, [(k.out_features, key_multiplier)])
        self.key_multiplier = float(key_multiplier)
        self.multipliers = dict(attention_in=float(attention_in_multiplier),
                                attention_out=float(attention_out_multiplier),
                                ssm_in=float(ssm_in_multiplier), ssm_out=float(ssm_out_multiplier))

    #: allocate_state takes a state_dtype for the Mamba part (`mambakit.layers.state.SSM_STATE_DTYPES`)
    accepts_state_dtype = True

    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None,
                       state_dtype: Optional[torch.dtype] = None) -> ParallelState:
        return ParallelState(ssm=allocate_mixer_state(self.mamba, batch_size, dtype, device, state_dtype),
                             kv=self.attn.allocate_state(batch_size, dtype=dtype, device=device))

    @staticmethod
    def _times(x: Tensor, m: float) -> Tensor:
        return x if m == 1.0 else x * m

    def _combine(self, ssm_out: Tensor, attn_out: Tensor) -> Tensor:
        m = self.multipliers
        return self._times(ssm_out, m["ssm_out"]) + self._times(attn_out, m["attention_out"])

    def forward(self, hidden_states: Tensor, state: Optional[ParallelState] = None, seq_idx: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model). state: continue from it and update
        it; mask: (batch, seqlen) 1 = token, 0 = padding."""
        m = self.multipliers
        ssm = self.mamba(self._times(hidden_states, m["ssm_in"]), state=None if state is None else state.ssm,
                         seq_idx=seq_idx, mask=mask)
        attn = self.attn(self._times(hidden_states, m["attention_in"]), state=None if state is None else state.kv,
                         seq_idx=seq_idx, mask=mask)
        return self._combine(ssm, attn)

    def step(self, hidden_states: Tensor, state: ParallelState) -> Tensor:
        """One decoding step: (batch, 1, d_model) or (batch, d_model), the state updated in place."""
        m = self.multipliers
        ssm = self.mamba.step(self._times(hidden_states, m["ssm_in"]), state.ssm)
        attn = self.attn.step(self._times(hidden_states, m["attention_in"]), state.kv)
        return self._combine(ssm, attn)
