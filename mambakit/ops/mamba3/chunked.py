"""Mamba-3 SISO by the SSD-style block decomposition (linear in seqlen, plain autograd).

The sequence is cut into chunks of ``chunk_size`` positions. The trapezoid's two terms are folded into one weight
per position: position j enters the state with ``scale_j = lambda_j DT_j + (1 - lambda_{j+1}) DT_{j+1}`` (the second
term is the next position's look-back, zero where a new sequence starts), except in its own output, which sees
only ``lambda_j DT_j`` (the diagonal, written separately). Inside a chunk the outputs are the masked quadratic form
``y_i = sum_{j<i} exp(acs_i - acs_j) (q_i . k_j) scale_j v_j``; across chunks a state (headdim, d_state) is passed
on, with the chunks' angles carried the same way. The math and the layouts are in :mod:`mambakit.ops.mamba3.common`.

Causality with non-finite inputs: every mask selects with ``torch.where``, and the products with V that sum over
positions use V with its non-finite entries set to zero, the NaN then put back (by a mask) only into the outputs
and states that the naive recurrence would make NaN; so a NaN or inf at position t never reaches outputs before t.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3.common import (
    TWO_PI,
    Dims,
    angle_increment,
    compute_dtype,
    heads_of_groups,
    rotate,
    segment_starts,
    validate,
)


def _pad_time(t: Tensor, pad: int, dim: int = 1) -> Tensor:
    """Zero-pad dimension dim (time) at the end by pad positions."""
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat((t, t.new_zeros(shape)), dim=dim)


def _chunk(t: Tensor, Q: int) -> Tensor:
    """(batch, nchunks * Q, ...) -> (batch, nchunks, Q, ...)."""
    return t.unflatten(1, (-1, Q))


class _AtSegmentStart(torch.autograd.Function):
    """x.gather(2, first): x (batch, nchunks, Q, ...) at the start of each position's segment inside its chunk;
    first (batch, nchunks, Q) long, non-decreasing along Q: the last position at or before each one where a
    segment starts (0 where none does).

    The gradient of a start is the sum of its segment's incoming gradients, taken here as a difference of a
    reverse cumulative sum; gather's own backward is scatter_add_, whose CUDA atomics add the many positions of a
    segment in an order that changes from run to run (gradients not bit-identical)."""

    @staticmethod
    def forward(ctx, x: Tensor, first: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(first)
        return x.gather(2, _along(first, x))

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (first,) = ctx.saved_tensors
        Q = g.shape[2]
        pos = torch.arange(Q, device=g.device)
        is_start = first == pos  # (batch, nchunks, Q), True at position 0
        # the next start after each position (Q: none): a reverse running minimum, shifted by one
        nxt = torch.where(is_start, pos, Q).flip(2).cummin(2).values.flip(2)
        nxt = torch.cat((nxt[..., 1:], torch.full_like(nxt[..., :1], Q)), dim=2)
        rev = g.flip(2).cumsum(2).flip(2)  # sum of g from the position to the chunk's end
        rev = torch.cat((rev, torch.zeros_like(rev[:, :, :1])), dim=2)
        seg_sum = rev[:, :, :Q] - rev.gather(2, _along(nxt, g))
        return torch.where(_along(is_start, g), seg_sum, 0.0), None


def _along(index: Tensor, x: Tensor) -> Tensor:
    """index (batch, nchunks, Q) expanded over x's trailing dimensions."""
    return index.reshape(index.shape + (1,) * (x.dim() - 3)).expand(*index.shape, *x.shape[3:])


def _reaches(reach: Tensor, bad: Tensor, equation: str) -> Tensor:
    """Where a non-finite V entry (bad: 1.0 there, else 0.0) feeds a result through the bool mask `reach` of
    which positions feed which (contracted by `equation`); all products are of finite 0/1 values."""
    return torch.einsum(equation, reach.to(bad.dtype), bad) > 0


class Prepared(NamedTuple):
    """The per-position pieces of the block decomposition in the chunked layout (batch, nchunks, Q, ...), padded
    with zeros at the end; shared by the PyTorch form below and the Triton kernel."""

    dims: Dims
    fp: torch.dtype
    chunk: int
    q_rot: Tensor  # (batch, nchunks, Q, nheads, d_state): rotated Q with bias
    k_rot: Tensor  # (batch, nchunks, Q, nheads, d_state): rotated K with bias
    v: Tensor  # (batch, nchunks, Q, nheads, headdim)
    adt: Tensor  # (batch, nchunks, Q, nheads)
    gamma: Tensor  # (batch, nchunks, Q, nheads): lambda_j DT_j, the weight of position j in its own output
    scale: Tensor  # (batch, nchunks, Q, nheads): gamma_j + the next position's look-back weight
    seg: Tensor  # (batch, nchunks, Q) segment number inside the chunk (0 without seq_idx)
    from_start: Tensor  # (batch, nchunks, Q) bool: no sequence starts inside the chunk at or before the position
    to_end: Tensor  # (batch, nchunks, Q) bool: no sequence starts inside the chunk after the position
    final_angle: Tensor  # (batch, nheads, n_angles)
    first_back: Tensor  # (batch, nheads): (1 - lambda_0) DT_0, the first position's look-back to Input_States


class Terms(NamedTuple):
    """The per-position pieces before any chunking, time on dim 1, in the compute dtype."""

    dims: Dims
    fp: torch.dtype
    q: Optional[Tensor]  # (batch, seqlen, nheads, d_state): Q per head with bias, not rotated (None: not asked)
    k: Optional[Tensor]  # (batch, seqlen, nheads, d_state): K per head with bias, not rotated (None: not asked)
    v: Tensor  # (batch, seqlen, nheads, headdim)
    adt: Tensor  # (batch, seqlen, nheads)
    inc: Tensor  # (batch, seqlen, nheads, n_angles): the angle increments
    starts: Optional[Tensor]  # (batch, seqlen) bool: a packed sequence starts there (None: no boundary)
    gamma: Tensor  # (batch, seqlen, nheads): lambda_j DT_j, the weight of position j in its own output
    scale: Tensor  # (batch, seqlen, nheads): gamma_j + the next position's look-back weight
    first_back: Tensor  # (batch, nheads): (1 - lambda_0) DT_0, the first position's look-back to Input_States


def position_terms(Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor,
                   K_bias: Tensor, Angles: Tensor, D: Optional[Tensor], Z: Optional[Tensor],
                   Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]], chunk_size: int,
                   seq_idx: Optional[Tensor], with_qk: bool = True) -> Terms:
    """Validate, cast to the compute dtype and compute the trapezoid's weights and the angle increments (and, if
    with_qk, Q and K per head with their biases)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dims = validate(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, seq_idx)
    fp = compute_dtype(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                       *(Input_States if Input_States is not None else ()))
    H = dims.nheads
    q = heads_of_groups(Q.to(fp), H) + Q_bias.to(fp) if with_qk else None
    k = heads_of_groups(K.to(fp), H) + K_bias.to(fp) if with_qk else None
    dt, adt, lam = DT.to(fp).transpose(1, 2), ADT.to(fp).transpose(1, 2), torch.sigmoid(Trap.to(fp)).transpose(1, 2)
    inc = angle_increment(Angles.to(fp), dt)  # (batch, seqlen, nheads, n_angles)
    starts = segment_starts(seq_idx)  # (batch, seqlen) bool or None
    gamma = lam * dt  # (batch, seqlen, nheads)
    look_back = _pad_time((1 - lam[:, 1:]) * dt[:, 1:], 1)  # position j: (1 - lambda_{j+1}) DT_{j+1}
    if starts is not None:
        look_back = torch.where(_pad_time(starts[:, 1:], 1)[..., None], 0.0, look_back)
    return Terms(dims, fp, q, k, V.to(fp), adt, inc, starts, gamma, gamma + look_back, (1 - lam[:, 0]) * dt[:, 0])


def prepare(Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
            Angles: Tensor, D: Optional[Tensor], Z: Optional[Tensor],
            Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]], chunk_size: int,
            seq_idx: Optional[Tensor]) -> Prepared:
    """Validate, cast to the compute dtype, chunk, and compute the angles (carried over chunks), the rotations and
    the trapezoid's weights."""
    terms = position_terms(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size, seq_idx)
    dims, fp, starts = terms.dims, terms.fp, terms.starts
    batch, L = dims.batch, dims.seqlen
    Qc = min(chunk_size, L)
    pad = (-L) % Qc
    q, k, v, inc, adt, gamma, scale = terms.q, terms.k, terms.v, terms.inc, terms.adt, terms.gamma, terms.scale

    q, k, v, inc, adt, gamma, scale = (_chunk(_pad_time(t, pad), Qc) for t in (q, k, v, inc, adt, gamma, scale))
    if starts is None:
        starts_c = torch.zeros(batch, q.shape[1], Qc, dtype=torch.bool, device=V.device)
    else:
        starts_c = _chunk(_pad_time(starts, pad), Qc)
    nchunks = q.shape[1]
    # positions reached from the chunk's start (no sequence starts at or before them inside the chunk) and positions
    # that reach the chunk's end (no sequence starts after them inside the chunk): (batch, nchunks, Q)
    from_start = starts_c.cumsum(2) == 0
    starts_after = starts_c.flip(2).cumsum(2).flip(2) - starts_c.to(torch.long)
    to_end = starts_after == 0
    seg_c = starts_c.cumsum(2)  # segment number inside the chunk

    # angles: chunk-local cumulative sums from each segment's start, then the carry from the chunks before
    local = inc.cumsum(2)
    first = torch.cummax(torch.where(starts_c, torch.arange(Qc, device=V.device), 0), dim=2).values
    before = _AtSegmentStart.apply(local - inc, first)
    local = local - before
    carry = torch.zeros_like(local[:, 0, 0]) if Input_States is None else Input_States[0].to(fp)
    carries = []
    for c in range(nchunks):
        carries.append(carry)
        last = local[:, c, -1] + torch.where(from_start[:, c, -1, None, None], carry, 0.0)
        carry = torch.remainder(last, TWO_PI)
    theta = local + torch.where(from_start[..., None, None], torch.stack(carries, 1)[:, :, None], 0.0)
    q_rot, k_rot = rotate(q, theta), rotate(k, theta)  # (batch, nchunks, Q, nheads, d_state)

    return Prepared(dims, fp, Qc, q_rot, k_rot, v, adt, gamma, scale, seg_c, from_start, to_end, carry,
                    terms.first_back)


def start_state(p: Union[Prepared, Terms], Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]) -> Tensor:
    """The ssm state (batch, nheads, headdim, d_state) that the first chunk starts from: zero, or Input_States' ssm
    plus the first position's look-back to Input_States' v and k (the decay alpha_0 is applied in the chunk)."""
    if Input_States is None:
        return p.v.new_zeros(p.dims.batch, p.dims.nheads, p.dims.headdim, p.dims.d_state)
    _, ssm0, k0, v0 = (s.to(p.fp) for s in Input_States)
    return ssm0 + p.first_back[..., None, None] * v0[..., :, None] * k0[..., None, :]


def mamba3_chunked(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, chunk_size: int = 64,
    return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The Mamba-3 SISO scan by chunks; arguments and results as :func:`mambakit.ops.mamba3.mamba3_scan`."""
    p = prepare(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size, seq_idx)
    fp, Qc, q_rot, k_rot, v, adt, gamma, scale = p.fp, p.chunk, p.q_rot, p.k_rot, p.v, p.adt, p.gamma, p.scale
    seg_c, from_start, to_end = p.seg, p.from_start, p.to_end
    batch, L, H, P = p.dims.batch, p.dims.seqlen, p.dims.nheads, p.dims.headdim
    nchunks = q_rot.shape[1]

    # decays inside a chunk
    acs = adt.cumsum(2).permute(0, 1, 3, 2)  # (batch, nchunks, nheads, Q)
    causal = torch.tril(torch.ones(Qc, Qc, dtype=torch.bool, device=V.device), -1)
    keep = causal & (seg_c[..., :, None] == seg_c[..., None, :])  # (batch, nchunks, Q, Q), strictly below
    keep_h = keep[:, :, None]
    decay = torch.exp(torch.where(keep_h, acs[..., :, None] - acs[..., None, :], 0.0))
    scores = torch.einsum("bcihn,bcjhn->bchij", q_rot, k_rot * scale[..., None])
    mix = torch.where(keep_h, scores * decay, 0.0)  # (batch, nchunks, nheads, Q, Q)

    # inside a CUDA-graph capture the check's host sync is not allowed: take the masking path (exact for finite V too)
    capturing = v.is_cuda and torch.cuda.is_current_stream_capturing()
    finite = False if capturing else bool(torch.isfinite(v).all())
    v_safe = v if finite else torch.where(torch.isfinite(v), v, 0.0)
    y = torch.einsum("bchij,bcjhp->bcihp", mix, v_safe)
    diag = (q_rot * k_rot).sum(-1) * gamma  # (batch, nchunks, Q, nheads)
    y = y + diag[..., None] * v
    if D is not None:
        y = y + D.to(fp)[:, None] * v

    # chunk states: what each chunk adds to the state at its end, and its total decay
    w_end = torch.exp(torch.where(to_end[:, :, None], acs[..., -1:] - acs, 0.0)).transpose(2, 3) * scale
    k_end = torch.where(to_end[..., None, None], k_rot * w_end[..., None], 0.0)
    chunk_states = torch.einsum("bcjhp,bcjhn->bchpn", v_safe, k_end)  # (batch, nchunks, nheads, P, N)
    chunk_decay = torch.where(from_start[:, :, -1, None], torch.exp(acs[..., -1]), 0.0)  # (batch, nchunks, nheads)
    h = start_state(p, Input_States)
    if not finite:
        bad = (~torch.isfinite(v)).to(fp)  # (batch, nchunks, Q, nheads, P)
        y = torch.where(_reaches(keep, bad, "bcij,bcjhp->bcihp"), math.nan, y)
        chunk_states = torch.where(_reaches(to_end, bad, "bcj,bcjhp->bchp")[..., None], math.nan, chunk_states)
    befores = []
    for c in range(nchunks):
        befores.append(h)
        h = chunk_decay[:, c, :, None, None] * h + chunk_states[:, c]
    h_before = torch.stack(befores, 1)  # (batch, nchunks, nheads, P, N)
    inter = torch.einsum("bcihn,bchpn->bcihp", q_rot, h_before) * torch.exp(acs).transpose(2, 3)[..., None]
    y = y + torch.where(from_start[..., None, None], inter, 0.0)

    y = y.flatten(1, 2)[:, :L]
    if Z is not None:
        y = y * F.silu(Z.to(fp))
    y = y.to(V.dtype)
    if not return_final_states:
        return y
    last_k = k_rot.flatten(1, 2)[:, L - 1]
    return y, p.final_angle, h, last_k, v.flatten(1, 2)[:, L - 1]
