"""Mamba-3 MIMO (rank R): the step recurrence (the reference, any dtype including float64), the chunked PyTorch
form, the dispatcher :func:`mamba3_mimo_scan` (also to the Triton kernels), and one decoding step.

Layouts (the official ``mamba_ssm`` MIMO op, ``mamba3_mimo``, less its gate and output mix)::

    Q, K        (batch, seqlen, R, ngroups, d_state)  C and B of each rank after their RMSNorm
    V           (batch, seqlen, nheads, headdim)      x (shared by the ranks)
    MIMO_V      (nheads, R, headdim)                  the up-projection of x: x_r = x * MIMO_V[:, r]
    Q_bias      (nheads, R, d_state)                  C_bias and B_bias
    K_bias
    ADT, DT, Trap, Angles, D, seq_idx                 as in the SISO scan (:mod:`mambakit.ops.mamba3.common`)

The recurrence, per head (theta, alpha, lambda as in SISO; k_r = Rot(theta)(K_r + K_bias_r), q_r likewise)::

    h_t = alpha_t h_{t-1} + (1 - lambda_t) DT_t alpha_t sum_r x_{r,t-1} k_{r,t-1}^T
                          + lambda_t DT_t sum_r x_{r,t} k_{r,t}^T
    y_{r,t} = h_t q_{r,t} + D x_{r,t}

The scan returns the per-rank outputs y (batch, seqlen, R, nheads, headdim); :func:`mimo_combine` applies the
per-rank gate and the output mix ``sum_r MIMO_O[:, r] * y_r * silu(Z * MIMO_Z[:, r])``. The state after a position
is (:class:`Mamba3States`) angle (batch, nheads, n_angles), ssm (batch, nheads, headdim, d_state), k (batch, R,
nheads, d_state) the rotated K of each rank, v (batch, nheads, headdim) the x of the last position (the official
decode cache). The state pairs are rotated as in SISO, (2i, 2i+1) (the official MIMO turns dim i with dim
i + d_state/2: the same model up to a permutation of d_state, which mambakit.models.io.mamba_ssm applies to official
checkpoints).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3 import BACKENDS
from mambakit.ops.mamba3.chunked import prepare
from mambakit.ops.mamba3.common import TWO_PI, Mamba3States, angle_increment, compute_dtype, heads_of_groups
from mambakit.ops.mamba3.common import rotate, validate_mimo
from mambakit.ops.mamba3.naive import run_steps

States = Tuple[Tensor, Tensor, Tensor, Tensor]


def mimo_step_core(states: Mamba3States, q: Tensor, k: Tensor, x: Tensor, mimo_x: Tensor, adt: Tensor, dt: Tensor,
                   trap: Tensor, q_bias: Tensor, k_bias: Tensor, angles: Tensor,
                   D: Optional[Tensor]) -> Tuple[Tensor, Mamba3States]:
    """One position, all in one dtype. q, k: (batch, R, nheads, d_state) before bias and rotation (heads already
    expanded from groups); x: (batch, nheads, headdim); mimo_x: (nheads, R, headdim); adt, dt, trap: (batch,
    nheads); q_bias, k_bias: (nheads, R, d_state); angles: (batch, nheads, n_angles); D: (nheads,) or None.
    Returns y (batch, R, nheads, headdim) and the states after this position."""
    angle = torch.remainder(states.angle + angle_increment(angles, dt), TWO_PI)
    k_rot = rotate(k + k_bias.transpose(0, 1), angle[:, None])
    q_rot = rotate(q + q_bias.transpose(0, 1), angle[:, None])
    lam = torch.sigmoid(trap)
    alpha = torch.exp(adt)
    beta = ((1 - lam) * dt * alpha)[..., None, None]
    gamma = (lam * dt)[..., None, None]
    xr = x[:, None] * mimo_x.transpose(0, 1)  # (batch, R, nheads, headdim)
    prev = states.v[:, None] * mimo_x.transpose(0, 1)
    ssm = (alpha[..., None, None] * states.ssm + beta * torch.einsum("brhp,brhn->bhpn", prev, states.k)
           + gamma * torch.einsum("brhp,brhn->bhpn", xr, k_rot))
    y = torch.einsum("bhpn,brhn->brhp", ssm, q_rot)
    if D is not None:
        y = y + D[:, None] * xr
    return y, Mamba3States(angle, ssm, k_rot, x)


def mamba3_mimo_scan_ref(
    Q: Tensor, K: Tensor, V: Tensor, MIMO_V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor,
    K_bias: Tensor, Angles: Tensor, D: Optional[Tensor] = None, Input_States: Optional[States] = None,
    chunk_size: int = 16, return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The MIMO scan by the sequential recurrence (chunk_size is accepted and ignored).

    Returns y (batch, seqlen, R, nheads, headdim) in V's dtype, or (y, angle, ssm, k, v) with the final states in
    the compute dtype (float64 if any input is float64, else float32)."""
    dims, R = validate_mimo(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Input_States, seq_idx)
    fp = compute_dtype(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, *(Input_States or ()))
    H = dims.nheads
    q, k = heads_of_groups(Q.to(fp), H), heads_of_groups(K.to(fp), H)
    v, mx, adt, dt, trap, angles = V.to(fp), MIMO_V.to(fp), ADT.to(fp), DT.to(fp), Trap.to(fp), Angles.to(fp)
    qb, kb, D_c = Q_bias.to(fp), K_bias.to(fp), None if D is None else D.to(fp)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=fp, device=V.device)

    b, P, N = dims.batch, dims.headdim, dims.d_state
    zero = Mamba3States(zeros(b, H, dims.n_angles), zeros(b, H, P, N), zeros(b, R, H, N), zeros(b, H, P))
    y, states = run_steps(lambda st, t: mimo_step_core(st, q[:, t], k[:, t], v[:, t], mx, adt[..., t], dt[..., t],
                                                       trap[..., t], qb, kb, angles[:, t], D_c),
                          zero, Input_States, seq_idx, dims.seqlen, fp)
    y = y.to(V.dtype)
    return (y, *states) if return_final_states else y


def mamba3_mimo_chunked(
    Q: Tensor, K: Tensor, V: Tensor, MIMO_V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor,
    K_bias: Tensor, Angles: Tensor, D: Optional[Tensor] = None, Input_States: Optional[States] = None,
    chunk_size: int = 16, return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The MIMO scan by chunks (plain autograd); arguments and results as :func:`mamba3_mimo_scan_ref`.

    The pieces per position come from the SISO :func:`~mambakit.ops.mamba3.chunked.prepare` run on (head, rank)
    pairs as heads; inside a chunk every rank's q meets every rank's k. Non-finite V: computed by the recurrence
    (the block form would let a NaN reach earlier positions of its chunk)."""
    dims, R = validate_mimo(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Input_States, seq_idx)
    kw = dict(D=D, Input_States=Input_States, chunk_size=chunk_size, return_final_states=return_final_states,
              seq_idx=seq_idx)
    if not bool(torch.isfinite(V).all()):
        return mamba3_mimo_scan_ref(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, **kw)
    fp = compute_dtype(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, *(Input_States or ()))
    b, L, H, P, N = dims.batch, dims.seqlen, dims.nheads, dims.headdim, dims.d_state
    HR = H * R

    def per_rank(t: Tensor, dim: int) -> Tensor:  # repeat a head axis for the ranks: head h -> h * R + r
        return t.repeat_interleave(R, dim=dim)

    q = heads_of_groups(Q.to(fp), H).transpose(2, 3).flatten(2, 3)  # (batch, seqlen, H * R, N)
    k = heads_of_groups(K.to(fp), H).transpose(2, 3).flatten(2, 3)
    xr = (V.to(fp)[:, :, :, None] * MIMO_V.to(fp)).flatten(2, 3)  # (batch, seqlen, H * R, P)
    start = None
    if Input_States is not None:  # prepare reads only the angle (the ssm start is built below)
        angle0 = per_rank(Input_States[0].to(fp), 1)
        start = (angle0, xr.new_zeros(()).expand(b, HR, P, N), xr.new_zeros(()).expand(b, HR, N),
                 xr.new_zeros(()).expand(b, HR, P))
    p = prepare(q, k, xr, per_rank(ADT, 1), per_rank(DT, 1), per_rank(Trap, 1), Q_bias.flatten(0, 1),
                K_bias.flatten(0, 1), per_rank(Angles, 2), None, None, start, chunk_size, seq_idx)
    Qc, seg_c, from_start, to_end = p.chunk, p.seg, p.from_start, p.to_end
    c_ = p.q_rot.shape[1]

    def heads(t: Tensor) -> Tensor:  # (..., H * R, d) -> (..., H, R, d)
        return t.unflatten(-2, (H, R))

    q_rot, k_rot, v = heads(p.q_rot), heads(p.k_rot), heads(p.v)  # (batch, nchunks, Q, H, R, .)
    adt, gamma, scale = (t[..., ::R] for t in (p.adt, p.gamma, p.scale))  # (batch, nchunks, Q, H)

    acs = adt.cumsum(2).permute(0, 1, 3, 2)  # (batch, nchunks, H, Q)
    causal = torch.tril(torch.ones(Qc, Qc, dtype=torch.bool, device=V.device), -1)
    keep = (causal & (seg_c[..., :, None] == seg_c[..., None, :]))[:, :, None]  # (batch, nchunks, 1, Q, Q)
    decay = torch.exp(torch.where(keep, acs[..., :, None] - acs[..., None, :], 0.0))
    scores = torch.einsum("bcihrn,bcjhsn->bchijrs", q_rot, k_rot * scale[..., None, None])
    mix = torch.where(keep[..., None, None], scores * decay[..., None, None], 0.0)
    y = torch.einsum("bchijrs,bcjhsp->bcihrp", mix, v)
    own = torch.einsum("bcihrn,bcihsn->bcihrs", q_rot, k_rot) * gamma[..., None, None]
    y = y + torch.einsum("bcihrs,bcihsp->bcihrp", own, v)
    if D is not None:
        y = y + D.to(fp)[:, None, None] * v

    w_end = torch.exp(torch.where(to_end[:, :, None], acs[..., -1:] - acs, 0.0)).transpose(2, 3) * scale
    w_end = torch.where(to_end[..., None], w_end, 0.0)  # (batch, nchunks, Q, H)
    chunk_states = torch.einsum("bcjhsp,bcjhsn->bchpn", v * w_end[..., None, None], k_rot)
    chunk_decay = torch.where(from_start[:, :, -1, None], torch.exp(acs[..., -1]), 0.0)  # (batch, nchunks, H)
    h = xr.new_zeros(b, H, P, N)
    if Input_States is not None:
        ssm0, k0, v0 = (s.to(fp) for s in Input_States[1:])
        first_back = p.first_back[:, ::R]  # (batch, H)
        prev = torch.einsum("bhp,hrp,brhn->bhpn", v0, MIMO_V.to(fp), k0)
        h = ssm0 + first_back[..., None, None] * prev
    befores = []
    for c in range(c_):
        befores.append(h)
        h = chunk_decay[:, c, :, None, None] * h + chunk_states[:, c]
    h_before = torch.stack(befores, 1)  # (batch, nchunks, H, P, N)
    inter = torch.einsum("bcihrn,bchpn->bcihrp", q_rot, h_before) * torch.exp(acs).transpose(2, 3)[..., None, None]
    y = y + torch.where(from_start[..., None, None, None], inter, 0.0)
    y = y.flatten(1, 2)[:, :L].transpose(2, 3).to(V.dtype)  # (batch, seqlen, R, H, P)
    if not return_final_states:
        return y
    last_k = k_rot.flatten(1, 2)[:, L - 1].transpose(1, 2)  # (batch, R, H, N)
    return y, p.final_angle[:, ::R], h, last_k, V.to(fp)[:, L - 1]


def mamba3_mimo_scan(
    Q: Tensor, K: Tensor, V: Tensor, MIMO_V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor,
    K_bias: Tensor, Angles: Tensor, D: Optional[Tensor] = None, Input_States: Optional[States] = None,
    chunk_size: int = 16, return_final_states: bool = False, seq_idx: Optional[Tensor] = None, backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The MIMO scan; arguments and results as :func:`mamba3_mimo_scan_ref`, backend one of
    :data:`mambakit.ops.mamba3.BACKENDS`: "auto" and "torch" the chunked form (the kernels are opt-in until timed on
    a GPU), "triton" the Triton kernels (:mod:`mambakit.ops.mamba3.triton_mimo`: CUDA or TRITON_INTERPRET=1), "ref"
    the recurrence."""
    if backend not in BACKENDS or backend == "ssd":
        raise MambaKitError(f"backend must be one of {tuple(b for b in BACKENDS if b != 'ssd')} (\"ssd\" is SISO "
                            f"only), got {backend!r}")
    if backend == "triton":
        from mambakit.ops.mamba3.triton_mimo import mamba3_mimo_scan_triton as form
    else:
        form = mamba3_mimo_scan_ref if backend == "ref" else mamba3_mimo_chunked
    return form(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=D, Input_States=Input_States,
                chunk_size=chunk_size, return_final_states=return_final_states, seq_idx=seq_idx)


def mimo_combine(y: Tensor, MIMO_O: Tensor, Z: Optional[Tensor] = None, MIMO_Z: Optional[Tensor] = None) -> Tensor:
    """The gate and the output mix: y (..., R, nheads, headdim) per rank, MIMO_O and MIMO_Z (nheads, R, headdim),
    Z (..., nheads, headdim) or None -> sum_r MIMO_O[:, r] * y_r * silu(Z * MIMO_Z[:, r]), (..., nheads, headdim)."""
    mo = MIMO_O.transpose(0, 1).to(y.dtype)
    if Z is not None:
        y = y * F.silu(Z.unsqueeze(-3) * MIMO_Z.transpose(0, 1).to(Z.dtype))
    return (y * mo).sum(-3)


def mamba3_mimo_step(states: States, Q: Tensor, K: Tensor, V: Tensor, MIMO_V: Tensor, ADT: Tensor, DT: Tensor,
                     Trap: Tensor, Q_bias: Tensor, K_bias: Tensor, Angles: Tensor,
                     D: Optional[Tensor] = None) -> Tensor:
    """One token; updates the four tensors of ``states`` IN PLACE (computed in float32, or float64 when a state or
    an input is float64, then stored in each state's dtype).

    Q, K: (batch, R, ngroups, d_state); V: (batch, nheads, headdim); ADT, DT, Trap: (batch, nheads); Angles:
    (batch, nheads, n_angles); the rest and the states as in :func:`mamba3_mimo_scan_ref`.
    Returns y (batch, R, nheads, headdim) in V's dtype: one step of the recurrence."""
    dims, _ = validate_mimo(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, states, None, seq_dims=False)
    fp = compute_dtype(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, *states)
    inputs = (Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, *states)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    before = Mamba3States(*(s.to(fp, copy=grad) for s in states))  # autograd keeps them: overwritten below
    H = dims.nheads
    y, after = mimo_step_core(before, heads_of_groups(Q.to(fp), H), heads_of_groups(K.to(fp), H), V.to(fp),
                              MIMO_V.to(fp), ADT.to(fp), DT.to(fp), Trap.to(fp), Q_bias.to(fp), K_bias.to(fp),
                              Angles.to(fp), None if D is None else D.to(fp))
    for target, value in zip(states, after):
        target.copy_(value)
    return y.to(V.dtype)
