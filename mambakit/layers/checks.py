"""The argument checks every mixer's ``forward`` makes first: a MambaKitError naming the argument, the expected and
the actual value, instead of a raw torch error deep inside (or a silently wrong result)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise MambaKitError(f"{name} must be a torch.Tensor, got {type(value).__name__} (convert it with "
                            f"torch.as_tensor)")
    return value


def check_mask(mask: object, batch: int, seqlen: int, name: str = "mask") -> None:
    """mask: (batch, seqlen) holding only 0 (padding) and 1 (token), any real dtype or bool."""
    mask = _require_tensor(name, mask)
    if tuple(mask.shape) != (batch, seqlen):
        raise MambaKitError(f"{name} must have shape (batch={batch}, seqlen={seqlen}), got {tuple(mask.shape)}")
    if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise MambaKitError(f"{name} must hold only 0 (padding) and 1 (token)")


def check_mixer_input(layer: nn.Module, hidden_states: object, seq_idx: Optional[object] = None,
                      mask: Optional[object] = None) -> None:
    """Check a mixer's forward arguments against the layer (its ``d_model`` and ``in_proj`` weight).

    hidden_states: (batch, seqlen, d_model) floating tensor, batch and seqlen >= 1 (an empty sequence is refused:
    there is no state to continue from it), on the layer's device and in its dtype (any dtype under autocast).
    seq_idx: (batch, seqlen) integer tensor, optional. mask: see :func:`check_mask`, optional.
    """
    x = _require_tensor("hidden_states", hidden_states)
    d_model = layer.d_model
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise MambaKitError(f"hidden_states must have shape (batch, seqlen, d_model={d_model}), got "
                            f"{tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise MambaKitError(f"hidden_states must hold at least one position of one sequence (batch, seqlen >= 1), "
                            f"got shape {tuple(x.shape)}")
    weight = layer.in_proj.weight
    if x.device != weight.device:
        raise MambaKitError(f"hidden_states must be on the layer's device {weight.device}, got {x.device}")
    if not x.dtype.is_floating_point:
        raise MambaKitError(f"hidden_states must be a floating tensor, got dtype {x.dtype}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise MambaKitError(f"hidden_states must have the layer's dtype {weight.dtype} (cast the input or the layer "
                            f"with .to(), or run under torch.autocast), got {x.dtype}")
    batch, seqlen = x.shape[0], x.shape[1]
    if seq_idx is not None:
        seq_idx = _require_tensor("seq_idx", seq_idx)
        if tuple(seq_idx.shape) != (batch, seqlen):
            raise MambaKitError(f"seq_idx must have shape (batch={batch}, seqlen={seqlen}), got "
                                f"{tuple(seq_idx.shape)}")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise MambaKitError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    if mask is not None:
        check_mask(mask, batch, seqlen)
