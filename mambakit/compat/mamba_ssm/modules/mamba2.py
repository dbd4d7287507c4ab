"""`mamba_ssm.modules.mamba2.Mamba2`: mambakit's Mamba-2 layer (same parameters) with the official signatures.

Accepted and ignored: use_mem_eff_path and sequence_parallel (mambakit's dispatchers choose the kernels).
Refused with MambaKitError: a process_group (tensor parallelism is `mambakit.distributed`), d_ssm other than
d_inner (the gated-MLP split of the official layer), cu_seqlens (variable-length batches).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mambakit.compat.mamba_ssm.modules.inference import OfficialInference
from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2 as MambaKitMamba2

__all__ = ["Mamba2"]


class Mamba2(OfficialInference, MambaKitMamba2):
    """Input and output: (batch, seqlen, d_model), or (batch * seqlen, d_model) with seqlen given."""

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: Optional[float] = None,
                 expand: int = 2, headdim: int = 64, d_ssm: Optional[int] = None, ngroups: int = 1,
                 A_init_range: tuple = (1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple = (0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: Optional[int] = None, process_group=None, sequence_parallel: bool = True, device=None,
                 dtype=None):
        if process_group is not None:
            raise MambaKitError("process_group must be None: mambakit.compat's Mamba2 is not sharded; for tensor "
                                "parallelism use mambakit.distributed (tensor_parallel), got "
                                f"{type(process_group).__name__}")
        d_inner = expand * d_model
        if d_ssm is not None and d_ssm != d_inner:
            raise MambaKitError(f"d_ssm must be None or d_inner = expand * d_model = {d_inner} (the gated-MLP split "
                                f"is not supported), got {d_ssm!r}")
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                         A_init_range=tuple(A_init_range), D_has_hdim=D_has_hdim, rmsnorm=rmsnorm,
                         norm_before_gate=norm_before_gate, dt_min=dt_min, dt_max=dt_max,
                         dt_init_floor=dt_init_floor, dt_limit=dt_limit, bias=bias, conv_bias=conv_bias,
                         chunk_size=chunk_size, layer_idx=layer_idx, device=device, dtype=dtype)
        self.d_ssm, self.conv_init = d_inner, conv_init
        self.use_mem_eff_path, self.sequence_parallel, self.process_group = use_mem_eff_path, sequence_parallel, None
        if conv_init is not None:
            with torch.no_grad():
                nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

    def forward(self, u: Tensor, seqlen: Optional[int] = None, seq_idx: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, inference_params=None, **kwargs) -> Tensor:
        """u (batch, seqlen, d_model), or (batch * seqlen, d_model) with seqlen given -> the same shape.
        seq_idx: (batch, seqlen) packed sequences; inference_params: the official decoding state."""
        if cu_seqlens is not None:
            raise MambaKitError("cu_seqlens is not supported by mambakit.compat yet; pack the sequences with seq_idx "
                                "instead, got a tensor")
        x = u if seqlen is None else u.reshape(-1, seqlen, u.shape[-1])
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        if inference_params is not None:
            out = self.cached_forward(x, inference_params, **kwargs)
        else:
            out = super().forward(x, **kwargs)
        return out if seqlen is None else out.reshape(u.shape)
