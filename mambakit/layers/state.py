"""Inference state of one SSM layer: the conv state and the SSM state, updated in place while decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError

#: The SSM-state dtypes a Mamba-1 or Mamba-2 layer can decode with. Arithmetic is float32 (float64) whatever the
#: stored dtype; a 16-bit state halves the bytes a step reads and writes and rounds the state after every token
#: (what mamba_ssm and transformers keep for a 16-bit model).
SSM_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def ssm_state_dtype(model_dtype: torch.dtype, state_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The SSM state's dtype: state_dtype when given (one of SSM_STATE_DTYPES), else float32 (float64 for a float64
    model)."""
    if state_dtype is None:
        return torch.float64 if model_dtype == torch.float64 else torch.float32
    if state_dtype not in SSM_STATE_DTYPES:
        names = ", ".join(str(d) for d in SSM_STATE_DTYPES)
        raise MambaKitError(f"state_dtype must be None or one of {names}, got {state_dtype!r}")
    return state_dtype


def float_state(ssm: Tensor) -> Tensor:
    """ssm as the scans take an initial state: itself when float32 or float64, else a float32 copy."""
    return ssm if ssm.dtype in (torch.float32, torch.float64) else ssm.float()


@dataclass
class SSMState:
    """conv: (batch, conv_dim, d_conv), the last d_conv inputs of the conv;
    ssm: (batch, d_inner, d_state) for Mamba-1, (batch, nheads, headdim, d_state) for Mamba-2 (float32 unless the
    cache was allocated with another state_dtype)."""

    conv: Tensor
    ssm: Tensor

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, dropping finished rows) in place of the stored tensors."""
        self.conv = self.conv.index_select(0, index)
        self.ssm = self.ssm.index_select(0, index)


def allocate_mixer_state(mixer, batch_size: int, dtype: Optional[torch.dtype], device,
                         state_dtype: Optional[torch.dtype] = None):
    """mixer.allocate_state(batch_size, dtype, device), with the SSM state in state_dtype when given: a layer whose
    allocate_state takes one (`accepts_state_dtype`: Mamba, Mamba2, a parallel Mamba + attention mixer); a KV cache
    (attention) is unaffected; any other layer raises MambaKitError."""
    if state_dtype is None or getattr(mixer, "kv_cache_only", False):
        return mixer.allocate_state(batch_size, dtype=dtype, device=device)
    if not getattr(mixer, "accepts_state_dtype", False):
        raise MambaKitError(f"state_dtype={state_dtype} is for Mamba and Mamba2 layers; {type(mixer).__name__} keeps "
                            "its own state dtype: leave state_dtype None")
    return mixer.allocate_state(batch_size, dtype=dtype, device=device, state_dtype=state_dtype)
