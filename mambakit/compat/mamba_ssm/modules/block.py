"""`mamba_ssm.modules.block.Block`: pre-norm residual block, norm -> mixer (-> norm2 -> mlp), passing the residual
stream along as the official does: forward returns (hidden_states, residual), the caller adds the last residual.

fused_add_norm: the add and the norm in one call of `layer_norm_fn` (the sum formed in float32, see
mambakit.compat's layer_norm); otherwise in PyTorch in the norm's dtype, as official. residual_in_fp32: the
residual returned is float32.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from mambakit.compat.mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn
from mambakit.errors import MambaKitError

__all__ = ["Block"]


class Block(nn.Module):
    """hidden_states, residual: (batch, seqlen, dim). mixer_cls(dim), mlp_cls(dim) (nn.Identity: no MLP) and
    norm_cls(dim) build the parts (functools.partial for their other arguments, as official)."""

    def __init__(self, dim: int, mixer_cls: Callable[[int], nn.Module], mlp_cls: Callable[[int], nn.Module],
                 norm_cls: Callable[[int], nn.Module] = nn.LayerNorm, fused_add_norm: bool = False,
                 residual_in_fp32: bool = False):
        super().__init__()
        self.residual_in_fp32, self.fused_add_norm = residual_in_fp32, fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None
        if fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, RMSNorm, nn.RMSNorm)):
            raise MambaKitError(f"fused_add_norm needs norm_cls to build nn.LayerNorm or RMSNorm, got "
                                f"{type(self.norm).__name__}")

    def _add_norm(self, norm: nn.Module, hidden_states: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.fused_add_norm:
            eps = norm.eps if norm.eps is not None else torch.finfo(hidden_states.dtype).eps
            return layer_norm_fn(hidden_states, norm.weight, getattr(norm, "bias", None), residual=residual,
                                 eps=eps, prenorm=True, residual_in_fp32=self.residual_in_fp32,
                                 is_rms_norm=not isinstance(norm, nn.LayerNorm))
        residual = hidden_states if residual is None else hidden_states + residual
        hidden_states = norm(residual.to(dtype=norm.weight.dtype))
        return hidden_states, residual.to(torch.float32) if self.residual_in_fp32 else residual

    def forward(self, hidden_states: Tensor, residual: Optional[Tensor] = None, inference_params=None,
                **mixer_kwargs) -> Tuple[Tensor, Tensor]:
        """hidden_states (batch, seqlen, dim): the previous block's output; residual: its residual (None in the
        first block) -> (this block's output, its residual), both (batch, seqlen, dim)."""
        hidden_states, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: Optional[torch.dtype] = None,
                                 **kwargs):
        """The mixer's cache (its allocate_inference_cache)."""
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
