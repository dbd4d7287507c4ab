"""Triton one-token decode step of the selective scan, updating the SSM state in place.

Same contract as `mambakit.ops.selective_scan.selective_state_update`:
    state: (batch, dim, d_state), updated in place; x, dt, z: (batch, dim); A: (dim, d_state);
    B, C: (batch, d_state) or (batch, groups, d_state); D, dt_bias: (dim,). Returns y: (batch, dim) in x's dtype.
The arithmetic is done in float32 whatever the state's dtype (the state is read and written in its own dtype).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.device import interpreted
from mambakit.ops.triton.grid import cdiv, next_power_of_2
from mambakit.ops.triton.math import softplus




@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         dim, dstate, dim_per_group, ngroups, s_ad, s_an,
                         s_sb, s_sd, s_sn, s_xb, s_xd, s_dtb, s_dtd, s_zb, s_zd, s_bb, s_bg, s_bn, s_cb, s_cg, s_cn,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                         BLOCK_D: tl.constexpr, NP: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n1 = tl.arange(0, NP)
    mask_d = d1 < dim
    m2 = mask_d[:, None] & (n1 < dstate)[None, :]
    d64 = d1.to(tl.int64)
    x = tl.load(x_ptr + pid_b * s_xb + d64 * s_xd, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_dtb + d64 * s_dtd, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + d64[:, None] * s_ad + n1[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    g = d64 // dim_per_group  # (BLOCK_D,) group of each channel
    Bv = tl.load(B_ptr + pid_b * s_bb + g[:, None] * s_bg + n1[None, :] * s_bn, mask=m2, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * s_cb + g[:, None] * s_cg + n1[None, :] * s_cn, mask=m2, other=0.0).to(tl.float32)
    s_off = pid_b * s_sb + d64[:, None] * s_sd + n1[None, :] * s_sn
    h = tl.load(state_ptr + s_off, mask=m2, other=0.0).to(tl.float32)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv
    tl.store(state_ptr + s_off, h.to(state_ptr.dtype.element_ty), mask=m2)
    # the torch reference reads the state back in its own dtype before the read-out
    h = h.to(state_ptr.dtype.element_ty).to(tl.float32)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + d1, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + d64 * s_zd, mask=mask_d, other=0.0).to(tl.float32)
        y = y * (z * tl.sigmoid(z))
    tl.store(y_ptr + pid_b * dim + d1, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_triton(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
    contiguous_A: bool = True,
) -> Tensor:
    """One decode step with a Triton kernel; `state` is updated in place (no autograd). Returns y: (batch, dim).
    contiguous_A=False reads A through its strides (a broadcast view stays a view)."""
    if state.dim() != 3:
        raise MambaKitError(f"state must have shape (batch, dim, d_state), got {tuple(state.shape)}")
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and t.shape != (batch, dim):
            raise MambaKitError(f"{name} must have shape (batch={batch}, dim={dim}), got {tuple(t.shape)}")
    if A.shape != (dim, d_state):
        raise MambaKitError(f"A must have shape (dim={dim}, d_state={d_state}), got {tuple(A.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (dim,):
            raise MambaKitError(f"{name} must have shape (dim={dim},), got {tuple(t.shape)}")
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    if (Bg.dim() != 3 or Bg.shape[0] != batch or Bg.shape[2] != d_state or dim % Bg.shape[1] != 0
            or Cg.shape != Bg.shape):
        raise MambaKitError(f"B and C must have shape (batch={batch}, d_state={d_state}) or (batch, groups, d_state) "
                            f"with groups dividing dim={dim}; got {tuple(B.shape)} and {tuple(C.shape)}")
    if not state.is_cuda and not interpreted():
        raise MambaKitError("selective_state_update_triton needs CUDA tensors (or TRITON_INTERPRET=1); "
                            f"got tensors on {state.device}")
    if d_state > 256:
        raise MambaKitError(f"selective_state_update_triton supports d_state <= 256, got {d_state}")
    G = Bg.shape[1]
    NP = next_power_of_2(d_state)
    bd = max(1, min(next_power_of_2(dim), 4096 // NP, 64))
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    Dc = D.contiguous() if D is not None else None
    bias = dt_bias.contiguous() if dt_bias is not None else None
    Ac = A.contiguous() if contiguous_A else A
    zz = z if z is not None else x
    grid = (cdiv(dim, bd), batch)
    with torch.no_grad():
        _state_update_kernel[grid](
            state, x, dt, Ac, Bg, Cg, Dc if Dc is not None else Ac, zz, bias if bias is not None else Ac, y,
            dim, d_state, dim // G, G, Ac.stride(0), Ac.stride(1),
            state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
            zz.stride(0), zz.stride(1), Bg.stride(0), Bg.stride(1), Bg.stride(2), Cg.stride(0), Cg.stride(1),
            Cg.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            BLOCK_D=bd, NP=NP, num_warps=4)
    return y


def ssd_step_triton(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
) -> Tensor:
    """Mamba-2 decode step (`mambakit.ops.ssd.ssd_step` without dt_limit) on the same kernel, `state` updated in place.

    state: (batch, nheads, headdim, d_state), contiguous; x, z: (batch, nheads, headdim); dt: (batch, nheads);
    A, dt_bias: (nheads,); B, C: (batch, ngroups, d_state); D: (nheads,) or (nheads, headdim).
    The heads' channels are laid side by side as dim = nheads * headdim; the per-head A and dt are broadcast over a
    head's channels with stride-0 views (A) or a small copy (dt), so no (dim, d_state) tensor is written.
    Returns y: (batch, nheads, headdim)."""
    batch, nheads, headdim, d_state = state.shape
    if not state.is_contiguous():
        raise MambaKitError("state must be contiguous for the Triton decode step")
    dim = nheads * headdim
    per_channel = lambda t: t.repeat_interleave(headdim, dim=-1)  # noqa: E731  (..., nheads) -> (..., dim)
    A_ch = per_channel(A.float())[:, None].expand(dim, d_state)
    D_ch = None if D is None else (per_channel(D) if D.dim() == 1 else D.reshape(dim))
    y = selective_state_update_triton(
        state.view(batch, dim, d_state), x.reshape(batch, dim), per_channel(dt), A_ch, B, C, D=D_ch,
        z=None if z is None else z.reshape(batch, dim), dt_bias=None if dt_bias is None else per_channel(dt_bias),
        dt_softplus=dt_softplus, contiguous_A=False)
    return y.view(batch, nheads, headdim)
