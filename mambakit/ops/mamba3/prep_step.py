"""One Mamba-3 SISO decoding step from the raw in_proj row: the per-token prep of the layer (split, RMSNorm of B and
C, dt, A dt, the angles) and the step of :func:`mambakit.ops.mamba3.mamba3_step` in one call, so that on CUDA the
whole of it is one kernel (:mod:`.triton_prep_step`).

    y = mamba3_prep_step(states, zxbcdt, dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D,
                         nheads=H, ngroups=G, B_eps=..., C_eps=..., A_floor=..., A_activation="heavy_tail",
                         gate=True, backend="auto")

zxbcdt (batch, d_in_proj) is packed [z, x, B, C, dd_dt, dd_A, trap, angle] (the official order: d_inner, d_inner,
G * d_state, G * d_state, H, H, H, n_angles); the sizes headdim, d_state and n_angles come from the states.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3.common import Dims, Mamba3States, compute_dtype, heads_of_groups, validate_states
from mambakit.ops.mamba3.naive import step_core
from mambakit.ops.ssd.validate import require_shape, require_tensor

__all__ = ["PREP_STEP_BACKENDS", "mamba3_prep_step", "prep_step_fits"]

#: "auto": "triton" where :func:`prep_step_fits` (CUDA, float32 compute, no autograd), else "torch"; "triton": the
#: fused kernel (CUDA or TRITON_INTERPRET=1, float32 compute, inference only); "torch": the PyTorch composition (any
#: float dtype, differentiable: the reference)
PREP_STEP_BACKENDS = ("auto", "torch", "triton")

A_ACTIVATIONS = ("heavy_tail", "softplus")


def _a_activation(a: Tensor, name: str) -> Tensor:
    """f of A = clamp(-f(dd_A), max=-A_floor): heavy-tail (1 + a for a >= 0, 1 / (1 - a) below) or softplus."""
    if name == "softplus":
        return F.softplus(a)
    return torch.where(a >= 0, 1 + a, torch.reciprocal(1 - a.clamp(max=0)))


def _check(states, zxbcdt, dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D, nheads, ngroups,
           A_activation) -> Dims:
    """The sizes, after checking every argument's type, shape and device against the states and nheads/ngroups."""
    if not isinstance(states, (tuple, list)) or len(states) != 4:
        raise MambaKitError(f"states must be a tuple (angle, ssm, k, v), got {type(states).__name__}")
    for name, value in (("nheads", nheads), ("ngroups", ngroups)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MambaKitError(f"{name} must be a positive integer, got {value!r}")
    if nheads % ngroups:
        raise MambaKitError(f"ngroups must divide nheads={nheads}, got {ngroups}")
    if A_activation not in A_ACTIVATIONS:
        raise MambaKitError(f"A_activation must be one of {A_ACTIVATIONS}, got {A_activation!r}")
    ssm = require_tensor("states.ssm", states[1])
    if ssm.dim() != 4:
        raise MambaKitError(f"states.ssm must have shape (batch, nheads, headdim, d_state), got {tuple(ssm.shape)}")
    angle = require_tensor("states.angle", states[0])
    if angle.dim() != 3:
        raise MambaKitError(f"states.angle must have shape (batch, nheads, n_angles), got {tuple(angle.shape)}")
    batch, _, headdim, d_state = ssm.shape
    dims = Dims(batch, 1, nheads, headdim, ngroups, d_state, angle.shape[-1])
    validate_states(states, dims, "states")
    if 2 * dims.n_angles > d_state:
        raise MambaKitError(f"states.angle has n_angles={dims.n_angles}: 2 * n_angles must be <= d_state={d_state}")
    width = 2 * nheads * headdim + 2 * ngroups * d_state + 3 * nheads + dims.n_angles
    require_shape("zxbcdt", require_tensor("zxbcdt", zxbcdt), [("batch", batch), ("d_in_proj", width)])
    for name, value, shape in (("dt_bias", dt_bias, [("nheads", nheads)]), ("D", D, [("nheads", nheads)]),
                               ("B_norm_weight", B_norm_weight, [("d_state", d_state)]),
                               ("C_norm_weight", C_norm_weight, [("d_state", d_state)]),
                               ("B_bias", B_bias, [("nheads", nheads), ("d_state", d_state)]),
                               ("C_bias", C_bias, [("nheads", nheads), ("d_state", d_state)])):
        require_shape(name, require_tensor(name, value), shape)
    for name, value in zip(("dt_bias", "B_norm_weight", "C_norm_weight", "B_bias", "C_bias", "D") +
                           tuple(f"states.{p}" for p in Mamba3States._fields),
                           (dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D, *states)):
        if value.device != zxbcdt.device:
            raise MambaKitError(f"{name} must be on zxbcdt's device ({zxbcdt.device}), got {value.device}")
    return dims


def prep_step_fits(states, zxbcdt: Tensor, *params: Tensor) -> bool:
    """Whether backend "auto" runs the fused kernel: CUDA tensors computed in float32 (no float64 among zxbcdt, the
    parameters and the states), nothing recorded for autograd, the kernel importable."""
    tensors = (zxbcdt, *params, *states)
    if not zxbcdt.is_cuda or compute_dtype(*tensors) != torch.float32:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return _kernel_imports()


@functools.lru_cache(maxsize=None)
def _kernel_imports() -> bool:
    from mambakit.ops.backends import kernels

    return kernels("mambakit.ops.mamba3.triton_prep_step") is not None


def mamba3_prep_step(states: Tuple[Tensor, Tensor, Tensor, Tensor], zxbcdt: Tensor, dt_bias: Tensor,
                     B_norm_weight: Tensor, C_norm_weight: Tensor, B_bias: Tensor, C_bias: Tensor, D: Tensor, *,
                     nheads: int, ngroups: int, B_eps: float, C_eps: float, A_floor: float,
                     A_activation: str = "heavy_tail", gate: bool = True, backend: str = "auto") -> Tensor:
    """One token of a Mamba-3 SISO layer from its in_proj output; updates the four tensors of ``states`` IN PLACE.

    Args:
        states: (angle, ssm, k, v): (batch, nheads, n_angles), (batch, nheads, headdim, d_state),
            (batch, nheads, d_state), (batch, nheads, headdim) (see :class:`Mamba3States`).
        zxbcdt: (batch, d_in_proj), the in_proj output of the token (any strides, any float dtype).
        dt_bias, D: (nheads,). B_norm_weight, C_norm_weight: (d_state,), with B_eps / C_eps the RMSNorms' eps.
        B_bias, C_bias: (nheads, d_state). A_floor: A = clamp(-f(dd_A), max=-A_floor), f = A_activation
            ("heavy_tail" or "softplus"). gate: y *= silu(z) (False where a gated norm applies z afterwards).
        backend: one of :data:`PREP_STEP_BACKENDS`.

    Returns:
        y (batch, nheads, headdim) in zxbcdt's dtype, computed in float32 (float64 when any input or state is).

    Raises:
        MambaKitError: an argument has the wrong type, shape or device; an unknown backend; "triton" with a float64
            input or state, or while an input requires grad.
    """
    if backend not in PREP_STEP_BACKENDS:
        raise MambaKitError(f"backend must be one of {PREP_STEP_BACKENDS}, got {backend!r}")
    params = (dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D)
    dims = _check(states, zxbcdt, *params, nheads, ngroups, A_activation)
    if backend == "auto":
        backend = "triton" if prep_step_fits(states, zxbcdt, *params) else "torch"
    if backend == "triton":
        tensors = (zxbcdt, *params, *states)
        if compute_dtype(*tensors) == torch.float64:
            raise MambaKitError("backend='triton' computes in float32: no float64 input or state, got float64")
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise MambaKitError("backend='triton' is inference only: an input requires grad (use torch.no_grad() "
                                "or backend='torch')")
        from mambakit.ops.mamba3.triton_prep_step import mamba3_prep_step_triton

        return mamba3_prep_step_triton(states, zxbcdt, *params, nheads=nheads, ngroups=ngroups, B_eps=B_eps,
                                       C_eps=C_eps, A_floor=A_floor, A_activation=A_activation, gate=gate)
    return _prep_step_torch(states, zxbcdt, *params, dims, B_eps, C_eps, A_floor, A_activation, gate)


def _prep_step_torch(states, zxbcdt, dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D, dims: Dims,
                     B_eps, C_eps, A_floor, A_activation, gate) -> Tensor:
    """The PyTorch composition, all in the compute dtype (no rounding between the prep and the step)."""
    fp = compute_dtype(zxbcdt, dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D, *states)
    H, P, G, N = dims.nheads, dims.headdim, dims.ngroups, dims.d_state
    z, x, B, C, dd_dt, dd_A, trap, angle = torch.split(zxbcdt.to(fp), [H * P, H * P, G * N, G * N, H, H, H,
                                                                       dims.n_angles], dim=-1)

    def norm(t: Tensor, weight: Tensor, eps: float) -> Tensor:
        t = t.unflatten(-1, (G, N))
        return heads_of_groups(t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight.to(fp), H)

    DT = F.softplus(dd_dt + dt_bias.to(fp))
    ADT = torch.clamp(-_a_activation(dd_A, A_activation), max=-A_floor) * DT
    tensors = (zxbcdt, dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D, *states)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)  # autograd keeps the old states: a
    # copy, since they are overwritten below
    before = Mamba3States(*(s.to(fp, copy=grad) for s in states))
    y, after = step_core(before, norm(C, C_norm_weight, C_eps), norm(B, B_norm_weight, B_eps),
                         x.unflatten(-1, (H, P)), ADT, DT, trap, C_bias.to(fp), B_bias.to(fp),
                         angle[:, None].expand(-1, H, -1), D.to(fp))
    for target, value in zip(states, after):
        target.copy_(value)
    if gate:
        y = y * F.silu(z.unflatten(-1, (H, P)))
    return y.to(zxbcdt.dtype)
