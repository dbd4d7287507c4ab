"""Mamba-2's one-token step between in_proj and the gated norm (optionally through it) in ONE kernel: the
conv-state update, the depthwise conv + SiLU, dt processing, the per-head state update, the read-out and the D skip
(before: a conv kernel, then `mixer_step._m2_state_step_kernel`).

Program (p block, head, batch row) owns its head's x channels: it convolves them and writes their conv-state windows
(no other program touches them). The group's B and C channels are read by every head of the group, so each of its
programs convolves them from the old windows, and the LAST of those programs to finish reading (an atomic count per
(batch row, group), acquire-release: every earlier reader's loads are done by then) writes their new windows and
sets the count back to zero for the next step. Deterministic: every program computes the same B and C.

With a norm (`mamba2_conv_state_step_triton(norm=...)`), the gated RMSNorm follows in the same kernel: each program
adds its channels' sum of squares to its (batch row, group)'s partials, and the group's last writer (a second count)
sums them in reader order and rewrites the group normalised. Before each count a CTA barrier, so that every warp's
loads (the windows) and stores (y, the partials) happen before the one thread's release.

The conv output is rounded to the input dtype as the separate conv kernel stores it, so the results equal the
two-kernel path's (the norm's: up to its sum's order). Inference only.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops.triton.grid import cdiv, next_power_of_2
from mambakit.ops.triton.mixer_step import m2_head_update


@triton.jit
def _conv_window(zx_ptr, cs_ptr, cw_ptr, cb_ptr, b, c, mc, col0, width, s_zxb, s_csb, s_csd, s_csw,
                 HAS_CB: tl.constexpr, WP: tl.constexpr):
    """Conv channels c (BLOCK,) of batch row b: (SiLU(conv) rounded to the input dtype, float32 (BLOCK,); the new
    window (BLOCK, WP) in the state's dtype; its addresses)."""
    xt = zx_ptr.dtype.element_ty
    k = tl.arange(0, WP)
    c64 = c.to(tl.int64)
    raw = tl.load(zx_ptr + b * s_zxb + col0 + c64, mask=mc, other=0.0)
    row = cs_ptr + b * s_csb + c64[:, None] * s_csd
    shifted = tl.load(row + (k[None, :] + 1) * s_csw, mask=mc[:, None] & (k[None, :] + 1 < width), other=0.0)
    new = tl.where(k[None, :] == width - 1, raw.to(cs_ptr.dtype.element_ty)[:, None], shifted)
    w = tl.load(cw_ptr + c64[:, None] * width + k[None, :], mask=mc[:, None] & (k[None, :] < width), other=0.0)
    y = tl.sum(new.to(xt).to(tl.float32) * w.to(xt).to(tl.float32), axis=1)
    if HAS_CB:
        y += tl.load(cb_ptr + c64, mask=mc, other=0.0).to(xt).to(tl.float32)
    y = y * tl.sigmoid(y)
    return y.to(xt).to(tl.float32), new, row + k[None, :] * s_csw


@triton.jit
def _m2_conv_state_step_kernel(zx_ptr, cs_ptr, cw_ptr, cb_ptr, cnt_ptr, dtb_ptr, alog_ptr, D_ptr, st_ptr, y_ptr,
                               nw_ptr, part_ptr, headdim, dstate, heads_per_group, d_inner, ngroups, width, readers,
                               dt_col, s_zxb, s_csb, s_csd, s_csw, s_sb, s_sh, s_sp, dt_lo, dt_hi, eps,
                               HAS_CB: tl.constexpr, HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr,
                               HAS_Z: tl.constexpr, CLAMP: tl.constexpr, NORM: tl.constexpr,
                               NORM_BEFORE_GATE: tl.constexpr, BLOCK_P: tl.constexpr, NP: tl.constexpr,
                               WP: tl.constexpr, RP: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // heads_per_group
    k = tl.arange(0, WP)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = p < headdim
    n = tl.arange(0, NP)
    mn = n < dstate
    # the head's own x channels: convolved and their windows written here
    x, x_win, x_addr = _conv_window(zx_ptr, cs_ptr, cw_ptr, cb_ptr, b, h * headdim + p, mp, d_inner, width, s_zxb,
                                    s_csb, s_csd, s_csw, HAS_CB, WP)
    tl.store(x_addr, x_win, mask=mp[:, None] & (k[None, :] < width))
    # the group's B and C: every reader convolves them; the last reader writes their windows
    Bv, b_win, b_addr = _conv_window(zx_ptr, cs_ptr, cw_ptr, cb_ptr, b, d_inner + g * dstate + n, mn, d_inner,
                                     width, s_zxb, s_csb, s_csd, s_csw, HAS_CB, WP)
    Cv, c_win, c_addr = _conv_window(zx_ptr, cs_ptr, cw_ptr, cb_ptr, b, d_inner + (ngroups + g) * dstate + n, mn,
                                     d_inner, width, s_zxb, s_csb, s_csd, s_csw, HAS_CB, WP)
    # every warp's window loads are bound before the count moves (one thread performs the atomic; the barrier makes
    # the others' loads happen before its release)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + b * ngroups + g, 1, sem="acq_rel")
    if done == readers - 1:
        mw = mn[:, None] & (k[None, :] < width)
        tl.store(b_addr, b_win, mask=mw)
        tl.store(c_addr, c_win, mask=mw)
        tl.atomic_xchg(cnt_ptr + b * ngroups + g, 0, sem="release")
    y = m2_head_update(zx_ptr, dtb_ptr, alog_ptr, D_ptr, st_ptr, y_ptr, b, h, p, mp, n, mn, x, Bv, Cv, headdim,
                       d_inner, dt_col, 0, s_zxb, s_sb, s_sh, s_sp, dt_lo, dt_hi, HAS_D, D_HAS_HDIM, HAS_Z, CLAMP)
    if NORM:
        _gated_norm_tail(zx_ptr, y_ptr, nw_ptr, part_ptr, cnt_ptr + b * ngroups + g + ngroups * tl.num_programs(2),
                         b, g, y.to(y_ptr.dtype.element_ty).to(tl.float32), h * headdim + p, mp,
                         (h - g * heads_per_group) * tl.num_programs(0) + pid_p, readers, heads_per_group * headdim,
                         d_inner, ngroups, s_zxb, eps, NORM_BEFORE_GATE, RP, BLOCK_C)


@triton.jit
def _gated_norm_tail(zx_ptr, y_ptr, nw_ptr, part_ptr, cnt_ptr, b, g, y, c, mc, reader, readers, group_size, d_inner,
                     ngroups, s_zxb, eps, NORM_BEFORE_GATE: tl.constexpr, RP: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gated RMSNorm of the group after its last writer: this program's y (its channels c, rounded to the output
    dtype as stored) adds its sum of squares to the group's partials; the last of the group's programs to get here
    sums them in reader order and rewrites the group's channels normalised (norm(y * silu(z)) * w, or norm(y) * w *
    silu(z)), then resets the count."""
    gate = y
    if not NORM_BEFORE_GATE:
        z = tl.load(zx_ptr + b * s_zxb + c, mask=mc, other=0.0).to(tl.float32)
        gate = y * (z * tl.sigmoid(z))
    row = b * ngroups + g
    tl.store(part_ptr + row * readers + reader, tl.sum(tl.where(mc, gate * gate, 0.0), axis=0))
    tl.debug_barrier()  # every warp's y stores happen before the release (see the window count above)
    done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if done == readers - 1:
        r = tl.arange(0, RP)
        total = tl.sum(tl.load(part_ptr + row * readers + r, mask=r < readers, other=0.0), axis=0)
        rstd = 1.0 / tl.sqrt(total / group_size + eps)
        for c0 in range(0, group_size, BLOCK_C):
            cc = g * group_size + c0 + tl.arange(0, BLOCK_C)
            m = c0 + tl.arange(0, BLOCK_C) < group_size
            yv = tl.load(y_ptr + b * d_inner + cc, mask=m, other=0.0).to(tl.float32)
            zv = tl.load(zx_ptr + b * s_zxb + cc, mask=m, other=0.0).to(tl.float32)
            sz = zv * tl.sigmoid(zv)
            w = tl.load(nw_ptr + cc, mask=m, other=0.0).to(tl.float32)
            if NORM_BEFORE_GATE:
                out = yv * rstd * w * sz
            else:
                out = yv * sz * rstd * w
            tl.store(y_ptr + b * d_inner + cc, out.to(y_ptr.dtype.element_ty), mask=m)
        tl.atomic_xchg(cnt_ptr, 0, sem="release")


def _reader_counts(conv_state: Tensor, rows: int) -> Tensor:
    """The zeroed int32 counts (rows,) of this conv state's kernel, kept on the tensor (every launch leaves them at
    zero, so a later launch may reuse them; a new state tensor gets its own)."""
    counts = getattr(conv_state, "_mambakit_reader_counts", None)
    if counts is None or counts.numel() < rows or counts.device != conv_state.device:
        counts = torch.zeros(rows, dtype=torch.int32, device=conv_state.device)
        conv_state._mambakit_reader_counts = counts
    return counts


def mamba2_conv_state_step_triton(zxbcdt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                                  conv_bias: Optional[Tensor], dt_bias: Tensor, A_log: Tensor, D: Optional[Tensor],
                                  ssm_state: Tensor, ngroups: int, dt_limit: tuple[float, float], gate: bool,
                                  norm: Optional[tuple[Tensor, float, bool]] = None, block_p: int = 0,
                                  num_warps: int = 8) -> Tensor:
    """zxbcdt: (batch, 2 * d_inner + 2 * ngroups * d_state + nheads) in_proj output [z, x, B, C, dt], last dim
    contiguous; conv_state: (batch, conv_dim, width) and ssm_state: (batch, nheads, headdim, d_state, contiguous)
    updated in place; conv_weight: (conv_dim, width) contiguous; gate: multiply by SiLU(z) here. block_p: head-dim
    rows per program (a power of two; 0: 2048 // d_state, the state step's default). Shapes are checked by
    `mambakit.ops.mixer_step.mamba2_step`. norm: (weight (d_inner,), eps, norm_before_gate): the gated RMSNorm per
    group of d_inner / ngroups channels applied here too (z from zxbcdt; gate must then be False). Returns y:
    (batch, nheads * headdim) in zxbcdt's dtype."""
    batch, nheads, headdim, d_state = ssm_state.shape
    d_inner = nheads * headdim
    width = conv_state.shape[2]
    np_ = next_power_of_2(d_state)
    block_p = block_p or max(1, min(next_power_of_2(headdim), 2048 // np_))
    heads_per_group = nheads // ngroups
    readers = cdiv(headdim, block_p) * heads_per_group
    counts = _reader_counts(conv_state, 2 * batch * ngroups)  # the conv windows' readers, then the norm's writers
    y = torch.empty(batch, d_inner, device=zxbcdt.device, dtype=zxbcdt.dtype)
    clamp = tuple(dt_limit) != (0.0, float("inf"))
    norm_weight, eps, norm_before_gate = norm if norm is not None else (A_log, 0.0, False)
    partials = torch.empty(batch * ngroups * readers if norm is not None else 1, device=zxbcdt.device,
                           dtype=torch.float32)
    _m2_conv_state_step_kernel[(cdiv(headdim, block_p), nheads, batch)](
        zxbcdt, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, counts, dt_bias, A_log,
        D if D is not None else A_log, ssm_state, y, norm_weight, partials,
        headdim, d_state, heads_per_group, d_inner, ngroups, width, readers, 2 * d_inner + 2 * ngroups * d_state,
        zxbcdt.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), float(dt_limit[0]), float(dt_limit[1]),
        float(eps), HAS_CB=conv_bias is not None, HAS_D=D is not None,
        D_HAS_HDIM=D is not None and D.numel() == d_inner, HAS_Z=gate, CLAMP=clamp, NORM=norm is not None,
        NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK_P=block_p, NP=np_, WP=next_power_of_2(width),
        RP=next_power_of_2(readers), BLOCK_C=min(1024, next_power_of_2(heads_per_group * headdim)),
        num_warps=num_warps)
    return y
