"""Triton matrix-vector kernels for the decode step's projections, with the norm before them fused in.

At small batches a projection of one token is a GEMV: reading the weight once is all the work, and the norm that
feeds it is a separate launch costing as much. Each kernel here computes `out = W @ f(input)` in one launch, where
f is one of
  * plain: f(x) = x;
  * add + RMSNorm (the pre-norm block): r' = residual + hidden (kept, in its own output buffer),
    f = rms_norm(r'.to(norm dtype)) * w_norm;
  * gated RMSNorm (Mamba-2's tail): f = norm(y * silu(z)) * w_norm, or norm(y) * w_norm * silu(z), per group of
    group_size channels.
f's result is rounded to W's dtype before the product, as the unfused norm's output is, and the product is
accumulated in float32 (fp32 weights: an IEEE product, no TF32). Inference only (no autograd).

Layout: program (i, j, s) owns output rows [i * BLOCK_N, (i + 1) * BLOCK_N) of W (out_features, in_features),
batch rows [j * BLOCK_B, (j + 1) * BLOCK_B) and the s-th of SPLIT contiguous runs of k blocks. The k blocks are
walked group by group (a block never straddles two groups), as one flat loop whose loads depend only on the loop
index, so `tl.range(num_stages=...)` keeps several weight tiles in flight per program. A norm costs a short first
phase: the program reads its batch rows over the groups it touches (read by every program, so from L2 after the
first) for the sums of squares, then the main loop reads them again next to the weight tile. The programs of column
(0, ·, 0) also store the new residual, into a buffer nobody reads. With SPLIT > 1 each program writes its float32
partial sums, and a second kernel adds them in split order (deterministic: the same tokens run to run), then the
bias.

Why these launch configurations (`launch_config`): a decode GEMV is bound by the weight bytes in flight, not by
arithmetic, so the choices aim at many programs with several deep-pipelined 16-byte loads each.
  * batch 1: a 2-D tile reduced on the CUDA cores (BLOCK_B = 1); few output rows per program (down to 1), so that
    even a narrow projection spreads over every multiprocessor, and a wide k block, so that each thread issues
    16-byte loads, several per stage where the tile allows (fewer warps for a small tile);
  * batch 2-16: out^T = W tile (BLOCK_N x BLOCK_K) @ f(x)^T (BLOCK_K x 16) on the tensor cores, the batch padded to
    16 (masked rows load nothing), so the time stays the weight read's at every batch in that range; BLOCK_N grows
    with the batch, since every program re-reads its batch rows (from L2) and a wider tile amortises that, as
    long as at least half the multiprocessors get a program; when fewer get one, k is split (then the second
    pass); a narrower k block than at batch 1, since each pipeline stage stages the 16 padded input rows in
    shared memory next to the weight tile (more stages rather than wider ones keep the weight loads in flight),
    and eight warps for the wider tiles, so that no thread holds much of the input tile (four for 16 output rows:
    eight leave a stack frame for the per-group statistics);
  * more than 16 rows: more programs along the batch axis (each re-reads W: beyond the GEMV range).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.device import interpreted, multiprocessor_count
from mambakit.ops.triton.grid import cdiv, next_power_of_2

MODE_PLAIN, MODE_ADD_NORM, MODE_GATED_NORM = 0, 1, 2

#: the batch rows of one tensor-core program (the dot's N side; more rows: more programs along the batch axis)
MAX_BLOCK_B = 16


class GemvConfig(NamedTuple):
    """One launch's blocks: block_b 1 (the CUDA-core path: one batch row per program, meant for batch 1) or
    MAX_BLOCK_B (the tensor-core path, block_n and block_k >= 16); block_n, block_k powers of two; split: programs
    along k (1: no second pass)."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split: int = 1


@triton.jit
def _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, cols, m, s_a, s_b, s_r, res_rows,
                MODE: tl.constexpr, HAS_B: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, STORE: tl.constexpr):
    """(x, gate), (BLOCK_B, BLOCK_K): what is normalised (float32; for MODE_ADD_NORM the new residual rounded to
    the norm's dtype, which is stored when STORE for the rows below res_rows) and silu(z) (MODE_GATED_NORM with z;
    x otherwise, unused)."""
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
def _gemv_kernel(a_ptr, b_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, n_rows, N, group_size, kb_per_group,
                 n_iters, iters_per_split, s_a, s_b, s_r, s_w, s_o, s_split, eps,
                 MODE: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                 DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                 ONE_SHOT: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mr = rows < n_rows
    rows = rows.to(tl.int64)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = ns < N
    w_rows = w_ptr + ns.to(tl.int64)[:, None] * s_w
    ks = tl.arange(0, BLOCK_K)
    gs = tl.arange(0, BLOCK_G)
    if ONE_SHOT:
        # one k block holds the whole row (one group): the weight loads are issued first, so that they are in
        # flight while the input is read and normalised
        mk = ks < group_size
        w = tl.load(w_rows + ks[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        x, gate = _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, ks, mr[:, None] & mk[None, :], s_a, s_b, s_r,
                              n_rows * (pid_n == 0).to(tl.int32), MODE, HAS_B, NORM_BEFORE_GATE, True)
        if MODE != 0:
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / group_size + eps)
            x = x * r[:, None] * tl.load(nw_ptr + ks, mask=mk, other=0.0).to(tl.float32)[None, :]
            if MODE == 2:
                if HAS_B:
                    if NORM_BEFORE_GATE:
                        x = x * gate
        v = x.to(w_ptr.dtype.element_ty)
        if DOT:
            if IEEE:
                acc = tl.dot(w, tl.trans(v), input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(v))  # (BLOCK_N, BLOCK_B)
        else:
            acc = tl.sum(w.to(tl.float32) * v.to(tl.float32), axis=1)[:, None]  # (BLOCK_N, 1)
    else:
        acc = _looped_product(a_ptr, b_ptr, nw_ptr, w_ptr, w_rows, res_ptr, rows, mr, mn, ks, gs, pid_n, pid_s, n_rows,
                              group_size, kb_per_group, n_iters, iters_per_split, s_a, s_b, s_r, eps, MODE, HAS_B,
                              NORM_BEFORE_GATE, DOT, IEEE, BLOCK_G, BLOCK_B, BLOCK_N, BLOCK_K, STAGES)
    m = mn[:, None] & mr[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ns, mask=mn, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rows[None, :] * s_o + ns[:, None], acc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(out_ptr + pid_s * s_split + rows[None, :] * N + ns[:, None], acc, mask=m)


@triton.jit
def _looped_product(a_ptr, b_ptr, nw_ptr, w_ptr, w_rows, res_ptr, rows, mr, mn, ks, gs, pid_n, pid_s, n_rows,
                    group_size, kb_per_group, n_iters, iters_per_split, s_a, s_b, s_r, eps, MODE: tl.constexpr,
                    HAS_B: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    STAGES: tl.constexpr):
    """This program's (BLOCK_N, BLOCK_B) float32 products over its split's k blocks, walked group by group."""
    it0 = pid_s * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    rstd = tl.zeros((BLOCK_B, BLOCK_G), dtype=tl.float32)
    if MODE != 0:
        # the sums of squares of the groups this program's k blocks fall in, one column per group
        res_rows = n_rows * ((pid_n == 0) & (pid_s == 0)).to(tl.int32)
        ss = tl.zeros((BLOCK_B, BLOCK_G), dtype=tl.float32)
        for it in tl.range((it0 // kb_per_group) * kb_per_group, tl.cdiv(it1, kb_per_group) * kb_per_group,
                           num_stages=STAGES):
            g = it // kb_per_group
            k0 = (it - g * kb_per_group) * BLOCK_K
            mk = k0 + ks < group_size
            x, _ = _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, g * group_size + k0 + ks,
                               mr[:, None] & mk[None, :], s_a, s_b, s_r, res_rows, MODE, HAS_B, NORM_BEFORE_GATE,
                               True)
            ss += tl.where(gs[None, :] == g, tl.sum(x * x, axis=1)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(ss / group_size + eps)
    if DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for it in tl.range(it0, it1, num_stages=STAGES):
        g = it // kb_per_group
        k0 = (it - g * kb_per_group) * BLOCK_K
        mk = k0 + ks < group_size
        cols = g * group_size + k0 + ks
        w = tl.load(w_rows + cols[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        x, gate = _load_input(a_ptr, b_ptr, res_ptr, nw_ptr, rows, cols, mr[:, None] & mk[None, :],
                              s_a, s_b, s_r, 0, MODE, HAS_B, NORM_BEFORE_GATE, False)
        if MODE != 0:
            nw = tl.load(nw_ptr + cols, mask=mk, other=0.0).to(tl.float32)
            r = tl.sum(tl.where(gs[None, :] == g, rstd, 0.0), axis=1)  # (BLOCK_B,): this block's group
            x = x * r[:, None] * nw[None, :]
            if MODE == 2:
                if HAS_B:
                    if NORM_BEFORE_GATE:
                        x = x * gate
        v = x.to(w_ptr.dtype.element_ty)
        if DOT:
            if IEEE:
                acc = tl.dot(w, tl.trans(v), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(v), acc)
        else:
            acc2 += w.to(tl.float32) * v.to(tl.float32)
    if not DOT:
        acc = tl.sum(acc2, axis=1)[:, None]  # (BLOCK_N, 1)
    return acc


@triton.jit
def _split_sum_kernel(part_ptr, bias_ptr, out_ptr, total, N, s_o,
                      SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s in order of part[s, i] (+ bias): part (SPLIT, rows, N) float32, out (rows, N) rows
    s_o apart."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    acc = tl.load(part_ptr + i, mask=m, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * total + i, mask=m, other=0.0)
    col = i % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + (i // N) * s_o + col, acc.to(out_ptr.dtype.element_ty), mask=m)


def _block_k(group_size: int, most: int, least: int) -> int:
    """The largest power of two in [least, most] dividing group_size, else the smallest covering it (capped)."""
    bk = most
    while bk > least and group_size % bk:
        bk //= 2
    return bk if group_size % bk == 0 else max(least, min(most, next_power_of_2(group_size)))


def _floor2(v: float) -> int:
    return 1 << max(0, int(v).bit_length() - 1)


#: batch 1 with one norm group and in_features up to this: the whole row in one k block (`one_shot_config`)
ONE_SHOT_MAX_K = 2048


def one_shot_config(n: int, k: int, sms: int) -> GemvConfig:
    """Batch 1, the whole row in one k block: no loop, every weight load of a program issued at once. Output rows
    per program so that a program's tile is at most 4096 elements and every multiprocessor gets two programs; one
    warp per 256 columns (the fastest of `bench_gemv.py --variants` on an H200: 4 rows x 1024 with four warps for
    the in_projs, 2 x 2048 with eight for the out_projs; RESULTS.md)."""
    block_k = next_power_of_2(k)
    block_n = max(1, min(16, 4096 // block_k, _floor2(n / (2 * sms))))
    return GemvConfig(1, block_n, block_k, max(1, min(8, block_k // 256, block_n * block_k // 256)), 1)


#: batch 2-64 with one norm group and in_features up to this: the whole row in one k block on the tensor cores
#: (`one_shot_batched_config`); 0: off (the k loop), since it was 2x slower than the loop on an H200 and far slower
#: where its registers spill (RESULTS.md, thirteenth session)
ONE_SHOT_BATCHED_MAX_K = 0


def one_shot_batched_config(batch: int, n: int, k: int, sms: int, block_n: int = 0,
                            num_warps: int = 0) -> GemvConfig:
    """Batch 2-64, the whole row in one k block: each program loads its (block_n, k) weight tile and its 16 batch
    rows at once and makes one tensor-core product. block_n (default: 16 output rows, 32 when that still gives every
    multiprocessor a program) and num_warps (default 8) override the choice."""
    block_k = next_power_of_2(k)
    if not block_n:
        programs32 = cdiv(n, 32) * cdiv(batch, MAX_BLOCK_B)
        block_n = 32 if programs32 >= sms and block_k <= 1024 else 16
    return GemvConfig(MAX_BLOCK_B, block_n, block_k, num_warps or 8, 1)


def launch_config(batch: int, n: int, k: int, group_size: int, device: torch.device) -> GemvConfig:
    """The blocks for a (batch, k) x (n, k)^T product normalised per group_size (k for no norm or one group); the
    module docstring says why. On the interpreter small blocks, so that the loops over k, the groups and the
    masked edges run in the tests."""
    if interpreted():
        return GemvConfig(1, 4, 16, 1, 1) if batch <= 1 else GemvConfig(MAX_BLOCK_B, 16, 16, 4, 1)
    sms = multiprocessor_count(device)
    if batch <= 1 and group_size == k and k <= ONE_SHOT_MAX_K:
        return one_shot_config(n, k, sms)
    if batch <= 1:
        block_k = _block_k(group_size, 512, 64)
        # at least 8 elements (16 bytes of bf16) per thread and load: more rows where small groups cap the k block
        block_n = max(min(16, 512 // block_k), min(16, _floor2(n / (2 * sms)), 8192 // block_k))
        return GemvConfig(1, block_n, block_k, max(1, min(4, block_n * block_k // 256)), 4)
    if group_size == k and k <= ONE_SHOT_BATCHED_MAX_K:
        return one_shot_batched_config(batch, n, k, sms)
    block_k = _block_k(group_size, 128, 32)
    wide = 16 if batch <= 4 else (32 if batch <= 8 else 64)
    block_n = max(16, min(wide, _floor2(n / (sms // 2))))
    programs = cdiv(n, block_n) * cdiv(batch, MAX_BLOCK_B)
    iters = (k // group_size) * cdiv(group_size, block_k)
    split = 1
    if programs < sms // 2:
        split = max(1, min(4, cdiv(sms, programs), iters // 2))
    return GemvConfig(MAX_BLOCK_B, block_n, block_k, 4 if block_n == 16 else 8, 4, split)


def _rows(name: str, t: Tensor, k: int) -> Tensor:
    """t (..., k) as a (rows, k) matrix with unit column stride (a view where it can be)."""
    if t.shape[-1] != k:
        raise MambaKitError(f"gemv: {name} must have last dim {k}, got shape {tuple(t.shape)}")
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_config(cfg: GemvConfig) -> None:
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (cfg.block_n, cfg.block_k, cfg.num_warps))
    dot_ok = cfg.block_b == MAX_BLOCK_B and cfg.block_n >= 16 and cfg.block_k >= 16
    if not (pow2 and (cfg.block_b == 1 or dot_ok) and cfg.split >= 1 and cfg.num_stages >= 1):
        raise MambaKitError(f"gemv: config must have block_b 1 or {MAX_BLOCK_B} (then block_n, block_k >= 16), "
                            f"powers of two, split >= 1, got {cfg}")


def _launch(mode: int, a: Tensor, b: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
            bias: Optional[Tensor], res_dtype: Optional[torch.dtype], eps: float, group_size: int,
            norm_before_gate: bool, config: Optional[GemvConfig]) -> tuple[Tensor, Optional[Tensor]]:
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
    cfg = config or launch_config(rows, n, k, group_size, a.device)
    _check_config(cfg)
    ngroups = k // group_size
    kb = cdiv(group_size, cfg.block_k)
    n_iters = ngroups * kb
    split = max(1, min(cfg.split, n_iters))
    per_split = cdiv(n_iters, split)
    split = cdiv(n_iters, per_split)  # no empty split
    if rows == 0 or n == 0:
        return out.view(*lead, n), (res.view(*lead, k) if res is not None else None)
    dest = out if split == 1 else torch.empty(split, rows, n, device=a.device, dtype=torch.float32)
    grid = (cdiv(n, cfg.block_n), cdiv(rows, cfg.block_b), split)
    _gemv_kernel[grid](
        a2, b2 if b2 is not None else a2, norm_weight if norm_weight is not None else w,
        w, bias if bias is not None else w, dest, res if res is not None else out, rows, n, group_size, kb,
        n_iters, per_split, a2.stride(0), (b2 if b2 is not None else a2).stride(0), k, w.stride(0), n, rows * n,
        float(eps), MODE=mode, HAS_B=b2 is not None, HAS_BIAS=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
        DOT=cfg.block_b > 1, IEEE=w.dtype == torch.float32, SPLIT=split,
        BLOCK_G=next_power_of_2(ngroups) if mode != MODE_PLAIN else 1,
        BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages,
        ONE_SHOT=n_iters == 1, num_warps=cfg.num_warps)
    if split > 1:
        block = 1024
        _split_sum_kernel[(cdiv(rows * n, block),)](
            dest, bias if bias is not None else w, out, rows * n, n, n, SPLIT=split, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)
    return out.view(*lead, n), (res.view(*lead, k) if res is not None else None)


def gemv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                config: Optional[GemvConfig] = None) -> Tensor:
    """F.linear(x, weight, bias) for a few rows: x (..., in_features) in weight's dtype, weight (out_features,
    in_features), bias (out_features,). Returns (..., out_features) in weight's dtype. config: the blocks
    (default `launch_config`'s)."""
    return _launch(MODE_PLAIN, x, None, None, weight, bias, None, 0.0, weight.shape[1], False, config)[0]


def add_rms_norm_gemv_triton(hidden: Tensor, residual: Optional[Tensor], norm_weight: Tensor, eps: float,
                             residual_in_fp32: bool, weight: Tensor, bias: Optional[Tensor] = None, *,
                             config: Optional[GemvConfig] = None) -> tuple[Tensor, Tensor]:
    """(F.linear(normed, weight, bias), residual') with (normed, residual') = add_rms_norm(hidden, residual,
    norm_weight, eps, residual_in_fp32). hidden, residual: (..., d) (residual None for the first block);
    norm_weight: (d,) in weight's dtype; weight: (out_features, d). Returns (..., out_features) in weight's dtype and
    (..., d) (float32 when residual_in_fp32, else the promoted dtype of hidden and residual)."""
    res_dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    if residual_in_fp32:
        res_dtype = torch.promote_types(res_dtype, torch.float32)
    k = weight.shape[1]
    return _launch(MODE_ADD_NORM, hidden, residual, norm_weight, weight, bias, res_dtype, eps, k, False, config)


def rms_norm_gated_gemv_triton(y: Tensor, z: Optional[Tensor], norm_weight: Tensor, eps: float, group_size: int,
                               norm_before_gate: bool, weight: Tensor, bias: Optional[Tensor] = None, *,
                               config: Optional[GemvConfig] = None) -> Tensor:
    """F.linear(rms_norm_gated(y, z, norm_weight, eps, group_size, norm_before_gate), weight, bias). y, z: (..., d)
    (z optional, any row stride), y in weight's dtype; norm_weight: (d,); weight: (out_features, d). Returns
    (..., out_features) in weight's dtype."""
    return _launch(MODE_GATED_NORM, y, z, norm_weight, weight, bias, None, eps, group_size, norm_before_gate,
                   config)[0]
