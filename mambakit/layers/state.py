"""Inference state of one SSM layer: the conv state and the SSM state, updated in place while decoding."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SSMState:
    """conv: (batch, conv_dim, d_conv), the last d_conv inputs of the conv;
    ssm: (batch, d_inner, d_state) for Mamba-1, (batch, nheads, headdim, d_state) for Mamba-2 (float32)."""

    conv: Tensor
    ssm: Tensor

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, dropping finished rows) in place of the stored tensors."""
        self.conv = self.conv.index_select(0, index)
        self.ssm = self.ssm.index_select(0, index)
