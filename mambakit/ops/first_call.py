"""The public entry to the first-call compiles of the Triton ops (`mambakit.ops.triton.compile`) for a module.

A mixer layer calls `precompile_module_call` before its first call on CUDA, so that every Triton kernel of its
forward and backward compiles in one parallel batch instead of one op after the other.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from mambakit.ops.backends import kernels


@functools.lru_cache(maxsize=None)
def _compile_module():  # None without Triton
    return kernels("mambakit.ops.triton.compile")


def precompile_module_call(module: nn.Module, hidden_states: Tensor, seq_idx: Optional[Tensor],
                           mask: Optional[Tensor]) -> None:
    """Before ``module(hidden_states, seq_idx=seq_idx, mask=mask)`` (no recurrent state) on CUDA: the first time
    for this configuration, compile the Triton kernels of that call and of its backward in parallel processes.
    hidden_states: (batch, seqlen, d_model). Nothing happens off CUDA, while torch.compile traces, or without
    Triton."""
    if not hidden_states.is_cuda or torch.compiler.is_compiling():  # nothing to compile; nothing to trace
        return
    compile_ = _compile_module()
    if compile_ is None:
        return
    compile_.precompile_once(compile_.module_call_key(module, hidden_states, seq_idx, mask),
                             compile_.module_first_call(module, hidden_states, seq_idx=seq_idx, mask=mask))
