"""`mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel`: mambakit's LM with the official inference surface.

forward(input_ids, position_ids=None, inference_params=None, num_last_tokens=0) -> .logits (batch, seqlen or
num_last_tokens, padded_vocab); with inference_params the layers' states live in its key_value_memory_dict
(allocated on first use) and a one-token call after the prompt (seqlen_offset > 0) is a decode step.
allocate_inference_cache(batch_size, max_seqlen, dtype=None) -> {layer_idx: (conv_state, ssm_state)}.
generate: the official decode loop (`mambakit.compat.mamba_ssm.utils.generation`). mambakit's own forward keywords
(cache, labels, seq_idx, attention_mask, inputs_embeds) still work when inference_params is None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.compat.mamba_ssm.utils.generation import GenerationMixin, as_official, states_of
from mambakit.models.io import from_pretrained as load_pretrained
from mambakit.models.lm import CausalLMOutput, InferenceCache, MixerModel
from mambakit.models.lm import MambaLMHeadModel as MambaKitLMHeadModel

__all__ = ["MambaLMHeadModel", "MixerModel"]


class MambaLMHeadModel(GenerationMixin, MambaKitLMHeadModel):
    """mambakit's `MambaLMHeadModel` (same modules, parameters and checkpoints) with the official signatures."""

    def __init__(self, config, initializer_cfg: Optional[dict] = None, device=None, dtype=None):
        super().__init__(config, device=device, dtype=dtype)  # initializer_cfg: accepted; mambakit's init is used

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: Optional[torch.dtype] = None,
                                 **kwargs) -> dict:
        """{layer_idx: (conv_state, ssm_state)} for SSM layers (mambakit's state object for attention layers);
        max_seqlen is not needed by the constant-size SSM states."""
        cache = self.allocate_cache(batch_size, dtype=dtype)
        return {i: as_official(s) for i, s in enumerate(cache.states)}

    def forward(self, input_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inference_params=None, num_last_tokens: int = 0, **kwargs):
        """Official forward (see the module docstring); without inference_params mambakit's forward."""
        if inference_params is None:
            return super().forward(input_ids, num_last_tokens=num_last_tokens, **kwargs)
        batch = input_ids.shape[0]
        states = [states_of(layer.mixer, inference_params, batch) for layer in self.backbone.layers]
        cache = InferenceCache(states=states, seqlen_offset=inference_params.seqlen_offset)
        if inference_params.seqlen_offset > 0 and input_ids.shape[1] == 1 and not kwargs:
            logits = self.step(input_ids, cache)[:, None]
            return CausalLMOutput(logits=logits)
        return super().forward(input_ids, cache=cache, num_last_tokens=num_last_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs) -> "MambaLMHeadModel":
        """A local checkpoint folder (transformers, mamba_ssm or mambakit format; no download)."""
        model = load_pretrained(pretrained_model_name, device=device or "cpu", dtype=dtype)
        model.__class__ = cls  # the same modules and parameters: only the methods above differ
        return model
