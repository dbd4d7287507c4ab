"""Tensors derived from weights (a compute-dtype copy, A = -exp(A_log)) kept per weight version,
so that a decode step does not form them at every token.

`derived(weight, kind, make)` returns make(weight) and keeps it for as long as the weight lives, keyed by the weight's
root tensor (a view such as `conv1d.weight.squeeze(1)` finds the entry of its parameter) and the kind; it is made
again when the weight changes: an in-place update (version counter), new storage (`load_state_dict` copies in place,
`.data =` swaps the storage), another dtype, device, shape or view of the root. `make` must depend on nothing but the
weight and the kind. Inference tensors (made under `torch.inference_mode`) have no version counter: they are not
cached (make runs at every call).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["derived", "float_copy", "negative_exp"]

# (id(root), kind) -> (weakref to the root, the weight's version key, the derived tensor)
_CACHE: dict[tuple[int, Any], tuple[Any, tuple, Tensor]] = {}


def _forget(key: tuple[int, Any]) -> None:
    _CACHE.pop(key, None)


def derived(weight: Tensor, kind: Any, make: Callable[[Tensor], Tensor]) -> Tensor:
    """make(weight) (detached, outside autograd), cached per weight version and kind (see the module docstring)."""
    root = weight._base if weight._base is not None else weight
    if root.is_inference():
        with torch.no_grad():
            return make(weight.detach())
    key = (id(root), kind)
    version = (root._version, root.data_ptr(), weight.dtype, weight.device, weight.shape, weight.stride(),
               weight.storage_offset())
    entry = _CACHE.get(key)
    if entry is not None and entry[1] == version and entry[0]() is root:
        return entry[2]
    with torch.no_grad():
        value = make(weight.detach())
    _CACHE[key] = (weakref.ref(root, lambda _, k=key: _forget(k)), version, value)
    return value


def float_copy(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight in dtype: weight itself when it has that dtype, else a copy kept per weight version."""
    if weight.dtype == dtype:
        return weight
    return derived(weight, ("to", dtype), lambda w: w.to(dtype))


def negative_exp(a_log: Tensor, dtype: torch.dtype) -> Tensor:
    """A = -exp(a_log) in dtype, kept per version of a_log."""
    return derived(a_log, ("-exp", dtype), lambda w: -torch.exp(w.to(dtype)))
