"""One Mamba-3 SISO decoding step as one Triton kernel (standard Triton only; CUDA or TRITON_INTERPRET=1): the
recurrence of :func:`mambakit.ops.mamba3.naive.step_core`, the D skip and the optional gate, with the four state
tensors updated in place.

One program per (head, batch row) covers the whole head: every entry of the new ssm state reads the old k and v
states and the new angle, so a program that owned only part of the head could not overwrite them in place while
another still reads them. The program forms the new angle, k_rot and q_rot once (d_state lanes: lane n reads its
pair partner n ^ 1 and the angle n // 2), then walks headdim in blocks of block_p rows (update the ssm tile, store
it, read y out), and writes the new angle, k and v only after a barrier, once it has read every old value.

Compute in float32; each state is stored in its own dtype, y in V's. Inputs may have any strides (the layer hands in
slices of its sequence-shaped tensors and a head-broadcast Angles). Public entry point with the checks:
:func:`mambakit.ops.mamba3.mamba3_step` (backend "triton", or "auto" on CUDA).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.grid import next_power_of_2
from mambakit.ops.triton.math import tanh


@triton.jit
def _bias_rotate(row, s_n, bias_row, s_bn, n, partner, mn, mpart, cos, sin):
    """Rot(theta)(x + bias) over the d_state lanes n: lane n reads its pair partner n ^ 1 (sin signed per lane)."""
    x = tl.load(row + n * s_n, mask=mn, other=0.0).to(tl.float32) \
        + tl.load(bias_row + n * s_bn, mask=mn, other=0.0).to(tl.float32)
    x_pair = tl.load(row + partner * s_n, mask=mpart, other=0.0).to(tl.float32) \
        + tl.load(bias_row + partner * s_bn, mask=mpart, other=0.0).to(tl.float32)
    return x * cos + x_pair * sin


@triton.jit
def _lanes_and_turn(sa_head, s_saa, ang_head, s_ana, dt, dstate, n_angles, NP: tl.constexpr):
    """The d_state lanes n (their mask, pair partner n ^ 1, rotated mask, partner mask), lane n's angle pointer
    (sa_head: the head's angle state) and the new angle of lane n's pair (the state's plus pi tanh(raw) dt with raw
    from ang_head, mod 2 pi; 0 past the rotated dims: cos 1, sin 0), its cos and lane-signed sin."""
    n = tl.arange(0, NP)
    mn = n < dstate
    partner = n ^ 1
    rot = n < 2 * n_angles
    mpart = rot & (partner < dstate)
    sa_base = sa_head + (n // 2) * s_saa  # each angle read by both lanes of its pair
    theta = tl.load(sa_base, mask=rot, other=0.0).to(tl.float32)
    raw = tl.load(ang_head + (n // 2) * s_ana, mask=rot, other=0.0).to(tl.float32)
    theta = theta + 3.141592653589793 * tanh(raw) * dt
    theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
    sin = tl.where(n % 2 == 0, -tl.sin(theta), tl.sin(theta))  # even lane: v0 cos - v1 sin; odd: v1 cos + v0 sin
    return n, mn, partner, rot, mpart, sa_base, theta, tl.cos(theta), sin


@triton.jit
def _update_head(sh_base, s_shp, s_shn, sk_base, s_skn, sv_base, s_svp, sa_base, v_base, s_vp, z_base, s_zp,
                 y_base, n, mn, rot, theta, k_rot, q_rot, adt, dt, trap, d_h, headdim,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, PP: tl.constexpr):
    """One head's state update and read-out over headdim in blocks of BLOCK_P rows, then the new angle (sa_base:
    lane n's angle pointer), k and v stored after a barrier. The *_base pointers are the head's (and batch row's)
    first element; s_* their element strides."""
    k_old = tl.load(sk_base + n * s_skn, mask=mn, other=0.0).to(tl.float32)
    lam = tl.sigmoid(trap)
    alpha = tl.exp(adt)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    for p0 in range(0, headdim, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mp = p < headdim
        v_old = tl.load(sv_base + p * s_svp, mask=mp, other=0.0).to(tl.float32)
        v_new = tl.load(v_base + p * s_vp, mask=mp, other=0.0).to(tl.float32)
        m2 = mp[:, None] & mn[None, :]
        sh_off = p[:, None] * s_shp + n[None, :] * s_shn
        ssm = tl.load(sh_base + sh_off, mask=m2, other=0.0).to(tl.float32)
        ssm = alpha * ssm + (beta * v_old)[:, None] * k_old[None, :] + (gamma * v_new)[:, None] * k_rot[None, :]
        tl.store(sh_base + sh_off, ssm.to(sh_base.dtype.element_ty), mask=m2)
        y = tl.sum(ssm * q_rot[None, :], axis=1)
        if HAS_D:
            y += d_h * v_new
        if HAS_Z:
            z = tl.load(z_base + p * s_zp, mask=mp, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(y_base + p, y.to(y_base.dtype.element_ty), mask=mp)

    tl.debug_barrier()  # every thread has read the old angle, k and v before any is overwritten
    tl.store(sa_base, theta.to(sa_base.dtype.element_ty), mask=rot & (n % 2 == 0))
    tl.store(sk_base + n * s_skn, k_rot.to(sk_base.dtype.element_ty), mask=mn)
    pp = tl.arange(0, PP)
    mpp = pp < headdim
    v_all = tl.load(v_base + pp * s_vp, mask=mpp, other=0.0)
    tl.store(sv_base + pp * s_svp, v_all.to(sv_base.dtype.element_ty), mask=mpp)


@triton.jit
def _mamba3_step_kernel(
        q_ptr, k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, qb_ptr, kb_ptr, ang_ptr, d_ptr, z_ptr,
        sa_ptr, sh_ptr, sk_ptr, sv_ptr, y_ptr,
        heads_per_group, headdim, dstate, n_angles,
        s_qb, s_qg, s_qn, s_kb, s_kg, s_kn, s_vb, s_vh, s_vp, s_zb, s_zh, s_zp,
        s_adtb, s_adth, s_dtb, s_dth, s_trb, s_trh, s_qbh, s_qbn, s_kbh, s_kbn, s_anb, s_anh, s_ana, s_d,
        s_sab, s_sah, s_saa, s_shb, s_shh, s_shp, s_shn, s_skb, s_skh, s_skn, s_svb, s_svh, s_svp, s_yb, s_yh,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, NP: tl.constexpr, PP: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    g = h // heads_per_group
    dt = tl.load(dt_ptr + b * s_dtb + h * s_dth).to(tl.float32)
    adt = tl.load(adt_ptr + b * s_adtb + h * s_adth).to(tl.float32)
    trap = tl.load(trap_ptr + b * s_trb + h * s_trh).to(tl.float32)

    n, mn, partner, rot, mpart, sa_base, theta, cos, sin = _lanes_and_turn(
        sa_ptr + b * s_sab + h * s_sah, s_saa, ang_ptr + b * s_anb + h * s_anh, s_ana, dt, dstate, n_angles, NP)

    k_rot = _bias_rotate(k_ptr + b * s_kb + g * s_kg, s_kn, kb_ptr + h * s_kbh, s_kbn, n, partner, mn, mpart, cos, sin)
    q_rot = _bias_rotate(q_ptr + b * s_qb + g * s_qg, s_qn, qb_ptr + h * s_qbh, s_qbn, n, partner, mn, mpart, cos, sin)
    d_h = 0.0
    if HAS_D:
        d_h = tl.load(d_ptr + h * s_d).to(tl.float32)
    _update_head(sh_ptr + b * s_shb + h * s_shh, s_shp, s_shn, sk_ptr + b * s_skb + h * s_skh, s_skn,
                 sv_ptr + b * s_svb + h * s_svh, s_svp, sa_base, v_ptr + b * s_vb + h * s_vh, s_vp,
                 z_ptr + b * s_zb + h * s_zh, s_zp, y_ptr + b * s_yb + h * s_yh, n, mn, rot, theta, k_rot, q_rot,
                 adt, dt, trap, d_h, headdim, HAS_D=HAS_D, HAS_Z=HAS_Z, BLOCK_P=BLOCK_P, PP=PP)


def default_block_p(headdim: int, d_state: int) -> int:
    """headdim rows per iteration of the program's loop: a tile of about 2048 float32 (16 per thread at four warps),
    the size of the Mamba-2 step kernel's tiles."""
    return max(1, min(next_power_of_2(headdim), 2048 // next_power_of_2(d_state)))


def pick_block_p(block_p: int, headdim: int, d_state: int) -> int:
    """block_p checked (0 or a power of two), 0 replaced by `default_block_p`."""
    if block_p < 0 or block_p & (block_p - 1):
        raise MambaKitError(f"block_p must be 0 or a power of two, got {block_p}")
    return block_p or default_block_p(headdim, d_state)


def mamba3_step_triton(states: Tuple[Tensor, Tensor, Tensor, Tensor], Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor,
                       DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor, Angles: Tensor,
                       D: Optional[Tensor] = None, Z: Optional[Tensor] = None, block_p: int = 0,
                       num_warps: int = 4) -> Tensor:
    """The step of :func:`mambakit.ops.mamba3.mamba3_step` (arguments checked there; shapes: states (angle (batch,
    nheads, n_angles), ssm (batch, nheads, headdim, d_state), k (batch, nheads, d_state), v (batch, nheads,
    headdim)), Q, K (batch, ngroups, d_state), V, Z (batch, nheads, headdim), ADT, DT, Trap (batch, nheads), Q_bias,
    K_bias (nheads, d_state), Angles (batch, nheads, n_angles), D (nheads,)), the states updated in place.
    block_p: headdim rows per loop iteration (a power of two; 0: `default_block_p`); num_warps: the launch's.
    Returns y (batch, nheads, headdim) in V's dtype."""
    angle, ssm, k_state, v_state = states
    batch, nheads, headdim = V.shape
    ngroups, d_state = Q.shape[-2:]
    n_angles = Angles.shape[-1]
    block_p = pick_block_p(block_p, headdim, d_state)
    y = torch.empty(batch, nheads, headdim, device=V.device, dtype=V.dtype)
    _mamba3_step_kernel[(nheads, batch)](
        Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, V if D is None else D, V if Z is None else Z,
        angle, ssm, k_state, v_state, y,
        nheads // ngroups, headdim, d_state, n_angles,
        *Q.stride(), *K.stride(), *V.stride(), *(V.stride() if Z is None else Z.stride()),
        *ADT.stride(), *DT.stride(), *Trap.stride(), *Q_bias.stride(), *K_bias.stride(), *Angles.stride(),
        0 if D is None else D.stride(0),
        *angle.stride(), *ssm.stride(), *k_state.stride(), *v_state.stride(), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=Z is not None, BLOCK_P=block_p, NP=next_power_of_2(d_state),
        PP=next_power_of_2(headdim), num_warps=num_warps)
    return y
