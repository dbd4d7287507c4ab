"""Triton selective scan (the S6 recurrence of Mamba-1): fused forward, deterministic recomputing backward.

Same contract as `mambakit.ops.selective_scan.naive.selective_scan_ref`:
    u, delta, z: (batch, dim, seqlen);  A: (dim, d_state);
    B, C: (batch, d_state, seqlen) or (batch, G, d_state, seqlen)
    D, delta_bias: (dim,);  initial_state / last state: (batch, dim, d_state) float32;  seq_idx: (batch, seqlen) int
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = <C_t, h_t> + D u_t,   y_t *= silu(z_t)

Design (see benchmarks/RESULTS_triton_scan.md for the numbers):
- One program owns a block of channels x all (padded) states of one batch element and walks time in tiles of BT steps.
  Compute tensors are 4D (BT, NH, BLOCK_D, NL) with state index n = nh * NL + nl. With Triton's default layout for
  that shape the lanes cover (BLOCK_D, NL) and each thread holds all BT steps and all NH high state indices, so the
  scan along time (tl.associative_scan on axis 0) is a plain in-register recurrence (no shuffles), the read-out
  sum over states is mostly in-thread (log2(NL) shuffle levels), and tl.flip along time is free (register renaming).
- Forward: discretisation (exp2(delta * A * log2 e), delta * B * u), scan, read-out with C, D skip and silu(z) gate in
  one kernel; the state stays in registers. Only the state at the start of every chunk of CHUNK steps is written (for
  the backward) plus the final state. Small grids split the sequence into spans as the backward does (below): a
  carry kernel gives each span's map h -> P h + S, each span starts from the earlier ones'.
- Backward: per program, chunks in reverse. Pass A recomputes the chunk from its saved start state and writes the
  state at each tile start into a small per-program scratch (L2-resident); pass B walks the tiles backwards,
  recomputes each tile's states from the scratch and runs the adjoint
      lambda_t = C_t g_t + exp(delta_{t+1} A) lambda_{t+1}
  as a reversed associative scan (flip, scan, flip) whose elements carry (a, 1, a*c, c), so that no time shift is
  needed. When its grid of (channel block, batch row) programs is less than about a wave (small batches, few
  channels), the sequence is cut into spans of chunks that run at once: a carry kernel first gives each later span's
  adjoint map (mu -> P mu + M: no states needed), and each span's program starts from the carry of the spans after
  it. Reductions over the batch/time/channel-blocks (dA, dB, dC, dD, d delta_bias) are written as per-program
  partial sums and summed by torch in a fixed order: no atomics, so gradients are bit-identical run to run.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan.chunked import selective_scan_chunked
from mambakit.ops.selective_scan.common import check_selective_scan_inputs, grouped_pair
from mambakit.ops.selective_scan.triton_config import ScanConfig, pick_config  # noqa: F401 (re-exported)
from mambakit.ops.selective_scan.triton_spans import (FWD_BUSY_PER_SM, SLOTS_PER_SM, _selective_scan_bwd_carry_kernel,
                                                      _selective_scan_fwd_carry_kernel, span_split)
from mambakit.ops.selective_scan.triton_tiles import (_adjoint_combine, _channel_block, _load_raw, _prep_delta,
                                                      _tile_decay, _tile_states, _wide)
from mambakit.ops.triton.device import interpreted
from mambakit.ops.triton.grid import cdiv

MAX_D_STATE = 256


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr,
    y_ptr, states_ptr, last_ptr, carry_P_ptr, carry_S_ptr,
    dim, seqlen, dstate, dim_per_group, ngroups, nchunks, span_tiles, n_spans,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sz_b, sz_d, sz_t, sy_b, sy_d, sy_t,
    sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, BT: tl.constexpr, TPC: tl.constexpr,
    BIG: tl.constexpr, A_LOG: tl.constexpr,
):
    pid_d, pid_b, d1, mask_d, n3, m_s3, st_off, A, A2, bias = _channel_block(dim, dstate, A_ptr, bias_ptr, BLOCK_D,
                                                                            NH, NL, HAS_BIAS, A_LOG)
    t1 = tl.arange(0, BT)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    # 64-bit offsets of this program's blocks, 32-bit offsets inside them (unless BIG)
    d0 = (pid_d * BLOCK_D).to(tl.int64)
    u_ptr += pid_b * su_b + d0 * su_d
    delta_ptr += pid_b * sdl_b + d0 * sdl_d
    y_ptr += pid_b * sy_b + d0 * sy_d
    z_ptr += pid_b * sz_b + d0 * sz_d
    dd = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    seq_row = pid_b * seqlen
    g = (pid_d * BLOCK_D) // dim_per_group
    nb = tl.arange(0, NH)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]  # (1, NH, NL)
    m_nb = nb < dstate
    B_ptr += pid_b * sB_b + g * sB_g
    C_ptr += pid_b * sC_b + g * sC_g
    ro_B = nb * sB_n
    ro_C = nb * sC_n
    ro_u = dd * su_d
    ro_dl = dd * sdl_d
    ro_z = dd * sz_d
    state_base = pid_b * dim * dstate
    if HAS_H0:
        h = tl.load(h0_ptr + state_base + st_off, mask=m_s3, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((NH, BLOCK_D, NL), tl.float32)
    q = tl.program_id(2)  # this program's span of tiles: [q * span_tiles, (q + 1) * span_tiles)
    carry_base = pid_b * n_spans * dim * dstate + st_off
    for j in range(0, q):  # the earlier spans' maps h -> P h + S (their carry kernel)
        h = tl.load(carry_P_ptr + carry_base + j * dim * dstate, mask=m_s3, other=0.0) * h \
            + tl.load(carry_S_ptr + carry_base + j * dim * dstate, mask=m_s3, other=0.0)
    it0 = q * span_tiles
    ntiles = tl.minimum(tl.cdiv(seqlen, BT), it0 + span_tiles)
    u_n, d_n, z_n, B_n, C_n, r_n = _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z,
                                             su_t, sdl_t, sz_t, ro_B, ro_C, sB_t, sC_t, seq_row, it0 * BT + t1,
                                             seqlen, mask_d, m_nb, HAS_Z, True, HAS_SEQ, BIG)
    for it in range(it0, ntiles):
        if SAVE_STATES:
            if it % TPC == 0:
                tl.store(states_ptr + (pid_b * nchunks + it // TPC) * dim * dstate + st_off, h, mask=m_s3)
        t = it * BT + t1
        u_c, d_c, z_c, B_c, C_c, reset = u_n, d_n, z_n, B_n, C_n, r_n
        u_n, d_n, z_n, B_n, C_n, r_n = _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z,
                                                 su_t, sdl_t, sz_t, ro_B, ro_C, sB_t, sC_t, seq_row,
                                                 t + BT, seqlen, mask_d, m_nb, HAS_Z, True, HAS_SEQ, BIG)
        m2 = (t < seqlen)[:, None] & mask_d[None, :]
        u = u_c.to(tl.float32)
        raw, dt = _prep_delta(d_c, m2, bias, HAS_BIAS, SOFTPLUS)
        dA = _tile_decay(dt, A2, reset, HAS_SEQ)
        x = (dt * u)[:, None, :, None] * B_c.to(tl.float32)[:, :, None, :]
        hs, h = _tile_states(dA, x, h, BT)
        y = tl.sum(tl.sum(hs * C_c.to(tl.float32)[:, :, None, :], axis=1), axis=2)  # (BT, BLOCK_D)
        if HAS_D:
            y += u * Dv[None, :]
        if HAS_Z:
            zz = z_c.to(tl.float32)
            y = y * (zz * tl.sigmoid(zz))
        tl.store(y_ptr + dd * sy_d + _wide(t, BIG)[:, None] * sy_t, y.to(y_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + state_base + st_off, h, mask=m_s3 & (n3 * 0 + q == n_spans - 1))  # the last span's


# ----------------------------------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, states_ptr, gy_ptr, glast_ptr,
    scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr, dh0_ptr,
    carry_P_ptr, carry_M_ptr,
    dim, seqlen, dstate, dim_per_group, ngroups, nchunks, n_dblocks, chunk, red_stride, bc_stride, cpg, n_spans,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sz_b, sz_d, sz_t, sg_b, sg_d, sg_t,
    sdu_b, sdu_d, sdu_t, sddl_b, sddl_d, sddl_t, sdz_b, sdz_d, sdz_t,
    sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, BT: tl.constexpr, TPC: tl.constexpr,
    BIG: tl.constexpr, A_LOG: tl.constexpr,
):
    pid_d, pid_b, d1, mask_d, n3, m_s3, st_off, A, A2, bias = _channel_block(dim, dstate, A_ptr, bias_ptr, BLOCK_D,
                                                                            NH, NL, HAS_BIAS, A_LOG)
    t1 = tl.arange(0, BT)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    d0 = (pid_d * BLOCK_D).to(tl.int64)
    u_ptr += pid_b * su_b + d0 * su_d
    delta_ptr += pid_b * sdl_b + d0 * sdl_d
    z_ptr += pid_b * sz_b + d0 * sz_d
    gy_ptr += pid_b * sg_b + d0 * sg_d
    du_ptr += pid_b * sdu_b + d0 * sdu_d
    ddelta_ptr += pid_b * sddl_b + d0 * sddl_d
    dz_ptr += pid_b * sdz_b + d0 * sdz_d
    dd = tl.arange(0, BLOCK_D)[None, :]
    ro_u = dd * su_d
    ro_dl = dd * sdl_d
    ro_z = dd * sz_d
    seq_row = pid_b * seqlen
    g = (pid_d * BLOCK_D) // dim_per_group
    nb = tl.arange(0, NH)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
    m_nb = nb < dstate
    B_ptr += pid_b * sB_b + g * sB_g
    C_ptr += pid_b * sC_b + g * sC_g
    ro_B = nb * sB_n
    ro_C = nb * sC_n
    part_blk = (pid_b * n_dblocks + pid_d) * bc_stride  # this program's (dstate, seqlen) block of each
    dB_part_ptr += part_blk
    dC_part_ptr += part_blk
    part_row = nb * seqlen  # (1, NH, NL) into this program's block of the dB/dC partials
    state_base = pid_b * dim * dstate
    # this program's scratch: TPC states laid out [tile][d][nl][nh], written and read by this program only (nh
    # fastest: the coalesced layout of these accesses is then the compute layout, no shuffling through shared memory)
    sc_off = (tl.arange(0, BLOCK_D)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]) * NH \
        + tl.arange(0, NH)[:, None, None]
    SC: tl.constexpr = NH * BLOCK_D * NL
    q = tl.program_id(2)  # this program's span of chunks: [q * cpg, (q + 1) * cpg)
    scratch_ptr += ((pid_b * n_dblocks + pid_d) * n_spans + q) * (TPC * SC)

    if HAS_GLAST:
        mu = tl.load(glast_ptr + state_base + st_off, mask=m_s3, other=0.0).to(tl.float32)
    else:
        mu = tl.zeros((NH, BLOCK_D, NL), tl.float32)  # adjoint of the state just before the tiles still to do
    # the later spans' adjoint maps mu -> P mu + M (their carry kernel), applied from the last span back to ours
    carry_base = pid_b * n_spans * dim * dstate + st_off
    for jj in range(0, n_spans - 1 - q):
        j = n_spans - 1 - jj
        cP = tl.load(carry_P_ptr + carry_base + j * dim * dstate, mask=m_s3, other=0.0)
        cM = tl.load(carry_M_ptr + carry_base + j * dim * dstate, mask=m_s3, other=0.0)
        mu = cP * mu + cM
    dA_acc = tl.zeros((NH, BLOCK_D, NL), tl.float32)
    dD_acc = tl.zeros((BT, BLOCK_D), tl.float32)
    dbias_acc = tl.zeros((BT, BLOCK_D), tl.float32)
    k_end = tl.minimum(nchunks, (q + 1) * cpg)
    for kk in range(0, k_end - q * cpg):
        k = k_end - 1 - kk
        c0 = k * chunk
        n_valid = tl.minimum(TPC, tl.cdiv(seqlen - c0, BT))
        # Pass A: the state at the start of each tile of chunk k, into the scratch
        h = tl.load(states_ptr + (pid_b * nchunks + k) * dim * dstate + st_off, mask=m_s3, other=0.0)
        u_n, d_n, z_n, B_n, C_n, r_n = _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z,
                                                 su_t, sdl_t, sz_t, ro_B, ro_C, sB_t, sC_t,
                                                 seq_row, c0 + t1, seqlen, mask_d, m_nb, False, False, HAS_SEQ, BIG)
        for j in range(0, n_valid):
            tl.store(scratch_ptr + j * SC + sc_off, h)
            t = c0 + j * BT + t1
            u_c, d_c, B_c, reset = u_n, d_n, B_n, r_n
            tn = tl.where(j + 1 < n_valid - 1, t + BT, seqlen)  # nothing to prefetch past the chunk's last scan
            u_n, d_n, z_n, B_n, C_n, r_n = _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z,
                                                     su_t, sdl_t, sz_t, ro_B, ro_C, sB_t, sC_t,
                                                     seq_row, tn, seqlen, mask_d, m_nb, False, False, HAS_SEQ, BIG)
            if j < n_valid - 1:
                m2 = (t < seqlen)[:, None] & mask_d[None, :]
                raw, dt = _prep_delta(d_c, m2, bias, HAS_BIAS, SOFTPLUS)
                dA = _tile_decay(dt, A2, reset, HAS_SEQ)
                x = (dt * u_c.to(tl.float32))[:, None, :, None] * B_c.to(tl.float32)[:, :, None, :]
                hs, h = _tile_states(dA, x, h, BT)
        tl.debug_barrier()
        # Pass B: tiles backwards; each tile's loads are issued while the tile after it is computed
        t = c0 + (n_valid - 1) * BT + t1
        u_n, d_n, z_n, B_n, C_n, r_n = _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z,
                                                 su_t, sdl_t, sz_t, ro_B, ro_C, sB_t, sC_t,
                                                 seq_row, t, seqlen, mask_d, m_nb, HAS_Z, True, HAS_SEQ, BIG)
        g_n = tl.load(gy_ptr + dd * sg_d + _wide(t, BIG)[:, None] * sg_t,
                      mask=(t < seqlen)[:, None] & mask_d[None, :], other=0.0)
        hp_n = tl.load(scratch_ptr + (n_valid - 1) * SC + sc_off)
        for jj in range(0, n_valid):
            j = n_valid - 1 - jj
            t = c0 + j * BT + t1
            u_c, d_c, z_c, B_c, C_c, reset, g_c, h_prev = u_n, d_n, z_n, B_n, C_n, r_n, g_n, hp_n
            jp = tl.maximum(j - 1, 0)
            tp = tl.where(j > 0, t - BT, seqlen)  # nothing to prefetch before the chunk's first tile
            u_n, d_n, z_n, B_n, C_n, r_n = _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z,
                                                     su_t, sdl_t, sz_t, ro_B, ro_C, sB_t, sC_t,
                                                     seq_row, tp, seqlen, mask_d, m_nb, HAS_Z, True, HAS_SEQ, BIG)
            g_n = tl.load(gy_ptr + dd * sg_d + _wide(tp, BIG)[:, None] * sg_t,
                          mask=(tp < seqlen)[:, None] & mask_d[None, :], other=0.0)
            hp_n = tl.load(scratch_ptr + jp * SC + sc_off)
            m2 = (t < seqlen)[:, None] & mask_d[None, :]
            m3 = (t < seqlen)[:, None, None] & m_nb
            u = u_c.to(tl.float32)
            Bt = B_c.to(tl.float32)
            Ct = C_c.to(tl.float32)
            raw, dt = _prep_delta(d_c, m2, bias, HAS_BIAS, SOFTPLUS)
            dA = _tile_decay(dt, A2, reset, HAS_SEQ)
            dtu = dt * u
            x = dtu[:, None, :, None] * Bt[:, :, None, :]
            hs, h_last = _tile_states(dA, x, h_prev, BT)
            gout = g_c.to(tl.float32)
            tw = _wide(t, BIG)[:, None]
            if HAS_Z:
                zz = z_c.to(tl.float32)
                sz = tl.sigmoid(zz)
                y_pre = tl.sum(tl.sum(hs * Ct[:, :, None, :], axis=1), axis=2) + u * Dv[None, :]
                dz = gout * y_pre * sz * (1.0 + zz * (1.0 - sz))
                tl.store(dz_ptr + dd * sdz_d + tw * sdz_t, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                gc = gout * zz * sz  # gradient of the pre-gate output
            else:
                gc = gout
            if HAS_D:
                dD_acc += gc * u
            # adjoint: lambda_t = C_t gc_t + dA_{t+1} lambda_{t+1}, the carry mu enters at the tile's last step
            c = gc[:, None, :, None] * Ct[:, :, None, :]
            c = tl.where((t1 == BT - 1)[:, None, None, None], c + mu[None, :, :, :], c)
            ones = tl.full(c.shape, 1.0, tl.float32)
            _, _, m_r, l_r = tl.associative_scan(
                (tl.flip(dA, 0), ones, tl.flip(dA * c, 0), tl.flip(c, 0)), 0, _adjoint_combine)
            lam = tl.flip(l_r, 0)
            mu = tl.sum(tl.where((t1 == 0)[:, None, None, None], tl.flip(m_r, 0), 0.0), axis=0)
            # channel-block partial sums of dC and dB, (BT, NH, NL)
            dC_t = tl.sum(gc[:, None, :, None] * hs, axis=2)
            dB_t = tl.sum(lam * dtu[:, None, :, None], axis=2)
            p_offs = part_row + t[:, None, None]
            tl.store(dC_part_ptr + p_offs, dC_t, mask=m3)
            tl.store(dB_part_ptr + p_offs, dB_t, mask=m3)
            # per-channel gradients, (BT, BLOCK_D)
            w = lam * (hs - x)  # dLoss/d(log decay_t)
            s_lb = tl.sum(tl.sum(lam * Bt[:, :, None, :], axis=1), axis=2)
            s_aw = tl.sum(tl.sum(w * A[None, :, :, :], axis=1), axis=2)
            dA_acc += tl.sum(w * dt[:, None, :, None], axis=0)
            du = dt * s_lb + gc * Dv[None, :]
            ddt = u * s_lb + s_aw
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(m2, ddt, 0.0)
            dbias_acc += ddt
            tl.store(du_ptr + dd * sdu_d + tw * sdu_t, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + dd * sddl_d + tw * sddl_t, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()
    red_row = (pid_b * n_spans + q) * red_stride  # this batch row's and span's [dA | dD | dbias] partials
    tl.store(dA_part_ptr + red_row + st_off, dA_acc * A if A_LOG else dA_acc, mask=m_s3)  # A_LOG: A_log's part
    tl.store(dh0_ptr + state_base + st_off, mu, mask=m_s3 & (n3 * 0 + q == 0))  # the first span's
    if HAS_D:
        tl.store(dD_part_ptr + red_row + d1, tl.sum(dD_acc, axis=0), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + red_row + d1, tl.sum(dbias_acc, axis=0), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------------
# Autograd wrapper
# ----------------------------------------------------------------------------------------------------------------------
def _opt(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A real pointer for an absent optional input (never read: its HAS_* flag is off)."""
    return t if t is not None else like


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _big(seqlen: int, *tensors: Optional[Tensor]) -> bool:
    """Whether some time offset t * stride(time) of these tensors can pass 2**31 - 1 (then 64-bit offsets)."""
    return any(t is not None and (seqlen - 1) * abs(t.stride(-1)) + 1024 >= 2 ** 31 for t in tensors)


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool, initial_state: Optional[Tensor],
                 seq_idx: Optional[Tensor], cfg: ScanConfig, save_states: bool,
                 out: Optional[Tensor] = None, a_log: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel. u, delta, z, out: (batch, dim, seqlen) of any strides (time contiguous or channel
    contiguous: both are read in place); B, C: (batch, G, d_state, seqlen) of any strides; A (dim, d_state) float32
    contiguous; D, delta_bias (dim,) float32; initial_state (batch, dim, d_state) float32 contiguous; seq_idx int32.
    y goes into `out` when given, else into a new tensor laid out like u. a_log: A holds A_log, A = -exp(A_log)
    formed in the kernel. Returns (y, last state (batch, dim,
    d_state) float32, the states saved for the backward (batch, nchunks, dim, d_state) float32)."""
    batch, dim, seqlen = u.shape
    G, N = B.shape[1], B.shape[2]
    nchunks = cdiv(seqlen, cfg.chunk) if save_states else 1
    y = torch.empty_like(u) if out is None else out
    last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
    states = torch.empty(batch, nchunks, dim, N, device=u.device, dtype=torch.float32)
    n_dblocks = cdiv(dim, cfg.fwd_block_d)
    n_spans, cpg = span_split(cfg.fwd_spans, FWD_BUSY_PER_SM, cdiv(seqlen, cfg.chunk), n_dblocks * batch, u.device)
    span_tiles = cpg * (cfg.chunk // cfg.fwd_block_t)
    carry_P = carry_S = last
    if n_spans > 1:  # each earlier span's map of the state, so that all spans run at once
        carry_P = torch.empty(batch, n_spans, dim, N, device=u.device, dtype=torch.float32)
        carry_S = torch.empty_like(carry_P)
        _selective_scan_fwd_carry_kernel[(n_dblocks, batch, n_spans - 1)](
            u, delta, A, B, _opt(delta_bias, A), _opt(seq_idx, u), carry_P, carry_S,
            dim, seqlen, N, dim // G, span_tiles, n_spans, *_strides3(u), *_strides3(delta), *B.stride(),
            HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq_idx is not None,
            BLOCK_D=cfg.fwd_block_d, NH=cfg.NH, NL=cfg.NL, BT=cfg.fwd_block_t, BIG=_big(seqlen, u, delta, B),
            A_LOG=a_log, num_warps=cfg.fwd_warps, num_stages=1,
        )
    _selective_scan_fwd_kernel[(n_dblocks, batch, n_spans)](
        u, delta, A, B, C, _opt(D, A), _opt(z, u), _opt(delta_bias, A), _opt(initial_state, last),
        _opt(seq_idx, u), y, states, last, carry_P, carry_S,
        dim, seqlen, N, dim // G, G, nchunks, span_tiles, n_spans,
        *_strides3(u), *_strides3(delta), *_strides3(_opt(z, u)), *_strides3(y), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_H0=initial_state is not None, HAS_SEQ=seq_idx is not None, SAVE_STATES=save_states,
        BLOCK_D=cfg.fwd_block_d, NH=cfg.NH, NL=cfg.NL, BT=cfg.fwd_block_t, TPC=cfg.chunk // cfg.fwd_block_t,
        BIG=_big(seqlen, u, delta, z, y, B, C), A_LOG=a_log, num_warps=cfg.fwd_warps, num_stages=1,
    )
    return y, last, states


def _summed(parts: Tensor, dtype: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """parts (batch, G, blocks, k, seqlen) float32 summed over the blocks, in dtype (into out when given)."""
    if out is None:
        return parts.sum(2).to(dtype)
    if out.dtype == parts.dtype:
        return torch.sum(parts, 2, out=out)
    return out.copy_(parts.sum(2))


def _adjacent_pair(dB_out: Optional[Tensor], dC_out: Optional[Tensor]) -> Optional[Tensor]:
    """The one (batch, G, 2 N, seqlen) view over dB_out and dC_out (batch, G, N, seqlen) when dC_out's rows follow
    dB_out's in memory with the same strides (the Mamba-1 block's B and C columns of x_proj's gradient), else
    None."""
    if dB_out is None or dC_out is None or dB_out.dtype != dC_out.dtype or dB_out.stride() != dC_out.stride():
        return None
    if dB_out.untyped_storage().data_ptr() != dC_out.untyped_storage().data_ptr():
        return None
    n = dB_out.shape[2]
    if dC_out.storage_offset() != dB_out.storage_offset() + n * dB_out.stride(2):
        return None
    return dB_out.as_strided((*dB_out.shape[:2], 2 * n, dB_out.shape[3]), dB_out.stride())


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, seq_idx: Optional[Tensor],
                  states: Tensor, cfg: ScanConfig, gy: Tensor, glast: Optional[Tensor],
                  dz_out: Optional[Tensor] = None, du_out: Optional[Tensor] = None,
                  dB_out: Optional[Tensor] = None, dC_out: Optional[Tensor] = None, a_log: bool = False) -> tuple:
    """Launch the backward kernel on the forward's inputs and saved states. gy: (batch, dim, seqlen) of any strides;
    glast: (batch, dim, d_state) or None. du / ddelta are laid out like u / delta (or go into du_out), dz into dz_out,
    dB / dC into dB_out / dC_out (B's shape and dtype) when given (any strides: e.g. slices of a bigger gradient
    buffer). Returns (du, ddelta, dA (dim, d_state),
    dB, dC (batch, G, d_state, seqlen), dD, d delta_bias, d initial_state (batch, dim, d_state)), all float32
    except du, ddelta, dz (the inputs' dtypes), dB and dC (B's and C's dtypes). a_log: A holds A_log (as the
    forward's a_log): dA is then A_log's gradient."""
    batch, dim, seqlen = u.shape
    G, N = B.shape[1], B.shape[2]
    nchunks = states.shape[1]
    dev = u.device
    f32 = torch.float32
    if glast is not None:
        glast = glast.to(f32).contiguous()
    bd = cfg.bwd_block_d
    n_dblocks = cdiv(dim, bd)
    tpc = cfg.chunk // cfg.bwd_block_t
    du = torch.empty_like(u) if du_out is None else du_out
    ddelta = torch.empty_like(delta)
    dz = (torch.empty_like(z) if dz_out is None else dz_out) if z is not None else None
    # per batch row [dA (dim * N) | dD (dim) | dbias (dim)], and per channel block [dB | dC] (N * seqlen each):
    # one fixed-order reduction each
    red_cols = dim * (N + (D is not None) + (delta_bias is not None))
    n_spans, cpg = span_split(cfg.bwd_spans, SLOTS_PER_SM, nchunks, n_dblocks * batch, dev)
    red = torch.empty(batch * n_spans, red_cols, device=dev, dtype=f32)
    dA_part = red
    dD_part = red[:, dim * N:] if D is not None else None
    dbias_part = red[:, red_cols - dim:] if delta_bias is not None else None
    bc_part = torch.empty(batch, n_dblocks, 2 * N, seqlen, device=dev, dtype=f32)
    dB_part, dC_part = bc_part, bc_part[:, :, N:]
    dh0 = torch.empty(batch, dim, N, device=dev, dtype=f32)
    nh, nl = cfg.bwd_split
    scratch = torch.empty(batch * n_dblocks * n_spans * tpc * nh * bd * nl, device=dev, dtype=f32)
    zz = _opt(z, u)
    carry_P = carry_M = dh0
    if n_spans > 1:  # each later span's adjoint map, so that all spans run at once
        carry_P = torch.empty(batch, n_spans, dim, N, device=dev, dtype=f32)
        carry_M = torch.empty_like(carry_P)
        _selective_scan_bwd_carry_kernel[(n_dblocks, batch, n_spans - 1)](
            delta, A, C, zz, _opt(delta_bias, A), _opt(seq_idx, u), gy, carry_P, carry_M,
            dim, seqlen, N, dim // G, cpg * cfg.chunk, n_spans,
            *_strides3(delta), *_strides3(zz), *_strides3(gy), *C.stride(),
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            HAS_SEQ=seq_idx is not None, BLOCK_D=bd, NH=nh, NL=nl, BT=cfg.bwd_block_t,
            BIG=_big(seqlen, delta, z, gy, C), A_LOG=a_log, num_warps=cfg.bwd_warps, num_stages=1,
        )
    _selective_scan_bwd_kernel[(n_dblocks, batch, n_spans)](
        u, delta, A, B, C, _opt(D, A), zz, _opt(delta_bias, A), _opt(seq_idx, u), states, gy,
        _opt(glast, dh0), scratch,
        du, ddelta, _opt(dz, du), dA_part, dB_part, dC_part, _opt(dD_part, dA_part), _opt(dbias_part, dA_part), dh0,
        carry_P, carry_M,
        dim, seqlen, N, dim // G, G, nchunks, n_dblocks, cfg.chunk, red_cols, 2 * N * seqlen, cpg, n_spans,
        *_strides3(u), *_strides3(delta), *_strides3(zz), *_strides3(gy),
        *_strides3(du), *_strides3(ddelta), *_strides3(_opt(dz, du)), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_GLAST=glast is not None, HAS_SEQ=seq_idx is not None,
        BLOCK_D=bd, NH=nh, NL=nl, BT=cfg.bwd_block_t, TPC=tpc,
        BIG=_big(seqlen, u, delta, z, gy, du, ddelta, dz, B, C), A_LOG=a_log, num_warps=cfg.bwd_warps,
        num_stages=1,
    )
    # fixed-order reductions of the partial sums
    parts = bc_part.view(batch, G, n_dblocks // G, 2 * N, seqlen)
    pair = _adjacent_pair(dB_out, dC_out) if B.dtype == C.dtype else None
    if pair is not None:
        _summed(parts, B.dtype, pair)
        dB, dC = dB_out, dC_out
    elif B.dtype == C.dtype and dB_out is None and dC_out is None:
        dB, dC = _summed(parts, B.dtype, None).split(N, dim=2)
    else:
        dB = _summed(parts[:, :, :, :N], B.dtype, dB_out)
        dC = _summed(parts[:, :, :, N:], C.dtype, dC_out)
    sums = red.sum(0)
    dA = sums[:dim * N].view(dim, N)
    dD = sums[dim * N:dim * (N + 1)] if D is not None else None
    dbias = sums[red_cols - dim:] if delta_bias is not None else None
    return du, ddelta, dz, dA, dB, dC, dD, dbias, dh0


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cfg, save_states):
        y, last, states = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                       cfg, save_states)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, states)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.cfg = cfg
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, states = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(u)
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, seq_idx, states, ctx.cfg, gy, glast)
        dD = dD.to(D.dtype) if D is not None else None
        dbias = dbias.to(delta_bias.dtype) if delta_bias is not None else None
        dh0_out = dh0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return du, ddelta, dA.to(A.dtype), dB, dC, dD, dz, dbias, None, dh0_out, None, None, None


def selective_scan_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None, *, chunk: Optional[int] = None,
    fwd_block_t: Optional[int] = None, bwd_block_t: Optional[int] = None, config: Optional[ScanConfig] = None,
):
    """Selective scan with Triton kernels; same contract as `selective_scan_ref` (differentiable in every tensor input).

    Inputs float32/float16/bfloat16 (float64 falls back to the chunked PyTorch path, which computes in float64), any
    strides, read in place (y and the gradients of u and delta are laid out like u and delta). d_state <= 256. Runs
    on CUDA tensors, or on the CPU under
    TRITON_INTERPRET=1.
    chunk / fwd_block_t / bwd_block_t override the time tiling (chunk = steps between saved states; for tests);
    config replaces the whole launch configuration (for benchmarks).
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if u.dtype == torch.float64:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state, seq_idx)
    if not u.is_cuda and not interpreted():
        raise MambaKitError("selective_scan_triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                            f"got tensors on {u.device}")
    d_state = A.shape[1]
    if d_state > MAX_D_STATE:
        raise MambaKitError(f"selective_scan_triton supports d_state <= {MAX_D_STATE}, got {d_state}")
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise MambaKitError(f"{name} must be float32, float16 or bfloat16 for the Triton scan, got {t.dtype}")
    Bg, Cg = grouped_pair(B, C, u)  # (batch, G, d_state, seqlen), mixed forms aligned
    G = Bg.shape[1]
    dim = u.shape[1]
    cfg = config or pick_config(d_state, dim, dim // G, G, chunk, fwd_block_t, bwd_block_t)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    A32 = A.float()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    Dc = D.float().contiguous() if D is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, last = _SelectiveScanTriton.apply(u, delta, A32.contiguous(), Bg, Cg, Dc, z, bias, delta_softplus, h0, seq,
                                         cfg, save_states)
    return (y, last) if return_last_state else y
