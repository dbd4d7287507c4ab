"""Triton residual add + RMSNorm with its backward, for training (the pre-norm block's `residual += hidden;
normed = rms_norm(residual)` in one kernel each way).

Forward per row: r = hidden + residual (float32), stored as the new residual (float32 with residual_in_fp32, else
the promoted dtype); x = r rounded to the weight's dtype (as the PyTorch composition normalises it); normed =
x * rstd * weight in the output dtype (e.g. the autocast dtype, so that no cast kernel follows); rstd kept.
Backward per row, with g = dnormed * weight and xhat = x * rstd:
    dr = rstd * (g - xhat * mean(g * xhat)) + d(new residual),   d hidden = d residual = dr,
    dweight = sum over rows of dnormed * xhat (per-program partial sums, reduced in a fixed order).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.device import interpreted, multiprocessor_count
from mambakit.ops.triton.grid import cdiv, next_power_of_2


@triton.jit
def _add_norm_fwd_kernel(h_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr, n_rows, d, eps,
                         HAS_RES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mr = rows < n_rows
    m = mr[:, None] & (cols < d)[None, :]
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
    r = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    r_kept = r.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + offs, r_kept, mask=m)
    x = r_kept.to(w_ptr.dtype.element_ty).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
    tl.store(rstd_ptr + rows, rstd, mask=mr)
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_norm_bwd_kernel(res_ptr, w_ptr, rstd_ptr, dout_ptr, dres_ptr, dh_ptr, dr_ptr, dw_part_ptr, n_rows, d,
                         blocks_per_prog, HAS_DRES: tl.constexpr, HAS_DR: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mc = cols < d
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, blocks_per_prog):
        rows = (pid * blocks_per_prog + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mr = rows < n_rows
        m = mr[:, None] & mc[None, :]
        offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
        x = tl.load(res_ptr + offs, mask=m, other=0.0).to(w_ptr.dtype.element_ty).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mr, other=0.0)
        do = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
        xhat = x * rstd[:, None]
        g = do * w[None, :]
        c = tl.sum(g * xhat, axis=1) / d
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(dres_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dx = tl.where(m, dx, 0.0)
        dw_acc += tl.sum(tl.where(m, do * xhat, 0.0), axis=0)
        tl.store(dh_ptr + offs, dx.to(dh_ptr.dtype.element_ty), mask=m)
        if HAS_DR:
            tl.store(dr_ptr + offs, dx.to(dr_ptr.dtype.element_ty), mask=m)
    tl.store(dw_part_ptr + pid.to(tl.int64) * d + cols, dw_acc, mask=mc)


def _block(d: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): tiles of about 4096 (forward) / 2048 (backward) elements."""
    block_d = next_power_of_2(d)
    tile = 512 if interpreted() else (2048 if backward else 4096)
    block_rows = max(1, min(32, tile // block_d))
    return block_rows, block_d, max(1, min(8, block_rows * block_d // 512))


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, eps, res_dtype, out_dtype):
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d).contiguous()
        r = residual.reshape(-1, d).contiguous() if residual is not None else h
        n_rows = h.shape[0]
        out = torch.empty(h.shape, device=h.device, dtype=out_dtype)
        res_out = torch.empty(h.shape, device=h.device, dtype=res_dtype)
        rstd = torch.empty(n_rows, device=h.device, dtype=torch.float32)
        block_rows, block_d, warps = _block(d, backward=False)
        _add_norm_fwd_kernel[(cdiv(n_rows, block_rows),)](
            h, r, weight, out, res_out, rstd, n_rows, d, float(eps), HAS_RES=residual is not None,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(res_out, weight, rstd)
        ctx.dtypes = (hidden.dtype, residual.dtype if residual is not None else None)
        ctx.shape = hidden.shape
        return out.view(hidden.shape), res_out.view(hidden.shape)

    @staticmethod
    def backward(ctx, dout, dres):
        res_out, weight, rstd = ctx.saved_tensors
        n_rows, d = res_out.shape
        h_dtype, r_dtype = ctx.dtypes
        if dout is None:
            dout = torch.zeros(res_out.shape, device=res_out.device, dtype=torch.float32)
        do = dout.reshape(-1, d).contiguous()
        dr_in = dres.reshape(-1, d).contiguous() if dres is not None else None
        block_rows, block_d, warps = _block(d, backward=True)
        n_blocks = cdiv(n_rows, block_rows)
        target = max(1, 4 * multiprocessor_count(res_out.device))
        blocks_per_prog = cdiv(n_blocks, min(n_blocks, target))
        n_progs = cdiv(n_blocks, blocks_per_prog)
        dh = torch.empty(n_rows, d, device=res_out.device, dtype=h_dtype)
        dr = torch.empty(n_rows, d, device=res_out.device, dtype=r_dtype) if r_dtype is not None else None
        dw_part = torch.empty(n_progs, d, device=res_out.device, dtype=torch.float32)
        _add_norm_bwd_kernel[(n_progs,)](
            res_out, weight, rstd, do, dr_in if dr_in is not None else do, dh, dr if dr is not None else dh, dw_part,
            n_rows, d, blocks_per_prog, HAS_DRES=dr_in is not None, HAS_DR=dr is not None,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype)
        return (dh.view(ctx.shape), dr.view(ctx.shape) if dr is not None else None, dw, None, None, None)


def add_rms_norm_triton(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                        residual_in_fp32: bool, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(normed, residual'): residual' = residual + hidden (hidden if residual is None), float32 when
    residual_in_fp32; normed = rms_norm(residual'.to(weight.dtype)) * weight in out_dtype (default: weight's dtype).
    hidden, residual: (..., d); weight: (d,). Differentiable in hidden, residual and weight; outside autograd it is
    also the decoding step's one kernel."""
    d = hidden.shape[-1]
    if weight.shape != (d,) or (residual is not None and residual.shape != hidden.shape):
        raise MambaKitError(f"add_rms_norm: hidden {tuple(hidden.shape)}, residual "
                            f"{None if residual is None else tuple(residual.shape)} and weight {tuple(weight.shape)} "
                            f"must be (..., d), the same shape, and (d,)")
    if not hidden.is_cuda and not interpreted():
        raise MambaKitError(f"the Triton add_rms_norm needs CUDA tensors (or TRITON_INTERPRET=1), got {hidden.device}")
    res_dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    if residual_in_fp32:
        res_dtype = torch.promote_types(res_dtype, torch.float32)
    return _AddRMSNorm.apply(hidden, residual, weight, eps, res_dtype, out_dtype or weight.dtype)
