"""`mamba_ssm.modules.mamba_simple.Mamba`: mambakit's Mamba-1 layer (same parameters) with the official signatures.

use_fast_path is accepted and ignored: mambakit's dispatchers choose the kernels (Triton on CUDA, PyTorch on CPU).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from mambakit.compat.mamba_ssm.modules.inference import OfficialInference
from mambakit.layers.mamba import Mamba as MambaKitMamba

__all__ = ["Mamba"]


class Mamba(OfficialInference, MambaKitMamba):
    """Input and output: (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, use_fast_path: bool = True, layer_idx: Optional[int] = None, device=None,
                 dtype=None):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                         dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor,
                         conv_bias=conv_bias, bias=bias, layer_idx=layer_idx, device=device, dtype=dtype)
        self.use_fast_path = use_fast_path

    def forward(self, hidden_states: Tensor, inference_params=None, **kwargs) -> Tensor:
        """hidden_states (batch, seqlen, d_model) -> same; inference_params: the official decoding state (see
        `OfficialInference.cached_forward`); mambakit's keywords (state, seq_idx, mask, dt_transform) pass through."""
        if inference_params is not None:
            return self.cached_forward(hidden_states, inference_params, **kwargs)
        return super().forward(hidden_states, **kwargs)
