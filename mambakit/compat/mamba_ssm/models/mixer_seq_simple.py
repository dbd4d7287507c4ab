"""`mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel`: mambakit's LM with the official inference surface.

forward(input_ids, position_ids=None, inference_params=None, num_last_tokens=0) -> .logits (batch, seqlen or
num_last_tokens, padded_vocab); with inference_params the layers' states live in its key_value_memory_dict
(allocated on first use) and a one-token call after the prompt (seqlen_offset > 0) is a decode step; with
cu_seqlens (and seq_idx) a packed batch of 1 prefills one cache row per sequence (SSM layers), as official.
allocate_inference_cache(batch_size, max_seqlen, dtype=None) -> {layer_idx: (conv_state, ssm_state)}.
generate: the official decode loop (`mambakit.compat.mamba_ssm.utils.generation`). mambakit's own forward keywords
(cache, labels, seq_idx, attention_mask, inputs_embeds) still work when inference_params is None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.compat.mamba_ssm.modules.mamba2 import seq_idx_of
from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import check_cu_seqlens
from mambakit.compat.mamba_ssm.utils.generation import GenerationMixin, as_official, states_of
from mambakit.errors import MambaKitError
from mambakit.layers.state import SSMState
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
        if kwargs.get("cu_seqlens") is not None:
            return self._varlen_prefill(input_ids, inference_params, num_last_tokens, **kwargs)
        kwargs.pop("cu_seqlens", None)
        batch = input_ids.shape[0]
        states = [states_of(layer.mixer, inference_params, batch) for layer in self.backbone.layers]
        cache = InferenceCache(states=states, seqlen_offset=inference_params.seqlen_offset)
        if inference_params.seqlen_offset > 0 and input_ids.shape[1] == 1 and not kwargs:
            logits = self.step(input_ids, cache)[:, None]
            return CausalLMOutput(logits=logits)
        return super().forward(input_ids, cache=cache, num_last_tokens=num_last_tokens, **kwargs)

    def _varlen_prefill(self, input_ids: Tensor, inference_params, num_last_tokens: int, cu_seqlens: Tensor,
                        seq_idx: Optional[Tensor] = None, **kwargs):
        """input_ids (1, total) packed -> logits (1, total or num_last_tokens, vocab); sequence i prefills row i of
        every layer's cached states (allocated for num_seqs rows on first use), as the official varlen prefill;
        positions past cu_seqlens[-1] are padding (their logits are computed, no state is kept from them)."""
        total = input_ids.shape[1]
        end = int(cu_seqlens[-1]) if isinstance(cu_seqlens, Tensor) and cu_seqlens.numel() else total
        bounds = check_cu_seqlens(cu_seqlens, input_ids.shape[0], end if 0 <= end <= total else total)
        derived = seq_idx_of(bounds, input_ids.device)
        if seq_idx is not None and not torch.equal(seq_idx[:, :end].to(derived), derived):
            raise MambaKitError(f"seq_idx must agree with cu_seqlens {bounds}, got {seq_idx.tolist()}")
        if inference_params.seqlen_offset > 0:
            raise MambaKitError(f"cu_seqlens with inference_params is a prefill: seqlen_offset must be 0, got "
                                f"{inference_params.seqlen_offset}")
        nseqs = len(bounds) - 1
        states = [states_of(layer.mixer, inference_params, nseqs) for layer in self.backbone.layers]
        for state in states:
            if not isinstance(state, SSMState) or state.ssm.shape[0] < nseqs:
                raise MambaKitError(f"a varlen prefill needs SSM layers whose cached states hold >= {nseqs} rows "
                                    f"(one per sequence), got {type(state).__name__}")
        logits = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if b == a:
                continue
            rows = [SSMState(conv=st.conv[i:i + 1], ssm=st.ssm[i:i + 1]) for st in states]
            out = super().forward(input_ids[:, a:b], cache=InferenceCache(states=rows, seqlen_offset=0), **kwargs)
            logits.append(out.logits)
        if end < total:  # padding after the last sequence (official): its logits, no state kept
            logits.append(super().forward(input_ids[:, end:], **kwargs).logits)
        logits = torch.cat(logits, dim=1)
        return CausalLMOutput(logits=logits[:, -num_last_tokens:] if num_last_tokens > 0 else logits)

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs) -> "MambaLMHeadModel":
        """A local checkpoint folder (transformers, mamba_ssm or mambakit format; no download)."""
        model = load_pretrained(pretrained_model_name, device=device or "cpu", dtype=dtype)
        model.__class__ = cls  # the same modules and parameters: only the methods above differ
        return model
