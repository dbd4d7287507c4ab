"""A mixer's one-token decoding step between its in_proj and its out_proj, as one op per mixer.

    mamba1_step: conv-state update, conv + SiLU, x_proj, dt_proj, softplus, the state update, D skip, SiLU(z) gate;
    mamba2_step: conv-state update, conv + SiLU, dt processing, the per-head state update, D skip (and the gate when
                 the layer has no gated RMSNorm).

backend "auto" runs the fused Triton kernels (`mambakit.ops.triton.mixer_step`: two kernels for Mamba-1, two for
Mamba-2 with the conv update) on CUDA and a lean PyTorch step ("torch") elsewhere; "ref" is the composition of the
single-purpose ops (conv update, projections, `selective_state_update` / `ssd_step`), the reference both fast forms
are tested against in float64. `linear_step` is the projections' matrix product for one token.
Inference only: the states are updated in place and nothing is recorded for autograd.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.conv1d import causal_conv1d_update
from mambakit.ops.derived import float_copy, negative_exp
from mambakit.ops.cpu_linear import cpu_linear, split_linear, use_cpu_linear, use_split_linear
from mambakit.ops.selective_scan import selective_state_update
from mambakit.ops.ssd import ssd_step

from mambakit.ops.backends import check_backend
from mambakit.ops.dt import process_dt
from mambakit.ops.norm import rms_norm_gated

DtTransform = Callable[[Tensor], Tensor]


def _check(name: str, t: Optional[Tensor], shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise MambaKitError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_shapes(expected: dict[str, tuple[Optional[Tensor], tuple[int, ...]]]) -> None:
    """Each named tensor (None: absent) of its expected shape: one comparison of all when they are (every step), the
    named check that fails when one is not."""
    if tuple(t.shape for t, _ in expected.values() if t is not None) != \
            tuple(shape for t, shape in expected.values() if t is not None):
        for name, (t, shape) in expected.items():
            _check(name, t, shape)


def _pick(backend: str, tensor: Tensor, fused_ok: Callable[[], bool]) -> str:
    """"triton", "torch" (the lean PyTorch step) or "ref" (the composition of the single-purpose ops); fused_ok (asked
    only where the kernels could run): whether they take these tensors."""
    backend = check_backend(backend)
    if backend == "triton" and not fused_ok():
        raise MambaKitError("backend='triton' needs contiguous weights and states (last dim), non-float64 tensors, "
                            "no dt_transform and (Mamba-1) no bcdt_rms_eps")
    if backend != "auto":
        return backend
    if tensor.is_cuda and fused_ok():
        try:
            import mambakit.ops.triton.mixer_step  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def linear_step(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear for one decoding step: x (batch, in), weight (out, in) -> (batch, out). On the CPU, a bfloat16 or
    float16 weight goes through `mambakit.ops.cpu_linear` (float32 input, accumulation and output, so that the
    activations between a step's products stay float32; where fbgemm is missing, a bfloat16 batch of one takes a
    matrix-vector product, which reads the weight faster there than the general matrix product); a large float32
    weight goes through `mambakit.ops.cpu_linear.split_linear` (a batched product over its two halves)."""
    if x.device.type == "cpu":
        if use_cpu_linear(x, weight):
            return cpu_linear(x, weight, bias)
        if use_split_linear(x, weight):
            return split_linear(x, weight, bias)
        if x.shape[0] == 1 and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
            y = torch.mv(weight, x[0])[None]
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def weightless_rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without a weight over the last dim, computed in float32 (float64 stays float64): x * rsqrt(mean(x^2)
    + eps), returned in x's dtype. Any shape (..., n)."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


BcdtWeights = Optional[tuple[Tensor, Tensor, Tensor]]


def bcdt_norm(dt: Tensor, B: Tensor, C: Tensor, eps: Optional[float],
              weights: BcdtWeights = None) -> tuple[Tensor, Tensor, Tensor]:
    """dt_low (..., dt_rank), B and C (..., d_state) each through `weightless_rms` when eps is given (Falcon-Mamba),
    then times its learned weight (dt_rank,) / (d_state,) / (d_state,) when weights are given (Jamba); else
    unchanged."""
    if eps is None:
        return dt, B, C
    out = (weightless_rms(dt, eps), weightless_rms(B, eps), weightless_rms(C, eps))
    return out if weights is None else tuple(w * t for w, t in zip(weights, out))


# (thread, shape, dtype, device) -> a buffer that the lean steps reuse for their largest temporary
_SCRATCH: dict[tuple, Tensor] = {}


def _scratch(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of shape, like's dtype and device, the same one at every call of this thread: written by
    every layer of a step, it stays in the cache, and it spares the allocator fresh pages (which a temporary of the
    state's size gets from the system at every call when it falls where the heap was trimmed)."""
    key = (threading.get_ident(), shape, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) >= 64:
            _SCRATCH.clear()
        with torch.inference_mode(False):  # a normal tensor: writable inside inference mode and outside it
            buf = _SCRATCH[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype without the cost of a `.to` call when it has it already."""
    return t if t.dtype == dtype else t.to(dtype)


def _conv_silu_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`causal_conv1d_update(..., activation="silu")` in fewer tensor operations for the lean step (the same values):
    x (batch, dim) enters conv_state (batch, dim, width) (in its dtype) as the newest column; weight (dim, width),
    bias (dim,) (in another dtype than x: a copy kept per weight version). Returns (batch, dim) in x's dtype."""
    window = torch.cat((conv_state[..., 1:], _as(x, conv_state.dtype)[..., None]), dim=-1)
    conv_state.copy_(window)
    y = torch.linalg.vecdot(_as(window, x.dtype), float_copy(weight, x.dtype))
    if bias is not None:
        y.add_(float_copy(bias, x.dtype))
    return F.silu(y, inplace=True)


_HALF = (torch.bfloat16, torch.float16)

#: Mamba-2's Triton step as one kernel (the conv update inside the state step, `mambakit.ops.triton.mamba2_conv_step`:
#: its B/C windows are written by their last reader, which only a GPU run can exercise); False (the default until it
#: has run on the GPU): the conv kernel, then the state-step kernel (the same results)
M2_CONV_IN_STEP = False

#: with M2_CONV_IN_STEP, Mamba-2 layers beyond the GEMV batch (`norm_linear.GEMV_MAX_BATCH`, where the out_proj
#: GEMV fuses the norm instead) also fold their gated RMSNorm into that kernel (`mamba2_step(norm=...)`: the last
#: program of each row and group normalises it); off by default for the same reason
M2_NORM_IN_STEP = False



def _fusable(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or (t.dtype != torch.float64 and t.stride(-1) == 1) for t in tensors)


@torch.no_grad()
def mamba1_step(xz: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_proj_bias: Tensor, A_log: Tensor,
                D: Optional[Tensor], dt_transform: Optional[DtTransform] = None, backend: str = "auto",
                A: Optional[Tensor] = None, bcdt_rms_eps: Optional[float] = None,
                bcdt_weights: BcdtWeights = None) -> Tensor:
    """One Mamba-1 token after in_proj.

    xz: (batch, 2 * d_inner), [x, z]; conv_state: (batch, d_inner, d_conv) and ssm_state: (batch, d_inner, d_state),
    both updated in place; conv_weight: (d_inner, d_conv); conv_bias, D, dt_proj_bias: (d_inner,); x_proj_weight:
    (dt_rank + 2 * d_state, d_inner); dt_proj_weight: (d_inner, dt_rank); A_log: (d_inner, d_state), A = -exp(A_log).
    dt_transform: rewrites the pre-bias dt (batch, d_inner) (ReMamba); it runs the PyTorch path.
    A: -exp(A_log) when the caller keeps it (the PyTorch path then skips forming it; the kernels form their own).
    bcdt_rms_eps: when given, dt_low (batch, dt_rank), B and C (batch, d_state) after x_proj each go through a
    weightless RMSNorm with this epsilon (Falcon-Mamba), then times bcdt_weights (dt_rank,), (d_state,), (d_state,)
    when given (Jamba's learned norms); the fused kernels do not cover it yet, so "auto" then runs the PyTorch path
    and "triton" is refused.
    backend: "auto" (the kernels on CUDA, else "torch"), "torch" (one lean PyTorch step), "triton", "ref" (the
    composition of conv1d update, x_proj, dt_proj and `selective_state_update`: the reference).
    Returns y: (batch, d_inner) in xz's dtype, gated by SiLU(z), before out_proj.
    """
    batch, d_inner, d_state = ssm_state.shape
    dt_rank = dt_proj_weight.shape[-1]
    _check_shapes({"xz": (xz, (batch, 2 * d_inner)),
                   "conv_state": (conv_state, (batch, d_inner, conv_weight.shape[-1])),
                   "conv_weight": (conv_weight, (d_inner, conv_state.shape[-1])), "conv_bias": (conv_bias, (d_inner,)),
                   "dt_proj_bias": (dt_proj_bias, (d_inner,)), "D": (D, (d_inner,)),
                   "x_proj_weight": (x_proj_weight, (dt_rank + 2 * d_state, d_inner)),
                   "dt_proj_weight": (dt_proj_weight, (d_inner, dt_rank)), "A_log": (A_log, (d_inner, d_state))})
    if bcdt_rms_eps is not None and not (isinstance(bcdt_rms_eps, (int, float)) and bcdt_rms_eps > 0):
        raise MambaKitError(f"bcdt_rms_eps must be a positive number or None, got {bcdt_rms_eps!r}")
    if bcdt_weights is not None:
        if bcdt_rms_eps is None:
            raise MambaKitError("bcdt_weights needs bcdt_rms_eps (the norms they scale)")
        for name, t, n in zip(("dt", "B", "C"), bcdt_weights, (dt_rank, d_state, d_state)):
            _check(f"bcdt_weights {name}", t, (n,))
    choice = _pick(backend, xz, lambda: dt_transform is None and bcdt_rms_eps is None
                   and _fusable(xz, conv_state, ssm_state, conv_weight, x_proj_weight, dt_proj_weight, A_log)
                   and all(t.is_contiguous() for t in (conv_weight, x_proj_weight, dt_proj_weight, A_log)))
    if choice == "triton":
        from mambakit.ops.triton.mixer_step import mamba1_step_triton

        return mamba1_step_triton(xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                  dt_proj_bias, A_log, D, ssm_state)
    if ssm_state.dtype in _HALF:  # float32 arithmetic; the state rounded once per step
        work = ssm_state.float()
        y = mamba1_step(xz, conv_state, work, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                        A_log, D, dt_transform, choice, A, bcdt_rms_eps, bcdt_weights)
        ssm_state.copy_(work)
        return y
    x, z = xz.chunk(2, dim=-1)
    if choice == "ref":
        x = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, activation="silu")
        dt, B, C = torch.split(F.linear(x, x_proj_weight), [dt_rank, d_state, d_state], dim=-1)
        dt, B, C = bcdt_norm(dt, B, C, bcdt_rms_eps, bcdt_weights)
        dt = F.linear(dt, dt_proj_weight)
        if dt_transform is not None:
            dt = dt_transform(dt)
        fp = ssm_state.dtype
        return selective_state_update(ssm_state, x, dt, -torch.exp(A_log.to(fp)), B, C,
                                      None if D is None else D.to(fp), z=z, dt_bias=dt_proj_bias.to(fp),
                                      dt_softplus=True)
    # the lean step: the same arithmetic as the composition in fewer, larger tensor operations
    fp = ssm_state.dtype
    x = _conv_silu_step(x, conv_state, conv_weight, conv_bias)
    dt, B, C = torch.split(linear_step(x, x_proj_weight), [dt_rank, d_state, d_state], dim=-1)
    dt, B, C = bcdt_norm(dt, B, C, bcdt_rms_eps, bcdt_weights)
    if dt_transform is None and dt_proj_bias.dtype == dt_proj_weight.dtype:  # the bias inside the product
        dt = process_dt(linear_step(dt, dt_proj_weight, dt_proj_bias), dt_softplus=True, dtype=fp)
    else:  # the transform sees the pre-bias dt
        dt = linear_step(dt, dt_proj_weight)
        if dt_transform is not None:
            dt = dt_transform(dt)
        dt = process_dt(dt, float_copy(dt_proj_bias, fp), dt_softplus=True, dtype=fp)  # (batch, d_inner)
    A = negative_exp(A_log, fp) if A is None else _as(A, fp)
    xf, B, C = _as(x, fp), _as(B, fp), _as(C, fp)
    dA = torch.mul(dt[..., None], A, out=_scratch(tuple(ssm_state.shape), ssm_state)).exp_()
    ssm_state.mul_(dA).addcmul_((dt * xf)[..., None], B[:, None, :])
    y = torch.bmm(ssm_state, C[..., None])[..., 0]  # (batch, d_inner)
    if D is not None:
        y = torch.addcmul(y, xf, float_copy(D, fp))
    y = y.mul_(F.silu(_as(z, fp)))
    return _as(y, xz.dtype)


@torch.no_grad()
def mamba2_step(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                conv_bias: Optional[Tensor], dt_bias: Tensor, A_log: Tensor, D: Optional[Tensor], ngroups: int,
                dt_limit: tuple[float, float] = (0.0, float("inf")), gate: bool = False,
                dt_transform: Optional[DtTransform] = None, backend: str = "auto",
                A: Optional[Tensor] = None, norm: Optional[tuple[Tensor, float, bool]] = None) -> Tensor:
    """One Mamba-2 token after in_proj.

    zxbcdt: (batch, 2 * d_inner + 2 * ngroups * d_state + nheads), [z, x, B, C, dt]; conv_state: (batch, conv_dim,
    d_conv) with conv_dim = d_inner + 2 * ngroups * d_state, and ssm_state: (batch, nheads, headdim, d_state), both
    updated in place; conv_weight: (conv_dim, d_conv); conv_bias: (conv_dim,); dt_bias, A_log: (nheads,); D:
    (nheads,) or (d_inner,); dt_limit: dt clamped to it after the softplus. gate: apply SiLU(z) here (a layer without
    its gated RMSNorm). dt_transform: rewrites the pre-bias dt (batch, nheads) (ReMamba); it runs the PyTorch path.
    backend: as `mamba1_step` ("ref": conv1d update + `ssd_step`). A: (nheads,) -exp(A_log) when the caller keeps it
    (the lean PyTorch step then skips forming it). norm: (weight (d_inner,), eps, norm_before_gate): also apply the
    gated RMSNorm per group of d_inner / ngroups channels (gate must be False); inside the one-kernel Triton step
    when `M2_CONV_IN_STEP` is on.
    Returns y: (batch, d_inner) in zxbcdt's dtype, before the gated norm (after it with norm) and out_proj.
    """
    batch, nheads, headdim, d_state = ssm_state.shape
    d_inner = nheads * headdim
    if norm is not None:
        if gate:
            raise MambaKitError("mamba2_step: norm and gate exclude each other (the norm gates by SiLU(z) itself)")
        if tuple(norm[0].shape) != (d_inner,):
            raise MambaKitError(f"mamba2_step: the norm weight must have shape ({d_inner},), got "
                                f"{tuple(norm[0].shape)}")
    conv_dim = d_inner + 2 * ngroups * d_state
    if ngroups < 1 or nheads % ngroups:
        raise MambaKitError(f"ngroups must divide nheads={nheads}, got {ngroups}")
    _check_shapes({"zxbcdt": (zxbcdt, (batch, d_inner + conv_dim + nheads)),
                   "conv_state": (conv_state, (batch, conv_dim, conv_weight.shape[-1])),
                   "conv_weight": (conv_weight, (conv_dim, conv_state.shape[-1])),
                   "conv_bias": (conv_bias, (conv_dim,)),
                   "dt_bias": (dt_bias, (nheads,)), "A_log": (A_log, (nheads,))})
    if D is not None and tuple(D.shape) not in ((nheads,), (d_inner,)):
        raise MambaKitError(f"D must have shape ({nheads},) or ({d_inner},), got {tuple(D.shape)}")
    choice = _pick(backend, zxbcdt, lambda: dt_transform is None and ssm_state.is_contiguous()
                   and _fusable(zxbcdt, conv_state, ssm_state, conv_weight))
    if choice == "triton" and M2_CONV_IN_STEP:
        from mambakit.ops.triton.mamba2_conv_step import mamba2_conv_state_step_triton

        return mamba2_conv_state_step_triton(zxbcdt, conv_state, conv_weight.contiguous(), conv_bias, dt_bias, A_log,
                                             D, ssm_state, ngroups, dt_limit, gate, norm=norm)
    if norm is not None:  # the step, then the norm on its rounded output (as the layer's own two calls)
        y = mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, ngroups, dt_limit,
                        False, dt_transform, choice, A)
        return rms_norm_gated(y, zxbcdt[:, :d_inner], norm[0], norm[1], d_inner // ngroups, norm[2])
    if choice == "triton":
        from mambakit.ops.triton.decode import conv1d_update_triton
        from mambakit.ops.triton.mixer_step import mamba2_state_step_triton

        xbc = conv1d_update_triton(zxbcdt[:, d_inner:d_inner + conv_dim], conv_state, conv_weight, conv_bias, "silu")
        return mamba2_state_step_triton(xbc, zxbcdt, d_inner + conv_dim, dt_bias, A_log, D, ssm_state, ngroups,
                                        dt_limit, gate)
    if ssm_state.dtype in _HALF:  # float32 arithmetic; the state rounded once per step
        work = ssm_state.float()
        y = mamba2_step(zxbcdt, conv_state, work, conv_weight, conv_bias, dt_bias, A_log, D, ngroups, dt_limit, gate,
                        dt_transform, choice, A)
        ssm_state.copy_(work)
        return y
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, nheads], dim=-1)
    if dt_transform is not None:
        dt = dt_transform(dt)
    if choice == "ref":
        xBC = causal_conv1d_update(xBC, conv_state, conv_weight, conv_bias, activation="silu")
    else:
        xBC = _conv_silu_step(xBC, conv_state, conv_weight, conv_bias)
    x, B, C = torch.split(xBC, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    fp = ssm_state.dtype
    if choice == "ref":
        Dh = None if D is None else (D.to(fp).view(nheads, headdim) if D.numel() == d_inner else D.to(fp))
        y = ssd_step(ssm_state, x.unflatten(-1, (nheads, headdim)), dt, -torch.exp(A_log.to(fp)),
                     B.unflatten(-1, (ngroups, d_state)), C.unflatten(-1, (ngroups, d_state)), D=Dh,
                     z=z.unflatten(-1, (nheads, headdim)) if gate else None, dt_bias=dt_bias.to(fp),
                     dt_softplus=True, dt_limit=dt_limit, backend="torch")
        return y.flatten(-2).to(zxbcdt.dtype)
    # the lean step: heads of a group read the group's B and C (broadcast, no per-head copies)
    dt = process_dt(dt, float_copy(dt_bias, fp), dt_softplus=True, dt_limit=dt_limit, dtype=fp)  # (batch, nheads)
    A = negative_exp(A_log, fp) if A is None else _as(A, fp)
    dA = torch.mul(dt, A).exp_()  # (batch, nheads)
    hpg = nheads // ngroups
    xf = _as(x, fp).view(batch, ngroups, hpg, headdim)
    state = ssm_state.view(batch, ngroups, hpg, headdim, d_state)
    Bg = _as(B, fp).view(batch, ngroups, 1, 1, d_state)
    state.mul_(dA.view(batch, ngroups, hpg, 1, 1)).addcmul_((dt.view(batch, ngroups, hpg, 1) * xf)[..., None], Bg)
    Cg = _as(C, fp).reshape(batch * ngroups, d_state, 1)
    if ssm_state.is_contiguous():  # the heads of a group as one matrix: one product per group, not one per head
        y = torch.bmm(ssm_state.view(batch * ngroups, hpg * headdim, d_state), Cg)
        y = y.view(batch, ngroups, hpg, headdim)
    else:
        y = torch.matmul(state, Cg.view(batch, ngroups, 1, d_state, 1))[..., 0]  # (batch, ngroups, hpg, headdim)
    if D is not None:  # per head (broadcast over headdim) or per channel
        y = torch.addcmul(y, xf, float_copy(D, fp).view(ngroups, hpg, headdim if D.numel() == d_inner else 1))
    y = y.reshape(batch, d_inner)
    if gate:
        y = y * F.silu(_as(z, fp))
    return _as(y, zxbcdt.dtype)
