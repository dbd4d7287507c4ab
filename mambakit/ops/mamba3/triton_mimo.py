"""The Mamba-3 MIMO (rank R) scan by the portable Triton kernels of :mod:`mambakit.ops.mamba3.triton` (the SISO
kernels with RANK > 1; forward and the deterministic backward).

The kernels see each time step as R rows (time, rank), time-major (R padded to a power of two with zero rows): the
per-position pieces come from the SISO :func:`~mambakit.ops.mamba3.chunked.prepare` on (head, rank) pairs as heads,
as in :func:`~mambakit.ops.mamba3.mimo.mamba3_mimo_chunked`; the decay A*dt sits on each step's first row, so
every row of a step has the step's cumulated decay; rows of earlier steps feed a row through k (times the
trapezoid's weight scale) and the rows of its own step through kg (times its own weight gamma). A chunk of the
kernels holds 64 rows at most (64 / R time steps: the official MIMO chunk).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.causal import nan_where, not_finite, poisoned_lanes
from mambakit.ops.mamba3.chunked import prepare
from mambakit.ops.mamba3.common import compute_dtype, heads_of_groups, segment_starts, validate_mimo
from mambakit.ops.mamba3.triton import _Mamba3Triton, interpreted
from mambakit.ops.triton.grid import next_power_of_2

States = Tuple[Tensor, Tensor, Tensor, Tensor]


def _rows(t: Tensor, H: int, R: int, Rp: int) -> Tensor:
    """(batch, seqlen, H * R, d) head-major (head h, rank r at h * R + r) -> (batch, seqlen * Rp, H, d) contiguous,
    rows (time, rank) with ranks R..Rp-1 zero."""
    t = t.unflatten(2, (H, R)).transpose(2, 3)  # (batch, seqlen, R, H, d)
    if Rp > R:
        t = torch.cat((t, t.new_zeros(t.shape[0], t.shape[1], Rp - R, *t.shape[3:])), 2)
    return t.flatten(1, 2).contiguous()


def mamba3_mimo_scan_triton(
    Q: Tensor, K: Tensor, V: Tensor, MIMO_V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor,
    K_bias: Tensor, Angles: Tensor, D: Optional[Tensor] = None, Input_States: Optional[States] = None,
    chunk_size: int = 16, return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The MIMO scan by the Triton kernels; arguments and results as
    :func:`mambakit.ops.mamba3.mimo.mamba3_mimo_scan_ref` (float16/bfloat16/float32 inputs, computed in float32,
    final states float32). chunk_size (time steps) changes only speed: the kernels' chunk is chunk_size * R rows
    rounded up to a power of two, between 16 and 64. Differentiable: the per-position pieces by PyTorch autograd,
    the scan by the backward kernel (no atomics: bit-identical gradients run to run).

    Non-finite V: the rows of a step where x has a NaN or infinity are zeroed for the kernels, and every output and
    final ssm state of that (batch, head) lane from that step on is NaN (as the recurrence gives)."""
    if not V.is_cuda and not interpreted():
        raise MambaKitError(f"mamba3_mimo_scan_triton needs CUDA tensors (or TRITON_INTERPRET=1), got V on "
                            f"{V.device}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dims, R = validate_mimo(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Input_States, seq_idx)
    fp = compute_dtype(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, *(Input_States or ()))
    if fp != torch.float32:
        raise MambaKitError(f"mamba3_mimo_scan_triton computes in float32; got an input of dtype {fp}")
    b, L, H, P, N = dims.batch, dims.seqlen, dims.nheads, dims.headdim, dims.d_state
    Rp = next_power_of_2(R)
    rows = max(16, Rp, next_power_of_2(min(chunk_size, L) * Rp))
    chunk = max(min(rows, 64), Rp)  # a power of two, a multiple of Rp

    def per_rank(t: Tensor, dim: int) -> Tensor:  # head h -> (h, r) at h * R + r
        return t.repeat_interleave(R, dim=dim)

    x = V.to(fp)
    bad = not_finite(x.detach(), (3,))  # (batch, seqlen, H)
    poison = poisoned_lanes([bad], time_dim=1)
    x_safe = x.masked_fill(bad[..., None], 0.0)
    q = heads_of_groups(Q.to(fp), H).transpose(2, 3).flatten(2, 3)  # (batch, seqlen, H * R, N)
    k = heads_of_groups(K.to(fp), H).transpose(2, 3).flatten(2, 3)
    xr = (x_safe[:, :, :, None] * MIMO_V.to(fp)).flatten(2, 3)  # (batch, seqlen, H * R, P)
    start = None
    if Input_States is not None:  # prepare reads only the angle
        zero = xr.new_zeros(())
        start = (per_rank(Input_States[0].to(fp), 1), zero.expand(b, H * R, P, N), zero.expand(b, H * R, N),
                 zero.expand(b, H * R, P))
    p = prepare(q, k, xr, per_rank(ADT, 1), per_rank(DT, 1), per_rank(Trap, 1), Q_bias.flatten(0, 1),
                K_bias.flatten(0, 1), per_rank(Angles, 2), None, None, start, max(chunk_size, 64), seq_idx)

    # (prepare's chunk only sets where its angles are carried over in Python: the SISO kernels' 64, fewer steps)

    def flat(t: Tensor) -> Tensor:  # (batch, nchunks, Q, ...) -> (batch, seqlen, ...)
        return t.flatten(1, 2)[:, :L]

    q_rot, k_rot, scale, gamma = flat(p.q_rot), flat(p.k_rot), flat(p.scale), flat(p.gamma)
    k_rows = _rows(k_rot * scale[..., None], H, R, Rp)
    kg_rows = _rows(k_rot * gamma[..., None], H, R, Rp) if Rp > 1 else None
    adt = flat(p.adt)[..., ::R]  # (batch, seqlen, H)
    adt_rows = torch.cat((adt[:, :, None], adt.new_zeros(b, L, Rp - 1, H)), 2).flatten(1, 2).contiguous()
    diag = (D.to(fp) if D is not None else x.new_zeros(H)).expand(b, L * Rp, H)
    if Rp == 1:  # rank 1 runs the SISO kernels: the own-step term is the diagonal weight there
        diag = diag + (q_rot * k_rot).sum(-1) * gamma
    diag = diag.contiguous()
    starts = segment_starts(seq_idx)
    seg = None
    if starts is not None:
        seg = starts.cumsum(1).to(torch.int32).repeat_interleave(Rp, 1).contiguous()  # (batch, seqlen * Rp)
    h0 = None
    if Input_States is not None:
        ssm0, k0, v0 = (s.to(fp) for s in Input_States[1:])
        prev = torch.einsum("bhp,hrp,brhn->bhpn", v0, MIMO_V.to(fp), k0)
        h0 = (ssm0 + p.first_back[:, ::R, None, None] * prev).contiguous()
    y, hT = _Mamba3Triton.apply(_rows(q_rot, H, R, Rp), k_rows, _rows(flat(p.v), H, R, Rp), adt_rows, diag, h0,
                                seg, chunk, kg_rows, Rp)
    y = y.unflatten(1, (L, Rp))[:, :, :R]  # (batch, seqlen, R, H, P)
    y = nan_where(poison[:, :, None, :, None], y).to(V.dtype)
    if not return_final_states:
        return y
    hT = nan_where(poison[:, -1, :, None, None], hT)
    last_k = k_rot[:, L - 1].unflatten(1, (H, R)).transpose(1, 2)  # (batch, R, H, N)
    return y, p.final_angle[:, ::R], hT, last_k, x[:, L - 1]
