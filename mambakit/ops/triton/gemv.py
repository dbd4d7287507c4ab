"""Triton matrix-vector kernels for the decode step's projections, with the norm before them fused in.

At small batches a projection of one token is a GEMV: reading the weight once is all the work, and the norm that
feeds it is a separate launch costing as much. Each kernel here computes `out = W @ f(input)` in one launch, where
f is one of
  * plain: f(x) = x;
  * add + RMSNorm (the pre-norm block): r' = residual + hidden (kept, in its own output buffer),
    f = rms_norm(r'.to(norm dtype)) * w_norm;
  * gated RMSNorm (Mamba-2's tail): f = norm(y * silu(z)) * w_norm, or norm(y) * w_norm * silu(z), per group of
    group_size channels.

Layout: program (i, j) owns output rows [i * BLOCK_N, (i + 1) * BLOCK_N) of W (out_features, in_features) and batch
rows [j * BLOCK_B, (j + 1) * BLOCK_B); it reads those batch rows in full and recomputes their norm itself (cheap next
to its slice of W), so no program waits for another. The new residual is written by the programs of column 0 only,
into a buffer nobody reads. f's result is rounded to W's dtype before the product, as the unfused norm's output is,
and the product is accumulated in float32. Inference only (no autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.device import interpreted, multiprocessor_count

MODE_PLAIN, MODE_ADD_NORM, MODE_GATED_NORM = 0, 1, 2

#: the batch rows one program takes at most (more rows: more programs along the grid's second axis)
MAX_BLOCK_B = 16


@triton.jit
def _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, cols, m, s_a, s_b, s_r, res_rows,
                MODE: tl.constexpr, HAS_B: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, STORE: tl.constexpr):
    """(x, gate): what is normalised (float32; for MODE_ADD_NORM the new residual rounded to the norm's dtype, which
    is stored when STORE for the rows below res_rows) and silu(z) (MODE_GATED_NORM with z; x otherwise,
    unused)."""
    x = tl.load(a_ptr + rows[:, None] * s_a + cols[None, :], mask=m, other=0.0).to(tl.float32)
    gate = x
    if MODE == 1:
        if HAS_B:
            x += tl.load(b_ptr + rows[:, None] * s_b + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = x.to(res_ptr.dtype.element_ty)
        if STORE:
            tl.store(res_ptr + rows[:, None] * s_r + cols[None, :], r, mask=m & (rows[:, None] < res_rows))
        x = r.to(nw_ptr.dtype.element_ty).to(tl.float32)
    if MODE == 2:
        if HAS_B:
            zv = tl.load(b_ptr + rows[:, None] * s_b + cols[None, :], mask=m, other=0.0).to(tl.float32)
            gate = zv * tl.sigmoid(zv)
            if not NORM_BEFORE_GATE:
                x = x * gate
    return x, gate


@triton.jit
def _gemv_kernel(a_ptr, b_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, n_rows, N, K, group_size,
                 s_a, s_b, s_r, s_w, s_o, eps,
                 MODE: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mr = rows < n_rows
    rows = rows.to(tl.int64)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = ns < N
    w_rows = w_ptr + ns.to(tl.int64)[:, None] * s_w
    ks = tl.arange(0, BLOCK_K)
    res_rows = n_rows * (pid_n == 0).to(tl.int32)  # the programs of output block 0 store the residual
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, K, group_size):
        rstd = tl.zeros((BLOCK_B,), dtype=tl.float32)
        if MODE != 0:
            ss = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for k0 in range(0, group_size, BLOCK_K):
                mk = k0 + ks < group_size
                x, _ = _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, g0 + k0 + ks, mr[:, None] & mk[None, :],
                                   s_a, s_b, s_r, res_rows, MODE, HAS_B, NORM_BEFORE_GATE, True)
                ss += tl.sum(x * x, axis=1)
            rstd = 1.0 / tl.sqrt(ss / group_size + eps)
        for k0 in range(0, group_size, BLOCK_K):
            mk = k0 + ks < group_size
            cols = g0 + k0 + ks
            x, gate = _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, cols, mr[:, None] & mk[None, :],
                                  s_a, s_b, s_r, res_rows, MODE, HAS_B, NORM_BEFORE_GATE, False)
            if MODE != 0:
                nw = tl.load(nw_ptr + cols, mask=mk, other=0.0).to(tl.float32)
                x = x * rstd[:, None] * nw[None, :]
                if MODE == 2:
                    if HAS_B:
                        if NORM_BEFORE_GATE:
                            x = x * gate
            v = x.to(w_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=mn[:, None] & mk[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * s_o + ns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mr[:, None] & mn[None, :])


def launch_config(batch: int, n: int, group_size: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps) for a (batch, k) x (n, k)^T product normalised per group_size
    (k for no norm or one group).

    About two programs per multiprocessor along n (a batch-1 GEMV is bound by how many loads are in flight, so
    every multiprocessor gets work), a k block that divides the group where it can (no masked-off tail), and at
    most about 8K products per step of the k loop (the k block kept >= 64, fewer output rows at larger batches).
    On the interpreter small blocks, so that the loops over k and the masked edges run in the tests."""
    block_b = min(triton.next_power_of_2(max(batch, 1)), MAX_BLOCK_B)
    if interpreted():
        return block_b, 16, 16, 1
    block_n = max(4, min(64, triton.next_power_of_2(max(1, n // (2 * multiprocessor_count(device))))))
    block_k = 512
    while block_k > 64 and group_size % block_k:
        block_k //= 2
    if group_size % block_k:
        block_k = min(512, triton.next_power_of_2(group_size))
    block_k = max(64, min(block_k, 8192 // (block_b * block_n)))
    block_n = max(2, min(block_n, 8192 // (block_b * block_k)))
    return block_b, block_n, block_k, 4


def _rows(name: str, t: Tensor, k: int) -> Tensor:
    """t (..., k) as a (rows, k) matrix with unit column stride (a view where it can be)."""
    if t.shape[-1] != k:
        raise MambaKitError(f"gemv: {name} must have last dim {k}, got shape {tuple(t.shape)}")
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(mode: int, a: Tensor, b: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
            bias: Optional[Tensor], res_dtype: Optional[torch.dtype], eps: float, group_size: int,
            norm_before_gate: bool) -> tuple[Tensor, Optional[Tensor]]:
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        raise MambaKitError(f"gemv: bias must have shape ({n},), got {tuple(bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise MambaKitError(f"gemv: norm weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if not weight.is_cuda and not interpreted():
        raise MambaKitError(f"gemv kernels need CUDA tensors (or TRITON_INTERPRET=1), got {weight.device}")
    if group_size <= 0 or k % group_size != 0:
        raise MambaKitError(f"gemv: group_size must divide in_features={k}, got {group_size}")
    lead = a.shape[:-1]
    a2 = _rows("input", a, k)
    b2 = _rows("second input", b, k) if b is not None else None
    if b2 is not None and b2.shape != a2.shape:
        raise MambaKitError(f"gemv: the two inputs must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    rows = a2.shape[0]
    out = torch.empty(rows, n, device=a.device, dtype=weight.dtype)
    res = torch.empty(rows, k, device=a.device, dtype=res_dtype) if mode == MODE_ADD_NORM else None
    block_b, block_n, block_k, warps = launch_config(rows, n, group_size, a.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, block_b))
    if rows > 0 and n > 0:
        _gemv_kernel[grid](
            a2, b2 if b2 is not None else a2, norm_weight if norm_weight is not None else w,
            w, bias if bias is not None else w, out, res if res is not None else out, rows, n, k, group_size,
            a2.stride(0), (b2 if b2 is not None else a2).stride(0), k, w.stride(0), n, float(eps),
            MODE=mode, HAS_B=b2 is not None, HAS_BIAS=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
            BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out.view(*lead, n), (res.view(*lead, k) if res is not None else None)


def gemv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) for a few rows: x (..., in_features) in weight's dtype, weight (out_features,
    in_features), bias (out_features,). Returns (..., out_features) in weight's dtype."""
    return _launch(MODE_PLAIN, x, None, None, weight, bias, None, 0.0, weight.shape[1], False)[0]


def add_rms_norm_gemv_triton(hidden: Tensor, residual: Optional[Tensor], norm_weight: Tensor, eps: float,
                             residual_in_fp32: bool, weight: Tensor,
                             bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(F.linear(normed, weight, bias), residual') with (normed, residual') = add_rms_norm(hidden, residual,
    norm_weight, eps, residual_in_fp32). hidden, residual: (..., d) (residual None for the first block);
    norm_weight: (d,) in weight's dtype; weight: (out_features, d). Returns (..., out_features) in weight's dtype and
    (..., d) (float32 when residual_in_fp32, else the promoted dtype of hidden and residual)."""
    res_dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    if residual_in_fp32:
        res_dtype = torch.promote_types(res_dtype, torch.float32)
    k = weight.shape[1]
    return _launch(MODE_ADD_NORM, hidden, residual, norm_weight, weight, bias, res_dtype, eps, k, False)


def rms_norm_gated_gemv_triton(y: Tensor, z: Optional[Tensor], norm_weight: Tensor, eps: float, group_size: int,
                               norm_before_gate: bool, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(rms_norm_gated(y, z, norm_weight, eps, group_size, norm_before_gate), weight, bias). y, z: (..., d)
    (z optional, any row stride), y in weight's dtype; norm_weight: (d,); weight: (out_features, d). Returns
    (..., out_features) in weight's dtype."""
    return _launch(MODE_GATED_NORM, y, z, norm_weight, weight, bias, None, eps, group_size, norm_before_gate)[0]
