"""Fused Triton RMSNorm and gated RMSNorm (forward and hand-written backward).

Same contract as `mambakit.layers.norm.RMSNormGated.forward` / `rms_norm`:
    y, z: (..., d) (z optional), weight: (d,); per group of `group_size` channels (group_size divides d),
    norm_before_gate=False: out = norm(y * silu(z)) * weight; True: out = norm(y) * weight * silu(z);
    norm(x) = x / sqrt(mean(x^2 over the group) + eps), all arithmetic in float32, out in y's dtype.

Forward: one program normalises BLOCK_ROWS rows x one group and stores only rstd (rows, ngroups) in float32.
Backward recomputes x = y * silu(z) (or y) and the normalised value from y, z and rstd; each program walks a fixed
run of row blocks of one group, accumulating its weight-gradient partial sum in float32 and writing it to a
(programs, d) buffer that torch sums in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.compile import precompile_once, specialisation
from mambakit.ops.triton.device import interpreted, multiprocessor_count
from mambakit.ops.triton.grid import cdiv, next_power_of_2

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gate(zv):
    """silu(z) and its derivative, z fp32."""
    sig = tl.sigmoid(zv)
    return zv * sig, sig * (1.0 + zv * (1.0 - sig))


@triton.jit
def _norm_fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, n_rows, group_size, ngroups, s_y, s_z, eps,
                     HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs = tl.arange(0, BLOCK_D)
    cols = grp * group_size + offs
    mr = rows < n_rows
    mc = offs < group_size
    m = mr[:, None] & mc[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(y_ptr + r64 * s_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + r64 * s_z + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gate, _ = _gate(zv)
        if not NORM_BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / group_size + eps)
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            out = out * gate
    tl.store(out_ptr + r64 * (group_size * ngroups) + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows.to(tl.int64) * ngroups + grp, rstd, mask=mr)


@triton.jit
def _norm_bwd_kernel(y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_part_ptr,
                     n_rows, group_size, ngroups, s_y, s_z, s_do, s_dz, blocks_per_prog,
                     HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    grp = tl.program_id(1)
    d = group_size * ngroups
    offs = tl.arange(0, BLOCK_D)
    cols = grp * group_size + offs
    mc = offs < group_size
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(blocks_per_prog):
        rows = (pid_r * blocks_per_prog + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mr = rows < n_rows
        m = mr[:, None] & mc[None, :]
        r64 = rows.to(tl.int64)[:, None]
        yv = tl.load(y_ptr + r64 * s_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + r64 * s_do + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows.to(tl.int64) * ngroups + grp, mask=mr, other=0.0)
        x = yv
        if HAS_Z:
            zv = tl.load(z_ptr + r64 * s_z + cols[None, :], mask=m, other=0.0).to(tl.float32)
            gate, dgate = _gate(zv)
            if not NORM_BEFORE_GATE:
                x = yv * gate
        n = x * rstd[:, None]  # the normalised value, before weight and (norm_before_gate) gate
        if HAS_Z:
            if NORM_BEFORE_GATE:
                dz = do * n * w[None, :] * dgate
                do = do * gate
        dw_acc += tl.sum(do * n, axis=0)
        dn = do * w[None, :]
        dx = (dn - n * (tl.sum(dn * n, axis=1) / group_size)[:, None]) * rstd[:, None]
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                dz = dx * yv * dgate
                dx = dx * gate
            tl.store(dz_ptr + r64 * s_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
        tl.store(dy_ptr + r64 * d + cols[None, :], dx.to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dw_part_ptr + pid_r.to(tl.int64) * d + cols, dw_acc, mask=mc)


def _rows_2d(t: Tensor, d: int) -> Tensor:
    """(..., d) -> (rows, d) with unit channel stride: a view where the layout allows it, else a copy."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(group_size: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): a tile of about 8192 (forward) / 4096 (backward) elements."""
    block_d = next_power_of_2(group_size)
    tile = 1024 if interpreted() else (4096 if backward else 8192)  # small tiles exercise several programs on CPU
    block_rows = max(1, min(64, tile // block_d))
    return block_rows, block_d, max(1, min(8, block_rows * block_d // 512))


def gated_norm_forward(y2: Tensor, z2: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                       norm_before_gate: bool) -> tuple[Tensor, Tensor]:
    """y2, z2: (rows, d); weight: (d,). Returns out (rows, d) in y2's dtype and rstd (rows, d // group_size) fp32."""
    n_rows, d = y2.shape
    ngroups = d // group_size
    out = torch.empty(n_rows, d, device=y2.device, dtype=y2.dtype)
    rstd = torch.empty(n_rows, ngroups, device=y2.device, dtype=torch.float32)
    block_rows, block_d, warps = _block(group_size, backward=False)
    grid = (cdiv(n_rows, block_rows), ngroups)
    _norm_fwd_kernel[grid](
        y2, z2 if z2 is not None else y2, weight, out, rstd, n_rows, group_size, ngroups,
        y2.stride(0), z2.stride(0) if z2 is not None else 0, float(eps),
        HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
    return out, rstd


def gated_norm_backward(y2: Tensor, z2: Optional[Tensor], weight: Tensor, rstd: Tensor, do2: Tensor,
                        group_size: int, norm_before_gate: bool,
                        dz_out: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Gradients (dy (rows, d), dz (rows, d) or None, dweight (d,)) for the upstream gradient do2 (rows, d).
    dz_out: (rows, d) with unit column stride (e.g. a slice of a bigger gradient buffer), written and returned as
    dz."""
    n_rows, d = y2.shape
    ngroups = d // group_size
    block_rows, block_d, warps = _block(group_size, backward=True)
    n_blocks = cdiv(n_rows, block_rows)
    target = max(1, 4 * multiprocessor_count(y2.device) // ngroups)  # row programs per group
    blocks_per_prog = cdiv(n_blocks, min(n_blocks, target))
    n_progs = cdiv(n_blocks, blocks_per_prog)
    dy = torch.empty(n_rows, d, device=y2.device, dtype=y2.dtype)
    dz = None
    if z2 is not None:
        dz = dz_out if dz_out is not None else torch.empty(n_rows, d, device=y2.device, dtype=z2.dtype)
    dw_part = torch.empty(n_progs, d, device=y2.device, dtype=torch.float32)
    _norm_bwd_kernel[(n_progs, ngroups)](
        y2, z2 if z2 is not None else y2, weight, rstd, do2, dy, dz if dz is not None else dy, dw_part,
        n_rows, group_size, ngroups, y2.stride(0), z2.stride(0) if z2 is not None else 0, do2.stride(0),
        dz.stride(0) if dz is not None else 0, blocks_per_prog, HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
    return dy, dz, dw_part.sum(0).to(weight.dtype)


class _RMSNormGatedTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size, norm_before_gate):
        d = y.shape[-1]
        y2 = _rows_2d(y, d)
        z2 = _rows_2d(z, d) if z is not None else None

        def first_call() -> None:  # forward and backward, the upstream gradient guessed (contiguous, y's dtype)
            out, rstd = gated_norm_forward(y2, z2, weight, eps, group_size, norm_before_gate)
            gated_norm_backward(y2, z2, weight, rstd, torch.empty_like(out), group_size, norm_before_gate)

        key = (y.dtype, None if z is None else z.dtype, weight.dtype, d, group_size, norm_before_gate, y.device,
               specialisation(y2.shape[0], y2, *(() if z2 is None else (z2,))))
        precompile_once(("rms_norm",) + key, first_call)
        out, rstd = gated_norm_forward(y2, z2, weight, eps, group_size, norm_before_gate)
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        ctx.y_shape, ctx.z_shape = y.shape, (z.shape if z is not None else None)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        dy, dz, dw = gated_norm_backward(y2, z2, weight, rstd, _rows_2d(dout, y2.shape[1]), ctx.group_size,
                                    ctx.norm_before_gate)
        return (dy.view(ctx.y_shape), dz.view(ctx.z_shape) if dz is not None else None, dw, None, None, None)


def _check(y: Tensor, z: Optional[Tensor], weight: Tensor, group_size: int, name: str) -> None:
    if y.dim() < 1:
        raise MambaKitError(f"{name}: y must have shape (..., d), got a 0-d tensor")
    d = y.shape[-1]
    if weight.shape != (d,):
        raise MambaKitError(f"{name}: weight must have shape (d={d},), got {tuple(weight.shape)}")
    if group_size <= 0 or d % group_size != 0:
        raise MambaKitError(f"{name}: group_size must be a positive divisor of d={d}, got {group_size}")
    if z is not None and z.shape != y.shape:
        raise MambaKitError(f"{name}: z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    if y.dtype not in _DTYPES:
        raise MambaKitError(f"{name}: y must be float32, float16 or bfloat16, got {y.dtype}")
    if z is not None and z.dtype not in _DTYPES:
        raise MambaKitError(f"{name}: z must be float32, float16 or bfloat16, got {z.dtype}")
    for arg, t in (("z", z), ("weight", weight)):
        if t is not None and t.device != y.device:
            raise MambaKitError(f"{name}: {arg} must be on y's device {y.device}, got {t.device}")
    if not y.is_cuda and not interpreted():
        raise MambaKitError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {y.device}")


def _apply(y: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int, norm_before_gate: bool,
           name: str) -> Tensor:
    _check(y, z, weight, group_size, name)
    if y.numel() == 0:  # no rows: nothing to launch; an empty result still connected to the graph
        return (y.float() * weight.float()).to(y.dtype)
    return _RMSNormGatedTriton.apply(y, z, weight.contiguous(), eps, group_size, norm_before_gate)


def rms_norm_gated_triton(y: Tensor, z: Optional[Tensor], weight: Tensor, eps: float,
                          group_size: Optional[int] = None, norm_before_gate: bool = False) -> Tensor:
    """Gated RMSNorm, differentiable in y, z and weight.

    y, z: (..., d) (z may be None: plain per-group RMSNorm); weight: (d,); group_size divides d (None: d).
    Returns (..., d) in y's dtype: norm(y * silu(z)) * weight, or norm(y) * weight * silu(z) if norm_before_gate.
    """
    d = y.shape[-1] if y.dim() else 0
    return _apply(y, z, weight, eps, d if group_size is None else group_size, norm_before_gate,
                  "rms_norm_gated_triton")


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x (..., d) over d, scaled by weight (d,), computed in float32; returns (..., d) in x's dtype.
    Differentiable in x and weight."""
    return _apply(x, None, weight, eps, x.shape[-1] if x.dim() else 0, False, "rms_norm_triton")
