"""One Mamba-3 SISO decoding step with its per-token prep, as one Triton kernel (standard Triton only; CUDA or
TRITON_INTERPRET=1): from the raw in_proj row [z, x, B, C, dd_dt, dd_A, trap, angle] of each batch row, the RMSNorm
of B and C over d_state, dt = softplus(dd_dt + dt_bias), A dt = clamp(-f(dd_A), max=-A_floor) dt (f heavy-tail or
softplus), the angle, the biases and the rotations, then the step of :mod:`.triton_step` (its shared helpers), the
D skip and the gate silu(z) (unless the layer's gated norm applies z later). Everything in float32; the parameters
are read uncast (any float dtype), the row with any strides.

One program per (head, batch row), as in :mod:`.triton_step`: a head's program normalises its group's B and C row
itself (d_state lanes), so heads of one group repeat that small sum instead of another launch.
Public entry point with the checks: :func:`mambakit.ops.mamba3.prep_step.mamba3_prep_step`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops.mamba3.triton_prep import _activation
from mambakit.ops.mamba3.triton_step import _lanes_and_turn, _update_head, pick_block_p
from mambakit.ops.triton.grid import next_power_of_2
from mambakit.ops.triton.math import softplus


@triton.jit
def _norm_bias_rotate(row, s_n, w_ptr, s_w, eps, bias_row, s_bn, n, partner, mn, mpart, cos, sin, dstate):
    """Rot(theta)(RMSNorm(x) * w + bias) of one d_state row x (lane n; its pair partner n ^ 1)."""
    x = tl.load(row + n * s_n, mask=mn, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dstate + eps)
    x_pair = tl.load(row + partner * s_n, mask=mpart, other=0.0).to(tl.float32)
    x = x * scale * tl.load(w_ptr + n * s_w, mask=mn, other=0.0).to(tl.float32) \
        + tl.load(bias_row + n * s_bn, mask=mn, other=0.0).to(tl.float32)
    x_pair = x_pair * scale * tl.load(w_ptr + partner * s_w, mask=mpart, other=0.0).to(tl.float32) \
        + tl.load(bias_row + partner * s_bn, mask=mpart, other=0.0).to(tl.float32)
    return x * cos + x_pair * sin


@triton.jit
def _mamba3_prep_step_kernel(
        row_ptr, dtb_ptr, bw_ptr, cw_ptr, bb_ptr, cb_ptr, d_ptr,
        sa_ptr, sh_ptr, sk_ptr, sv_ptr, y_ptr,
        nheads, heads_per_group, headdim, dstate, n_angles, b_eps, c_eps, a_floor,
        s_rb, s_rc, s_dtb, s_bw, s_cw, s_bbh, s_bbn, s_cbh, s_cbn, s_d,
        s_sab, s_sah, s_saa, s_shb, s_shh, s_shp, s_shn, s_skb, s_skh, s_skn, s_svb, s_svh, s_svp, s_yb, s_yh,
        HEAVY_TAIL: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, NP: tl.constexpr,
        PP: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    g = h // heads_per_group
    d_inner = nheads * headdim
    gn = (nheads // heads_per_group) * dstate
    row = row_ptr + b * s_rb
    at_dt = 2 * d_inner + 2 * gn  # dd_dt, then dd_A, trap (nheads each) and the angles
    dt = softplus(tl.load(row + (at_dt + h) * s_rc).to(tl.float32) + tl.load(dtb_ptr + h * s_dtb).to(tl.float32))
    a = tl.load(row + (at_dt + nheads + h) * s_rc).to(tl.float32)
    neg_f, _ = _activation(a, a_floor, HEAVY_TAIL)  # clamp(-f(a), max=-A_floor), NaN kept
    adt = neg_f * dt
    trap = tl.load(row + (at_dt + 2 * nheads + h) * s_rc).to(tl.float32)

    n, mn, partner, rot, mpart, sa_base, theta, cos, sin = _lanes_and_turn(
        sa_ptr + b * s_sab + h * s_sah, s_saa, row + (at_dt + 3 * nheads) * s_rc, s_rc, dt, dstate, n_angles, NP)

    k_rot = _norm_bias_rotate(row + (2 * d_inner + g * dstate) * s_rc, s_rc, bw_ptr, s_bw, b_eps,
                              bb_ptr + h * s_bbh, s_bbn, n, partner, mn, mpart, cos, sin, dstate)
    q_rot = _norm_bias_rotate(row + (2 * d_inner + gn + g * dstate) * s_rc, s_rc, cw_ptr, s_cw, c_eps,
                              cb_ptr + h * s_cbh, s_cbn, n, partner, mn, mpart, cos, sin, dstate)
    d_h = tl.load(d_ptr + h * s_d).to(tl.float32)
    _update_head(sh_ptr + b * s_shb + h * s_shh, s_shp, s_shn, sk_ptr + b * s_skb + h * s_skh, s_skn,
                 sv_ptr + b * s_svb + h * s_svh, s_svp, sa_base, row + (d_inner + h * headdim) * s_rc, s_rc,
                 row + h * headdim * s_rc, s_rc, y_ptr + b * s_yb + h * s_yh, n, mn, rot, theta, k_rot, q_rot,
                 adt, dt, trap, d_h, headdim, HAS_D=True, HAS_Z=HAS_Z, BLOCK_P=BLOCK_P, PP=PP)


def prep_block_p(headdim: int, d_state: int) -> int:
    """The default headdim rows per loop iteration: tiles of about 4096 float32 (twice the unfused step kernel's:
    a program does its head in fewer, larger iterations). At the 130M head on the H200 (benchmarks/RESULTS.md):
    6.9 us per layer at batch 1 and 11.5 at batch 16, against 9.3 and 13.6 with 2048-element tiles; 8192-element
    tiles spill registers on sm_90."""
    return max(1, min(next_power_of_2(headdim), 4096 // next_power_of_2(d_state)))


def mamba3_prep_step_triton(states: Tuple[Tensor, Tensor, Tensor, Tensor], zxbcdt: Tensor, dt_bias: Tensor,
                            B_norm_weight: Tensor, C_norm_weight: Tensor, B_bias: Tensor, C_bias: Tensor, D: Tensor,
                            *, nheads: int, ngroups: int, B_eps: float, C_eps: float, A_floor: float,
                            A_activation: str, gate: bool, block_p: int = 0, num_warps: int = 4) -> Tensor:
    """The step of :func:`mambakit.ops.mamba3.prep_step.mamba3_prep_step` (arguments checked there; shapes: states
    as in :func:`mambakit.ops.mamba3.mamba3_step`, zxbcdt (batch, d_in_proj), dt_bias, D (nheads,), the norm weights
    (d_state,), B_bias, C_bias (nheads, d_state)), the states updated in place. block_p: headdim rows per loop
    iteration (a power of two; 0: `prep_block_p`). Returns y (batch, nheads, headdim) in zxbcdt's
    dtype."""
    angle, ssm, k_state, v_state = states
    batch, _, headdim, d_state = ssm.shape
    n_angles = angle.shape[-1]
    block_p = pick_block_p(block_p, headdim, d_state) if block_p else prep_block_p(headdim, d_state)
    y = torch.empty(batch, nheads, headdim, device=zxbcdt.device, dtype=zxbcdt.dtype)
    _mamba3_prep_step_kernel[(nheads, batch)](
        zxbcdt, dt_bias, B_norm_weight, C_norm_weight, B_bias, C_bias, D, angle, ssm, k_state, v_state, y,
        nheads, nheads // ngroups, headdim, d_state, n_angles, float(B_eps), float(C_eps), float(A_floor),
        *zxbcdt.stride(), dt_bias.stride(0), B_norm_weight.stride(0), C_norm_weight.stride(0), *B_bias.stride(),
        *C_bias.stride(), D.stride(0),
        *angle.stride(), *ssm.stride(), *k_state.stride(), *v_state.stride(), y.stride(0), y.stride(1),
        HEAVY_TAIL=A_activation == "heavy_tail", HAS_Z=gate, BLOCK_P=block_p, NP=next_power_of_2(d_state),
        PP=next_power_of_2(headdim), num_warps=num_warps)
    return y
