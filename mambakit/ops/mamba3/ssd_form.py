"""Mamba-3 SISO as an SSD (Mamba-2's scan) with a per-position log-decay: the angles and the trapezoid's weights in
PyTorch, the biases and rotations of B and C (:mod:`.triton_rotary` with the kernels, else PyTorch), the scan by
:func:`mambakit.ops.ssd.mamba_chunk_scan_combined` (its Triton kernels on the GPU), and a diagonal correction.

:func:`mamba3_ssd` takes the scan's arguments (ADT, DT, Trap, Angles per head); :func:`mamba3_ssd_raw`, the
layer's entry on the kernels, takes the raw in_proj columns instead and forms those per-position terms in one
Triton kernel each way (:mod:`.triton_prep`), with B_norm / C_norm inside the rotary kernel and the correction
inside the gate's.

The math. Per head, with k_t, q_t the rotated B and C (with bias), lambda_t = sigmoid(Trap_t), alpha_t =
exp(ADT_t), the recurrence of :mod:`mambakit.ops.mamba3.common` is::

    h_t = alpha_t h_{t-1} + (1 - lambda_t) DT_t alpha_t v_{t-1} k_{t-1}^T + lambda_t DT_t v_t k_t^T

Position j enters the state twice: at j with weight gamma_j = lambda_j DT_j, and at j + 1 with weight
(1 - lambda_{j+1}) DT_{j+1} alpha_{j+1}. Both are then decayed by the same alphas, so for t > j its contribution
to h_t is ``prod_{i=j+1..t} alpha_i * s_j * v_j k_j^T`` with::

    s_j = lambda_j DT_j + (1 - lambda_{j+1}) DT_{j+1}      (the second term 0 at the last position and where a
                                                            packed sequence starts at j + 1)

while h_j itself holds only gamma_j = s_j - (1 - lambda_{j+1}) DT_{j+1}. So h_t is the SSD state with log-decay
ADT_t, input scale s_t, B = k, C = q, except at its own position; and::

    y_t = SSD(x = v, dt = s, log_decay = ADT, B = k, C = q)_t + (D - (q_t . k_t) (s_t - gamma_t)) v_t

The state before the first position enters the SSD as ``ssm + (1 - lambda_0) DT_0 v_{-1} k_{-1}^T`` (the first
position's look-back; alpha_0 is applied by the SSD). The final ssm state is the SSD's final state (the last
position's look-forward term belongs to the next call, which reads k and v from the state).

Non-finite values: the SSD forms keep them causal; the correction and the rotations are per position.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3.chunked import _AtSegmentStart, position_terms, start_state
from mambakit.ops.mamba3.common import TWO_PI, compute_dtype, rotate, validate
from mambakit.ops.ssd.validate import require_shape as _require_shape, require_tensor as _require_tensor
from mambakit.ops.ssd import mamba_chunk_scan_combined

#: the SSD backends this form can run on: "triton" (the SSD Triton kernels: CUDA, or the interpreter), "torch"
#: (the chunked PyTorch SSD) and "ref" (the SSD recurrence)
SSD_BACKENDS = ("triton", "torch", "ref")

#: the upper bound on the SSD kernels' chunk handed to them ("triton"): they choose their own chunk below it
SSD_KERNEL_CHUNK = 256


#: positions per block of the two-level cumulative sum in `position_cumsum`
CUMSUM_BLOCK = 64


def position_cumsum(x: Tensor) -> Tensor:
    """x.cumsum(1) for x (batch, seqlen, ...) as two shorter sums: within blocks of CUMSUM_BLOCK positions, then over
    the blocks' totals. The same sums in another order (float rounding); on CUDA, torch's scan along a non-last dim
    runs one thread per column through the whole sequence (1.6 ms of a 130M Mamba-3 block's 8.7 ms forward +
    backward at 8 x 2048), the blocked form one per column and block."""
    batch, L = x.shape[:2]
    if L <= CUMSUM_BLOCK:
        return x.cumsum(1)
    nb = -(-L // CUMSUM_BLOCK)
    pad = nb * CUMSUM_BLOCK - L
    xp = x
    if pad:
        xp = torch.cat((x, x.new_zeros((batch, pad) + tuple(x.shape[2:]))), dim=1)
    inner = xp.view((batch, nb, CUMSUM_BLOCK) + tuple(x.shape[2:])).cumsum(2)
    # (batch, nb, ...): the sum of the blocks before each, shifted rather than subtracted (a non-finite total
    # must not reach its own block's earlier positions)
    before = F.pad(inner[:, :-1, -1].cumsum(1).movedim(1, -1), (1, 0)).movedim(-1, 1)
    out = (inner + before[:, :, None]).view((batch, nb * CUMSUM_BLOCK) + tuple(x.shape[2:]))
    return out[:, :L] if pad else out


def sequence_angles(inc: Tensor, starts: Optional[Tensor], angle0: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The angles theta_t (mod 2 pi) of every position from one float64 cumulative sum over the whole sequence (no
    loop over chunks; float64 keeps the long sums exact enough), restarted where a packed sequence starts.

    inc: (batch, seqlen, nheads, n_angles) the increments; starts: (batch, seqlen) bool or None; angle0: (batch,
    nheads, n_angles) the angle before the first position, or None. Returns (theta in inc's dtype, the last
    position's theta (batch, nheads, n_angles))."""
    inc64 = inc.double()
    theta = position_cumsum(inc64)
    in_first = None
    if starts is not None:
        L = inc.shape[1]
        first = torch.cummax(torch.where(starts, torch.arange(L, device=inc.device), 0), dim=1).values  # (b, L)
        # the sum before each segment's start, taken without gather's atomics (deterministic gradients)
        theta = theta - _AtSegmentStart.apply((theta - inc64)[:, None], first[:, None])[:, 0]
        in_first = (first == 0)[..., None, None]
    if angle0 is not None:
        start = angle0.double()[:, None]
        theta = theta + (start if in_first is None else torch.where(in_first, start, 0.0))
    theta = torch.remainder(theta, TWO_PI).to(inc.dtype)
    return theta, theta[:, -1]


def mamba3_ssd(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, chunk_size: int = 64,
    return_final_states: bool = False, seq_idx: Optional[Tensor] = None, ssd_backend: str = "triton",
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The Mamba-3 SISO scan through the SSD op (see the module's docstring for the math).

    Arguments and results as :func:`mambakit.ops.mamba3.mamba3_scan` (y (batch, seqlen, nheads, headdim) in V's
    dtype, or (y, angle, ssm, k, v) with the final states in float32, float64 for float64 inputs), plus
    ssd_backend: one of :data:`SSD_BACKENDS`. With "triton", 16-bit V runs the SSD kernels on float32 v, q and k
    with tf32 products (as fast as 16-bit inputs there: rounding q and k to 16 bits instead costs the gradients of
    DT and the angles 2-8e-2 against float32, tf32 at most 9e-3, benchmarks/RESULTS.md), and the kernels choose
    their own chunk; chunk_size is then only checked.
    """
    if ssd_backend not in SSD_BACKENDS:
        raise MambaKitError(f"ssd_backend must be one of {SSD_BACKENDS}, got {ssd_backend!r}")
    kernels = ssd_backend == "triton"
    p = position_terms(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size, seq_idx,
                       with_qk=not kernels)
    L = p.dims.seqlen
    theta, final_angle = sequence_angles(p.inc, p.starts, None if Input_States is None else Input_States[0])
    v = p.v
    if kernels:  # bias, rotation and the own-position product in one kernel, q and k written once in float32
        from mambakit.ops.mamba3.triton_rotary import rotary_qk

        q_io, k_io, qk = rotary_qk(Q, K, Q_bias, K_bias, theta, p.fp)
        last_k = k_io[:, L - 1]  # the state's k (unrounded: the kernel wrote the compute dtype)
    else:
        q_io, k_io = rotate(p.q, theta), rotate(p.k, theta)  # (batch, seqlen, nheads, d_state)
        qk, last_k = (q_io * k_io).sum(-1), k_io[:, L - 1]
    h0 = None if Input_States is None else start_state(p, Input_States)
    return _scan_and_finish(v, q_io, k_io, qk, p.scale, p.adt, p.gamma - p.scale, h0, final_angle, last_k, D, Z,
                            V.dtype, p.fp, chunk_size, seq_idx, return_final_states, ssd_backend)


def mamba3_ssd_raw(
    Q: Tensor, K: Tensor, V: Tensor, dd_dt: Tensor, dt_bias: Tensor, dd_A: Tensor, trap: Tensor, angle: Tensor,
    Q_bias: Tensor, K_bias: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, A_floor: float = 1e-4,
    A_activation: str = "heavy_tail", chunk_size: int = 64, return_final_states: bool = False,
    seq_idx: Optional[Tensor] = None, QK_norm: Optional[Tuple[Tensor, Tensor, float]] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The layer's entry to the SSD form on its Triton kernels (CUDA, or TRITON_INTERPRET=1): :func:`mamba3_ssd`
    with ssd_backend "triton" from the raw in_proj columns, the per-position prep fused
    (:mod:`.triton_prep`): DT = softplus(dd_dt + dt_bias), ADT = clamp(-f(dd_A), max=-A_floor) DT (f by
    A_activation, "heavy_tail" or "softplus"), Trap = trap, Angles = angle for every head.

    Args:
        dd_dt, dd_A, trap: (batch, seqlen, nheads), any strides; dt_bias: (nheads,); angle: (batch, seqlen,
            n_angles), any strides. The other arguments and the results as :func:`mamba3_ssd`.
        QK_norm: (q_weight, k_weight (d_state,), eps) or None: Q and K are the raw C and B, RMSNorm-ed inside the
            rotary kernel (as the layer's C_norm and B_norm would).
    """
    if A_activation not in ("heavy_tail", "softplus"):
        raise MambaKitError(f"A_activation must be 'heavy_tail' or 'softplus', got {A_activation!r}")
    try:
        dims = validate(Q, K, V, dd_dt, dd_dt, trap, Q_bias, K_bias, angle, D, Z, Input_States, seq_idx,
                        raw_columns=True)
        _require_shape("dd_A", _require_tensor("dd_A", dd_A), [("batch", dims.batch), ("seqlen", dims.seqlen),
                                                               ("nheads", dims.nheads)])
        _require_shape("dt_bias", _require_tensor("dt_bias", dt_bias), [("nheads", dims.nheads)])
        if QK_norm is not None:
            for name, w in (("QK_norm[0]", QK_norm[0]), ("QK_norm[1]", QK_norm[1])):
                _require_shape(name, _require_tensor(name, w), [("d_state", dims.d_state)])
    except MambaKitError as err:  # validate names the scan's arguments: name the raw columns
        raise MambaKitError(str(err).replace("ADT", "dd_dt").replace("Trap", "trap").replace("Angles", "angle")) \
            from None
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    fp = compute_dtype(Q, K, V, dd_dt, dt_bias, dd_A, trap, angle, Q_bias, K_bias, D, Z,
                       *(Input_States if Input_States is not None else ()))
    from mambakit.ops.mamba3.triton_prep import position_prep
    from mambakit.ops.mamba3.triton_rotary import rotary_qk

    prep = position_prep(dd_dt, dt_bias, dd_A, trap, angle, None if Input_States is None else Input_States[0],
                         seq_idx, A_floor, A_activation, fp)
    q_io, k_io, qk = rotary_qk(Q, K, Q_bias, K_bias, prep.theta, fp, norm=QK_norm)
    v = V.to(fp)
    h0 = None
    if Input_States is not None:
        _, ssm0, k0, v0 = (s.to(fp) for s in Input_States)
        h0 = ssm0 + prep.first_back[..., None, None] * v0[..., :, None] * k0[..., None, :]
    final_angle, last_k = (prep.theta[:, -1], k_io[:, dims.seqlen - 1]) if return_final_states else (None, None)
    return _scan_and_finish(v, q_io, k_io, qk, prep.scale, prep.adt, prep.corr, h0, final_angle, last_k, D, Z,
                            V.dtype, fp, chunk_size, seq_idx, return_final_states, "triton")


def _scan_and_finish(v, q_io, k_io, qk, scale, adt, corr, h0, final_angle, last_k, D, Z, out_dtype, fp, chunk_size,
                     seq_idx, return_final_states, ssd_backend):
    """The SSD scan of the prepared v (batch, seqlen, nheads, headdim), rotated q, k (..., d_state), their product qk,
    scale, adt and corr = gamma - scale (batch, seqlen, nheads) from h0; then the own-position correction, D and
    the gate; the results of :func:`mamba3_ssd`."""
    kernels = ssd_backend == "triton"
    L = v.shape[1]
    # the kernels pick their own chunk below this bound (128 positions for 16-bit inputs, as for Mamba-2)
    ssd_chunk = max(chunk_size, SSD_KERNEL_CHUNK) if kernels else chunk_size
    y, ssm = mamba_chunk_scan_combined(
        v, scale, None, k_io, q_io, ssd_chunk, initial_states=h0, seq_idx=seq_idx,
        return_final_states=True, log_decay=adt, backend=ssd_backend,
        allow_tf32=kernels and torch.finfo(out_dtype).bits == 16)
    # the own-position term: the SSD gave it weight s_t, the recurrence gamma_t (qk from the same rounded q and k,
    # so that the look-forward part cancels); plus the D skip
    if kernels:  # the correction, the skip and the gate in one kernel each way
        from mambakit.ops.mamba3.triton_gate import skip_gate

        y = skip_gate(y, v, qk, Z, out_dtype, corr=corr, D=D)
    else:
        diag = qk * corr  # (batch, seqlen, nheads)
        if D is not None:
            diag = diag + D.to(fp)
        y = y.to(fp) + diag[..., None] * v
        if Z is not None:
            y = y * F.silu(Z.to(fp))
        y = y.to(out_dtype)
    if not return_final_states:
        return y
    return y, final_angle, ssm.to(fp), last_k, v[:, L - 1]
