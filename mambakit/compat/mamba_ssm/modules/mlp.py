"""`mamba_ssm.modules.mlp.GatedMLP`: fc2(fc1_up(x) * activation(fc1_gate(x))), with the official parameters (fc1
packs the up half first, then the gate half; the width rounded up to a multiple of multiple_of)."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError

__all__ = ["GatedMLP"]


class GatedMLP(nn.Module):
    """Input (..., in_features) -> output (..., out_features); hidden width ceil(hidden / multiple_of) *
    multiple_of, hidden defaulting to int(8 * in_features / 3).

    The layout differs from mambakit's `layers.mlp.MLP(packed=True)` (whose gate is the first half), hence this
    small layer of its own, so that official state dicts load unchanged."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 activation: Callable[[Tensor], Tensor] = F.silu, bias: bool = False, multiple_of: int = 128,
                 device=None, dtype=None):
        super().__init__()
        if not callable(activation):
            raise MambaKitError(f"activation must be a callable (e.g. F.silu), got {activation!r}")
        if not isinstance(multiple_of, int) or multiple_of < 1:
            raise MambaKitError(f"multiple_of must be a positive int, got {multiple_of!r}")
        out_features = in_features if out_features is None else out_features
        hidden = int(8 * in_features / 3) if hidden_features is None else hidden_features
        hidden = -(-hidden // multiple_of) * multiple_of
        self.activation = activation
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features)."""
        up, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(up * self.activation(gate))
