"""The feed-forward layers of the hybrid stacks, with the parameter names of transformers' Llama-style MLPs.

gated (SwiGLU and the like): down_proj(act(gate_proj(x)) * up_proj(x)); plain: down_proj(act(up_proj(x))).
packed (gated only): one gate_up_proj whose first half of outputs is the gate, as Granite's input_linear.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


#: activation name (as transformers spells it) -> function
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "relu2": _relu2, "relu": F.relu,
                                                      "gelu": F.gelu}


class MLP(nn.Module):
    """Feed-forward layer. Input and output: (..., d_model); hidden width d_intermediate."""

    def __init__(self, d_model: int, d_intermediate: int, activation: str = "silu", gated: bool = True,
                 bias: bool = False, packed: bool = False, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise MambaKitError(f"MLP activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        for name, value in (("d_model", d_model), ("d_intermediate", d_intermediate)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MambaKitError(f"MLP {name} must be a positive integer, got {value!r}")
        factory = {"bias": bias, "device": device, "dtype": dtype}
        if packed and not gated:
            raise MambaKitError("MLP packed=True needs gated=True (it packs the gate and up projections)")
        self.activation, self.gated, self.packed = activation, gated, packed
        self.act = ACTIVATIONS[activation]
        if packed:
            self.gate_up_proj = nn.Linear(d_model, 2 * d_intermediate, **factory)
        else:
            if gated:
                self.gate_proj = nn.Linear(d_model, d_intermediate, **factory)
            self.up_proj = nn.Linear(d_model, d_intermediate, **factory)
        self.down_proj = nn.Linear(d_intermediate, d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        up = self.up_proj(x)
        hidden = self.act(self.gate_proj(x)) * up if self.gated else self.act(up)
        return self.down_proj(hidden)
