"""Triton kernels of the chunked SSD (Mamba-2), forward and backward, on tensor cores.

The math is that of :func:`mambakit.ops.ssd.ssd_chunked`. Per (batch, head) the sequence is cut into chunks of ``Q``
positions. With ``a`` the within-chunk inclusive cumsum of ``dt * A`` and ``X~ = dt * x``::

    S_c      = sum_s exp(a_last - a_s) B_s X~_s^T             chunk-local state        (d_state, headdim)
    H_{c+1}  = exp(a_last) H_c + S_c                           state passing (sequential over chunks only)
    y_t      = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) X~_s      intra-chunk, (C B^T o L) X~ : two matmuls
             + exp(a_t) C_t H_c                                 inter-chunk read-out       : one matmul

Chunks are long (``Q`` up to 256 positions, so that few states go through memory) and are worked on in blocks of
``BQ`` positions (the (BQ x BQ) tiles of the intra-chunk sums are looped over, as in flash attention).

The kernels live in `triton_fwd` and `triton_bwd` (their tile helpers in `triton_tiles`); this module plans and
launches them. Kernels (forward): ``_chunk_state_fwd`` (cumsum + S_c), ``_state_passing_fwd`` (H_c, final state),
``_chunk_scan_fwd`` (y, one program per query block). Backward: ``_chunk_read_bwd`` (gradient of H_c from the
read-out), ``_state_passing_bwd`` (reverse pass over chunks), ``_chunk_dx_bwd`` (dx per key block and head),
``_chunk_dBC_bwd`` (dC and dB per query block from the gradient of C B^T summed over the group's heads in registers:
no atomics, bit-identical gradients run after run), ``_dt_bwd`` (ddt and dA from the pieces of dL/da the
others wrote). The states that are kept (H_c at chunk starts) are O(batch * nheads * headdim * d_state * seqlen / Q).

``seq_idx`` (packed sequences) is handled by masks: a decay that crosses a sequence boundary is zero.

The first kernel processes dt (bias, softplus, clamp) into float32; the kernels return y with the D skip, without
the z gate (done by the caller, so autograd handles it).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops.ssd.triton_fwd import (  # noqa: F401
    _chunk_state_fwd, _state_passing_fwd, _chunk_states_fwd, _chunk_scan_fwd,
)
from mambakit.ops.ssd.triton_bwd import (  # noqa: F401
    _chunk_read_bwd, _state_passing_bwd, _chunk_states_bwd, _chunk_dx_bwd, _chunk_dBC_bwd, _dt_bwd,
)
from mambakit.ops.dt import process_dt
from mambakit.ops.triton.compile import precompile_once, specialisation
from mambakit.ops.triton.device import multiprocessor_count
from mambakit.ops.triton.grid import cdiv, next_power_of_2
from mambakit.ops.triton.math import softplus


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _pow2(v: int, minimum: int = 16) -> int:
    return max(minimum, next_power_of_2(v))


#: Upper bounds on the chunk (positions whose states are not stored: larger chunks move fewer states through memory
#: but do more intra-chunk work) and on the block (positions per tile). None: the defaults chosen in `_Plan`.
MAX_CHUNK: int = 128
MAX_BLOCK: Optional[int] = None
#: float32 inputs keep short chunks: the reverse cumsum of dL/da over a chunk cancels large terms, and dA lost
#: float32 precision with 64-position chunks (benchmarks/RESULTS.md).
MAX_CHUNK_FP32: int = 32
#: The states H_c entering the chunks (and, backward, their gradients): one sequential pass over the sequence per
#: (batch, head, state tile) that keeps the state in registers (True), or the chunk-local states written to memory
#: and passed along by a separate kernel (False). None: the pass when there are (batch, head) pairs enough to
#: fill half the GPU's multiprocessors (the sweep in benchmarks/RESULTS.md: faster with many pairs, slower with few).
FUSED_STATES: Optional[bool] = None
#: (headdim, d_state) tile of that pass; None: `_Plan.state_tiles` picks it.
STATE_TILE: Optional[Tuple[int, int]] = None
#: Two chunks per step of that pass (forward); None: `_Plan.pairs` decides.
STATE_PAIRS: Optional[bool] = None
#: Positions per step of that pass, 16-bit inputs (whole 128-position chunks were faster than 64-blocks).
MAX_STATE_BLOCK: int = 128


def _block_len(d_state: int, headdim: int, chunk_size: int, itemsize: int) -> int:
    """Positions per tile: a power of two in [16, chunk_size] small enough for the (BQ x BQ) and (BQ x d_state)
    tiles to fit in registers and shared memory. float32 tiles take twice the room of 16-bit ones."""
    cap = 64 if max(d_state, headdim) <= 128 else 32
    if itemsize > 2:
        cap //= 2
    if MAX_BLOCK is not None:
        cap = min(cap, MAX_BLOCK)
    q = 16
    while q * 2 <= min(cap, chunk_size):
        q *= 2
    return q


def _chunk_len(block: int, chunk_size: int, itemsize: int) -> int:
    """Positions per chunk: the largest power of two <= min(chunk_size, MAX_CHUNK), a multiple of the block (the
    result does not depend on it: chunking only reorders the sums); at most MAX_CHUNK_FP32 for float32."""
    cap = min(chunk_size, MAX_CHUNK, MAX_CHUNK_FP32 if itemsize > 2 else MAX_CHUNK)
    q = block
    while q * 2 <= cap:
        q *= 2
    return q


def _precision(dtype: torch.dtype, allow_tf32: bool = False) -> str:
    """The products' input precision: float32 exact ("ieee") unless allow_tf32; 16-bit inputs multiply in their own
    dtype (the flag is then not read)."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


@triton.jit
def _dt_prepare(dt_ptr, bias_ptr, x_ptr, out_ptr, seqlen, nheads, P, Lpad, s_b, s_l, s_h, sx_b, sx_l, sx_h, sx_p, lo,
                hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr,
                BP: tl.constexpr):
    """One program per (batch * head, block of positions): dt (batch, seqlen, nheads), any float dtype -> (batch,
    nheads, Lpad) float32: + bias, softplus (x past 20), clamp to [lo, hi]; 0 past seqlen; NaN where the head's x
    (batch, seqlen, nheads, P) row has a non-finite entry, so that the chunk kernels carry it to the positions after
    it (and only those: they mask the future after their products)."""
    bh = tl.program_id(0)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = pos < seqlen
    v = tl.load(dt_ptr + b * s_b + pos * s_l + h * s_h, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        v = softplus(v)
    if HAS_LIMIT:
        v = tl.where(v == v, tl.minimum(tl.maximum(v, lo), hi), v)  # min/max would turn NaN into a bound
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        xv = tl.load(x_ptr + b * sx_b + pos[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                     mask=valid[:, None] & (p < P)[None, :], other=0.0).to(tl.float32)
        bad = tl.maximum(bad, tl.max((~(tl.abs(xv) < float("inf"))).to(tl.int32), axis=1))
    v = tl.where(bad > 0, float("nan"), v)
    tl.store(out_ptr + (b * nheads + h) * Lpad + pos, tl.where(valid, v, 0.0), mask=pos < Lpad)


def _prepare_dt(dt: Tensor, bias: Optional[Tensor], softplus: bool, limit: Optional[Tuple[float, float]],
                Lpad: int, x: Tensor) -> Tensor:
    """dt (batch, seqlen, nheads) -> (batch, nheads, Lpad) float32, processed as the official kernels do (bias,
    softplus, clamp to limit where given) and zero-padded, in one kernel; NaN where x (batch, seqlen, nheads,
    headdim) has a non-finite entry in the head's row."""
    batch, seqlen, nheads = dt.shape
    out = torch.empty((batch, nheads, Lpad), device=dt.device, dtype=torch.float32)
    BLOCK = 64
    P = x.shape[-1]
    lo, hi = limit if limit is not None else (0.0, 0.0)
    _dt_prepare[batch * nheads, cdiv(Lpad, BLOCK)](
        dt, bias if bias is not None else dt, x, out, seqlen, nheads, P, Lpad, *dt.stride(), *x.stride(), float(lo),
        float(hi), HAS_BIAS=bias is not None, SOFTPLUS=softplus, HAS_LIMIT=limit is not None, BLOCK=BLOCK,
        BP=min(64, next_power_of_2(P)), num_warps=4)
    return out


def dt_processing_grad(ddt: Tensor, dt: Tensor, bias: Optional[Tensor], softplus: bool,
                        limit: Optional[Tuple[float, float]]) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of the raw dt (its dtype) and of the bias from that of the processed dt, ddt (batch, seqlen,
    nheads) float32: what autograd gives through `mambakit.ops.dt.process_dt` (the clamp passes where
    lo <= v <= hi). The PyTorch form of what `ssd_backward(dt_grad=...)` does in its last kernel (kept as its
    reference and for callers holding the processed dt's gradient)."""
    v = process_dt(dt, bias, dtype=torch.float32)  # before the softplus
    if limit is not None:
        pre = process_dt(v, dt_softplus=softplus)  # before the clamp
        ddt = ddt * ((pre >= limit[0]) & (pre <= limit[1]))
    if softplus:
        ddt = ddt * torch.sigmoid(v)
    return ddt.to(dt.dtype), (ddt.sum((0, 1)).to(bias.dtype) if bias is not None else None)


def kernel_chunk_size(seqlen: int, chunk_size: int) -> int:
    """The chunk the kernels run for a requested chunk_size (an upper bound): at most the sequence's length
    rounded up to a power of two >= 16 (the kernels' chunks are powers of two)."""
    return min(chunk_size, max(16, 1 << max(seqlen - 1, 0).bit_length()))


def _padded_segments(seg: Optional[Tensor], Lpad: int) -> Optional[Tensor]:
    if seg is None:
        return None
    out = seg[:, -1:].expand(seg.shape[0], Lpad).to(torch.int32).clone()
    out[:, : seg.shape[1]] = seg
    return out.contiguous()


class _Plan:
    """Shapes and launch parameters shared by forward and backward."""

    def __init__(self, x: Tensor, B: Tensor, chunk_size: int, allow_tf32: bool = False) -> None:
        self.batch, self.seqlen, self.nheads, self.P = x.shape
        self.ngroups, self.N = B.shape[2], B.shape[3]
        self.hpg = self.nheads // self.ngroups
        self.BQ = _block_len(self.N, self.P, chunk_size, x.element_size())
        self.Q = _chunk_len(self.BQ, chunk_size, x.element_size())
        self.NB = self.Q // self.BQ
        # float32 keeps its short blocks there too: dA is ill-conditioned (see MAX_CHUNK_FP32)
        self.state_block = self.BQ if x.element_size() > 2 else min(self.Q, MAX_STATE_BLOCK)
        self.nchunks = -(-self.seqlen // self.Q)
        self.Lpad = self.nchunks * self.Q
        self.BP, self.BN = _pow2(self.P), _pow2(self.N)
        self.prec = _precision(x.dtype, allow_tf32)
        self.sixteen_bit = x.element_size() == 2
        self.PN = self.P * self.N
        self.BLOCK = min(1024, next_power_of_2(self.PN))
        self.nblocks = cdiv(self.PN, self.BLOCK)
        # from the sweep of benchmarks/sweep_ssd.py: 4 warps at d_state 64 and 128 (8 is slower), 2 stages
        self.stages = 2 if x.element_size() == 2 else 1
        self.warps = 4

    def fused_states(self, device: torch.device) -> bool:
        if FUSED_STATES is not None:
            return FUSED_STATES
        return self.batch * self.nheads >= multiprocessor_count(device) // 2

    def pairs(self, device: torch.device) -> bool:
        """Two chunks per step of the forward state pass (`_chunk_states_fwd`): for 16-bit inputs (whole chunks per
        step): faster at long sequences, equal at short ones (benchmarks/RESULTS.md); float32 keeps single chunks."""
        if STATE_PAIRS is not None:
            return STATE_PAIRS
        return self.sixteen_bit

    def state_tiles(self, device: torch.device) -> Tuple[int, int]:
        """(headdim, d_state) tile of `_chunk_states_fwd` / `_chunk_states_bwd`: one program per (batch, head, tile)
        runs through the whole sequence, so with few (batch, head) pairs the state is cut into tiles until there are
        programs enough to fill the GPU (one per multiprocessor). headdim is cut first: its tiles share the B and C
        tiles, which all the heads of a group read anyway."""
        if STATE_TILE is not None:
            return STATE_TILE
        sms = multiprocessor_count(device)
        bp, bn = min(self.BP, 64), min(self.BN, 64)
        while self.batch * self.nheads * cdiv(self.P, bp) * cdiv(self.N, bn) < sms \
                and max(bp, bn) > 16:
            if bp > 16:
                bp //= 2
            else:
                bn //= 2
        return bp, bn

    def head_splits(self, target_programs: int = 1024) -> int:
        """`_chunk_dBC_bwd` sums over a group's heads in registers, one program per (block, batch, group): with
        fewer programs than the GPU holds (a Mamba-2 LM: batch 8 x 2048, one group: 256) the heads are split over
        this many programs (a power of two dividing heads_per_group)."""
        programs = self.nchunks * self.NB * self.batch * self.ngroups
        splits = 1
        while self.hpg % (splits * 2) == 0 and programs * splits < target_programs:
            splits *= 2
        return splits


def _states(pl: "_Plan", x: Tensor, dt: Tensor, A: Optional[Tensor], B: Tensor, initial_states: Optional[Tensor],
            seg: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
            dt_limit: Optional[Tuple[float, float]],
            log_decay: Optional[Tensor] = None, a_log: bool = False) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """The state pass of the forward: (dtp, segp, acs, H) and the final state (see `ssd_forward`)."""
    dev = x.device
    dtp = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, pl.Lpad, x)
    ldp = dtp if log_decay is None else _prepare_dt(log_decay, None, False, None, pl.Lpad, x)
    if log_decay is not None:
        A = torch.zeros(pl.nheads, device=dev, dtype=torch.float32)  # the kernels read the increments from ldp
    segp = _padded_segments(seg, pl.Lpad)
    has_seg = segp is not None
    segp_arg = segp if has_seg else dtp
    acs = torch.empty_like(dtp)
    H = torch.empty((pl.batch, pl.nchunks, pl.nheads, pl.P, pl.N), device=dev,
                    dtype=x.dtype if x.element_size() == 2 else torch.float32)
    final = torch.empty((pl.batch, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
    init = initial_states.float().contiguous() if initial_states is not None else final
    if pl.fused_states(dev):
        BPs, BNs = pl.state_tiles(dev)
        _chunk_states_fwd[pl.batch * pl.nheads, cdiv(pl.P, BPs), cdiv(pl.N, BNs)](
            x, dtp, A, ldp, B, segp_arg, init, acs, H, final, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N,
            pl.nchunks, pl.Lpad, *x.stride(), *B.stride(), HAS_INIT=initial_states is not None, HAS_SEG=has_seg,
            Q=pl.Q, BQ=pl.state_block, BP=BPs, BN=BNs, PAIRS=pl.pairs(dev), PREC=pl.prec,
            LOG_DECAY=log_decay is not None, A_LOG=a_log, num_warps=pl.warps, num_stages=pl.stages)
    else:
        S = torch.empty((pl.batch, pl.nchunks, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
        _chunk_state_fwd[pl.nchunks, pl.batch * pl.nheads](
            x, dtp, A, ldp, B, segp_arg, acs, S, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
            *x.stride(), *B.stride(), HAS_SEG=has_seg, Q=pl.Q, BQ=pl.BQ, BP=pl.BP, BN=pl.BN, PREC=pl.prec,
            LOG_DECAY=log_decay is not None, A_LOG=a_log, num_warps=pl.warps, num_stages=pl.stages)
        _state_passing_fwd[pl.batch * pl.nheads, pl.nblocks](
            S, acs, segp_arg, init, H, final, pl.nheads, pl.PN, pl.nchunks, pl.Lpad,
            HAS_INIT=initial_states is not None, HAS_SEG=has_seg, Q=pl.Q, BLOCK=pl.BLOCK, num_warps=4)
        del S
    return (dtp, segp, acs, H), final


def ssd_states(x: Tensor, dt: Tensor, A: Optional[Tensor], B: Tensor, initial_states: Optional[Tensor],
               seg: Optional[Tensor], chunk_size: int, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
               dt_limit: Optional[Tuple[float, float]] = None,
               log_decay: Optional[Tensor] = None, a_log: bool = False, allow_tf32: bool = False) -> Tuple[Tensor, ...]:
    """What `ssd_forward` returns for the backward (its third result), without computing y: the same kernels on
    the same inputs, so the same values bit for bit. For a backward that recomputes them instead of keeping them
    (the states H_c are (batch, nchunks, nheads, headdim, d_state): headdim * d_state * nheads / Q values per
    position). Arguments as `ssd_forward`'s."""
    return _states(_Plan(x, B, chunk_size, allow_tf32), x, dt, A, B, initial_states, seg, dt_bias, dt_softplus,
                   dt_limit, log_decay, a_log)[0]


def ssd_forward(x: Tensor, dt: Tensor, A: Optional[Tensor], B: Tensor, C: Tensor, D: Optional[Tensor],
                initial_states: Optional[Tensor], seg: Optional[Tensor], chunk_size: int,
                dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                dt_limit: Optional[Tuple[float, float]] = None,
                log_decay: Optional[Tensor] = None, a_log: bool = False,
                allow_tf32: bool = False) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    """x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads), processed here (+ dt_bias (nheads,),
    softplus, clamp to dt_limit where given); A: (nheads,) float32, or None with log_decay (batch, seqlen, nheads),
    the per-position log-decay in place of dt * A; a_log: A holds A_log (nheads,) float32, A = -exp(A_log) formed
    in the kernels;
    B, C: (batch, seqlen, ngroups, d_state); D: (nheads,) or (nheads, headdim) float32 or None; initial_states:
    (batch, nheads, headdim, d_state) or None; seg: (batch, seqlen) segment numbers or None. x, B, C share one dtype.
    chunk_size: upper bound of the chunk. allow_tf32: float32 inputs multiply on the tensor cores in tf32 (10-bit
    mantissas, float32 sums; ~2x faster products) instead of exactly.

    Returns y (x's layout and dtype, with D * x, without the gate), the final state (float32) and what the backward
    needs (`ssd_states` recomputes it)."""
    pl = _Plan(x, B, chunk_size, allow_tf32)
    saved, final = _states(pl, x, dt, A, B, initial_states, seg, dt_bias, dt_softplus, dt_limit, log_decay, a_log)
    dtp, segp, acs, H = saved
    segp_arg = segp if segp is not None else dtp
    y = torch.empty_like(x)
    BPy = min(pl.BP, 64)
    _chunk_scan_fwd[pl.nchunks * pl.NB, pl.batch * pl.nheads, cdiv(pl.P, BPy)](
        x, dtp, B, C, D if D is not None else dtp, segp_arg, acs, H, y, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N,
        pl.nchunks, pl.Lpad, *x.stride(), *B.stride(), *C.stride(), *y.stride(), HAS_SEG=segp is not None,
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, Q=pl.Q, BQ=pl.BQ, BP=BPy, BN=pl.BN,
        PREC=pl.prec, num_warps=pl.warps, num_stages=pl.stages)
    return y, final, saved


class DtGrad(NamedTuple):
    """What `ssd_backward` needs to return the raw dt's gradient itself (its last kernel carries ddt back through
    the processing): the raw dt (batch, seqlen, nheads), the bias (nheads,) or None, softplus, the clamp (lo, hi) or
    None, and out: a (batch, seqlen, nheads) tensor of any strides to write the gradient into (None: a new tensor
    like dt)."""
    dt: Tensor
    bias: Optional[Tensor]
    softplus: bool
    limit: Optional[Tuple[float, float]]
    out: Optional[Tensor] = None


def _workspace(device: torch.device, **sizes: int) -> Tuple[Tensor, dict]:
    """One float32 buffer for several scratch tensors (one allocation instead of one each: fewer host ops): returns
    it and each name's offset in elements (multiples of 32, so that every slice is as aligned as the buffer)."""
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += -(-size // 32) * 32
    return torch.empty(max(total, 1), device=device, dtype=torch.float32), offsets


def ssd_backward(x: Tensor, A: Optional[Tensor], B: Tensor, C: Tensor, D: Optional[Tensor],
                 saved: Tuple[Tensor, ...], dy: Tensor, dfinal: Optional[Tensor], chunk_size: int,
                 dx_out: Optional[Tensor] = None, dt_grad: Optional[DtGrad] = None,
                 dB_out: Optional[Tensor] = None, dC_out: Optional[Tensor] = None,
                 need_dinit: bool = True, log_decay: bool = False,
                 a_log: bool = False, allow_tf32: bool = False) -> Tuple[Optional[Tensor], ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dinit, dbias): dx in x's dtype, dB, dC in B's dtype, the others float32;
    dx: x's shape, ddt: (batch, seqlen, nheads) of the processed dt, dA: (nheads,), dB, dC: B's shape, dD: D's
    shape (None without D), dinit: (batch, nheads, headdim, d_state) (None unless need_dinit), dbias None.
    dx_out: x's shape and dtype, dB_out / dC_out: B's shape and dtype, any strides (e.g. slices of a bigger
    gradient buffer): the gradient is written there. With dt_grad, ddt is the raw dt's gradient (its dtype, in
    dt_grad.out when given) and dbias the bias's (its dtype; None without a bias), as `dt_processing_grad` gives.
    log_decay: the forward ran with a per-position log-decay (A None): dA is then its gradient, (batch, seqlen,
    nheads) float32. a_log: A holds A_log (as the forward's a_log): dA is then A_log's gradient. allow_tf32: as
    the forward's."""
    dtp, segp, acs, H = saved
    pl = _Plan(x, B, chunk_size, allow_tf32)
    dev = x.device
    if log_decay:
        A = torch.zeros(pl.nheads, device=dev, dtype=torch.float32)  # ddt = q alone; r goes to dld
    dld = torch.empty_like(dtp) if log_decay else dtp  # not written without log_decay
    has_seg = segp is not None
    segp_arg = segp if has_seg else dtp
    dy = dy.to(x.dtype)
    common = dict(HAS_SEG=has_seg, Q=pl.Q, BQ=pl.BQ, BN=pl.BN, PREC=pl.prec, num_warps=pl.warps,
                  num_stages=pl.stages)
    G = torch.empty_like(H)  # input dtype for 16-bit inputs like H: every reader rounds it to that dtype anyway
    dinit = torch.empty((pl.batch, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32) if need_dinit else None
    dinit_arg = dinit if need_dinit else G  # not written without need_dinit
    dfin = dfinal.float().contiguous() if dfinal is not None else G  # not read without dfinal
    fused = pl.fused_states(dev)
    if fused:
        BPs, BNs = pl.state_tiles(dev)
        grid = (pl.batch * pl.nheads, cdiv(pl.P, BPs), cdiv(pl.N, BNs))
    ntiles = grid[1] * grid[2] if fused else pl.nblocks  # parts of dlast per (batch, head, chunk)
    splits = pl.head_splits()
    d_cols = 0 if D is None else (pl.P if D.dim() == 2 else 1)
    K = pl.nheads * (2 + d_cols)  # [dA, dbias, dD] per (batch, chunk)
    rows = pl.batch * pl.nheads * pl.Lpad
    bhc = pl.batch * pl.nheads * pl.nchunks
    # the float32 scratch, shapes: dlast (batch, nheads, nchunks, ntiles); q, dacol, row (batch, nheads, Lpad);
    # rowpart (batch, nheads, nchunks, NB, Q); usum (batch, nheads, nchunks * NB); dD (batch, nchunks * NB, nheads,
    # BP); dCs (splits, batch, Lpad, ngroups, N); dBp (splits, batch, Lpad, NB + 1, ngroups, N); red (batch,
    # nchunks, K)
    ws, off = _workspace(
        dev, dlast=bhc * ntiles, q=rows, dacol=rows, row=rows, rowpart=bhc * pl.NB * pl.Q, usum=bhc * pl.NB,
        dD=0 if D is None else pl.batch * pl.nchunks * pl.NB * pl.nheads * pl.BP,
        dCs=splits * pl.batch * pl.Lpad * pl.ngroups * pl.N,
        dBp=splits * pl.batch * pl.Lpad * (pl.NB + 1) * pl.ngroups * pl.N, red=pl.batch * pl.nchunks * K)
    if fused:
        _chunk_states_bwd[grid](
            dy, C, segp_arg, acs, H, dfin, G, dinit_arg, ws, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N,
            pl.nchunks, pl.Lpad, off["dlast"], *dy.stride(), *C.stride(), HAS_DFINAL=dfinal is not None,
            HAS_SEG=has_seg, Q=pl.Q, BQ=pl.state_block, BP=BPs, BN=BNs, PREC=pl.prec, STORE_DINIT=need_dinit,
            num_warps=pl.warps,
            num_stages=pl.stages)
    else:
        dHl = torch.empty_like(H, dtype=torch.float32)
        BPy = min(pl.BP, 64)
        _chunk_read_bwd[pl.nchunks, pl.batch * pl.nheads, cdiv(pl.P, BPy)](
            dy, C, segp_arg, acs, dHl, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
            *dy.stride(), *C.stride(), BP=BPy, **common)
        _state_passing_bwd[pl.batch * pl.nheads, pl.nblocks](
            dHl, H, acs, segp_arg, dfin, G, dinit_arg, ws, pl.nheads, pl.PN, pl.nchunks, pl.Lpad, pl.nblocks,
            off["dlast"], HAS_DFINAL=dfinal is not None, HAS_SEG=has_seg, Q=pl.Q, BLOCK=pl.BLOCK,
            STORE_DINIT=need_dinit,
            num_warps=4)
        del dHl

    # accumulated in float32, rounded once on the way out
    dx = dx_out if dx_out is not None else torch.empty(x.shape, device=dev, dtype=x.dtype)
    _chunk_dx_bwd[pl.nchunks * pl.NB, pl.batch * pl.nheads](
        x, dtp, B, C, D if D is not None else dtp, segp_arg, acs, G, dy, dx, ws, ws, ws, ws, ws,
        pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad, off["q"], off["dacol"], off["rowpart"],
        off["usum"], off["dD"], *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), HAS_D=D is not None,
        D_HDIM=D is not None and D.dim() == 2, BP=pl.BP, **common)
    # slot i < NB of dBp: the part of dB from query block i (written where i is at or after the key block: only
    # those are read); slot NB: the state term. Partial sums per head split, added by `_dt_bwd` in a fixed order:
    # deterministic.
    _chunk_dBC_bwd[pl.nchunks * pl.NB, pl.batch * pl.ngroups, splits](
        x, dtp, B, C, segp_arg, acs, H, G, dy, ws, ws, ws, pl.seqlen, pl.nheads, pl.ngroups, pl.hpg,
        pl.hpg // splits, pl.P, pl.N, pl.nchunks, pl.Lpad, off["dCs"], off["dBp"], off["row"], *x.stride(),
        *B.stride(), *C.stride(), *dy.stride(), BP=pl.BP, **common)
    dB = dB_out if dB_out is not None else torch.empty(B.shape, device=dev, dtype=B.dtype)
    dC = dC_out if dC_out is not None else torch.empty(B.shape, device=dev, dtype=B.dtype)
    if dt_grad is None:
        ddt = torch.empty_like(dtp)
        graw, raw, bias, (lo, hi) = ddt, dtp, dtp, (0.0, 0.0)
    else:
        raw, bias = dt_grad.dt, dt_grad.bias
        graw = dt_grad.out if dt_grad.out is not None else torch.empty_like(raw)
        lo, hi = dt_grad.limit if dt_grad.limit is not None else (0.0, 0.0)
        ddt = graw
    _dt_bwd[pl.nchunks, pl.batch * pl.nheads](
        dtp, A, ws, ws, ws, ws, ws, ws, ddt, dld, ws, raw, bias if bias is not None else dtp, graw,
        ws, ws, ws, dB, dC, pl.seqlen, *(raw.stride() if dt_grad is not None else (0, 0, 0)),
        *(graw.stride() if dt_grad is not None else (0, 0, 0)), float(lo), float(hi), pl.nheads, pl.nchunks,
        pl.Lpad, ntiles, pl.P, pl.N, pl.ngroups, pl.hpg, splits, K, off["row"], off["rowpart"], off["dacol"],
        off["q"], off["usum"], off["dlast"], off["red"], off["dD"], off["dBp"], off["dCs"], *dB.stride(),
        *dC.stride(), Q=pl.Q, BQ=pl.BQ, RAW=dt_grad is not None, HAS_BIAS=dt_grad is not None and bias is not None,
        SOFTPLUS=dt_grad is not None and dt_grad.softplus, HAS_LIMIT=dt_grad is not None and dt_grad.limit is not None,
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, BP=pl.BP, BNR=min(pl.BN, 32),
        LOG_DECAY=log_decay, A_LOG=a_log, num_warps=1)
    red = ws.as_strided((pl.batch * pl.nchunks, K), (K, 1), off["red"])  # (batch * nchunks, K)
    dA, dbias, dD = red.sum(0).split([pl.nheads, pl.nheads, pl.nheads * d_cols])
    if dt_grad is None:
        ddt = ddt[:, :, : pl.seqlen].transpose(1, 2)
    dbias = dbias.to(bias.dtype) if dt_grad is not None and bias is not None else None
    dD = None if D is None else (dD.view(pl.nheads, pl.P) if D.dim() == 2 else dD)
    if log_decay:
        dA = dld[:, :, : pl.seqlen].transpose(1, 2)
    return dx, ddt, dA, dB, dC, dD, dinit, dbias


# ----------------------------------------------------------------------------------------------------------------------
# First call: compile every kernel of forward and backward at once, in child processes (mambakit.ops.triton.compile)
# ----------------------------------------------------------------------------------------------------------------------


def _config_key(x: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], has_init: bool, seg: Optional[Tensor],
                chunk_size: int, *more: Tensor) -> tuple:
    """What decides which kernel specialisations a call launches: dtypes, head and state sizes, the options, and
    what Triton specialises on of the lengths, strides and addresses."""
    return (x.dtype, x.shape[2:], B.shape[2:], None if D is None else D.dim(), has_init, seg is None, chunk_size,
            x.device, specialisation(x.shape[0], x.shape[1], -(-x.shape[1] // chunk_size), x, B, C, *more))


# ----------------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------------


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, seg, chunk_size, dt_bias, dt_softplus,  # type: ignore[override]
                dt_limit, log_decay, allow_tf32):
        processing = (dt_bias, dt_softplus, dt_limit)
        has_ld = log_decay is not None
        tf32 = dict(allow_tf32=allow_tf32)

        def first_call() -> None:  # forward and backward (the upstream gradients guessed: contiguous, materialised)
            y, final, saved = ssd_forward(x, dt, A, B, C, D, initial_states, seg, chunk_size, *processing,
                                          log_decay=log_decay, **tf32)
            ssd_backward(x, A, B, C, D, saved, torch.empty_like(y), torch.empty_like(final), chunk_size,
                         dt_grad=DtGrad(dt, *processing), need_dinit=initial_states is not None, log_decay=has_ld,
                         **tf32)

        key = _config_key(x, B, C, D, initial_states is not None, seg, chunk_size, dt) + (
            dt_bias is not None, dt_softplus, dt_limit is not None, has_ld, allow_tf32)
        precompile_once(("forward",) + key, first_call)
        y, final, saved = ssd_forward(x, dt, A, B, C, D, initial_states, seg, chunk_size, *processing,
                                      log_decay=log_decay, **tf32)
        dtp, segp, acs, H = saved
        ctx.save_for_backward(x, A, B, C, D, dtp, acs, H, segp, dt, dt_bias)
        ctx.chunk_size = chunk_size
        ctx.has_init = initial_states is not None
        ctx.dt_softplus, ctx.dt_limit = dt_softplus, dt_limit
        ctx.log_decay_dtype = log_decay.dtype if has_ld else None
        ctx.allow_tf32 = allow_tf32
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):  # type: ignore[override]
        x, A, B, C, D, dtp, acs, H, segp, dt, dt_bias = ctx.saved_tensors
        dy = gy if gy is not None else torch.zeros_like(x)
        # the real upstream gradients may specialise the backward kernels otherwise than forward's guess
        has_ld = ctx.log_decay_dtype is not None
        key = _config_key(x, B, C, D, ctx.has_init, segp, ctx.chunk_size, dy) + (has_ld, ctx.allow_tf32)
        tf32 = dict(allow_tf32=ctx.allow_tf32)
        precompile_once(("backward", dy.dtype, gfinal is None) + key,
                        lambda: ssd_backward(x, A, B, C, D, (dtp, segp, acs, H), dy, gfinal, ctx.chunk_size,
                                             dt_grad=DtGrad(dt, dt_bias, ctx.dt_softplus, ctx.dt_limit),
                                             need_dinit=ctx.has_init, log_decay=has_ld, **tf32))
        dx, ddt, dA, dB, dC, dD, dinit, dbias = ssd_backward(
            x, A, B, C, D, (dtp, segp, acs, H), dy, gfinal, ctx.chunk_size,
            dt_grad=DtGrad(dt, dt_bias, ctx.dt_softplus, ctx.dt_limit), need_dinit=ctx.has_init, log_decay=has_ld,
            **tf32)
        dld = dA.to(ctx.log_decay_dtype) if has_ld else None
        return (dx, ddt, None if has_ld else dA, dB, dC, dD, dinit,
                None, None, dbias, None, None, dld, None)


def ssd_triton_core(x: Tensor, dt: Tensor, A: Optional[Tensor], B: Tensor, C: Tensor, D: Optional[Tensor],
                    initial_states: Optional[Tensor], seg: Optional[Tensor], chunk_size: int,
                    dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                    dt_limit: Optional[Tuple[float, float]] = None,
                    log_decay: Optional[Tensor] = None, allow_tf32: bool = False) -> Tuple[Tensor, Tensor]:
    """Differentiable SSD core with the D skip, without the gate. x: (batch, seqlen, nheads, headdim)
    float16/bfloat16/float32; dt: (batch, seqlen, nheads), processed in the first kernel (+ dt_bias (nheads,),
    softplus, clamp to dt_limit where given); B, C are cast to x's dtype; D: (nheads,) or (nheads, headdim) or None;
    A None with log_decay (batch, seqlen, nheads), the per-position log-decay (differentiable) in place of dt * A.
    allow_tf32: float32 x multiplies in tf32 (see `ssd_forward`). Returns y (x's dtype) and the final state
    (float32)."""
    io = x.dtype
    init = None if initial_states is None else initial_states.float()
    Df = None if D is None else D.float().contiguous()
    Af = None if A is None else A.float().contiguous()
    return _SSDTriton.apply(x, dt, Af, B.to(io), C.to(io), Df, init, seg, chunk_size, dt_bias,
                            dt_softplus, dt_limit, log_decay, allow_tf32)
