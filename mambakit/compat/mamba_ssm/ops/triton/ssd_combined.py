"""`mamba_ssm.ops.triton.ssd_combined`: the Mamba-2 SSD op with the official varlen arguments, and the fused
Mamba-2 path `mamba_split_conv1d_scan_combined` (zxbcdt -> out), on mambakit's public ops.

Layouts (official): x, z (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads); A, dt_bias (nheads,); B, C
(batch, seqlen, ngroups, dstate); D (nheads,) or (nheads, headdim); states (batch, nheads, headdim, dstate); seq_idx
(batch, seqlen) integer; cu_seqlens (num_seqs + 1,) integer, from 0 to seqlen, non-decreasing. Everything is
differentiable by autograd (the varlen states too, which the official backward refuses). Computed in float32
(float64 for float64 inputs); returned states are float32 (float64) unless `state_dtype` is given.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.checks import require_tensors
from mambakit.ops.conv1d import ACTIVATIONS, causal_conv1d_fn
from mambakit.ops.dt import DEFAULT_DT_LIMIT, compute_dtype, process_dt
from mambakit.ops.mamba2_inner import fused_available, mamba2_inner
from mambakit.ops.norm import rms_norm_gated
from mambakit.ops.selective_scan import selective_scan_fn
from mambakit.ops.ssd import mamba_chunk_scan_combined as ssd_combined
from mambakit.ops.triton.device import interpreted

__all__ = ["mamba_chunk_scan", "mamba_chunk_scan_combined", "mamba_conv1d_scan_ref", "mamba_split_conv1d_scan_combined",
           "mamba_split_conv1d_scan_ref", "ssd_chunk_scan_combined_ref", "ssd_selective_scan"]


def mamba_chunk_scan_combined(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None, dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT, return_final_states: bool = False,
    return_varlen_states: bool = False, state_dtype: Optional[torch.dtype] = None,
):
    """The official signature. Returns out (batch, seqlen, nheads, headdim) in x's dtype, then final_states
    (batch, nheads, headdim, dstate) with `return_final_states`, then varlen_states (num_seqs, nheads, headdim,
    dstate) with `return_varlen_states` (which needs cu_seqlens and batch 1, as official): the state after the last
    position of each packed sequence, each sequence on its own (initial_states reaches the first one). seq_idx still
    decides where out resets; pass the one matching cu_seqlens. cu_seqlens is ignored without return_varlen_states.
    state_dtype: the dtype of the returned states (the states are computed in float32 whatever it is)."""
    if return_varlen_states and cu_seqlens is None:
        raise MambaKitError("return_varlen_states=True needs cu_seqlens (num_seqs + 1,), got cu_seqlens=None")
    out = ssd_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                       seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
                       return_final_states=return_final_states)
    result = list(out) if return_final_states else [out]
    if return_varlen_states:
        result.append(varlen_states(x, dt, A, B, cu_seqlens, dt_bias, initial_states, dt_softplus, dt_limit))
    if state_dtype is not None:
        result[1:] = [s.to(state_dtype) for s in result[1:]]
    return result[0] if len(result) == 1 else tuple(result)


def mamba_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                     D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                     dt_softplus: bool = False) -> Tensor:
    """The official non-combined form's signature (no initial or final states, no seq_idx, no dt_limit): out
    (batch, seqlen, nheads, headdim) in x's dtype, by mambakit's SSD dispatcher (Triton kernels for CUDA tensors).
    chunk_size need not divide seqlen (the official asserts it does)."""
    return ssd_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def ssd_chunk_scan_combined_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                                D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                                dt_bias: Optional[Tensor] = None, dt_softplus: bool = False) -> Tensor:
    """The official reference's signature: `mamba_chunk_scan` by the sequential SSD recurrence (float64 inputs are
    computed in float64)."""
    return ssd_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                        backend="ref")


def _per_channel(t: Tensor, headdim: int, per_head_dims: int) -> Tensor:
    """A per-head tensor (with `per_head_dims` dims) repeated over a trailing headdim axis; a per-channel one as it
    is."""
    return t[..., None].expand(*t.shape, headdim) if t.dim() == per_head_dims else t


def ssd_selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                       dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT) -> Tensor:
    """SSD through Mamba-1's selective scan, official signature: x, z (batch, seqlen, nheads, headdim); dt (batch,
    seqlen, nheads) or per channel (batch, seqlen, nheads, headdim); A (nheads,) or (nheads * headdim, dstate);
    B, C (batch, seqlen, ngroups, dstate); D (nheads,) or (nheads, headdim); dt_bias (nheads,) or (nheads, headdim).
    Each (head, channel) is one channel of the scan. Returns out (batch, seqlen, nheads, headdim) in x's dtype, by
    `mambakit.ops.selective_scan_fn`; differentiable. With a dt_limit the processed dt stays in float32 (the official
    casts it to x's dtype)."""
    require_tensors(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if x.dim() != 4 or B.dim() != 4 or C.shape != B.shape:
        raise MambaKitError(f"x must have shape (batch, seqlen, nheads, headdim) and B, C (batch, seqlen, ngroups, "
                            f"dstate), got x {tuple(x.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    if dt.dim() not in (3, 4) or tuple(dt.shape[:3]) != (batch, seqlen, nheads):
        raise MambaKitError(f"dt must have shape (batch, seqlen, nheads) or (batch, seqlen, nheads, headdim) with "
                            f"batch={batch}, seqlen={seqlen}, nheads={nheads}, got {tuple(dt.shape)}")
    delta = _per_channel(dt, headdim, 3).flatten(2).transpose(1, 2)  # (batch, dim, seqlen)
    A = _per_channel(A, headdim, 1)[..., None].expand(nheads, headdim, dstate).flatten(0, 1) if A.dim() == 1 else A
    D = None if D is None else _per_channel(D, headdim, 1).flatten()
    bias = None if dt_bias is None else _per_channel(dt_bias, headdim, 1).flatten()
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        delta = process_dt(delta, bias, dt_softplus, dt_limit, compute_dtype(x, dt), channel_dim=1)
        bias, dt_softplus = None, False
    channels = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (batch, seqlen, h, p) -> (batch, dim, seqlen)
    y = selective_scan_fn(channels(x), delta, A.float() if A.dtype != torch.float64 else A,
                          B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D=D,
                          z=None if z is None else channels(z), delta_bias=bias, delta_softplus=dt_softplus)
    return y.transpose(1, 2).unflatten(2, (nheads, headdim))


def mamba_conv1d_scan_ref(xBC: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], dt: Tensor, A: Tensor,
                          chunk_size: int, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                          dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT, activation: Optional[str] = "silu",
                          headdim: Optional[int] = None, ngroups: int = 1) -> Tensor:
    """The official reference's signature: xBC (batch, seqlen, dim + 2 * ngroups * dstate) through the causal conv
    (conv1d_weight (channels, width), conv1d_bias, activation), split into x, B, C, then `ssd_selective_scan` with
    dt (batch, seqlen, nheads) or (batch, seqlen, nheads, headdim), A (nheads,), D, z (batch, seqlen, dim), dt_bias,
    dt_softplus, dt_limit. headdim comes from z, else D (nheads, headdim), else the argument. Returns out (batch,
    seqlen, dim). chunk_size is not used (as official)."""
    require_tensors(xBC=xBC, dt=dt, D=D, z=z)
    if activation not in ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    nheads = dt.shape[2] if dt.dim() >= 3 else 0
    if nheads == 0 or nheads % ngroups:
        raise MambaKitError(f"dt must have shape (batch, seqlen, nheads, ...) with ngroups={ngroups} dividing nheads, "
                            f"got {tuple(dt.shape)}")
    if z is not None:
        headdim = z.shape[-1] // nheads
    elif D is not None and D.dim() == 2:
        headdim = D.shape[1]
    if headdim is None:
        raise MambaKitError("headdim must be given when z is None and D is not (nheads, headdim), got headdim=None")
    dim = nheads * headdim
    if xBC.dim() != 3 or (xBC.shape[-1] - dim) % (2 * ngroups) or xBC.shape[-1] <= dim:
        raise MambaKitError(f"xBC must have shape (batch, seqlen, dim + 2 * ngroups * dstate) with dim={dim}, "
                            f"ngroups={ngroups}, got {tuple(xBC.shape)}")
    dstate = (xBC.shape[-1] - dim) // ngroups // 2
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    out = ssd_selective_scan(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                             C.unflatten(-1, (ngroups, dstate)), D=D,
                             z=None if z is None else z.unflatten(-1, (nheads, headdim)), dt_bias=dt_bias,
                             dt_softplus=dt_softplus, dt_limit=dt_limit)
    return out.flatten(-2)


def check_cu_seqlens(cu_seqlens: Tensor, batch: int, seqlen: int) -> list:
    """The bounds of packed sequences, cu_seqlens (num_seqs + 1,) from 0 to seqlen, as a list; batch must be 1."""
    if batch != 1:
        raise MambaKitError(f"cu_seqlens needs x of batch 1 (the packed sequences in one row, as official), got "
                            f"batch {batch}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.numel() < 2:
        raise MambaKitError(f"cu_seqlens must be a 1-D integer tensor (num_seqs + 1,), got "
                            f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seqlen or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise MambaKitError(f"cu_seqlens must rise from 0 to seqlen={seqlen} without decreasing, got {bounds}")
    return bounds


def varlen_states(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, cu_seqlens: Tensor, dt_bias: Optional[Tensor] = None,
                  initial_states: Optional[Tensor] = None, dt_softplus: bool = False,
                  dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT) -> Tensor:
    """The final SSD state of each packed sequence of a batch-1 row, (num_seqs, nheads, headdim, dstate) in float32
    (float64 for float64 inputs): state = sum_t exp(sum_{t' > t} dt_t' A) dt_t x_t B_t^T over the sequence, plus
    exp(sum_t dt_t A) initial_states for the first sequence (an empty sequence: 0, or initial_states if first)."""
    batch, seqlen, nheads, headdim = x.shape
    bounds = check_cu_seqlens(cu_seqlens, batch, seqlen)
    ngroups, dstate = B.shape[2], B.shape[3]
    fp = compute_dtype(x, dt, A, B)
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, fp)[0]  # (seqlen, nheads)
    log_decay = delta * A.to(fp)
    xg = x[0].to(fp).unflatten(1, (ngroups, -1))  # (seqlen, ngroups, heads per group, headdim)
    Bf = B[0].to(fp)
    states = []
    for start, end in zip(bounds, bounds[1:]):
        step = log_decay[start:end]  # (len, nheads)
        # the decay from t to the end: a reverse cumulative sum of the later steps only (no cancellation)
        later = F.pad(step[1:].flip(0).cumsum(0).flip(0), (0, 0, 0, 1))
        w = (torch.exp(later) * delta[start:end]).unflatten(1, (ngroups, -1))  # (len, ngroups, per group)
        s = torch.einsum("lgr,lgrp,lgn->grpn", w, xg[start:end], Bf[start:end]).flatten(0, 1)
        if start == 0 and initial_states is not None:
            s = s + torch.exp(step.sum(0))[:, None, None] * initial_states[0].to(fp)
        states.append(s)
    return torch.stack(states) if states else x.new_zeros(0, nheads, headdim, dstate, dtype=fp)


def _split_sizes(zxbcdt: Tensor, conv1d_weight: Tensor, D: Tensor, headdim: Optional[int], ngroups: int):
    """(nheads, headdim, dim, dstate, d_nonssm) of the fused path's packed input, checked."""
    if D.dim() == 1:
        if headdim is None:
            raise MambaKitError("headdim must be given when D has shape (nheads,), got headdim=None")
        nheads = D.shape[0]
    elif D.dim() == 2:
        nheads, headdim = D.shape
    else:
        raise MambaKitError(f"D must have shape (nheads,) or (nheads, headdim), got {tuple(D.shape)}")
    if nheads % ngroups:
        raise MambaKitError(f"ngroups must divide nheads={nheads}, got {ngroups}")
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    if conv1d_weight.dim() != 2 or dstate < 1 or conv1d_weight.shape[0] != dim + 2 * ngroups * dstate:
        raise MambaKitError(f"conv1d_weight must have shape (dim + 2 * ngroups * dstate, width) with dim={dim}, "
                            f"ngroups={ngroups}, got {tuple(conv1d_weight.shape)}")
    if zxbcdt.dim() != 3:
        raise MambaKitError(f"zxbcdt must have shape (batch, seqlen, features), got {tuple(zxbcdt.shape)}")
    extra = zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads
    if extra < 0 or extra % 2:
        raise MambaKitError(f"zxbcdt must have 2 * d_mlp + 2 * dim + 2 * ngroups * dstate + nheads = 2 * d_mlp + "
                            f"{2 * dim + 2 * ngroups * dstate + nheads} features, got {zxbcdt.shape[-1]}")
    return nheads, headdim, dim, dstate, extra // 2


def _split_conv_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx,
                     dt_limit, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                     norm_before_gate, backend):
    """The fused path composed: (out, final_states). backend: of the SSD op ("auto", or "ref" for the recurrence)."""
    if activation not in ACTIVATIONS:
        raise MambaKitError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    nheads, headdim, dim, dstate, d_mlp = _split_sizes(zxbcdt, conv1d_weight, D, headdim, ngroups)
    if outproj_weight is None and outproj_bias is not None:
        raise MambaKitError("outproj_bias needs outproj_weight, got outproj_weight=None")
    if rmsnorm_weight is not None and tuple(rmsnorm_weight.shape) != (dim,):
        raise MambaKitError(f"rmsnorm_weight must have shape (dim={dim},), got {tuple(rmsnorm_weight.shape)}")
    batch, seqlen, _ = zxbcdt.shape
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation, None, seq_idx).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    gate = z.unflatten(-1, (nheads, headdim)) if rmsnorm_weight is None else None  # else the norm gates
    y, final = ssd_combined(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                            C.unflatten(-1, (ngroups, dstate)), chunk_size, D=D, z=gate,
                            dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True,
                            dt_limit=dt_limit, return_final_states=True, backend=backend)
    out = y.flatten(-2)  # (batch, seqlen, dim)
    if rmsnorm_weight is not None:
        out = rms_norm_gated(out, z, rmsnorm_weight, rmsnorm_eps, group_size=dim // ngroups,
                             norm_before_gate=norm_before_gate)
    if d_mlp:
        out = torch.cat([(F.silu(z0.float()) * x0.float()).to(out.dtype), out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return out, final


def _fused_fits(zxbcdt, conv1d_weight, D, headdim, ngroups, initial_states, return_final_states, activation,
                rmsnorm_weight, outproj_weight) -> bool:
    """Whether `mamba_split_conv1d_scan_combined` can run as the fused `mamba2_inner` op."""
    on_device = isinstance(zxbcdt, Tensor) and (zxbcdt.is_cuda or interpreted())
    if not (on_device and zxbcdt.dtype != torch.float64 and fused_available()):
        return False
    if initial_states is not None or return_final_states or activation not in ("silu", "swish"):
        return False
    if rmsnorm_weight is None or outproj_weight is None:
        return False
    return _split_sizes(zxbcdt, conv1d_weight, D, headdim, ngroups)[4] == 0


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], dt_bias: Tensor, A: Tensor, D: Tensor,
    chunk_size: int, initial_states: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT, return_final_states: bool = False,
    activation: Optional[str] = "silu", rmsnorm_weight: Optional[Tensor] = None, rmsnorm_eps: float = 1e-6,
    outproj_weight: Optional[Tensor] = None, outproj_bias: Optional[Tensor] = None, headdim: Optional[int] = None,
    ngroups: int = 1, norm_before_gate: bool = True, state_dtype: Optional[torch.dtype] = None,
):
    """The fused Mamba-2 path, official signature: zxbcdt (batch, seqlen, 2 * d_mlp + 2 * dim + 2 * ngroups *
    dstate + nheads), dim = nheads * headdim, split into [z0, x0 | z | xBC | dt]; xBC goes through the causal conv
    (conv1d_weight (dim + 2 * ngroups * dstate, width), conv1d_bias, activation, seq_idx), then the SSD scan with
    dt = softplus(dt + dt_bias) clamped to dt_limit, D skip; the gate silu(z) either in the scan or in the grouped
    RMSNorm (rmsnorm_weight (dim,), group dim // ngroups, norm_before_gate); silu(z0) * x0 is put in front when
    d_mlp > 0; then the out projection (outproj_weight (out_dim, features), outproj_bias). Returns out (batch,
    seqlen, out_dim or features), and with `return_final_states` also (batch, nheads, headdim, dstate) states in
    float32 (or state_dtype). Differentiable by autograd in every tensor. On CUDA, with the norm and the out
    projection, without d_mlp, initial or final states, this is `mambakit.ops.mamba2_inner` (one fused autograd
    function, as the official)."""
    if _fused_fits(zxbcdt, conv1d_weight, D, headdim, ngroups, initial_states, return_final_states, activation,
                   rmsnorm_weight, outproj_weight):
        return mamba2_inner(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, rmsnorm_weight, outproj_weight,
                            outproj_bias, headdim=_split_sizes(zxbcdt, conv1d_weight, D, headdim, ngroups)[1],
                            ngroups=ngroups, chunk_size=chunk_size, eps=rmsnorm_eps,
                            norm_before_gate=norm_before_gate, dt_limit=dt_limit, seq_idx=seq_idx, backend="triton")
    out, final = _split_conv_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states,
                                  seq_idx, dt_limit, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight,
                                  outproj_bias, headdim, ngroups, norm_before_gate, "auto")
    if not return_final_states:
        return out
    return out, final if state_dtype is None else final.to(state_dtype)


def mamba_split_conv1d_scan_ref(
    zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], dt_bias: Tensor, A: Tensor, D: Tensor,
    chunk_size: int, dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT, activation: Optional[str] = "silu",
    rmsnorm_weight: Optional[Tensor] = None, rmsnorm_eps: float = 1e-6, outproj_weight: Optional[Tensor] = None,
    outproj_bias: Optional[Tensor] = None, headdim: Optional[int] = None, ngroups: int = 1,
    norm_before_gate: bool = True,
) -> Tensor:
    """The official reference's signature: the same composition with the sequential SSD recurrence (out only)."""
    return _split_conv_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, None, None, dt_limit,
                            activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                            norm_before_gate, "ref")[0]
