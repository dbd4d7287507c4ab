"""`mamba_ssm.modules.mamba2.Mamba2`: mambakit's Mamba-2 layer (same parameters) with the official signatures.

Accepted and ignored: use_mem_eff_path (mambakit's dispatchers choose the kernels).
process_group: the layer is built as this rank's shard (a `ShardedMamba2`, which is also a
`mambakit.distributed.tensor_parallel.TensorParallelMamba2`): heads, groups and channels divided by the world size,
in_proj column parallel, out_proj row parallel, as official; with sequence_parallel (the official default) forward
and step take and return this rank's rows (dim 0) of the whole input and output.
d_ssm < d_inner: the SSM on d_ssm channels, a gated MLP silu(z0) * x0 on the other d_inner - d_ssm (as official).
cu_seqlens (a packed batch of 1, as official): seq_idx is derived from it, so the conv does not mix sequences and
the scan restarts at each; with inference_params, each sequence's final states go to row i of the cache.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from mambakit.compat.mamba_ssm.modules.inference import OfficialInference
from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import check_cu_seqlens
from mambakit.compat.mamba_ssm.utils.generation import states_of
from mambakit.distributed.collectives import gather_dim0, group_rank_world, split_dim0
from mambakit.distributed.tensor_parallel import TensorParallelMamba2
from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2 as MambaKitMamba2
from mambakit.layers.state import SSMState

__all__ = ["Mamba2", "ShardedMamba2"]


class Mamba2(OfficialInference, MambaKitMamba2):
    """Input and output: (batch, seqlen, d_model), or (batch * seqlen, d_model) with seqlen given. With a
    process_group the instance is a `ShardedMamba2`."""

    def __new__(cls, *args, **kwargs):
        # no arguments: copy and pickle re-creating an instance of its own class
        if cls is Mamba2 and (args or kwargs) and _bound(args, kwargs).get("process_group") is not None:
            cls = ShardedMamba2
        return super().__new__(cls)

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: Optional[float] = None,
                 expand: int = 2, headdim: int = 64, d_ssm: Optional[int] = None, ngroups: int = 1,
                 A_init_range: tuple = (1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple = (0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: Optional[int] = None, process_group=None, sequence_parallel: bool = True, device=None,
                 dtype=None):
        if process_group is not None and not isinstance(self, ShardedMamba2):
            raise MambaKitError(f"process_group: a subclass of Mamba2 is not sharded; build Mamba2 itself (it gives a "
                                f"ShardedMamba2), got {type(self).__name__}")
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                         A_init_range=tuple(A_init_range), D_has_hdim=D_has_hdim, rmsnorm=rmsnorm,
                         norm_before_gate=norm_before_gate, dt_min=dt_min, dt_max=dt_max,
                         dt_init_floor=dt_init_floor, dt_limit=dt_limit, bias=bias, conv_bias=conv_bias,
                         chunk_size=chunk_size, layer_idx=layer_idx, d_ssm=d_ssm, device=device, dtype=dtype)
        self.conv_init = conv_init
        self.use_mem_eff_path, self.sequence_parallel, self.process_group = use_mem_eff_path, sequence_parallel, None
        self.world_size, self.local_rank = 1, 0
        if conv_init is not None:
            with torch.no_grad():
                nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

    def forward(self, u: Tensor, seqlen: Optional[int] = None, seq_idx: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, inference_params=None, **kwargs) -> Tensor:
        """u (batch, seqlen, d_model), or (batch * seqlen, d_model) with seqlen given -> the same shape.
        seq_idx: (batch, seqlen) packed sequences; cu_seqlens: (num_seqs + 1,) the bounds of the sequences packed
        in a batch of 1; inference_params: the official decoding state."""
        x = u if seqlen is None else u.reshape(-1, seqlen, u.shape[-1])
        if cu_seqlens is not None:
            bounds = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
            derived = seq_idx_of(bounds, x.device)
            if seq_idx is not None and not torch.equal(seq_idx.to(derived), derived):
                raise MambaKitError(f"seq_idx must agree with cu_seqlens {bounds}, got {seq_idx.tolist()}")
            if inference_params is not None:
                out = self._varlen_prefill(x, bounds, inference_params, **kwargs)
                return out if seqlen is None else out.reshape(u.shape)
            seq_idx = derived
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        if inference_params is not None:
            out = self.cached_forward(x, inference_params, **kwargs)
        else:
            out = super().forward(x, **kwargs)
        return out if seqlen is None else out.reshape(u.shape)

    def _varlen_prefill(self, x: Tensor, bounds: list, inference_params, **kwargs) -> Tensor:
        """x (1, total, d_model) packed -> same; sequence i prefills row i of this layer's cached states."""
        if inference_params.seqlen_offset > 0:
            raise MambaKitError(f"cu_seqlens with inference_params is a prefill: seqlen_offset must be 0, got "
                                f"{inference_params.seqlen_offset}")
        state = states_of(self, inference_params, len(bounds) - 1)
        if state.ssm.shape[0] < len(bounds) - 1:
            raise MambaKitError(f"the cached states hold {state.ssm.shape[0]} rows, cu_seqlens has "
                                f"{len(bounds) - 1} sequences")
        outs = [MambaKitMamba2.forward(self, x[:, a:b], state=SSMState(conv=state.conv[i:i + 1],
                                                                       ssm=state.ssm[i:i + 1]), **kwargs)
                for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]
        return torch.cat(outs, dim=1)


def _bound(args: tuple, kwargs: dict) -> dict:
    """Mamba2's constructor arguments by name, defaults filled in."""
    bound = inspect.signature(Mamba2.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["self"]
    return arguments


class ShardedMamba2(Mamba2, TensorParallelMamba2):
    """This rank's shard of a Mamba2 over `process_group` (what Mamba2(..., process_group=group) builds): the
    unsharded layer is initialised, then sliced by `TensorParallelMamba2` (its rank's heads, groups and channels;
    every rank normalises whole groups of d_inner / ngroups channels, so the shards together equal the unsharded
    layer: the official sharded norm uses groups world-size times smaller). Official attributes world_size,
    local_rank, process_group, sequence_parallel. With d_ssm < d_inner each rank also holds (d_inner - d_ssm) / W
    channels of the gated MLP, as official."""

    def __init__(self, d_model: int, *args, **kwargs):
        config = _bound((d_model,) + args, kwargs)
        group = config.pop("process_group")
        rank, world = group_rank_world(group)
        TensorParallelMamba2.__init__(self, Mamba2(**config), group)
        self.conv_init, self.use_mem_eff_path = config["conv_init"], config["use_mem_eff_path"]
        self.process_group, self.sequence_parallel = group, config["sequence_parallel"]
        self.world_size, self.local_rank = world, rank

    def forward(self, u: Tensor, seqlen: Optional[int] = None, seq_idx: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, inference_params=None, **kwargs) -> Tensor:
        """As `Mamba2.forward`; with sequence_parallel, u is this rank's rows (dim 0) of the whole input (every rank
        the same number) and the result this rank's rows of the whole output. seq_idx, cu_seqlens: of the whole."""
        if self.sequence_parallel:
            u = gather_dim0(u, self.process_group)
        out = super().forward(u, seqlen, seq_idx, cu_seqlens, inference_params, **kwargs)
        return split_dim0(out, self.process_group) if self.sequence_parallel else out

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """As `Mamba2.step`, the states of the whole batch; with sequence_parallel hidden_states and out are this
        rank's rows of the batch."""
        if self.sequence_parallel:
            hidden_states = gather_dim0(hidden_states, self.process_group)
        out, conv_state, ssm_state = super().step(hidden_states, conv_state, ssm_state)
        return (split_dim0(out, self.process_group) if self.sequence_parallel else out), conv_state, ssm_state


def seq_idx_of(bounds: list, device) -> Tensor:
    """cu_seqlens bounds [0, ..., total] -> seq_idx (1, total) int32: the index of each token's sequence."""
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), lengths)[None]
