"""Triton causal depthwise conv1d with fused SiLU (forward and backward), for any strides of its tensors.

Same contract as `mambakit.ops.conv1d.causal_conv1d_fn` without `conv_state`:
    x: (batch, dim, seqlen), any strides (the channel-last views the Mamba blocks make are read in place);
    weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) integer, taps reaching into another packed sequence
    are dropped.  y_t = act(bias + sum_k weight[:, k] * x_{t - width + 1 + k}), y: (batch, dim, seqlen).

`conv1d_forward` / `conv1d_backward` are the kernels' entry points (outputs into given buffers of any strides);
`causal_conv1d_triton` is the differentiable op. The backward computes g' = dL/d(pre-activation) once per output
position of its tile (plus a halo of width - 1 positions past the tile) and shifts it within the program
(`tl.gather`: warp shuffles or shared memory) for the transposed conv; weight and bias gradients are per-(batch,
time block) partial sums reduced by torch in a fixed order (deterministic, no atomics). Every tile is (BLOCK_D, BT)
over (channel, time); Triton orders each load along whichever axis its pointers are contiguous in (real strides are
passed, so a stride of 1 is specialised), and `block_sizes` picks the tile shape by layout.
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
from mambakit.ops.triton.grid import cdiv, next_power_of_2

__all__ = ["block_sizes", "causal_conv1d_triton", "causal_conv1d_triton_from_state", "conv1d_backward",
           "conv1d_forward", "is_channel_last"]

_ACTIVATIONS = (None, "silu", "swish")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

#: The backward shifts g' with `tl.gather` (True) or recomputes it at each shift (False: width^2 loads of x per
#: tile). Only channel-last tiles use the gather: on time-contiguous tiles the time axis spans warps, and Triton
#: 3.6 aborts compiling a gather that is not warp-local (its OptimizeThreadLocality pass asserts).
BACKWARD_GATHER: bool = True


def use_gather(x: Tensor) -> bool:
    """Whether the backward of x's layout shifts g' with `tl.gather` (channel-last tiles only)."""
    return BACKWARD_GATHER and is_channel_last(x)


def block_sizes(channel_last: bool, backward: bool) -> Tuple[int, int]:
    """(BLOCK_D, BT): channels and time steps of one program's tile. Channel-last x (dim the fastest axis) wants a
    wide channel axis (cache-line segments along dim), time-contiguous x a long time axis. num_warps is 4. The
    backward's tiles are smaller (it holds more per element: g', its halo, dx); fewer time tiles mean fewer weight /
    bias partial sums (batch * time tiles * dim * (width + 1) floats)."""
    if interpreted():
        return 4, 16  # small tiles: several blocks (and partial ones) on the tests' small shapes
    if channel_last:
        return (32, 64) if backward else (64, 64)
    return (8, 128) if backward else (8, 256)


@triton.jit
def _conv_pre(x_ptr, w_ptr, xrow, sx_t, sw_d, sw_k, d1, mask_d, t, seqlen, seq_ptr, seq_row,
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
        wk = tl.load(w_ptr + d1 * sw_d + k * sw_k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv.to(tl.float32)
    return acc


@triton.jit
def _conv_history(s_ptr, w_ptr, srow, ss_w, sw_d, sw_k, d1, mask_d, t, seqlen, seq_ptr, seq_row,
                  WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The taps that reach before x's first step, read from the conv state (the last WIDTH inputs, position -1 at
    index WIDTH - 1): (BLOCK_D, BT) fp32. With seq_idx the history belongs to x's first sequence."""
    acc = tl.zeros((d1.shape[0], t.shape[0]), tl.float32)
    mt = (t >= 0) & (t < seqlen)
    if HAS_SEQ:
        first = tl.load(seq_ptr + seq_row)
        mt = mt & (tl.load(seq_ptr + seq_row + t, mask=mt, other=0) == first)
    for k in tl.static_range(WIDTH - 1):
        ts = t - (WIDTH - 1) + k
        ok = mt & (ts < 0)
        sv = tl.load(s_ptr + srow + (WIDTH + ts)[None, :].to(tl.int64) * ss_w, mask=mask_d[:, None] & ok[None, :],
                     other=0.0)
        wk = tl.load(w_ptr + d1 * sw_d + k * sw_k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * sv.to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, y_ptr, s_ptr, dim, seqlen, sx_b, sx_d, sx_t, sy_b, sy_d, sy_t,
                     sw_d, sw_k, ss_b, ss_d, ss_w, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     HAS_SEQ: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr,
                     AXB: tl.constexpr, AXD: tl.constexpr, AXT: tl.constexpr,
                     AYB: tl.constexpr, AYD: tl.constexpr, AYT: tl.constexpr):
    # strides come divided by their constexpr power-of-two factors (see `_strides`)
    sx_b, sx_d, sx_t = sx_b * AXB, sx_d * AXD, sx_t * AXT
    sy_b, sy_d, sy_t = sy_b * AYB, sy_d * AYD, sy_t * AYT
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d1 < dim
    t = pid_t * BT + tl.arange(0, BT)
    xrow = pid_b * sx_b + d1[:, None].to(tl.int64) * sx_d
    acc = _conv_pre(x_ptr, w_ptr, xrow, sx_t, sw_d, sw_k, d1, mask_d, t, seqlen, seq_ptr, pid_b * seqlen,
                    WIDTH, HAS_SEQ)
    if HAS_STATE:
        srow = pid_b * ss_b + d1[:, None].to(tl.int64) * ss_d
        acc += _conv_history(s_ptr, w_ptr, srow, ss_w, sw_d, sw_k, d1, mask_d, t, seqlen, seq_ptr, pid_b * seqlen,
                             WIDTH, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    yoff = pid_b * sy_b + d1[:, None].to(tl.int64) * sy_d + t[None, :].to(tl.int64) * sy_t
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & (t < seqlen)[None, :])


@triton.jit
def _conv_gprime(x_ptr, w_ptr, seq_ptr, gy_ptr, bias, xrow, grow, sx_t, sg_t, sw_d, sw_k, d1, mask_d, t, seqlen,
                 seq_row, WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr):
    """g' = dL/d(pre-activation) at times t >= 0 (BT,): gy * silu'(pre) (gy without SiLU), exactly 0 at t >= seqlen.
    (BLOCK_D, BT) fp32; bias (BLOCK_D,) fp32."""
    m2 = mask_d[:, None] & (t < seqlen)[None, :]
    g = tl.load(gy_ptr + grow + t[None, :].to(tl.int64) * sg_t, mask=m2, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(x_ptr, w_ptr, xrow, sx_t, sw_d, sw_k, d1, mask_d, t, seqlen, seq_ptr, seq_row,
                        WIDTH, HAS_SEQ) + bias[:, None]
        sg = tl.sigmoid(pre)
        g = tl.where(m2, g * sg * (1.0 + pre * (1.0 - sg)), 0.0)
    return g


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, gy_ptr, dx_ptr, part_ptr,
                     dim, seqlen, n_tblocks, part_stride, sx_b, sx_d, sx_t, sg_b, sg_d, sg_t, sdx_b, sdx_d, sdx_t,
                     sw_d, sw_k,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
                     GATHER: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr, HALO: tl.constexpr,
                     AXB: tl.constexpr, AXD: tl.constexpr, AXT: tl.constexpr,
                     AGB: tl.constexpr, AGD: tl.constexpr, AGT: tl.constexpr,
                     ADB: tl.constexpr, ADD: tl.constexpr, ADT: tl.constexpr):
    sx_b, sx_d, sx_t = sx_b * AXB, sx_d * AXD, sx_t * AXT
    sg_b, sg_d, sg_t = sg_b * AGB, sg_d * AGD, sg_t * AGT
    sdx_b, sdx_d, sdx_t = sdx_b * ADB, sdx_d * ADD, sdx_t * ADT
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d1 < dim
    col = tl.arange(0, BT)
    s = pid_t * BT + col  # the inputs whose gradient this program writes, and the outputs whose g' it sums
    ms = s < seqlen
    xrow = pid_b * sx_b + d1[:, None].to(tl.int64) * sx_d
    grow = pid_b * sg_b + d1[:, None].to(tl.int64) * sg_d
    seq_row = pid_b * seqlen
    if HAS_BIAS:
        bias = tl.load(b_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), tl.float32)
    g = _conv_gprime(x_ptr, w_ptr, seq_ptr, gy_ptr, bias, xrow, grow, sx_t, sg_t, sw_d, sw_k, d1, mask_d, s, seqlen,
                     seq_row, WIDTH, SILU, HAS_SEQ)
    # weight / bias partial sums over this program's outputs t = s, in its row of the partials: [dw | db]
    prow = (pid_b * n_tblocks + pid_t) * part_stride
    if HAS_BIAS:
        tl.store(part_ptr + prow + dim * WIDTH + d1, tl.sum(g, axis=1), mask=mask_d)
    if HAS_SEQ:
        s_s = tl.load(seq_ptr + seq_row + s, mask=ms, other=0)
    for k in tl.static_range(WIDTH):
        ts = s - (WIDTH - 1) + k
        ok = ms & (ts >= 0)
        if HAS_SEQ:
            ok = ok & (tl.load(seq_ptr + seq_row + ts, mask=ok, other=0) == s_s)
        xv = tl.load(x_ptr + xrow + ts[None, :].to(tl.int64) * sx_t, mask=mask_d[:, None] & ok[None, :],
                     other=0.0).to(tl.float32)
        tl.store(part_ptr + prow + d1 * WIDTH + k, tl.sum(tl.where(ok[None, :], g * xv, 0.0), axis=1),
                 mask=mask_d)
    if GATHER:
        # g' of the width - 1 outputs past the tile, which the tile's last inputs feed
        gh = _conv_gprime(x_ptr, w_ptr, seq_ptr, gy_ptr, bias, xrow, grow, sx_t, sg_t, sw_d, sw_k, d1, mask_d,
                          pid_t * BT + BT + tl.arange(0, HALO), seqlen, seq_row, WIDTH, SILU, HAS_SEQ)
    # input s feeds output s + j through tap width - 1 - j
    dx = tl.zeros((BLOCK_D, BT), tl.float32)
    for j in tl.static_range(WIDTH):
        t = s + j
        ok = t < seqlen
        if HAS_SEQ:
            ok = ok & (tl.load(seq_ptr + seq_row + t, mask=ok, other=0) == s_s)
        if j == 0:
            gj = g
        elif GATHER:
            i = col + j
            in_tile = tl.gather(g, tl.broadcast_to(tl.minimum(i, BT - 1)[None, :], (BLOCK_D, BT)), axis=1)
            past = tl.gather(gh, tl.broadcast_to(tl.maximum(i - BT, 0)[None, :], (BLOCK_D, BT)), axis=1)
            gj = tl.where((i < BT)[None, :], in_tile, past)
        else:
            gj = _conv_gprime(x_ptr, w_ptr, seq_ptr, gy_ptr, bias, xrow, grow, sx_t, sg_t, sw_d, sw_k, d1, mask_d,
                              t, seqlen, seq_row, WIDTH, SILU, HAS_SEQ)
        wk = tl.load(w_ptr + d1 * sw_d + (WIDTH - 1 - j) * sw_k, mask=mask_d, other=0.0).to(tl.float32)
        dx += tl.where(ok[None, :], gj * wk[:, None], 0.0)
    dxoff = pid_b * sdx_b + d1[:, None].to(tl.int64) * sdx_d + s[None, :].to(tl.int64) * sdx_t
    tl.store(dx_ptr + dxoff, dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & ms[None, :])


def is_channel_last(x: Tensor) -> bool:
    """Whether x (batch, dim, seqlen) has dim as its fastest axis (stride 1) and time strided: a (batch, dim,
    seqlen) view of a (batch, seqlen, C) buffer, C >= dim."""
    return x.stride(1) == 1 and x.stride(2) != 1


def _empty_like_layout(x: Tensor) -> Tensor:
    """An uninitialised (batch, dim, seqlen) tensor in x's dtype: channel-last when x is, else contiguous."""
    batch, dim, seqlen = x.shape
    if is_channel_last(x):
        return torch.empty(batch, seqlen, dim, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(batch, dim, seqlen, device=x.device, dtype=x.dtype)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor]) -> None:
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
        raise MambaKitError("the Triton conv needs CUDA tensors (or TRITON_INTERPRET=1); "
                            f"got tensors on {x.device}")
    if x.dtype not in _FLOATS:
        raise MambaKitError(f"x must be float32, float16 or bfloat16 for the Triton conv, got {x.dtype}")


def _check_buffer(name: str, buf: Tensor, x: Tensor) -> None:
    if buf.shape != x.shape or buf.device != x.device or buf.dtype not in _FLOATS:
        raise MambaKitError(f"{name} must be a float32/float16/bfloat16 tensor of shape {tuple(x.shape)} on "
                            f"{x.device}, got {buf.dtype} {tuple(buf.shape)} on {buf.device}")


def _seq(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    return None if seq_idx is None else seq_idx.to(torch.int32).contiguous()


def _strides(t: Tensor) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """t's strides as (quotients, factors): each stride = quotient * factor, the factor its largest power-of-two
    divisor up to 16 (1 for a stride of 1; 16 for an axis of size 1, whose stride is never used). The kernels take
    the factors as constexprs, so that rows stay known to be aligned (vector loads) when a stride is a multiple of
    8 but not of 16, which Triton's own specialisation (16 or nothing) does not see: the channel-last slice of a
    Mamba-2 in_proj output, 3352 wide for d_model 768, is one."""
    quotients, factors = [], []
    for size, stride in zip(t.shape, t.stride()):
        f = 16 if size == 1 else next(f for f in (16, 8, 4, 2, 1) if stride % f == 0)
        quotients.append(0 if size == 1 else stride // f)
        factors.append(f)
    return tuple(quotients), tuple(factors)


def _grid(x: Tensor, backward: bool) -> Tuple[int, int, Tuple[int, int, int]]:
    """(BLOCK_D, BT, grid): one program per (time tile, channel block, batch row) of x (batch, dim, seqlen)."""
    batch, dim, seqlen = x.shape
    bd, bt = block_sizes(is_channel_last(x), backward)
    bd, bt = min(bd, next_power_of_2(dim)), min(bt, next_power_of_2(seqlen))
    return bd, bt, (cdiv(seqlen, bt), cdiv(dim, bd), batch)


def conv1d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, seq_idx: Optional[Tensor],
                   out: Optional[Tensor] = None, conv_state: Optional[Tensor] = None) -> Tensor:
    """The causal conv (+ SiLU when `silu`), not differentiable. x: (batch, dim, seqlen), any strides; weight:
    (dim, width); bias: (dim,) or None; seq_idx: (batch, seqlen) integer or None.

    conv_state: (batch, dim, width), any strides, x's dtype: the last `width` inputs before x (continuing a
    sequence; the history belongs to x's first packed sequence); None: zeros before x.

    out: (batch, dim, seqlen), any strides (e.g. a channel-last view of a (batch, seqlen, dim) buffer), not
    overlapping x; written and returned. Without it y is allocated in x's dtype, channel-last when x is (see
    `is_channel_last`), else contiguous. Returns y: (batch, dim, seqlen)."""
    _check(x, weight, bias, seq_idx)
    if out is None:
        out = _empty_like_layout(x)
    else:
        _check_buffer("out", out, x)
    if x.numel() == 0:
        return out
    if conv_state is not None and (conv_state.shape != (*x.shape[:2], weight.shape[1]) or conv_state.dtype != x.dtype):
        raise MambaKitError(f"conv_state must be a {x.dtype} tensor of shape {(*x.shape[:2], weight.shape[1])}, got "
                            f"{conv_state.dtype} {tuple(conv_state.shape)}")
    seq, bias = _seq(seq_idx), None if bias is None else bias.contiguous()
    bd, bt, grid = _grid(x, backward=False)
    (sx, ax), (sy, ay) = _strides(x), _strides(out)
    state = conv_state if conv_state is not None else x
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq if seq is not None else x, out, state,
        x.shape[1], x.shape[2], *sx, *sy, *weight.stride(), *state.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ=seq is not None,
        HAS_STATE=conv_state is not None,
        BLOCK_D=bd, BT=bt, AXB=ax[0], AXD=ax[1], AXT=ax[2], AYB=ay[0], AYD=ay[1], AYT=ay[2], num_warps=4)
    return out


def conv1d_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, seq_idx: Optional[Tensor],
                    gy: Tensor, dx_out: Optional[Tensor] = None,
                    grad_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of `conv1d_forward` given gy = dL/dy. x, gy: (batch, dim, seqlen), any strides; weight: (dim, width);
    bias: (dim,) or None; seq_idx: (batch, seqlen) integer or None.

    dx_out: (batch, dim, seqlen), any strides (e.g. a slice view of a bigger gradient buffer), not overlapping x or
    gy; written (not accumulated into) and returned. Without it dx is allocated like `conv1d_forward`'s y.
    Returns (dx (batch, dim, seqlen), dweight (dim, width) in weight's dtype, dbias (dim,) in bias's dtype or None);
    grad_dtype: the dtype of dweight and dbias instead (e.g. the float32 parameters the 16-bit weight was cast from:
    the float32 sums are not rounded on the way). Deterministic: the same inputs give bit-identical gradients."""
    _check(x, weight, bias, seq_idx)
    _check_buffer("gy", gy, x)
    if dx_out is None:
        dx_out = _empty_like_layout(x)
    else:
        _check_buffer("dx_out", dx_out, x)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if x.numel() == 0:
        db = None if bias is None else torch.zeros_like(bias)
        return dx_out, torch.zeros_like(weight), db
    seq, bias = _seq(seq_idx), None if bias is None else bias.contiguous()
    bd, bt, grid = _grid(x, backward=True)
    (sx, ax), (sg, ag), (sd, ad) = _strides(x), _strides(gy), _strides(dx_out)
    n_tblocks = grid[0]
    # one row of partial sums per program, [dweight (dim * width) | dbias (dim)], summed by one reduction
    cols = dim * (width + (bias is not None))
    parts = torch.empty(batch * n_tblocks, cols, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq if seq is not None else x, gy, dx_out, parts, dim,
        seqlen, n_tblocks, cols, *sx, *sg, *sd, *weight.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ=seq is not None, GATHER=use_gather(x),
        BLOCK_D=bd, BT=bt, HALO=next_power_of_2(max(width - 1, 1)), AXB=ax[0], AXD=ax[1], AXT=ax[2],
        AGB=ag[0], AGD=ag[1], AGT=ag[2], ADB=ad[0], ADD=ad[1], ADT=ad[2], num_warps=4)
    dw_dtype, db_dtype = grad_dtype or weight.dtype, grad_dtype or (weight.dtype if bias is None else bias.dtype)
    sums = parts.sum(0)
    if dw_dtype == db_dtype:  # one cast (none for float32 gradients)
        sums = sums.to(dw_dtype)
    if bias is None:
        return dx_out, sums.view(dim, width).to(dw_dtype), None
    dw, db = sums.split([dim * width, dim])
    return dx_out, dw.view(dim, width).to(dw_dtype), db.to(db_dtype)


class _CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, seq_idx):
        # the first call compiles the forward and backward kernels side by side (mambakit.ops.triton.compile)
        key = (x.dtype, weight.dtype, weight.shape, bias is not None, silu, seq_idx is not None, x.device,
               _strides(x)[1], specialisation(x.shape[1], x.shape[2], x))
        precompile_once(key, lambda: conv1d_backward(x, weight, bias, silu, seq_idx,
                                                     conv1d_forward(x, weight, bias, silu, seq_idx)))
        y = conv1d_forward(x, weight, bias, silu, seq_idx)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        dx, dw, db = conv1d_backward(x, weight, bias, ctx.silu, seq_idx, gy)
        return dx, dw, db, None, None


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                         seq_idx: Optional[Tensor] = None) -> Tensor:
    """Causal depthwise conv1d (+ SiLU) with Triton kernels; differentiable in x, weight and bias.

    x: (batch, dim, seqlen), any strides; weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) integer.
    Returns y: (batch, dim, seqlen) in x's dtype, laid out like x: channel-last (dim the fastest axis, so that
    y.transpose(1, 2) is a contiguous (batch, seqlen, dim) tensor a following projection reads without a copy) when
    x is channel-last, else contiguous. dx comes back in the same layout."""
    if activation not in _ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _check(x, weight, bias, seq_idx)
    batch, dim, seqlen = x.shape
    if seqlen == 0:
        return x.new_empty(batch, dim, 0)
    return _CausalConv1dTriton.apply(x, weight.contiguous(), bias.contiguous() if bias is not None else None,
                                     activation in ("silu", "swish"), _seq(seq_idx))


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
    if activation not in _ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    tensors = (x, weight, bias, conv_state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # inference (a prefill continuing a state): the kernel reads the history from the state itself
        return conv1d_forward(x, weight.contiguous(), bias, activation in ("silu", "swish"), seq_idx,
                              conv_state=conv_state.to(x.dtype))
    xx = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)
    seq = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)
    return causal_conv1d_triton(xx, weight, bias, activation, seq_idx=seq)[..., width - 1:]
