"""Pieces shared by the Mamba-3 forms: the state tuple, argument checks, the rotation, the angle increments and the
segment starts of packed sequences.

Layouts (the official ``mamba_ssm`` SISO op, ``mamba3_siso_combined``)::

    Q, K        (batch, seqlen, ngroups, d_state)     C and B after their RMSNorm, shared by nheads / ngroups heads
    V, Z        (batch, seqlen, nheads, headdim)      x and the gate
    ADT, DT     (batch, nheads, seqlen)               A * dt (A < 0) and dt (after softplus)
    Trap        (batch, nheads, seqlen)               the trapezoid's mixing logit (lambda = sigmoid(Trap))
    Q_bias      (nheads, d_state)                     C_bias and B_bias
    K_bias
    Angles      (batch, seqlen, nheads, n_angles)     the angle projections (raw; 2 * n_angles <= d_state)
    D           (nheads,)
    seq_idx     (batch, seqlen) integer               packed sequences: every state part restarts from zero
                                                      wherever seq_idx[:, t] != seq_idx[:, t - 1]

The recurrence, per head (theta: (n_angles,), h: (headdim, d_state))::

    theta_t = (theta_{t-1} + pi * tanh(Angles_t) * DT_t) mod 2 pi
    k_t = Rot(theta_t)(K_t + K_bias),  q_t = Rot(theta_t)(Q_t + Q_bias)     pairs (2i, 2i+1), i < n_angles
    alpha_t = exp(ADT_t),  lambda_t = sigmoid(Trap_t)
    h_t = alpha_t h_{t-1} + (1 - lambda_t) DT_t alpha_t v_{t-1} k_{t-1}^T + lambda_t DT_t v_t k_t^T
    y_t = h_t q_t + D v_t,  then y_t *= silu(Z_t) if Z is given

The state after position t has four parts (:class:`Mamba3States`): theta_t, h_t, k_t and v_t (the last two feed the
trapezoid's first term at t + 1).

Precision: float64 if any floating input is float64, else float32 (half inputs are computed in float32).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.dt import compute_dtype  # noqa: F401  (part of this module's surface)
from mambakit.ops.ssd.validate import require_shape as _require_shape, require_tensor as _require_tensor

TWO_PI = 2 * math.pi


class Mamba3States(NamedTuple):
    """The four state parts after a position: angle (batch, nheads, n_angles), ssm (batch, nheads, headdim,
    d_state), k (batch, nheads, d_state) the rotated B (with bias) of the last position, v (batch, nheads, headdim)
    the x of the last position."""

    angle: Tensor
    ssm: Tensor
    k: Tensor
    v: Tensor


class Dims(NamedTuple):
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    n_angles: int


def _require_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise MambaKitError(f"{name} must be on the same device as V ({device}), got {value.device}")


def validate(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, seq_idx,
             seq_dims: bool = True, raw_columns: bool = False) -> Dims:
    """Check the arguments of the scan (seq_dims=True: with a seqlen axis) or of one step (seq_dims=False: the
    same layouts without the seqlen axis); return the problem sizes. raw_columns (with seq_dims): ADT, DT, Trap
    are the layer's raw columns (batch, seqlen, nheads) and Angles (batch, seqlen, n_angles), shared by the heads."""
    V = _require_tensor("V", V)
    want = 4 if seq_dims else 3
    if V.dim() != want or min(V.shape) < 1:
        layout = "(batch, seqlen, nheads, headdim)" if seq_dims else "(batch, nheads, headdim)"
        raise MambaKitError(f"V must have shape {layout} with every size >= 1, got {tuple(V.shape)}")
    if seq_dims:
        batch, seqlen, nheads, headdim = V.shape
    else:
        (batch, nheads, headdim), seqlen = V.shape, 1
    t = [("seqlen", seqlen)] if seq_dims else []
    Q = _require_tensor("Q", Q)
    if Q.dim() != want or Q.shape[0] != batch or (seq_dims and Q.shape[1] != seqlen) or min(Q.shape) < 1 \
            or nheads % Q.shape[-2] != 0:
        raise MambaKitError(f"Q must have shape (batch={batch}, {'seqlen=%d, ' % seqlen if seq_dims else ''}"
                            f"ngroups, d_state) with nheads={nheads} divisible by ngroups, got {tuple(Q.shape)}")
    ngroups, d_state = Q.shape[-2:]
    _require_shape("K", _require_tensor("K", K), [("batch", batch)] + t + [("ngroups", ngroups), ("d_state", d_state)])
    head_seq = [("batch", batch), ("nheads", nheads)] + t
    if raw_columns:
        head_seq = [("batch", batch), ("seqlen", seqlen), ("nheads", nheads)]
    for name, value in (("ADT", ADT), ("DT", DT), ("Trap", Trap)):
        _require_shape(name, _require_tensor(name, value), head_seq)
    for name, value in (("Q_bias", Q_bias), ("K_bias", K_bias)):
        _require_shape(name, _require_tensor(name, value), [("nheads", nheads), ("d_state", d_state)])
    Angles = _require_tensor("Angles", Angles)
    per_head = [] if raw_columns else [("nheads", nheads)]
    _require_shape("Angles", Angles, [("batch", batch)] + t + per_head + [("n_angles", None)])
    n_angles = Angles.shape[-1]
    if 2 * n_angles > d_state:
        raise MambaKitError(f"Angles' last size n_angles must satisfy 2 * n_angles <= d_state={d_state}, "
                            f"got {n_angles}")
    if D is not None:
        _require_shape("D", _require_tensor("D", D), [("nheads", nheads)])
    if Z is not None:
        _require_shape("Z", _require_tensor("Z", Z), [("batch", batch)] + t + [("nheads", nheads),
                                                                             ("headdim", headdim)])
    dims = Dims(batch, seqlen, nheads, headdim, ngroups, d_state, n_angles)
    if Input_States is not None:
        validate_states(Input_States, dims, "Input_States")
    if seq_idx is not None:
        if not isinstance(seq_idx, Tensor) or seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise MambaKitError(f"seq_idx must be an integer tensor, got "
                                f"{seq_idx.dtype if isinstance(seq_idx, Tensor) else type(seq_idx).__name__}")
        _require_shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
    for name, value in (("Q", Q), ("K", K), ("ADT", ADT), ("DT", DT), ("Trap", Trap), ("Q_bias", Q_bias),
                        ("K_bias", K_bias), ("Angles", Angles), ("D", D), ("Z", Z), ("seq_idx", seq_idx)):
        if value is not None:
            _require_device(name, value, V.device)
    return dims


def validate_states(states: object, dims: Dims, name: str) -> None:
    """states: a 4-tuple (angle, ssm, k, v) of the shapes in :class:`Mamba3States`."""
    if not isinstance(states, (tuple, list)) or len(states) != 4:
        raise MambaKitError(f"{name} must be a tuple (angle, ssm, k, v), got {type(states).__name__}"
                            + (f" of length {len(states)}" if isinstance(states, (tuple, list)) else ""))
    b, h = ("batch", dims.batch), ("nheads", dims.nheads)
    shapes = ([b, h, ("n_angles", dims.n_angles)], [b, h, ("headdim", dims.headdim), ("d_state", dims.d_state)],
              [b, h, ("d_state", dims.d_state)], [b, h, ("headdim", dims.headdim)])
    for part, value, shape in zip(Mamba3States._fields, states, shapes):
        _require_shape(f"{name}.{part}", _require_tensor(f"{name}.{part}", value), shape)


def rotate(v: Tensor, theta: Tensor) -> Tensor:
    """Rotate the pairs (v[..., 2i], v[..., 2i+1]) by theta[..., i] for i < n_angles; the rest of v is unchanged.

    v: (..., d_state); theta: (..., n_angles) broadcastable against v[..., 0]. Returns (..., d_state)."""
    n = theta.shape[-1]
    pairs = v[..., :2 * n].unflatten(-1, (n, 2))
    v0, v1 = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    turned = torch.stack((v0 * cos - v1 * sin, v0 * sin + v1 * cos), dim=-1).flatten(-2)
    return torch.cat((turned, v[..., 2 * n:]), dim=-1)


def angle_increment(Angles: Tensor, dt: Tensor) -> Tensor:
    """pi * tanh(Angles) * dt: Angles (..., n_angles), dt (...) -> (..., n_angles)."""
    return math.pi * torch.tanh(Angles) * dt[..., None]


def segment_starts(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    """(batch, seqlen) bool, True where a new packed sequence starts (t > 0 and seq_idx changes); None when no
    sequence boundary occurs."""
    if seq_idx is None:
        return None
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    if not bool(change.any()):
        return None
    return torch.cat((torch.zeros_like(change[:, :1]), change), dim=1)


def heads_of_groups(t: Tensor, nheads: int) -> Tensor:
    """(..., ngroups, d) -> (..., nheads, d): head h reads group h // (nheads / ngroups)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def validate_mimo(Q, K, V, MIMO_V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Input_States, seq_idx,
                  seq_dims: bool = True) -> Tuple[Dims, int]:
    """Check the arguments of the MIMO scan (seq_dims=True) or of one MIMO step (the layouts of
    :mod:`mambakit.ops.mamba3.mimo`); return (the problem sizes, the rank R)."""
    Q, K = _require_tensor("Q", Q), _require_tensor("K", K)
    want = 5 if seq_dims else 4
    if Q.dim() != want or min(Q.shape) < 1:
        layout = "(batch, seqlen, R, ngroups, d_state)" if seq_dims else "(batch, R, ngroups, d_state)"
        raise MambaKitError(f"Q must have shape {layout} with every size >= 1, got {tuple(Q.shape)}")
    R = Q.shape[-3]
    _require_shape("K", K, [(f"dim {i}", s) for i, s in enumerate(Q.shape)])
    # the SISO checks on rank 0 give every other size and check
    dims = validate(Q.select(-3, 0), K.select(-3, 0), V, ADT, DT, Trap, _require_tensor("Q_bias", Q_bias)[:, 0],
                    _require_tensor("K_bias", K_bias)[:, 0], Angles, D, None, None, seq_idx, seq_dims=seq_dims)
    for name, value, last in (("MIMO_V", MIMO_V, ("headdim", dims.headdim)), ("Q_bias", Q_bias,
                              ("d_state", dims.d_state)), ("K_bias", K_bias, ("d_state", dims.d_state))):
        _require_shape(name, _require_tensor(name, value), [("nheads", dims.nheads), ("R", R), last])
    if Input_States is not None:
        if not isinstance(Input_States, (tuple, list)) or len(Input_States) != 4:
            raise MambaKitError(f"Input_States must be a tuple (angle, ssm, k, v), got {type(Input_States).__name__}")
        b, h = ("batch", dims.batch), ("nheads", dims.nheads)
        shapes = ([b, h, ("n_angles", dims.n_angles)], [b, h, ("headdim", dims.headdim), ("d_state", dims.d_state)],
                  [b, ("R", R), h, ("d_state", dims.d_state)], [b, h, ("headdim", dims.headdim)])
        for part, value, shape in zip(Mamba3States._fields, Input_States, shapes):
            _require_shape(f"Input_States.{part}", _require_tensor(f"Input_States.{part}", value), shape)
    return dims, R
