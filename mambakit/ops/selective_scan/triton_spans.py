"""The selective scan's sequence split into spans that run at once (small grids): the rule, and the carry kernels
that give each span the map of the others (forward: h -> P h + S; backward: the adjoint mu -> P mu + M). The scan
kernels that start from them are in `mambakit.ops.selective_scan.triton`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops.selective_scan.triton_tiles import (_channel_block, _load_raw, _prep_delta, _scan_combine,
                                                      _tile_decay, _tile_states)
from mambakit.ops.triton.grid import cdiv

SLOTS_PER_SM = 8  # one-warp backward programs resident per multiprocessor (255 registers)
# the forward (128 registers) fits 16, but with 5.8 per multiprocessor it was no faster with twice the programs
# (benchmarks/RESULTS.md, sixteenth session): it splits only below 6
FWD_BUSY_PER_SM = 6


def span_split(count: int, slots_per_sm: int, nchunks: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(spans, chunks per span) of a kernel whose programs walk their channels' whole sequence: a grid of less than
    about a wave (slots_per_sm programs per multiprocessor) leaves the GPU partly idle, so the sequence is then cut
    into spans that run at once, each from the carry of the others (a small kernel of its own), for about six waves.
    count: the configuration's span count (0: this rule; 1: no split)."""
    spans = count
    if not spans:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        slots = slots_per_sm * sms
        spans = 1 if programs >= 0.9 * slots else cdiv(6 * slots, programs)
    cpg = cdiv(nchunks, max(1, min(spans, nchunks)))
    return cdiv(nchunks, cpg), cpg


@triton.jit
def _selective_scan_fwd_carry_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, seq_ptr, carry_P_ptr, carry_S_ptr,
    dim, seqlen, dstate, dim_per_group, span_tiles, n_spans,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sB_b, sB_g, sB_n, sB_t,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, BT: tl.constexpr, BIG: tl.constexpr,
    A_LOG: tl.constexpr,
):
    """The map h -> P h + S of span q (program axis 2) of the sequence, for the forward kernel's later spans: S the
    span's last state from a zero state, P = exp(A * the span's sum of delta), 0 where a packed sequence starts."""
    q = tl.program_id(2)
    pid_d, pid_b, d1, mask_d, n3, m_s3, st_off, A, A2, bias = _channel_block(dim, dstate, A_ptr, bias_ptr, BLOCK_D,
                                                                            NH, NL, HAS_BIAS, A_LOG)
    t1 = tl.arange(0, BT)
    d0 = (pid_d * BLOCK_D).to(tl.int64)
    u_ptr += pid_b * su_b + d0 * su_d
    delta_ptr += pid_b * sdl_b + d0 * sdl_d
    dd = tl.arange(0, BLOCK_D)[None, :]
    nb = tl.arange(0, NH)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
    m_nb = nb < dstate
    B_ptr += pid_b * sB_b + ((pid_d * BLOCK_D) // dim_per_group) * sB_g
    ro_B = nb * sB_n
    seq_row = pid_b * seqlen
    h = tl.zeros((NH, BLOCK_D, NL), tl.float32)
    dt_sum = tl.zeros((BLOCK_D,), tl.float32)
    any_reset = tl.zeros((BT,), tl.int32)
    it0 = q * span_tiles
    for it in range(it0, tl.minimum(tl.cdiv(seqlen, BT), it0 + span_tiles)):
        t = it * BT + t1
        u_c, d_c, _, B_c, _, reset = _load_raw(u_ptr, delta_ptr, u_ptr, B_ptr, B_ptr, seq_ptr, dd * su_d,
                                               dd * sdl_d, dd * su_d, su_t, sdl_t, su_t, ro_B, ro_B, sB_t, sB_t,
                                               seq_row, t, seqlen, mask_d, m_nb, False, False, HAS_SEQ, BIG)
        m2 = (t < seqlen)[:, None] & mask_d[None, :]
        _, dt = _prep_delta(d_c, m2, bias, HAS_BIAS, SOFTPLUS)
        dA = _tile_decay(dt, A2, reset, HAS_SEQ)
        x = (dt * u_c.to(tl.float32))[:, None, :, None] * B_c.to(tl.float32)[:, :, None, :]
        _, h = _tile_states(dA, x, h, BT)
        dt_sum += tl.sum(dt, axis=0)
        any_reset = tl.maximum(any_reset, reset.to(tl.int32))
    P = tl.exp2(dt_sum[None, :, None] * A2)
    if HAS_SEQ:
        P = tl.where(tl.max(any_reset, axis=0) > 0, 0.0, P)
    out = (pid_b * n_spans + q) * dim * dstate + st_off
    tl.store(carry_P_ptr + out, P, mask=m_s3)
    tl.store(carry_S_ptr + out, h, mask=m_s3)


@triton.jit
def _selective_scan_bwd_carry_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, seq_ptr, gy_ptr, carry_P_ptr, carry_M_ptr,
    dim, seqlen, dstate, dim_per_group, span, n_spans,
    sdl_b, sdl_d, sdl_t, sz_b, sz_d, sz_t, sg_b, sg_d, sg_t, sC_b, sC_g, sC_n, sC_t,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, BT: tl.constexpr, BIG: tl.constexpr,
    A_LOG: tl.constexpr,
):
    """The adjoint map of span q + 1 (program axis 2) of the sequence: the adjoint passed to the state before the
    span is P mu + M, for mu the adjoint of its last state, where (going back in time) mu <- a_t (C_t g_t + mu),
    a_t = exp(delta_t A). Needs no states, so the backward kernel's spans can start at once from their carries."""
    q = tl.program_id(2) + 1
    pid_d, pid_b, d1, mask_d, n3, m_s3, st_off, A, A2, bias = _channel_block(dim, dstate, A_ptr, bias_ptr, BLOCK_D,
                                                                            NH, NL, HAS_BIAS, A_LOG)
    t1 = tl.arange(0, BT)
    d0 = (pid_d * BLOCK_D).to(tl.int64)
    delta_ptr += pid_b * sdl_b + d0 * sdl_d
    z_ptr += pid_b * sz_b + d0 * sz_d
    gy_ptr += pid_b * sg_b + d0 * sg_d
    dd = tl.arange(0, BLOCK_D)[None, :]
    g = (pid_d * BLOCK_D) // dim_per_group
    nb = tl.arange(0, NH)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
    m_nb = nb < dstate
    C_ptr += pid_b * sC_b + g * sC_g
    ro_C = nb * sC_n
    seq_row = pid_b * seqlen
    P = tl.full((NH, BLOCK_D, NL), 1.0, tl.float32)
    M = tl.zeros((NH, BLOCK_D, NL), tl.float32)
    t_start = q * span
    ntiles = tl.cdiv(tl.minimum(seqlen - t_start, span), BT)
    for jj in range(0, ntiles):
        t = t_start + (ntiles - 1 - jj) * BT + t1
        g_c, d_c, z_c, C_c, _, reset = _load_raw(gy_ptr, delta_ptr, z_ptr, C_ptr, C_ptr, seq_ptr, dd * sg_d,
                                                 dd * sdl_d, dd * sz_d, sg_t, sdl_t, sz_t, ro_C, ro_C, sC_t, sC_t,
                                                 seq_row, t, seqlen, mask_d, m_nb, HAS_Z, False, HAS_SEQ, BIG)
        m2 = (t < seqlen)[:, None] & mask_d[None, :]
        _, dt = _prep_delta(d_c, m2, bias, HAS_BIAS, SOFTPLUS)
        dA = _tile_decay(dt, A2, reset, HAS_SEQ)
        gout = g_c.to(tl.float32)
        if HAS_Z:
            zz = z_c.to(tl.float32)
            gout = gout * zz * tl.sigmoid(zz)
        c = gout[:, None, :, None] * C_c.to(tl.float32)[:, :, None, :]
        # the tile's map mu -> Pt mu + Mt, its latest step applied first
        Ps, Ms = tl.associative_scan((tl.flip(dA, 0), tl.flip(dA * c, 0)), 0, _scan_combine)
        last = (t1 == BT - 1)[:, None, None, None]
        Pt = tl.sum(tl.where(last, Ps, 0.0), axis=0)
        Mt = tl.sum(tl.where(last, Ms, 0.0), axis=0)
        M = Pt * M + Mt
        P = Pt * P
    out = (pid_b * n_spans + q) * dim * dstate + st_off
    tl.store(carry_P_ptr + out, P, mask=m_s3)
    tl.store(carry_M_ptr + out, M, mask=m_s3)
