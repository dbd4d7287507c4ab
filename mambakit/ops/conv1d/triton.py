"""Triton causal depthwise conv1d with fused SiLU (forward and backward).

Same contract as `mambakit.ops.conv1d.causal_conv1d_fn` without `conv_state`:
    x: (batch, dim, seqlen), any strides (the channel-last views the Mamba block makes are read in place);
    weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) integer, taps reaching into another packed sequence
    are dropped.  y_t = act(bias + sum_k weight[:, k] * x_{t - width + 1 + k}), y: (batch, dim, seqlen) in x's dtype.

Backward recomputes the pre-activation over a halo of width - 1 steps and applies the transposed conv in the same
kernel; weight and bias gradients are written as per-(batch, time block) partial sums and summed by torch in a fixed
order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.compile import precompile_once, specialisation
from mambakit.ops.triton.device import interpreted

_ACTIVATIONS = (None, "silu", "swish")


@triton.jit
def _conv_pre(x_ptr, w_ptr, xrow, sx_t, d1, mask_d, t, seqlen, seq_ptr, seq_row,
              WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Pre-activation (without bias) at times t (BT,) for channels d1 (BLOCK_D,): (BLOCK_D, BT) fp32."""
    acc = tl.zeros((d1.shape[0], t.shape[0]), tl.float32)
    mt = (t >= 0) & (t < seqlen)
    if HAS_SEQ:
        s_t = tl.load(seq_ptr + seq_row + t, mask=mt, other=0)
    for k in tl.static_range(WIDTH):
        ts = t - (WIDTH - 1) + k
        ok = mt & (ts >= 0)
        if HAS_SEQ:
            s_s = tl.load(seq_ptr + seq_row + ts, mask=ok, other=0)
            ok = ok & (s_s == s_t)
        xv = tl.load(x_ptr + xrow + ts[None, :].to(tl.int64) * sx_t, mask=mask_d[:, None] & ok[None, :], other=0.0)
        wk = tl.load(w_ptr + d1 * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv.to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, y_ptr, dim, seqlen, sx_b, sx_d, sx_t,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
                     BLOCK_D: tl.constexpr, BT: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d1 < dim
    t = pid_t * BT + tl.arange(0, BT)
    xrow = pid_b * sx_b + d1[:, None].to(tl.int64) * sx_d
    acc = _conv_pre(x_ptr, w_ptr, xrow, sx_t, d1, mask_d, t, seqlen, seq_ptr, pid_b * seqlen, WIDTH, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    yoff = (pid_b * dim + d1[:, None].to(tl.int64)) * seqlen + t[None, :]
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & (t < seqlen)[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, gy_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                     dim, seqlen, n_tblocks, sx_b, sx_d, sx_t,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
                     BLOCK_D: tl.constexpr, BT: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d1 < dim
    s = pid_t * BT + tl.arange(0, BT)  # the inputs whose gradient this program writes
    ms = s < seqlen
    xrow = pid_b * sx_b + d1[:, None].to(tl.int64) * sx_d
    grow = (pid_b * dim + d1[:, None].to(tl.int64)) * seqlen  # gy / dx are contiguous (batch, dim, seqlen)
    seq_row = pid_b * seqlen
    if HAS_BIAS:
        bias = tl.load(b_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_SEQ:
        s_s = tl.load(seq_ptr + seq_row + s, mask=ms, other=0)
    dx = tl.zeros((BLOCK_D, BT), tl.float32)
    for j in tl.static_range(WIDTH):
        # outputs t = s + j read input s through tap k = WIDTH - 1 - j
        t = s + j
        mt = t < seqlen
        g = tl.load(gy_ptr + grow + t[None, :], mask=mask_d[:, None] & mt[None, :], other=0.0).to(tl.float32)
        if SILU:
            pre = _conv_pre(x_ptr, w_ptr, xrow, sx_t, d1, mask_d, t, seqlen, seq_ptr, seq_row, WIDTH, HAS_SEQ)
            if HAS_BIAS:
                pre += bias[:, None]
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        ok = mt
        if HAS_SEQ:
            s_t = tl.load(seq_ptr + seq_row + t, mask=mt, other=0)
            ok = ok & (s_t == s_s)
        wk = tl.load(w_ptr + d1 * WIDTH + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        dx += tl.where(ok[None, :], g * wk[:, None], 0.0)
        if j == 0:
            # weight / bias partial sums over this program's outputs t = s
            part = ((pid_b * n_tblocks + pid_t) * dim + d1).to(tl.int64)
            if HAS_BIAS:
                tl.store(db_part_ptr + part, tl.sum(g, axis=1), mask=mask_d)
            for k in tl.static_range(WIDTH):
                ts = s - (WIDTH - 1) + k
                okk = ms & (ts >= 0)
                if HAS_SEQ:
                    s_k = tl.load(seq_ptr + seq_row + ts, mask=okk, other=0)
                    okk = okk & (s_k == s_s)
                xv = tl.load(x_ptr + xrow + ts[None, :].to(tl.int64) * sx_t, mask=mask_d[:, None] & okk[None, :],
                             other=0.0).to(tl.float32)
                tl.store(dw_part_ptr + part * WIDTH + k, tl.sum(g * xv, axis=1), mask=mask_d)
    tl.store(dx_ptr + grow + s[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & ms[None, :])


def _blocks(dim: int, seqlen: int, backward: bool):
    bd = min(16, triton.next_power_of_2(dim))
    bt = min(64 if backward else 128, triton.next_power_of_2(seqlen))
    if interpreted():
        bt = min(bt, 32)
    return bd, bt


def _conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, seq_idx: Optional[Tensor]) -> Tensor:
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    bd, bt = _blocks(dim, seqlen, backward=False)
    y = torch.empty(batch, dim, seqlen, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(seqlen, bt), triton.cdiv(dim, bd), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq_idx if seq_idx is not None else x, y,
        dim, seqlen, x.stride(0), x.stride(1), x.stride(2),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ=seq_idx is not None,
        BLOCK_D=bd, BT=bt, num_warps=4)
    return y


def _conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, seq_idx: Optional[Tensor],
                   gy: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    bd, bt = _blocks(dim, seqlen, backward=True)
    n_tblocks = triton.cdiv(seqlen, bt)
    gy = gy.contiguous()
    dx = torch.empty(batch, dim, seqlen, device=x.device, dtype=x.dtype)
    dw_part = torch.empty(batch, n_tblocks, dim, width, device=x.device, dtype=torch.float32)
    db_part = torch.empty(batch, n_tblocks, dim, device=x.device, dtype=torch.float32) if bias is not None else None
    grid = (n_tblocks, triton.cdiv(dim, bd), batch)
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq_idx if seq_idx is not None else x, gy, dx, dw_part,
        db_part if db_part is not None else dw_part,
        dim, seqlen, n_tblocks, x.stride(0), x.stride(1), x.stride(2),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ=seq_idx is not None,
        BLOCK_D=bd, BT=bt, num_warps=4)
    dw = dw_part.sum((0, 1)).to(weight.dtype)
    db = db_part.sum((0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dw, db


class _CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, seq_idx):
        # the first call compiles the forward and backward kernels side by side (mambakit.ops.triton.compile)
        key = (x.dtype, weight.dtype, weight.shape, bias is not None, silu, seq_idx is not None, x.device,
               specialisation(x.shape[1], x.shape[2], x))
        precompile_once(key, lambda: _conv_backward(x, weight, bias, silu, seq_idx,
                                                    _conv_forward(x, weight, bias, silu, seq_idx)))
        y = _conv_forward(x, weight, bias, silu, seq_idx)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        dx, dw, db = _conv_backward(x, weight, bias, ctx.silu, seq_idx, gy)
        return dx, dw, db, None, None


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                         seq_idx: Optional[Tensor] = None) -> Tensor:
    """Causal depthwise conv1d (+ SiLU) with Triton kernels; differentiable in x, weight and bias."""
    if activation not in _ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise MambaKitError(f"x must have shape (batch, dim, seqlen), got {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise MambaKitError(f"weight must have shape (dim={dim}, width), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (dim,):
        raise MambaKitError(f"bias must have shape (dim={dim},), got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise MambaKitError(f"seq_idx must have shape (batch={batch}, seqlen={seqlen}), got {tuple(seq_idx.shape)}")
    if not x.is_cuda and not interpreted():
        raise MambaKitError("causal_conv1d_triton needs CUDA tensors (or TRITON_INTERPRET=1); "
                            f"got tensors on {x.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise MambaKitError(f"x must be float32, float16 or bfloat16 for the Triton conv, got {x.dtype}")
    if seqlen == 0:
        return x.new_empty(batch, dim, 0)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return _CausalConv1dTriton.apply(x, weight.contiguous(), bias.contiguous() if bias is not None else None,
                                     activation in ("silu", "swish"), seq)


def causal_conv1d_triton_from_state(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                                    conv_state: Tensor, seq_idx: Optional[Tensor] = None) -> Tensor:
    """`causal_conv1d_triton` continuing from `conv_state` (batch, dim, width), the last `width` inputs before x
    (read, not modified): the state's last width - 1 columns are put in front of x, the conv runs over both, and
    the outputs of x's positions are kept (seq_idx: the history belongs to x's first sequence). Differentiable in
    x, weight, bias and conv_state. y: (batch, dim, seqlen) in x's dtype."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if conv_state.shape != (batch, dim, width):
        raise MambaKitError(f"conv_state must have shape (batch={batch}, dim={dim}, width={width}), got "
                            f"{tuple(conv_state.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise MambaKitError(f"seq_idx must have shape (batch={batch}, seqlen={seqlen}), got {tuple(seq_idx.shape)}")
    if seqlen == 0:
        return x.new_empty(batch, dim, 0)
    xx = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)
    seq = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)
    return causal_conv1d_triton(xx, weight, bias, activation, seq_idx=seq)[..., width - 1:]


def conv1d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, seq_idx: Optional[Tensor],
                   out: Optional[Tensor] = None) -> Tensor:
    """TEMPORARY shim (replaced by the conv branch)."""
    y = _conv_forward(x, weight, bias, silu, seq_idx)
    if out is None:
        return y
    out.copy_(y)
    return out


def conv1d_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, seq_idx: Optional[Tensor],
                    gy: Tensor, dx_out: Optional[Tensor] = None):
    """TEMPORARY shim (replaced by the conv branch)."""
    dx, dw, db = _conv_backward(x, weight, bias, silu, seq_idx, gy)
    if dx_out is not None:
        dx_out.copy_(dx)
        dx = dx_out
    return dx, dw, db
