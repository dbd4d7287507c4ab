"""The official mixers' inference surface on mambakit's layers: `inference_params=` on forward, step(hidden_states,
conv_state, ssm_state) and allocate_inference_cache(batch_size, max_seqlen, dtype=None)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.compat.mamba_ssm.utils.generation import states_of
from mambakit.errors import MambaKitError
from mambakit.layers.state import SSMState


class OfficialInference:
    """Mixed into a subclass of a mambakit mixer (Mamba or Mamba2); the states live in the official places."""

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: Optional[torch.dtype] = None,
                                 **kwargs) -> Tuple[Tensor, Tensor]:
        """(conv_state (batch, conv_dim, d_conv), ssm_state); the SSM state in float32 whatever dtype (mambakit's
        choice: the state is accumulated over the whole sequence)."""
        state = self.allocate_state(batch_size, dtype=dtype)
        return state.conv, state.ssm

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One token, hidden_states (batch, 1, d_model) -> (out (batch, 1, d_model), conv_state, ssm_state), the
        states updated in place."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise MambaKitError(f"hidden_states must have shape (batch, 1, d_model) for a step, got "
                                f"{tuple(hidden_states.shape)}")
        out = super().step(hidden_states, SSMState(conv=conv_state, ssm=ssm_state))
        return out, conv_state, ssm_state

    def cached_forward(self, hidden_states: Tensor, inference_params, **kwargs) -> Tensor:
        """(batch, seqlen, d_model) -> same, from (and into) this layer's state in inference_params: a one-token step
        once inference_params.seqlen_offset > 0 and seqlen is 1; else the forward continuing from the cached state
        (a prefill, or several new tokens after it: speculative decoding)."""
        state = states_of(self, inference_params, hidden_states.shape[0])
        if inference_params.seqlen_offset > 0 and hidden_states.shape[1] == 1:
            return super().step(hidden_states, state)
        return super().forward(hidden_states, state=state, **kwargs)
