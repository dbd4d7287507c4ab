"""Context (sequence) parallelism: the sequence is split into contiguous segments, one per rank.

Both scans are linear recurrences ``h_t = a_t h_{t-1} + b_t`` (SSD: a scalar ``a_t = exp(dt_t A_h)`` per head;
Mamba-1: ``a_t = exp(delta_t A)`` per channel and state). Over a whole segment the recurrence composes into
``h_end = exp(s) h_start + h_local`` where ``s = sum_t log a_t`` is the segment's total log decay and ``h_local``
its final state from a zero start. So each rank

1. scans its segment from a zero state (the ordinary op), giving ``h_local`` and ``s``;
2. all-gathers ``(h_local, s)`` -- O(batch * state) bytes per rank, independent of seqlen;
3. combines its predecessors: ``h_in(r) = sum_{j<r} exp(s_{j+1} + ... + s_{r-1}) h_local(j)``;
4. adds the incoming state's contribution to its outputs:
   SSD: ``y_t += exp(sum_{u<=t} dt_u A) C_t h_in`` (a cheap read-out, no second scan);
   Mamba-1: the scan is rerun from ``h_in`` (the per-channel, per-state decay makes a closed-form read-out as
   large as the scan itself; the rerun keeps the chunked op's O(chunk) memory).

Backward: step 3 is :class:`_IncomingState`, whose backward all-gathers the gradients w.r.t. ``h_in`` (again
O(state)) and runs the same combination in reverse; everything else is ordinary autograd through the ops, so the
gradients w.r.t. every input (x, dt, A, B, C, D, z, dt_bias) equal those of the single-process scan.

Block wrappers (:class:`ContextParallelMamba2`, :class:`ContextParallelMamba`) also pass the conv halo: rank r
receives the last ``d_conv - 1`` hidden states of rank r - 1 (point to point, gradients sent back).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.distributed.collectives import ProcessGroup, all_gather_stack, group_rank_world, halo_from_previous
from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.ops.dt import DEFAULT_DT_LIMIT, compute_dtype, process_dt
from mambakit.ops.selective_scan import check_selective_scan_inputs, prepare_delta, selective_scan_fn
from mambakit.ops.ssd import check_ssd_inputs, mamba_chunk_scan_combined

__all__ = [
    "ContextParallelMamba", "ContextParallelMamba2", "context_parallel", "context_parallel_selective_scan",
    "context_parallel_ssd", "incoming_state", "sequence_shard",
]


# ----------------------------------------------------------------------------------------------------------------------
# Step 3: the state entering each rank's segment
# ----------------------------------------------------------------------------------------------------------------------
def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum t over the dimensions where `shape` has size 1 (t broadcasts shape up to t.shape)."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


class _IncomingState(torch.autograd.Function):
    """(h_local, log_decay) of this rank -> h_in, the state entering this rank's segment.

    h_local: (*S) the segment's final state from a zero start; log_decay: broadcastable to S, the segment's total
    log decay. Forward all-gathers both (one call); backward all-gathers dL/dh_in. The weight of rank j's state at
    rank r is W(j, r) = exp(s_{j+1} + ... + s_{r-1}), so
    dL/dh_local(j) = G_j = sum_{r>j} W(j, r) g_r  (G_j = g_{j+1} + exp(s_{j+1}) G_{j+1}), and
    dL/ds_j = sum over broadcast dims of G_j * exp(s_j) * h_in(j).
    """

    @staticmethod
    def forward(ctx, h_local: Tensor, log_decay: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        rank, world = group_rank_world(group)
        packed = all_gather_stack(torch.cat([h_local.flatten(), log_decay.flatten().to(h_local.dtype)]), group)
        hs = packed[:, : h_local.numel()].view(world, *h_local.shape)
        decays = packed[:, h_local.numel():].view(world, *log_decay.shape).exp()
        h_in = torch.zeros_like(h_local)
        for j in range(rank):
            h_in = decays[j] * h_in + hs[j]
        ctx.save_for_backward(decays, h_in)
        ctx.group, ctx.rank, ctx.world, ctx.decay_shape = group, rank, world, log_decay.shape
        return h_in

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        decays, h_in = ctx.saved_tensors
        grads = all_gather_stack(grad, ctx.group)
        G = torch.zeros_like(grad)
        for k in range(ctx.world - 1, ctx.rank, -1):
            G = grads[k] + decays[k] * G
        g_decay = _sum_to(G * decays[ctx.rank] * h_in, ctx.decay_shape)
        return G, g_decay, None


def incoming_state(h_local: Tensor, log_decay: Tensor, group: ProcessGroup = None) -> Tensor:
    """The state entering this rank's segment (zeros on rank 0), differentiable. h_local: (*S); log_decay:
    broadcastable to S, <= 0. Collective over `group`: every rank calls it, with the same shapes."""
    return _IncomingState.apply(h_local, log_decay, group)


# ----------------------------------------------------------------------------------------------------------------------
# The two scans
# ----------------------------------------------------------------------------------------------------------------------
def context_parallel_ssd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT, return_final_states: bool = False, group: ProcessGroup = None,
):
    """`mamba_chunk_scan_combined` over a sequence split across the ranks of `group` (collective).

    Each rank passes ITS segment (contiguous, in rank order; segments may differ in length):
    x, z: (batch, seqlen_local, nheads, headdim); dt: (batch, seqlen_local, nheads); B, C: (batch, seqlen_local,
    ngroups, d_state); A, D, dt_bias as the op (the same on every rank). Returns y (batch, seqlen_local, nheads,
    headdim) equal to the matching slice of the single-process output, and with `return_final_states` the state
    after this rank's segment (batch, nheads, headdim, d_state) (on the last rank: the final state).
    Communication: one all-gather of batch*nheads*(headdim*d_state + 1) values forward, one of
    batch*nheads*headdim*d_state backward.
    """
    dims = check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, None, None, dt_softplus, dt_limit,
                            need_chunk_size=True)
    fp = compute_dtype(x, dt, A, B, C)
    dt_p = process_dt(dt, dt_bias, dt_softplus, dt_limit, fp)  # (batch, L, nheads)
    A_p = A.to(fp)
    # x in the compute dtype (the op computes in it anyway) so that y0 is not rounded to half before the correction
    y0, h_local = mamba_chunk_scan_combined(x.to(fp), dt_p, A_p, B, C, chunk_size, D=D, return_final_states=True)
    log_decay = torch.cumsum(dt_p * A_p, dim=1)  # (batch, L, nheads): log decay from the segment start to t
    h_in = incoming_state(h_local, log_decay[:, -1, :, None, None], group)  # (batch, nheads, headdim, d_state)
    b, L, h, p = x.shape
    g, n = dims.ngroups, dims.d_state
    readout = torch.einsum("blgn,bgrpn->blgrp", C.to(fp), h_in.view(b, g, h // g, p, n)).reshape(b, L, h, p)
    y = y0 + readout * log_decay.exp()[..., None]
    if z is not None:
        y = y * F.silu(z.to(fp))
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    return y, log_decay[:, -1, :, None, None].exp() * h_in + h_local


def context_parallel_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    group: ProcessGroup = None, backend: str = "auto",
):
    """`selective_scan_fn` (Mamba-1) over a sequence split across the ranks of `group` (collective).

    Each rank passes its segment: u, delta, z: (batch, dim, seqlen_local); B, C: (batch, d_state, seqlen_local) or
    (batch, groups, d_state, seqlen_local); A: (dim, d_state); D, delta_bias: (dim,). Returns y (batch, dim,
    seqlen_local), and with `return_last_state` the state after this rank's segment (batch, dim, d_state).
    Costs two local scans (from zero, then from the incoming state). Communication: one all-gather of
    2*batch*dim*d_state values forward, one of batch*dim*d_state backward.
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, None, None)
    delta_p = prepare_delta(delta, delta_bias, delta_softplus, compute_dtype(u))  # (batch, dim, L)
    _, h_local = selective_scan_fn(u, delta_p, A, B, C, return_last_state=True, backend=backend)
    log_decay = A.to(delta_p.dtype) * delta_p.sum(-1)[..., None]  # (batch, dim, d_state)
    h_in = incoming_state(h_local, log_decay, group)
    return selective_scan_fn(u, delta_p, A, B, C, D, z, return_last_state=return_last_state, initial_state=h_in,
                             backend=backend)


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------
def sequence_shard(t: Tensor, group: ProcessGroup = None, dim: int = 1) -> Tensor:
    """This rank's contiguous segment of t along `dim` (``torch.tensor_split`` order: the first seqlen % W ranks
    get one position more)."""
    rank, world = group_rank_world(group)
    if t.shape[dim] < world:
        raise MambaKitError(f"sequence_shard: the sequence length must be >= the world size {world}, got "
                            f"{t.shape[dim]}")
    return torch.tensor_split(t, world, dim=dim)[rank]


def _conv_history(block: nn.Module, hidden: Tensor, group: ProcessGroup, conv_part) -> Tensor:
    """The conv state (batch, channels, d_conv) holding the previous rank's last d_conv - 1 conv inputs (zeros on
    rank 0). hidden: (batch, seqlen_local, d_model); conv_part maps in_proj output (batch, k, ·) to conv input
    channels (batch, k, channels)."""
    k = block.d_conv - 1
    if hidden.shape[1] < k:
        raise MambaKitError(f"context parallel: every rank's segment must hold at least d_conv - 1 = {k} positions, "
                            f"got seqlen_local={hidden.shape[1]}")
    rank, _ = group_rank_world(group)
    halo = halo_from_previous(hidden[:, hidden.shape[1] - k:], group)  # (batch, k, d_model)
    history = conv_part(block.in_proj(halo)).transpose(1, 2)  # (batch, channels, k)
    history = history * (1.0 if rank > 0 else 0.0)  # rank 0 starts from zeros (keeps the graph alike on all ranks)
    return F.pad(history, (1, 0))


class _ContextParallelBlock(nn.Module):
    """Holds a block (its own parameters, shared: wrapping copies nothing) and the process group."""

    block_type: type = nn.Module

    def __init__(self, block: nn.Module, group: ProcessGroup = None):
        super().__init__()
        if not isinstance(block, self.block_type):
            raise MambaKitError(f"{type(self).__name__}: block must be a {self.block_type.__name__}, got "
                                f"{type(block).__name__}")
        self.block, self.group = block, group


class ContextParallelMamba2(_ContextParallelBlock):
    """Runs a Mamba2 block on this rank's segment. Input and output: (batch, seqlen_local, d_model); the ranks'
    segments are consecutive parts of one sequence."""

    block_type = Mamba2

    def forward(self, hidden_states: Tensor) -> Tensor:
        blk = self.block
        conv_state = _conv_history(blk, hidden_states, self.group, lambda zxbcdt: blk.split_projection(zxbcdt)[1])
        s = blk.ssm_inputs(hidden_states, conv_state)
        y = context_parallel_ssd(s.x, s.dt, s.A, s.B, s.C, blk.scan_chunk_size(s.x), D=s.D, z=blk.scan_gate(s),
                                 group=self.group, **s.dt_args)
        return blk.finish(y.flatten(-2), s.z)


class ContextParallelMamba(_ContextParallelBlock):
    """Runs a Mamba (Mamba-1) block on this rank's segment. Input and output: (batch, seqlen_local, d_model)."""

    block_type = Mamba

    def forward(self, hidden_states: Tensor) -> Tensor:
        blk = self.block
        conv_state = _conv_history(blk, hidden_states, self.group, lambda xz: xz[..., : blk.d_inner])
        s = blk.ssm_inputs(hidden_states, conv_state)
        y = context_parallel_selective_scan(s.u, s.delta, s.A, s.B, s.C, s.D, z=s.z, delta_bias=s.delta_bias,
                                            delta_softplus=s.delta_softplus, group=self.group,
                                            backend=blk.scan_backend)
        return blk.finish(y)


def context_parallel(block: Union[Mamba, Mamba2], group: ProcessGroup = None) -> nn.Module:
    """Wrap a Mamba or Mamba2 block to run on this rank's segment of the sequence."""
    if isinstance(block, Mamba2):
        return ContextParallelMamba2(block, group)
    if isinstance(block, Mamba):
        return ContextParallelMamba(block, group)
    raise MambaKitError(f"context_parallel: block must be a Mamba or Mamba2, got {type(block).__name__}")
