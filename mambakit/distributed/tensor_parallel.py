"""Tensor parallelism for the Mamba-2 block: heads and B/C groups split over the ranks of a process group.

With ``W`` ranks, rank ``r`` holds heads ``[r H/W, (r+1) H/W)`` and groups ``[r G/W, (r+1) G/W)`` (head ``h`` reads
group ``h // (H/G)``, so each rank's heads read only its own groups). Per rank:

* ``in_proj`` (column parallel): the rows of the packed ``[z, x, B, C, dt]`` projection that belong to the local
  heads and groups, re-laid as a local ``[z_r, x_r, B_r, C_r, dt_r]`` so that the unchanged `Mamba2` code splits it.
  With d_ssm < d_inner (the official gated MLP beside the SSM) the projection is ``[z0, x0, z, x, B, C, dt]`` and
  rank ``r`` also holds channels ``[r M/W, (r+1) M/W)`` of z0 and x0 (M = d_inner - d_ssm), as the official does;
* ``conv1d``, ``dt_bias``, ``A_log``, ``D`` and the gated norm's weight: the local channels. The norm keeps the
  full block's group size ``d_inner / ngroups``, so every rank normalises whole groups and the result equals the
  unsharded norm (normalising over the local ``d_inner / W`` channels instead would differ whenever ngroups < W * k);
* ``out_proj`` (row parallel): the local input columns (of ``cat([silu(z0) * x0, y])`` with a gated MLP part,
  the local MLP channels then the local SSM ones); the partial outputs are summed with ONE all-reduce of
  ``(batch, seqlen, d_model)`` per block forward (and one of the same size in backward, for the input gradient).

The module is a `Mamba2` with local sizes, so ``forward``, ``step`` and ``allocate_state`` (local state shapes) work
unchanged. Checkpoints are consolidated: :func:`full_state_dict` gathers the unsharded state dict (its keys and
shapes are those of the unsharded model) and :func:`load_full_state_dict` slices one into a sharded model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.distributed.collectives import (
    ProcessGroup, all_gather_stack, copy_to_parallel, group_rank_world, reduce_from_parallel,
)
from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.norm import RMSNormGated

__all__ = [
    "TensorParallelMamba2", "full_state_dict", "load_full_state_dict", "parallelize_mamba2",
    "save_tensor_parallel_checkpoint", "shard_mamba2", "shard_mamba2_state_dict", "unshard_mamba2",
    "unshard_mamba2_state_dicts",
]


class ColumnParallelLinear(nn.Linear):
    """A Linear holding some output rows; its input is replicated, so the input gradient is all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: ProcessGroup, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features), the same on every rank -> (..., local out_features)."""
        return F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """A Linear holding some input columns; the partial products are all-reduced, then the (replicated) bias added."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: ProcessGroup, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., local in_features) -> (..., out_features), the same on every rank."""
        out = reduce_from_parallel(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


# ----------------------------------------------------------------------------------------------------------------------
# Layout: which slice of each Mamba-2 parameter a rank holds
# ----------------------------------------------------------------------------------------------------------------------
def _check_divisible(nheads: int, ngroups: int, world: int, d_mlp: int = 0) -> None:
    if ngroups % world != 0:
        raise MambaKitError(f"tensor parallel Mamba2: ngroups must be divisible by the world size {world} (each "
                            f"rank holds whole B/C groups), got ngroups={ngroups}")
    if nheads % world != 0:
        raise MambaKitError(f"tensor parallel Mamba2: nheads must be divisible by the world size {world}, got "
                            f"nheads={nheads}")
    if d_mlp % world != 0:
        raise MambaKitError(f"tensor parallel Mamba2: d_inner - d_ssm (the gated MLP channels) must be divisible by "
                            f"the world size {world}, got d_inner - d_ssm={d_mlp}")


def _mamba2_shard_index(block: Mamba2, rank: int, world: int) -> dict[str, tuple[int, Optional[Tensor]]]:
    """Parameter name -> (dim, indices of the unsharded tensor along dim that rank holds); indices None means
    replicated. `block` gives the unsharded sizes (a Mamba2 or a TensorParallelMamba2).

    Unsharded layout (M = d_mlp = d_inner - d_ssm, S = d_ssm, gn = ngroups * d_state): in_proj rows
    [z0 (M), x0 (M), z (S), x (S), B (gn), C (gn), dt (nheads)], conv channels [x, B, C], out_proj columns
    [MLP (M), SSM (S)]; each part is split into W equal consecutive slices, rank r holding the r-th of each."""
    full = block.full_sizes if isinstance(block, TensorParallelMamba2) else _sizes(block)
    H, G, P, N, M = full["nheads"], full["ngroups"], full["headdim"], full["d_state"], full["d_mlp"]
    _check_divisible(H, G, world, M)
    S, gn = H * P, G * N
    h = torch.arange(rank * H // world, (rank + 1) * H // world)
    m = torch.arange(rank * M // world, (rank + 1) * M // world)  # gated-MLP channels
    ch = torch.arange(rank * S // world, (rank + 1) * S // world)  # channels of the local heads
    g = torch.arange(rank * gn // world, (rank + 1) * gn // world)  # B (or C) rows of the local groups
    xbc = torch.cat([ch, S + g, S + gn + g])
    zxbcdt = torch.cat([m, M + m, 2 * M + ch, 2 * M + S + xbc, 2 * M + 2 * S + 2 * gn + h])
    index: dict[str, tuple[int, Optional[Tensor]]] = {
        "in_proj.weight": (0, zxbcdt), "in_proj.bias": (0, zxbcdt),
        "conv1d.weight": (0, xbc), "conv1d.bias": (0, xbc),
        "dt_bias": (0, h), "A_log": (0, h), "D": (0, ch if full["D_has_hdim"] else h),
        "norm.weight": (0, ch), "out_proj.weight": (1, torch.cat([m, M + ch])), "out_proj.bias": (0, None),
    }
    return index


def _sizes(block: Mamba2) -> dict:
    return dict(nheads=block.nheads, ngroups=block.ngroups, headdim=block.headdim, d_state=block.d_state,
                D_has_hdim=block.D_has_hdim, d_mlp=block.d_mlp)


def shard_mamba2_state_dict(state: Mapping[str, Tensor], block: Mamba2, rank: int, world: int,
                            prefix: str = "") -> dict[str, Tensor]:
    """Slice an unsharded Mamba2 state dict (keys ``prefix + name``) into rank's shard; other keys are dropped."""
    out = {}
    for name, (dim, idx) in _mamba2_shard_index(block, rank, world).items():
        key = prefix + name
        if key in state:
            out[key] = state[key] if idx is None else state[key].index_select(dim, idx.to(state[key].device))
    return out


def unshard_mamba2_state_dicts(shards: list[Mapping[str, Tensor]], block: Mamba2,
                               prefix: str = "") -> dict[str, Tensor]:
    """Inverse of :func:`shard_mamba2_state_dict`: one shard per rank, in rank order -> the unsharded state dict."""
    world = len(shards)
    out = {}
    for name, (dim, idx0) in _mamba2_shard_index(block, 0, world).items():
        key = prefix + name
        if key not in shards[0]:
            continue
        if idx0 is None:
            out[key] = shards[0][key]
            continue
        first = shards[0][key]
        shape = list(first.shape)
        shape[dim] *= world
        full = first.new_empty(shape)
        for rank, shard in enumerate(shards):
            idx = _mamba2_shard_index(block, rank, world)[name][1]
            full.index_copy_(dim, idx.to(full.device), shard[key])
        out[key] = full
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The sharded block
# ----------------------------------------------------------------------------------------------------------------------
class TensorParallelMamba2(Mamba2):
    """The local shard of a Mamba-2 block. Input and output: (batch, seqlen, d_model), the same on every rank.

    Built from an unsharded `Mamba2` (its parameters are copied, sliced) by :func:`shard_mamba2`. Local sizes:
    nheads/W heads, ngroups/W groups, d_inner/W channels (d_ssm/W of the SSM, (d_inner - d_ssm)/W of the gated
    MLP); `full_sizes` keeps the unsharded ones. An installed dt
    transform (`mambakit.layers.dt_transform`) is kept and sees the local heads' dt, (batch, seqlen, nheads/W).
    """

    def __init__(self, block: Mamba2, group: ProcessGroup = None):
        nn.Module.__init__(self)
        if isinstance(block, TensorParallelMamba2):
            raise MambaKitError("shard_mamba2: block is already tensor parallel; pass an unsharded Mamba2")
        if not isinstance(block, Mamba2):
            raise MambaKitError(f"shard_mamba2: block must be a Mamba2, got {type(block).__name__}")
        rank, world = group_rank_world(group)
        _check_divisible(block.nheads, block.ngroups, world, block.d_mlp)
        self.group, self.tp_rank, self.tp_world = group, rank, world
        self.full_sizes = _sizes(block)
        self.full_config = dict(
            d_model=block.d_model, d_state=block.d_state, d_conv=block.d_conv, expand=block.expand,
            headdim=block.headdim, ngroups=block.ngroups, D_has_hdim=block.D_has_hdim, rmsnorm=block.rmsnorm,
            norm_before_gate=block.norm.norm_before_gate if block.rmsnorm else False, dt_limit=block.dt_limit,
            bias=block.in_proj.bias is not None, conv_bias=block.conv1d.bias is not None,
            chunk_size=block.chunk_size, layer_idx=block.layer_idx,
            norm_eps=block.norm.eps if block.rmsnorm else 1e-5, d_ssm=block.d_ssm,
        )
        for name in ("d_model", "d_state", "d_conv", "expand", "headdim", "D_has_hdim", "rmsnorm", "chunk_size",
                     "dt_limit", "layer_idx"):
            setattr(self, name, getattr(block, name))
        self.dt_transform = block.dt_transform
        self.nheads, self.ngroups = block.nheads // world, block.ngroups // world
        self.d_inner = block.d_inner // world  # d_ssm (a property: nheads * headdim) plus the local MLP channels
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        w = block.out_proj.weight
        factory = {"device": w.device, "dtype": w.dtype}
        bias = block.in_proj.bias is not None
        self.in_proj = ColumnParallelLinear(self.d_model, 2 * self.d_inner + 2 * self.ngroups * self.d_state
                                            + self.nheads, bias, group, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=block.conv1d.bias is not None, **factory)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, device=w.device, dtype=block.dt_bias.dtype))
        self.A_log = nn.Parameter(torch.empty(self.nheads, device=w.device, dtype=block.A_log.dtype))
        self.D = nn.Parameter(torch.empty(self.d_ssm if self.D_has_hdim else self.nheads, device=w.device,
                                          dtype=block.D.dtype))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if self.rmsnorm:
            # the group size of the UNSHARDED block: every rank normalises whole groups
            self.norm = RMSNormGated(self.d_ssm, eps=block.norm.eps, group_size=block.norm.group_size,
                                     norm_before_gate=block.norm.norm_before_gate, **factory)
        self.out_proj = RowParallelLinear(self.d_inner, self.d_model, block.out_proj.bias is not None, group,
                                          **factory)
        _assign(self, shard_mamba2_state_dict(block.state_dict(), block, rank, world))


def _assign(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Give every parameter of `module` the value AND dtype of state[name] (load_state_dict would cast to the
    parameter's dtype, e.g. the float32 A_log a Mamba2 is created with). Keys must match exactly."""
    params = dict(module.named_parameters())
    if params.keys() != state.keys():
        raise MambaKitError(f"state dict keys do not match the module: missing {sorted(params.keys() - state.keys())},"
                            f" unexpected {sorted(state.keys() - params.keys())}")
    for name, p in params.items():
        p.data = state[name].detach().to(p.device).clone()


def shard_mamba2(block: Mamba2, group: ProcessGroup = None) -> TensorParallelMamba2:
    """The rank's shard of `block` over `group` (the default group if None). Every rank must pass the same block
    (e.g. built from the same seed or checkpoint). Raises MambaKitError if nheads, ngroups or d_inner - d_ssm
    is not divisible by the group size."""
    return TensorParallelMamba2(block, group)


def _gather_state(tp: TensorParallelMamba2) -> dict[str, Tensor]:
    """The unsharded state dict of one sharded block (collective: every rank of tp.group calls it)."""
    local = {k: v.detach() for k, v in tp.state_dict().items()}
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp.tp_world)]
    for key in sorted(local):
        gathered = all_gather_stack(local[key], tp.group)
        for rank in range(tp.tp_world):
            shards[rank][key] = gathered[rank]
    return unshard_mamba2_state_dicts(shards, tp)


def unshard_mamba2(tp: TensorParallelMamba2) -> Mamba2:
    """A full Mamba2 with the parameters of the sharded block (collective: every rank of the group calls it)."""
    state = _gather_state(tp)
    w = tp.out_proj.weight
    block = Mamba2(**tp.full_config, device=w.device, dtype=w.dtype)
    _assign(block, state)
    block.dt_transform = tp.dt_transform
    return block


# ----------------------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------------------
def parallelize_mamba2(model: nn.Module, group: ProcessGroup = None) -> nn.Module:
    """Replace, in place, every (unsharded) Mamba2 inside `model` by its TensorParallelMamba2 shard; returns model.

    Everything else (embedding, norms, MLPs, lm_head) stays replicated: give every rank the same input ids.
    """
    if isinstance(model, Mamba2) and not isinstance(model, TensorParallelMamba2):
        raise MambaKitError("parallelize_mamba2: model is itself a Mamba2 block; use shard_mamba2(block, group)")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Mamba2) and not isinstance(child, TensorParallelMamba2):
                setattr(module, child_name, TensorParallelMamba2(child, group))
    return model


def _tp_modules(model: nn.Module) -> dict[str, TensorParallelMamba2]:
    return {name + "." if name else "": m for name, m in model.named_modules() if isinstance(m, TensorParallelMamba2)}


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict of a model holding TensorParallelMamba2 blocks: same keys and shapes as the model
    before `parallelize_mamba2`. Collective: every rank calls it (every rank gets the whole dict)."""
    state = dict(model.state_dict())
    for prefix, tp in _tp_modules(model).items():
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update({prefix + k: v for k, v in _gather_state(tp).items()})
    return state


def load_full_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load an unsharded state dict into a model holding TensorParallelMamba2 blocks (each rank takes its slice)."""
    local = dict(state)
    for prefix, tp in _tp_modules(model).items():
        local.update(shard_mamba2_state_dict(state, tp, tp.tp_rank, tp.tp_world, prefix))
    model.load_state_dict(local)


def save_tensor_parallel_checkpoint(model: nn.Module, directory: str | Path) -> Optional[Path]:
    """Save a tensor-parallel `MambaLMHeadModel` as an ordinary (unsharded) mambakit checkpoint, written by rank 0
    of the default group. Collective. Load it with `load_checkpoint` (unsharded) or `load_checkpoint` followed by
    `parallelize_mamba2` (sharded, any world size dividing ngroups)."""
    from mambakit.models.checkpoint import save_checkpoint
    from mambakit.models.lm import MambaLMHeadModel

    state = full_state_dict(model)
    path = None
    if dist.get_rank() == 0:
        full = MambaLMHeadModel(model.config, device="cpu")
        params = dict(full.named_parameters())  # a tied lm_head is one parameter under the embedding's name
        _assign(full, {k: v.cpu() for k, v in state.items() if k in params})
        path = save_checkpoint(full, directory)
    dist.barrier()
    return path
