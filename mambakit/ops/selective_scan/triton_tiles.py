"""The jit helpers the selective scan's kernels share (`triton` and `triton_spans`): loads of one time tile, the
discretisation, the in-register scans of a tile, a program's block of channels and states. Layout and notation: see
`mambakit.ops.selective_scan.triton`."""
from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops.triton.math import softplus


@triton.jit
def _scan_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier segment, (a2, b2) the later: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint_combine(p_y, q_y, m_y, l_y, p_x, q_x, m_x, l_x):
    # Scanned over time reversed: y is the accumulated later-time segment, x the earlier one. A segment [p..q] holds
    # P = a_p..a_q, Q = a_{p+1}..a_q, L = lambda_p from inside the segment, M = a_p * L (the adjoint passed to h_{p-1}).
    return p_x * p_y, q_x * p_y, m_x + p_x * m_y, l_x + q_x * m_y


@triton.jit
def _wide(t, BIG: tl.constexpr):
    """Time indices as 64-bit when time offsets (t * stride) may pass 2**31 (long channel-last tensors)."""
    if BIG:
        return t.to(tl.int64)
    else:
        return t


@triton.jit
def _load_raw(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, ro_u, ro_dl, ro_z, st_u, st_dl, st_z,
              ro_B, ro_C, st_B, st_C, seq_row, t, seqlen, mask_d, m_nb,
              LOAD_Z: tl.constexpr, LOAD_C: tl.constexpr, HAS_SEQ: tl.constexpr, BIG: tl.constexpr):
    """Issue every load of one time tile (in the inputs' dtypes). Called one tile ahead of its use, so the loads are
    in flight while the previous tile is computed. Tensors that are not asked for come back as placeholders.
    ro_*: the channel (or state) part of each tensor's offsets, st_*: its time stride."""
    mt = t < seqlen
    m2 = mt[:, None] & mask_d[None, :]
    m3 = mt[:, None, None] & m_nb
    tw = _wide(t, BIG)
    u = tl.load(u_ptr + ro_u + tw[:, None] * st_u, mask=m2, other=0.0)
    d = tl.load(delta_ptr + ro_dl + tw[:, None] * st_dl, mask=m2, other=0.0)
    Bt = tl.load(B_ptr + ro_B + tw[:, None, None] * st_B, mask=m3, other=0.0)
    if LOAD_Z:
        z = tl.load(z_ptr + ro_z + tw[:, None] * st_z, mask=m2, other=0.0)
    else:
        z = u
    if LOAD_C:
        Ct = tl.load(C_ptr + ro_C + tw[:, None, None] * st_C, mask=m3, other=0.0)
    else:
        Ct = Bt
    if HAS_SEQ:
        s_cur = tl.load(seq_ptr + seq_row + t, mask=mt, other=0)
        s_prev = tl.load(seq_ptr + seq_row + t - 1, mask=mt & (t > 0), other=0)
        reset = (s_cur != s_prev) & (t > 0) & mt
    else:
        reset = t < 0
    return u, d, z, Bt, Ct, reset


@triton.jit
def _prep_delta(d_raw, m2, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The discretisation step in fp32 (bias, softplus); 0 outside the sequence. Returns (pre-softplus, step)."""
    raw = d_raw.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    if SOFTPLUS:
        dt = softplus(raw)
    else:
        dt = raw
    dt = tl.where(m2, dt, 0.0)
    return raw, dt


@triton.jit
def _tile_decay(dt, A2, reset, HAS_SEQ: tl.constexpr):
    """exp(delta A) as (BT, NH, BLOCK_D, NL); 0 where a new packed sequence starts."""
    dA = tl.exp2(dt[:, None, :, None] * A2[None, :, :, :])
    if HAS_SEQ:
        dA = tl.where(reset[:, None, None, None], 0.0, dA)
    return dA


@triton.jit
def _tile_states(dA, x, h, BT: tl.constexpr):
    """States of a tile, h_t = dA_t h_{t-1} + x_t, from the state h before it. Returns (states, last state)."""
    t1 = tl.arange(0, BT)
    xin = tl.where((t1 == 0)[:, None, None, None], x + dA * h[None, :, :, :], x)
    _, hs = tl.associative_scan((dA, xin), 0, _scan_combine)
    h_last = tl.sum(tl.where((t1 == BT - 1)[:, None, None, None], hs, 0.0), axis=0)
    return hs, h_last


@triton.jit
def _state_decay(A_ptr, st_off, mask, A_LOG: tl.constexpr):
    """A at the (dim, dstate) offsets st_off, float32, 0 outside mask: read, or -exp(A_log) from A_log with A_LOG
    (the layer's parameter: no PyTorch kernels to form A)."""
    a = tl.load(A_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    if A_LOG:
        a = tl.where(mask, -tl.exp(a), 0.0)
    return a


@triton.jit
def _channel_block(dim, dstate, A_ptr, bias_ptr, BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr,
                   HAS_BIAS: tl.constexpr, A_LOG: tl.constexpr):
    """A program's (channel block, batch row) ids, its channels d1 (BLOCK_D,) and their mask, the (NH, BLOCK_D, NL)
    offsets st_off of its states in a (dim, dstate) state and their mask, A there (float32) and A * log2(e), and the
    channels' delta bias (0 without)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d1 < dim
    n3 = tl.arange(0, NH)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]  # (NH, 1, NL)
    d3 = d1[None, :, None]  # (1, BLOCK_D, 1)
    m_s3 = (n3 < dstate) & (d3 < dim)
    st_off = d3 * dstate + n3
    A = _state_decay(A_ptr, st_off, m_s3, A_LOG)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    return pid_d, pid_b, d1, mask_d, n3, m_s3, st_off, A, A * 1.4426950408889634, bias
