"""A mixer layer's first call on CUDA: every Triton kernel of its forward and backward compiled at once.

Each Triton op compiles its own first call side by side, but one op after the other. A layer's dry run notes the
compiles of all its ops (forward and backward), so that they all go into one parallel batch
(`mambakit.ops.first_call`). A layer with a dt transform installed skips it (the dry run would call the transform
once more); its ops then compile their own first calls.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mambakit.ops.first_call import precompile_module_call


def compile_first_call(layer: nn.Module, hidden_states: Tensor, seq_idx: Optional[Tensor],
                       mask: Optional[Tensor]) -> None:
    """Before ``layer(hidden_states, seq_idx=seq_idx, mask=mask)`` (no recurrent state) on CUDA: the first time
    for this configuration, compile the Triton kernels of that call and of its backward in parallel processes.
    hidden_states: (batch, seqlen, d_model)."""
    precompile_module_call(layer, hidden_states, seq_idx, mask)
