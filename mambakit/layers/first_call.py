"""A mixer layer's first call on CUDA: every Triton kernel of its forward and backward compiled at once.

Each Triton op compiles its own first call side by side (`mambakit.ops.triton.compile`), but one op after the
other. A layer's dry run notes the compiles of all its ops (forward and backward), so that they all go into one
parallel batch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn


@functools.lru_cache(maxsize=None)
def _compile_module():  # None without Triton
    try:
        from mambakit.ops.triton import compile as triton_compile
    except ImportError:
        return None
    return triton_compile


def compile_first_call(layer: nn.Module, hidden_states: Tensor, seq_idx: Optional[Tensor],
                       mask: Optional[Tensor]) -> None:
    """Before ``layer(hidden_states, seq_idx=seq_idx, mask=mask)`` (no recurrent state) on CUDA: the first time
    for this configuration, compile the Triton kernels of that call and of its backward in parallel processes."""
    if not hidden_states.is_cuda or torch.compiler.is_compiling():  # nothing to compile; nothing to trace
        return
    compile_ = _compile_module()
    if compile_ is None:
        return
    compile_.precompile_once(compile_.module_call_key(layer, hidden_states, seq_idx, mask),
                             compile_.module_first_call(layer, hidden_states, seq_idx=seq_idx, mask=mask))
