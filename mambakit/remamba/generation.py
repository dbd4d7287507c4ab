"""Generation with ReMamba: the two-stage prefill, then ordinary one-token steps from the state after stage 2.

The decoding loop is `mambakit.models.generation.generate` itself, run on a thin view of the model whose prefill
is ReMamba's two stages and whose step is the base model's plain step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.models.generation import generate
from mambakit.models.lm import CausalLMOutput, InferenceCache
from mambakit.remamba.config import ReMambaConfig


class _TwoStagePrefill:
    """What `generate` calls on a model (config, allocate_cache, __call__ for the prefill, step), with the prefill
    replaced by ReMamba's stages 1 and 2 and everything else the base model's."""

    def __init__(self, model, remamba: ReMambaConfig):
        self.model, self.remamba = model, remamba
        self.config = model.base.config

    def allocate_cache(self, batch_size: int, dtype=None, device=None, state_dtype=None) -> InferenceCache:
        return self.model.base.allocate_cache(batch_size, dtype=dtype, device=device, state_dtype=state_dtype)

    def __call__(self, input_ids: Tensor, cache: InferenceCache, num_last_tokens: int = 0,
                 attention_mask: Optional[Tensor] = None) -> CausalLMOutput:
        if attention_mask is not None:
            raise MambaKitError("ReMamba generation takes no attention_mask (prompts of one batch share a length)")
        return self.model(input_ids, self.remamba, cache=cache, num_last_tokens=num_last_tokens)

    def step(self, input_ids: Tensor, cache: InferenceCache) -> Tensor:
        return self.model.base.step(input_ids, cache)


@torch.no_grad()
def remamba_generate(model, input_ids: Tensor, max_new_tokens: int, remamba: ReMambaConfig,
                     **sampling) -> Tensor:
    """model: a `ReMambaLM`. input_ids: (batch, L). sampling: the keyword arguments of `MambaLMHeadModel.generate`
    (temperature, top_k, top_p, min_p, repetition_penalty, seed, eos_token_id). Returns (batch, L + max_new_tokens):
    the prompt as given, then the new tokens. The decoding steps run without the delta hooks: only the compressed
    prompt positions are adapted, and each new token costs one plain step."""
    if not isinstance(remamba, ReMambaConfig):
        raise MambaKitError(f"remamba must be a ReMambaConfig, got {type(remamba).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise MambaKitError(f"input_ids must have shape (batch, seqlen >= 1), got {shape}")
    was_training = model.training
    model.eval()
    try:
        return generate(_TwoStagePrefill(model, remamba), input_ids, max_new_tokens, **sampling)
    finally:
        model.train(was_training)
