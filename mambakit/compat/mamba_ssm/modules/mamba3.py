"""`mamba_ssm.modules.mamba3.Mamba3`: mambakit's Mamba-3 layer (same parameters and state_dict keys) with the
official signatures: the constructor (SISO or MIMO, `is_outproj_norm`), forward(u, seq_idx, cu_seqlens,
inference_params), step(u, angle_state, ssm_state, k_state, v_state) and allocate_inference_cache.

A per token is clamp(-f(dd_A), max=-A_floor) with the heavy-tail f of the official main branch; the keyword
A_activation="softplus" (mambakit's, absorbed by the official **kwargs) gives the 2.3.2.post1 release's. Accepted
and ignored as official: dropout, n_layer, other keywords; fuse_pregate_headwise_norm (the fused and the unfused
MIMO norm compute the same). The decode states are float32 (float64 for a float64 layer), k and v too (the
official: the layer's dtype).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.compat.mamba_ssm.modules.mamba2 import seq_idx_of
from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import check_cu_seqlens
from mambakit.errors import MambaKitError
from mambakit.layers.mamba3 import Mamba3 as MambaKitMamba3
from mambakit.layers.mamba3 import Mamba3State

__all__ = ["Mamba3"]

States = Tuple[Tensor, Tensor, Tensor, Tensor]


class Mamba3(MambaKitMamba3):
    """Input and output: (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64, ngroups: int = 1,
                 rope_fraction: float = 0.5, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_floor: float = 1e-4, is_outproj_norm: bool = False, is_mimo: bool = False, mimo_rank: int = 4,
                 fuse_pregate_headwise_norm: bool = True, chunk_size: int = 64, dropout: float = 0.0,
                 layer_idx: Optional[int] = None, n_layer: Optional[int] = None, device=None, dtype=None, **kwargs):
        super().__init__(d_model, d_state=d_state, expand=expand, headdim=headdim, ngroups=ngroups,
                         rope_fraction=rope_fraction, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                         A_floor=A_floor, A_activation=kwargs.get("A_activation", "heavy_tail"),
                         is_outproj_norm=is_outproj_norm, is_mimo=is_mimo, mimo_rank=mimo_rank,
                         chunk_size=chunk_size, layer_idx=layer_idx, device=device, dtype=dtype)
        self.fuse_pregate_headwise_norm = bool(fuse_pregate_headwise_norm and is_mimo and is_outproj_norm)
        self.rotary_dim_divisor = int(2 / rope_fraction)
        self.split_tensor_size = 2 * self.num_rope_angles

    # ------------------------------------------------------------------------------------------------------------------
    def _as_state(self, angle_state: Tensor, ssm_state: Tensor, k_state: Tensor, v_state: Tensor) -> Mamba3State:
        """The official four states (k (batch, R or 1, nheads, d_state)) as the Mamba3State the layer updates in
        place (views, so the official tensors are the ones updated)."""
        if k_state.dim() != 4 or k_state.shape[1] != self.mimo_rank:
            raise MambaKitError(f"k_state must have shape (batch, {self.mimo_rank}, nheads={self.nheads}, "
                                f"d_state={self.d_state}), got {tuple(k_state.shape)}")
        return Mamba3State(angle_state, ssm_state, k_state if self.is_mimo else k_state[:, 0], v_state)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None,
                                 inplace_state=None, **kwargs) -> States:
        """(angle_state (batch, nheads, num_rope_angles), ssm_state (batch, nheads, headdim, d_state), k_state
        (batch, R or 1, nheads, d_state), v_state (batch, nheads, headdim)), zero, float32 (float64 for float64)."""
        s = self.allocate_state(batch_size, dtype=dtype, device=device)
        return s.angle, s.ssm, s.k if self.is_mimo else s.k[:, None], s.v

    def _states(self, inference_params, batch: int) -> Mamba3State:
        """This layer's states in inference_params.key_value_memory_dict[layer_idx] (the official tuple), allocated
        on first use."""
        if self.layer_idx is None:
            raise MambaKitError("inference_params needs the layer's layer_idx (the key of its cache), got None")
        store = inference_params.key_value_memory_dict
        if self.layer_idx not in store:
            store[self.layer_idx] = self.allocate_inference_cache(batch, inference_params.max_seqlen)
        return self._as_state(*store[self.layer_idx])

    def forward(self, u: Tensor, seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                inference_params=None, **kwargs) -> Tensor:
        """u (batch, seqlen, d_model) -> same. seq_idx (batch, seqlen): packed sequences, the state restarts where it
        changes (the official accepts it and does not use it); cu_seqlens (num_seqs + 1,): the bounds of the
        sequences packed in a batch of 1; inference_params: the official decoding state (a prefill into it, each
        packed sequence into its own row with cu_seqlens; once seqlen_offset > 0, a one-token step or several new
        tokens continuing from the cached state)."""
        if cu_seqlens is not None:
            bounds = check_cu_seqlens(cu_seqlens, u.shape[0], u.shape[1])
            derived = seq_idx_of(bounds, u.device)
            if seq_idx is not None and not torch.equal(seq_idx.to(derived), derived):
                raise MambaKitError(f"seq_idx must agree with cu_seqlens {bounds}, got {seq_idx.tolist()}")
            seq_idx = derived
        if inference_params is None:
            return super().forward(u, seq_idx=seq_idx, **kwargs)
        batch = len(bounds) - 1 if cu_seqlens is not None else u.shape[0]
        state = self._states(inference_params, batch)
        if inference_params.seqlen_offset > 0 and u.shape[1] == 1:
            return MambaKitMamba3.step(self, u, state)  # else several tokens continue from the state too
        if cu_seqlens is None:
            return super().forward(u, state=state, seq_idx=seq_idx, **kwargs)
        rows = [Mamba3State(*(t[i:i + 1] for t in state.parts())) for i in range(batch)]
        outs = [MambaKitMamba3.forward(self, u[:, a:b], state=rows[i], **kwargs)
                for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]
        return torch.cat(outs, dim=1)

    def step(self, u: Tensor, angle_state: Tensor, ssm_state: Tensor, k_state: Tensor, v_state: Tensor,
             **kwargs) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One token: u (batch, d_model) (or (batch, 1, d_model)) -> (out of u's shape, angle_state, ssm_state,
        k_state, v_state), the states (from `allocate_inference_cache`) updated in place."""
        if u.dim() not in (2, 3) or (u.dim() == 3 and u.shape[1] != 1):
            raise MambaKitError(f"u must have shape (batch, d_model) or (batch, 1, d_model) for a step, got "
                                f"{tuple(u.shape)}")
        out = MambaKitMamba3.step(self, u, self._as_state(angle_state, ssm_state, k_state, v_state))
        return out, angle_state, ssm_state, k_state, v_state
