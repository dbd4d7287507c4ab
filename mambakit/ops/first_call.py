"""The public entry to the first-call compiles of the Triton ops (`mambakit.ops.triton.compile`) for a module.

A mixer layer calls `precompile_module_call` before its first call on CUDA, so that every Triton kernel of its
forward and backward compiles in one parallel batch instead of one op after the other.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mambakit.ops.backends import kernels

#: module -> the signature of its last call that went through `precompile_once` (see `precompile_call`)
_LAST_CALL: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


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
    precompile_call(compile_, module, hidden_states, seq_idx, mask)


def precompile_call(compile_: Any, module: nn.Module, hidden_states: Tensor, seq_idx: Optional[Tensor],
                    mask: Optional[Tensor]) -> None:
    """`precompile_module_call` past its checks (compile_: `mambakit.ops.triton.compile`). A call whose signature
    (the input's dtype, device and Triton specialisation, autocast, grad mode, which optional inputs are given) is
    the module's last one returns at once: the full key (`module_call_key`, which walks the module's settings and
    parameters: tens of us a call) is built only when the signature changes. A setting or parameter changed between
    two such calls then goes unseen, which only skips its parallel first-call compile (the ops compile their own)."""
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    signature = (hidden_states.dtype, hidden_states.device, autocast, torch.is_grad_enabled(), seq_idx is None,
                 mask is None, compile_.specialisation(*hidden_states.shape[:-1], hidden_states))
    if _LAST_CALL.get(module) == signature:
        return
    compile_.precompile_once(compile_.module_call_key(module, hidden_states, seq_idx, mask),
                             compile_.module_first_call(module, hidden_states, seq_idx=seq_idx, mask=mask))
    _LAST_CALL[module] = signature
