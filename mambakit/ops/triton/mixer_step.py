"""Triton kernels of a whole mixer's one-token step between its in_proj and its out_proj.

Mamba-1 takes two kernels: (1) conv-state update + depthwise conv + SiLU + this block of channels' share of x_proj
(partial sums, one row per channel block), (2) the partial sums added up (a fixed order: deterministic), dt_proj,
softplus, the state update, the D skip and the SiLU(z) gate. At large batches (`mamba1_step_config`) x_proj is one
cuBLAS product between the two instead (its output rounded to the input dtype, as the partial sums are). Mamba-2
takes one kernel after the conv update: dt processing (bias, softplus, clamp), the per-head state update, the
read-out and the D skip (the gated RMSNorm follows). A = -exp(A_log) is formed in the kernels, so no per-step
PyTorch kernels remain.

Inference only (no autograd). Intermediates are rounded to the input dtype where the PyTorch step rounds them (the
conv output, x_proj's output, dt_proj's output), everything else is float32; the SSM state is read and written in
its own dtype. Public entry points with checks and the PyTorch reference: `mambakit.ops.mixer_step`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.grid import cdiv, next_power_of_2
from mambakit.ops.triton.math import softplus



@triton.jit
def _m1_conv_xproj_kernel(xz_ptr, cs_ptr, cw_ptr, cb_ptr, wx_ptr, xc_ptr, part_ptr,
                          dim, width, n_out, n_blocks, s_xzb, s_csb, s_csd, s_csw,
                          HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, WP: tl.constexpr, BLOCK_O: tl.constexpr,
                          XPROJ: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < dim
    k = tl.arange(0, WP)
    xt = xz_ptr.dtype.element_ty
    x = tl.load(xz_ptr + b * s_xzb + d, mask=md, other=0.0)
    row = cs_ptr + b * s_csb + d[:, None] * s_csd
    mk = md[:, None] & (k[None, :] < width)
    shifted = tl.load(row + (k[None, :] + 1) * s_csw, mask=md[:, None] & (k[None, :] + 1 < width), other=0.0)
    new = tl.where(k[None, :] == width - 1, x.to(cs_ptr.dtype.element_ty)[:, None], shifted)
    tl.store(row + k[None, :] * s_csw, new, mask=mk)
    w = tl.load(cw_ptr + d[:, None] * width + k[None, :], mask=mk, other=0.0)
    y = tl.sum(new.to(xt).to(tl.float32) * w.to(xt).to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(cb_ptr + d, mask=md, other=0.0).to(xt).to(tl.float32)
    y = y * tl.sigmoid(y)
    y = tl.where(md, y, 0.0).to(xt)
    tl.store(xc_ptr + b * dim + d, y, mask=md)
    if XPROJ:
        o = tl.arange(0, BLOCK_O)
        wx = tl.load(wx_ptr + o[:, None] * dim + d[None, :], mask=(o < n_out)[:, None] & md[None, :], other=0.0)
        part = tl.sum(wx.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
        tl.store(part_ptr + (b * n_blocks + pid_d) * BLOCK_O + o, part)


@triton.jit
def _m1_scan_step_kernel(part_ptr, xc_ptr, xz_ptr, wdt_ptr, dtb_ptr, alog_ptr, D_ptr, st_ptr, y_ptr,
                         batch, dim, dstate, dt_rank, n_blocks, s_part, s_xzb, s_sb, s_sd,
                         HAS_D: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                         NB: tl.constexpr, ROWS: tl.constexpr):
    """Program (i, j): channels [i * BLOCK_D, (i + 1) * BLOCK_D) of batch rows [j * ROWS, (j + 1) * ROWS); the
    channel block's weights (dt_proj, A, dt bias, D) are read once for its ROWS rows. part: (batch * n_blocks)
    rows s_part apart, x_proj's output per row the sum of its n_blocks rows (n_blocks 1: x_proj's output itself)."""
    pid_d = tl.program_id(0)
    xt = xc_ptr.dtype.element_ty
    j = tl.arange(0, NB)
    mj = j < n_blocks
    r = tl.arange(0, RP)
    mr = r < dt_rank
    n = tl.arange(0, NP)
    mn = n < dstate
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < dim
    m2 = md[:, None] & mn[None, :]
    wdt = tl.load(wdt_ptr + d[:, None] * dt_rank + r[None, :], mask=md[:, None] & mr[None, :], other=0.0)
    wdt = wdt.to(tl.float32)
    dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(alog_ptr + d[:, None] * dstate + n[None, :], mask=m2, other=0.0).to(tl.float32))
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    for i in range(ROWS):
        b = tl.program_id(1).to(tl.int64) * ROWS + i
        # the row's validity as vectors (scalar masks are not supported everywhere)
        okj = (j.to(tl.int64) * 0 + b) < batch
        okd = (d.to(tl.int64) * 0 + b) < batch
        mdb = md & okd
        m2b = mdb[:, None] & mn[None, :]
        # the row's own loads first, so that they are in flight during the reduction below
        s_off = b * s_sb + d[:, None] * s_sd + n[None, :]
        h = tl.load(st_ptr + s_off, mask=m2b, other=0.0).to(tl.float32)
        x = tl.load(xc_ptr + b * dim + d, mask=mdb, other=0.0).to(tl.float32)
        z = tl.load(xz_ptr + b * s_xzb + dim + d, mask=mdb, other=0.0).to(tl.float32)
        prow = part_ptr + (b * n_blocks + j[:, None]) * s_part
        mp = (mj & okj)[:, None]
        # x_proj's output = the blocks' partial sums in a fixed order, rounded to the input dtype (as the GEMM's)
        dt_low = tl.sum(tl.load(prow + r[None, :], mask=mp & mr[None, :], other=0.0).to(tl.float32), axis=0)
        dt_low = dt_low.to(xt).to(tl.float32)
        Bv = tl.sum(tl.load(prow + dt_rank + n[None, :], mask=mp & mn[None, :], other=0.0).to(tl.float32), axis=0)
        Cv = tl.sum(tl.load(prow + dt_rank + dstate + n[None, :], mask=mp & mn[None, :],
                            other=0.0).to(tl.float32), axis=0)
        Bv = Bv.to(xt).to(tl.float32)
        Cv = Cv.to(xt).to(tl.float32)
        dt = tl.sum(wdt * dt_low[None, :], axis=1).to(xt).to(tl.float32)
        dt = softplus(dt + dtb)
        h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
        tl.store(st_ptr + s_off, h.to(st_ptr.dtype.element_ty), mask=m2b)
        y = tl.sum(h * Cv[None, :], axis=1)
        if HAS_D:
            y += x * Dv
        y = y * (z * tl.sigmoid(z))
        tl.store(y_ptr + b * dim + d, y.to(y_ptr.dtype.element_ty), mask=mdb)


class StepConfig(NamedTuple):
    """The Mamba-1 state-update kernel's blocks: block_d channels by rows batch rows per program; xproj_gemm: x_proj
    as one cuBLAS product between the two kernels (False: partial sums inside the conv kernel, reduced by the
    update kernel)."""
    block_d: int
    rows: int
    num_warps: int
    xproj_gemm: bool = False


def mamba1_step_config(batch: int, dim: int, device: torch.device) -> StepConfig:
    """The fastest blocks of `benchmarks/sweep_mixer_step.py` (H200, d_inner 1536, bf16; RESULTS.md): 32 channels of
    one row per program with four warps up to batch 8 and two up to 32, x_proj as partial sums; beyond 32 rows, 64
    channels with four warps and x_proj as one product between the kernels. Several rows per program were slower at
    every batch. At d_inner 4096 (the 1.4B shape) beyond batch 8, 64 channels with eight warps and x_proj as one
    product were fastest (18.4 against 26.0 us per layer at batch 16)."""
    if batch <= 8:
        return StepConfig(32, 1, 4)
    if dim >= 4096:
        return StepConfig(64, 1, 8, True)
    if batch <= 32:
        return StepConfig(32, 1, 2)
    return StepConfig(64, 1, 4, True)


def mamba1_step_triton(xz: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias, x_proj_weight: Tensor,
                       dt_proj_weight: Tensor, dt_proj_bias: Tensor, A_log: Tensor, D, ssm_state: Tensor,
                       config: Optional[StepConfig] = None) -> Tensor:
    """xz: (batch, 2 * d_inner) in_proj output ([x, z], last dim contiguous); conv_state (batch, d_inner, d_conv) and
    ssm_state (batch, d_inner, d_state, last dim contiguous) updated in place. Returns y: (batch, d_inner).
    config: the state-update kernel's blocks (default `mamba1_step_config`'s)."""
    batch = xz.shape[0]
    dim, width = conv_weight.shape
    d_state = A_log.shape[1]
    dt_rank = dt_proj_weight.shape[1]
    n_out = x_proj_weight.shape[0]
    block_d = 64
    n_blocks = cdiv(dim, block_d)
    block_o = next_power_of_2(n_out)
    cfg = config or mamba1_step_config(batch, dim, xz.device)
    xc = torch.empty(batch, dim, device=xz.device, dtype=xz.dtype)
    part = torch.empty(batch, n_blocks, block_o, device=xz.device, dtype=torch.float32) if not cfg.xproj_gemm \
        else xc
    _m1_conv_xproj_kernel[(n_blocks, batch)](
        xz, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight, xc, part,
        dim, width, n_out, n_blocks, xz.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        HAS_BIAS=conv_bias is not None, BLOCK_D=block_d, WP=next_power_of_2(width), BLOCK_O=block_o,
        XPROJ=not cfg.xproj_gemm, num_warps=4)
    if cfg.xproj_gemm:
        part, n_blocks, s_part = F.linear(xc, x_proj_weight), 1, n_out  # (batch, n_out), rounded as the GEMM's
    else:
        s_part = block_o
    y = torch.empty(batch, dim, device=xz.device, dtype=xz.dtype)
    _m1_scan_step_kernel[(cdiv(dim, cfg.block_d), cdiv(batch, cfg.rows))](
        part, xc, xz, dt_proj_weight, dt_proj_bias, A_log, D if D is not None else A_log, ssm_state, y,
        batch, dim, d_state, dt_rank, n_blocks, s_part, xz.stride(0), ssm_state.stride(0), ssm_state.stride(1),
        HAS_D=D is not None, BLOCK_D=cfg.block_d, NP=next_power_of_2(d_state),
        RP=next_power_of_2(dt_rank), NB=next_power_of_2(n_blocks), ROWS=cfg.rows,
        num_warps=cfg.num_warps)
    return y


@triton.jit
def m2_head_update(zx_ptr, dtb_ptr, alog_ptr, D_ptr, st_ptr, y_ptr, b, h, p, mp, n, mn, x, Bv, Cv, headdim, d_inner,
                   dt_col, z_col, s_zxb, s_sb, s_sh, s_sp, dt_lo, dt_hi, HAS_D: tl.constexpr,
                   D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, CLAMP: tl.constexpr):
    """Mamba-2's step for head h's rows p (BLOCK_P,) of batch row b after the conv: dt (bias, softplus, clamp), the
    state update from x (BLOCK_P,), B and C (NP,) (float32), the read-out, the D skip, the SiLU(z) gate (HAS_Z; z
    from column z_col of the in_proj output); stores y and returns it (float32, before rounding)."""
    dt = tl.load(zx_ptr + b * s_zxb + dt_col + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    dt = softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    dA = tl.exp(dt * -tl.exp(tl.load(alog_ptr + h).to(tl.float32)))
    m2 = mp[:, None] & mn[None, :]
    s_off = b * s_sb + h * s_sh + p[:, None] * s_sp + n[None, :]
    s = tl.load(st_ptr + s_off, mask=m2, other=0.0).to(tl.float32)
    s = s * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(st_ptr + s_off, s.to(st_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        if D_HAS_HDIM:
            y += x * tl.load(D_ptr + h * headdim + p, mask=mp, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        z = tl.load(zx_ptr + b * s_zxb + z_col + h * headdim + p, mask=mp, other=0.0).to(tl.float32)
        y = y * (z * tl.sigmoid(z))
    tl.store(y_ptr + b * d_inner + h * headdim + p, y.to(y_ptr.dtype.element_ty), mask=mp)
    return y


@triton.jit
def _m2_state_step_kernel(xbc_ptr, zx_ptr, dtb_ptr, alog_ptr, D_ptr, st_ptr, y_ptr,
                          headdim, dstate, heads_per_group, d_inner, ngroups, dt_col, z_col, s_xbcb, s_zxb,
                          s_sb, s_sh, s_sp, dt_lo, dt_hi,
                          HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, CLAMP: tl.constexpr,
                          BLOCK_P: tl.constexpr, NP: tl.constexpr):
    pid_p = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // heads_per_group
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = p < headdim
    n = tl.arange(0, NP)
    mn = n < dstate
    row = xbc_ptr + b * s_xbcb
    x = tl.load(row + h * headdim + p, mask=mp, other=0.0).to(tl.float32)
    Bv = tl.load(row + d_inner + g * dstate + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(row + d_inner + (ngroups + g) * dstate + n, mask=mn, other=0.0).to(tl.float32)
    m2_head_update(zx_ptr, dtb_ptr, alog_ptr, D_ptr, st_ptr, y_ptr, b, h, p, mp, n, mn, x, Bv, Cv, headdim, d_inner,
                   dt_col, z_col, s_zxb, s_sb, s_sh, s_sp, dt_lo, dt_hi, HAS_D, D_HAS_HDIM, HAS_Z, CLAMP)


def mamba2_state_step_triton(xbc: Tensor, zxbcdt: Tensor, dt_col: int, dt_bias: Tensor, A_log: Tensor, D,
                             ssm_state: Tensor, ngroups: int, dt_limit: tuple[float, float], gate: bool,
                             block_p: int = 0, num_warps: int = 8) -> Tensor:
    """xbc: (batch, conv_dim) after conv + SiLU ([x, B, C], last dim contiguous); zxbcdt: (batch, d_in_proj) in_proj
    output (z in columns [0, d_inner), dt from column dt_col); ssm_state: (batch, nheads, headdim, d_state) updated in
    place. gate: multiply by SiLU(z) here (Mamba2 without its RMSNorm). block_p (a power of two; 0: the default)
    and num_warps: the launch's head-dim rows per program and warps (benchmarks/sweep_mixer_step.py --arch mamba2).
    Returns y: (batch, nheads * headdim)."""
    batch, nheads, headdim, d_state = ssm_state.shape
    d_inner = nheads * headdim
    y = torch.empty(batch, d_inner, device=xbc.device, dtype=xbc.dtype)
    np_ = next_power_of_2(d_state)
    if block_p & (block_p - 1) or block_p < 0:
        raise MambaKitError(f"block_p must be 0 or a power of two, got {block_p}")
    # small state tiles (about 8 float32 per thread at eight warps): many programs in flight, few registers; 16 x 128
    # with eight warps was within 5% of the fastest at batch 1, 16 and 64 (sweep_mixer_step.py --arch mamba2)
    block_p = block_p or max(1, min(next_power_of_2(headdim), 2048 // np_))
    clamp = tuple(dt_limit) != (0.0, float("inf"))
    _m2_state_step_kernel[(cdiv(headdim, block_p), nheads, batch)](
        xbc, zxbcdt, dt_bias, A_log, D if D is not None else A_log, ssm_state, y,
        headdim, d_state, nheads // ngroups, d_inner, ngroups, dt_col, 0, xbc.stride(0), zxbcdt.stride(0),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), float(dt_limit[0]), float(dt_limit[1]),
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.numel() == d_inner, HAS_Z=gate, CLAMP=clamp,
        BLOCK_P=block_p, NP=np_, num_warps=num_warps)
    return y
