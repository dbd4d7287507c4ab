"""SSD (structured state-space duality): the sequence-mixing op of Mamba-2, in plain PyTorch.

The restricted SSM of Mamba-2 has, per head ``h``, a scalar decay ``a_t = exp(dt_t * A_h)`` and a state of shape
``(headdim, d_state)``::

    state_t = a_t * state_{t-1} + dt_t * x_t B_t^T        (x_t: (headdim,), B_t: (d_state,))
    y_t     = state_t C_t + D * x_t
    y_t    *= silu(z_t)                                    (only if z is given)

``B`` and ``C`` are shared by the heads of a group: with ``nheads = ngroups * r`` head ``h`` uses group ``h // r``.

Three forms of the same function are provided, all with the official ``mamba_ssm`` layout and ONE signature
(so that ``ssd_chunked(**kw)`` can be checked against ``ssd_recurrent(**kw)``):

* :func:`ssd_recurrent` -- the sequential recurrence above (the reference; slow, plain autograd).
* :func:`ssd_quadratic` -- the "attention" (dual) form ``y = (L o C B^T)(dt x)`` over the whole sequence
  (quadratic in seqlen; plain autograd); its matrix is :func:`ssd_attention_matrix`.
* :func:`ssd_chunked` -- the block decomposition used by Mamba-2 (linear in seqlen), with a hand-written backward
  that recomputes the chunk-local quadratic blocks instead of storing them.

:func:`mamba_chunk_scan_combined` (alias :data:`ssd`) is the public entry point with the official signature and
validation; :func:`ssd_step` is the one-token decode step.

Layouts (official ``mamba_ssm``)::

    x, z           (batch, seqlen, nheads, headdim)
    dt             (batch, seqlen, nheads)
    A              (nheads,)                       A < 0
    B, C           (batch, seqlen, ngroups, d_state)
    D              (nheads,) or (nheads, headdim)
    dt_bias        (nheads,)
    states         (batch, nheads, headdim, d_state)
    seq_idx        (batch, seqlen) integer; the state is reset to zero wherever seq_idx[:, t] != seq_idx[:, t-1],
                   so the initial state only reaches the positions before the first change.

dt processing (as the official op): ``dt = dt + dt_bias``; ``dt = softplus(dt)`` if ``dt_softplus``; clamp to
``dt_limit`` unless it is the default ``(0, inf)``.

Precision: inputs in float16/bfloat16/float32 are computed in float32, float64 inputs in float64. ``y`` has x's
dtype; the final state has the compute dtype (float32 or float64), like the official op's float32 final state.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mambakit.errors import MambaKitError
from mambakit.ops.autocast import autocast_off

__all__ = [
    "mamba_chunk_scan_combined",
    "ssd",
    "ssd_attention_matrix",
    "ssd_chunked",
    "ssd_quadratic",
    "ssd_recurrent",
    "ssd_step",
]

DEFAULT_DT_LIMIT: Tuple[float, float] = (0.0, math.inf)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

# exp() arguments of the chunk-local decay matrices are floored here: exp(-60) ~ 1e-26 is negligible next to the
# diagonal entries (exactly 1) even in float64, and it keeps exp() out of its very slow underflow/-inf paths on CPU.
_LOG_DECAY_FLOOR = -60.0

# The chunked form processes the (chunk x chunk) blocks of this many chunks at a time, chosen so that one block of
# decay matrices has about this many elements (a few MiB: it stays in cache and memory stays linear in seqlen).
_BLOCK_ELEMENTS = 1 << 20

SSDOutput = Union[Tensor, Tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


class _Dims(NamedTuple):
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int


def _shape_text(named: Sequence[Tuple[str, Optional[int]]]) -> str:
    """``[("batch", 2), ("d_state", None)]`` -> ``"(batch=2, d_state)"``."""
    parts = [name if size is None else f"{name}={size}" for name, size in named]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _require_tensor(name: str, value: object, dtypes: Sequence[torch.dtype] = _FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise MambaKitError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        wanted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise MambaKitError(f"{name} must have dtype in ({wanted}), got {value.dtype}")
    return value


def _require_shape(
    name: str, value: Tensor, named: Sequence[Tuple[str, Optional[int]]], note: str = ""
) -> None:
    """Raise unless ``value.shape`` matches ``named`` (``None`` sizes are free but must be >= 1)."""
    ok = value.dim() == len(named) and all(
        (size is None and actual >= 1) or actual == size for (_, size), actual in zip(named, value.shape)
    )
    if not ok:
        raise MambaKitError(f"{name} must have shape {_shape_text(named)}{note}, got {tuple(value.shape)}")


def _require_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise MambaKitError(f"{name} must be on the same device as x ({device}), got {value.device}")


def _check_dt_options(dt_softplus: object, dt_limit: object) -> None:
    if not isinstance(dt_softplus, bool):
        raise MambaKitError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    pair = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
    numbers = pair and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)  # type: ignore
    if not numbers or dt_limit[0] > dt_limit[1]:  # type: ignore[index]
        raise MambaKitError(f"dt_limit must be a pair (low, high) of floats with low <= high, got {dt_limit!r}")


def _check_head_params(
    dims: _Dims, device: torch.device, D: Optional[Tensor], dt_bias: Optional[Tensor]
) -> None:
    if D is not None:
        _require_tensor("D", D)
        if not (tuple(D.shape) == (dims.nheads,) or tuple(D.shape) == (dims.nheads, dims.headdim)):
            raise MambaKitError(
                f"D must have shape (nheads={dims.nheads},) or (nheads={dims.nheads}, headdim={dims.headdim}), "
                f"got {tuple(D.shape)}"
            )
        _require_device("D", D, device)
    if dt_bias is not None:
        _require_tensor("dt_bias", dt_bias)
        _require_shape("dt_bias", dt_bias, [("nheads", dims.nheads)])
        _require_device("dt_bias", dt_bias, device)


def _validate_scan(
    x: object,
    dt: object,
    A: object,
    B: object,
    C: object,
    chunk_size: object,
    D: object,
    z: object,
    dt_bias: object,
    initial_states: object,
    seq_idx: object,
    dt_softplus: object,
    dt_limit: object,
    *,
    need_chunk_size: bool,
) -> _Dims:
    """Check the arguments of the sequence forms once; return the problem sizes."""
    x = _require_tensor("x", x)
    if x.dim() != 4 or min(x.shape) < 1:
        raise MambaKitError(
            f"x must have shape (batch, seqlen, nheads, headdim) with every size >= 1, got {tuple(x.shape)}"
        )
    batch, seqlen, nheads, headdim = x.shape
    device = x.device
    dt = _require_tensor("dt", dt)
    _require_shape("dt", dt, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads)])
    A = _require_tensor("A", A)
    _require_shape("A", A, [("nheads", nheads)])
    B = _require_tensor("B", B)
    ok = B.dim() == 4 and B.shape[0] == batch and B.shape[1] == seqlen and min(B.shape) >= 1
    if not ok or nheads % B.shape[2] != 0:
        raise MambaKitError(
            f"B must have shape (batch={batch}, seqlen={seqlen}, ngroups, d_state) with nheads={nheads} "
            f"divisible by ngroups, got {tuple(B.shape)}"
        )
    ngroups, d_state = B.shape[2], B.shape[3]
    C = _require_tensor("C", C)
    _require_shape("C", C, [("batch", batch), ("seqlen", seqlen), ("ngroups", ngroups), ("d_state", d_state)],
                   " (the shape of B)")
    dims = _Dims(batch, seqlen, nheads, headdim, ngroups, d_state)
    if need_chunk_size or chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_head_params(dims, device, D, dt_bias)  # type: ignore[arg-type]
    if z is not None:
        z = _require_tensor("z", z)
        _require_shape("z", z, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads), ("headdim", headdim)],
                       " (the shape of x)")
    if initial_states is not None:
        initial_states = _require_tensor("initial_states", initial_states)
        _require_shape("initial_states", initial_states,
                       [("batch", batch), ("nheads", nheads), ("headdim", headdim), ("d_state", d_state)])
    if seq_idx is not None:
        seq_idx = _require_tensor("seq_idx", seq_idx, _INT_DTYPES)
        _require_shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
    for name, value in (("dt", dt), ("A", A), ("B", B), ("C", C), ("z", z),
                        ("initial_states", initial_states), ("seq_idx", seq_idx)):
        if value is not None:
            _require_device(name, value, device)  # type: ignore[arg-type]
    _check_dt_options(dt_softplus, dt_limit)
    return dims


# ----------------------------------------------------------------------------------------------------------------------
# Shared preprocessing / postprocessing
# ----------------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, otherwise float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _process_dt(
    dt: Tensor, dt_bias: Optional[Tensor], dt_softplus: bool, dt_limit: Sequence[float], dtype: torch.dtype
) -> Tensor:
    """Official dt handling: add the bias, softplus, clamp to ``dt_limit`` (skipped for the default (0, inf))."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_weight(D: Tensor) -> Tensor:
    """D (nheads,) or (nheads, headdim) -> broadcastable against (..., nheads, headdim)."""
    return D[:, None] if D.dim() == 1 else D


def _add_skip(y: Tensor, x: Tensor, D: Optional[Tensor]) -> Tensor:
    """``y + D * x``; y, x: (..., nheads, headdim)."""
    return y if D is None else y + x * _skip_weight(D)


def _segments(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    """Segment number of each position, (batch, seqlen) int64: 0 up to the first change of seq_idx, then +1 at
    every change. Returns None when no sequence boundary occurs (nothing to mask)."""
    if seq_idx is None:
        return None
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    if not bool(change.any()):
        return None
    return F.pad(change.cumsum(dim=1), (1, 0))


def _run_form(core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
              return_final_states, *, need_chunk_size: bool) -> SSDOutput:
    """Validate, process dt, cast to the compute dtype, run ``core`` (which adds D * x) and apply the gate."""
    _validate_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                   need_chunk_size=need_chunk_size)
    dtype = _compute_dtype(x, dt, A, B, C)
    dt_c = _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    x_c = x.to(dtype)
    init = None if initial_states is None else initial_states.to(dtype)
    D_c = None if D is None else D.to(dtype)
    y, final = core(x_c, dt_c, A.to(dtype), B.to(dtype), C.to(dtype), D_c, init, seq_idx, chunk_size)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


# ----------------------------------------------------------------------------------------------------------------------
# 1. Recurrent form (reference)
# ----------------------------------------------------------------------------------------------------------------------


def _step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
    """One step of the recurrence, without D and gate.

    state: (batch, nheads, headdim, d_state); x: (batch, nheads, headdim); dt: (batch, nheads); A: (nheads,);
    B, C: (batch, ngroups, d_state). Returns (new state, y) with y: (batch, nheads, headdim).
    """
    batch, nheads, headdim, d_state = state.shape
    ngroups = B.shape[1]
    r = nheads // ngroups
    decay = torch.exp(dt * A)[:, :, None, None]  # (batch, nheads, 1, 1)
    xdt = (x * dt[:, :, None]).view(batch, ngroups, r, headdim, 1)
    update = (xdt * B[:, :, None, None, :]).view(batch, nheads, headdim, d_state)
    state = decay * state + update
    y = torch.matmul(state.view(batch, ngroups, r, headdim, d_state), C[:, :, None, :, None])
    return state, y.view(batch, nheads, headdim)


def _recurrent_core(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size=None) -> Tuple[Tensor, Tensor]:
    batch, seqlen, nheads, headdim = x.shape
    d_state = B.shape[-1]
    state = initial_states
    if state is None:
        state = x.new_zeros(batch, nheads, headdim, d_state)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)
            state = state * keep[:, None, None, None]
        state, y = _step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return _add_skip(torch.stack(ys, dim=1), x, D), state


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: Optional[int] = None,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
) -> SSDOutput:
    """SSD by the plain sequential recurrence (the reference; one Python step per position).

    Same arguments as :func:`mamba_chunk_scan_combined` (``chunk_size`` is accepted and ignored). Returns
    y (batch, seqlen, nheads, headdim), and the final state (batch, nheads, headdim, d_state) if
    ``return_final_states``.
    """
    return _run_form(_recurrent_core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     dt_softplus, dt_limit, return_final_states, need_chunk_size=False)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Quadratic (dual / attention) form
# ----------------------------------------------------------------------------------------------------------------------


def _segsum_exp(acs: Tensor, keep: Tensor) -> Tensor:
    """Decay matrix ``L[..., i, j] = exp(acs[..., i] - acs[..., j])`` where ``keep[..., i, j]``, else 0.

    acs: (..., T) inclusive cumulative sums of dt*A; keep: bool, broadcastable to (..., T, T) (lower triangle,
    same segment). Masked entries are set to -inf BEFORE the exp, so no exp of a large positive number happens.
    Returns a new tensor (..., T, T).
    """
    diff = acs[..., :, None] - acs[..., None, :]
    return diff.masked_fill_(~keep, -math.inf).exp_()


def _log_decays(dt: Tensor, A: Tensor) -> Tensor:
    """Inclusive cumulative sums of dt*A over the whole sequence, in float64 whatever the compute dtype (a long
    cumsum must not cost the small differences): dt (batch, seqlen, nheads) -> (batch, nheads, seqlen)."""
    return torch.cumsum(dt.double() * A.double(), dim=1).transpose(1, 2)


def _attention_matrix(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seg: Optional[Tensor]) -> Tensor:
    """The quadratic form's matrix (batch, nheads, seqlen, seqlen) in dt's dtype; seg from :func:`_segments`."""
    batch, seqlen, nheads = dt.shape
    ngroups = B.shape[2]
    r = nheads // ngroups
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool, device=dt.device).tril()[None]
    if seg is not None:
        keep = keep & (seg[:, :, None] == seg[:, None, :])  # (batch, seqlen, seqlen)
    L = _segsum_exp(_log_decays(dt, A), keep[:, None]).to(dt.dtype)  # (batch, nheads, seqlen, seqlen)
    scores = torch.matmul(C.transpose(1, 2), B.permute(0, 2, 3, 1))  # (batch, ngroups, seqlen, seqlen)
    step = dt.transpose(1, 2).reshape(batch, ngroups, r, 1, seqlen)  # dt_j scales column j
    M = L.view(batch, ngroups, r, seqlen, seqlen) * scores[:, :, None] * step
    return M.view(batch, nheads, seqlen, seqlen)


def ssd_attention_matrix(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seq_idx: Optional[Tensor] = None) -> Tensor:
    """The matrix of SSD's quadratic ("attention") form, ``y = M x + D x`` without an initial state.

    ``M[b, h, i, j] = (C_i . B_j) * exp(A_h * sum_{k=j+1..i} dt_k) * dt_j`` for j <= i in the same packed sequence,
    else exactly 0 (decays from differences of a float64 cumulative sum, masked before the exp).

    Args:
        dt: (batch, seqlen, nheads), already processed (bias, softplus and limit applied).
        A: (nheads,); B, C: (batch, seqlen, ngroups, d_state) with ngroups dividing nheads.
        seq_idx: (batch, seqlen) int, optional: no entries across a change of seq_idx.

    Returns:
        (batch, nheads, seqlen, seqlen) in float32 (float64 if an input is float64). Memory is quadratic in seqlen.
    """
    dt = _require_tensor("dt", dt)
    if dt.dim() != 3 or min(dt.shape) < 1:
        raise MambaKitError(f"dt must have shape (batch, seqlen, nheads) with every size >= 1, got {tuple(dt.shape)}")
    batch, seqlen, nheads = dt.shape
    A = _require_tensor("A", A)
    _require_shape("A", A, [("nheads", nheads)])
    B = _require_tensor("B", B)
    if not (B.dim() == 4 and tuple(B.shape[:2]) == (batch, seqlen) and min(B.shape) >= 1
            and nheads % B.shape[2] == 0):
        raise MambaKitError(
            f"B must have shape (batch={batch}, seqlen={seqlen}, ngroups, d_state) with nheads={nheads} "
            f"divisible by ngroups, got {tuple(B.shape)}"
        )
    C = _require_tensor("C", C)
    _require_shape("C", C, [("batch", batch), ("seqlen", seqlen), ("ngroups", B.shape[2]), ("d_state", B.shape[3])],
                   " (the shape of B)")
    if seq_idx is not None:
        seq_idx = _require_tensor("seq_idx", seq_idx, _INT_DTYPES)
        _require_shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
    for name, value in (("A", A), ("B", B), ("C", C), ("seq_idx", seq_idx)):
        if value is not None:
            _require_device(name, value, dt.device)
    dtype = _compute_dtype(dt, A, B, C)
    return _attention_matrix(dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), _segments(seq_idx))


def _quadratic_core(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size=None) -> Tuple[Tensor, Tensor]:
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    r = nheads // ngroups
    seg = _segments(seq_idx)
    y = torch.matmul(_attention_matrix(dt, A, B, C, seg), x.transpose(1, 2))  # (batch, nheads, seqlen, headdim)
    if seg is None:
        seg = torch.zeros(batch, seqlen, dtype=torch.long, device=x.device)
    acs = _log_decays(dt, A)  # (batch, nheads, seqlen), float64
    Bg, Cg = B.transpose(1, 2), C.transpose(1, 2)  # (batch, ngroups, seqlen, d_state)
    # final state: decay from each position to the end of the sequence (within the last segment)
    in_last = (seg == seg[:, -1:])[:, None, :]
    to_end = torch.exp(torch.where(in_last, acs[:, :, -1:] - acs, -math.inf)).to(x.dtype)  # (batch, nheads, seqlen)
    xw = (x * dt[..., None]).transpose(1, 2) * to_end[..., None]  # (batch, nheads, seqlen, headdim)
    final = torch.einsum("bgrlp,bgln->bgrpn", xw.reshape(batch, ngroups, r, seqlen, headdim), Bg)
    final = final.reshape(batch, nheads, headdim, d_state)
    if initial_states is not None:  # it reaches the first segment only
        in_first = (seg == 0)[:, None, :]
        from_start = torch.exp(torch.where(in_first, acs, -math.inf)).to(x.dtype)  # (batch, nheads, seqlen)
        init = initial_states.view(batch, ngroups, r, headdim, d_state)
        y_init = torch.einsum("bgln,bgrpn->bgrlp", Cg, init).reshape(batch, nheads, seqlen, headdim)
        y = y + y_init * from_start[..., None]
        carry = torch.exp(torch.where(seg[:, -1:] == 0, acs[:, :, -1], -math.inf)).to(x.dtype)  # (batch, nheads)
        final = final + initial_states * carry[:, :, None, None]
    return _add_skip(y.transpose(1, 2), x, D), final


def ssd_quadratic(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: Optional[int] = None,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
) -> SSDOutput:
    """SSD by the attention ("dual") form ``y = (L o C B^T)(dt x)`` over the whole sequence.

    ``L[i, j] = exp(sum_{k=j+1..i} dt_k A)`` for i >= j (same packed sequence) else 0, from a masked segment-sum.
    Time and memory are quadratic in seqlen (batch * nheads * seqlen^2). Same arguments as
    :func:`mamba_chunk_scan_combined` (``chunk_size`` is accepted and ignored). Returns y
    (batch, seqlen, nheads, headdim), and the final state (batch, nheads, headdim, d_state) if
    ``return_final_states``.
    """
    return _run_form(_quadratic_core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     dt_softplus, dt_limit, return_final_states, need_chunk_size=False)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Chunked form
# ----------------------------------------------------------------------------------------------------------------------
#
# Notation: b batch, c chunks, Q chunk_size, h heads = g groups * r heads per group, p headdim, n d_state.
# Per chunk, with acs the within-chunk inclusive cumsum of dt*A and X = dt*x:
#   y      = (L o C B^T) X  +  e o (C S_prev^T)       L[i,j] = exp(acs_i - acs_j) (i >= j), e_i = exp(acs_i)
#   S_next = alpha S_prev + (w o X)^T B              w_l = exp(acs_last - acs_l), alpha = exp(acs_last)
# Internal tensors are chunk-major, (c, b, ...), so that a range of chunks is a contiguous slice. States are kept
# "transposed per group", (b, g, n, r*p): every product with B or C is one matmul per group with the heads of the
# group side by side (B and C are never expanded per head).


class _Chunks(NamedTuple):
    """The chunked layout of one problem (compute dtype), built identically in forward and backward."""

    dims: _Dims
    Q: int  # chunk size
    c: int  # number of chunks (the tail is zero-padded: dt = 0 there, so it changes nothing)
    X: Tensor  # (c, b, Q, h, p)  dt * x
    Xh: Tensor  # (c, b, h, Q, p)  the same, head-major (for the per-head (Q x Q) products)
    B: Tensor  # (c, b, g, Q, n)
    C: Tensor  # (c, b, g, Q, n)
    acs: Tensor  # (c, b, h, Q)  within-chunk inclusive cumsum of dt*A
    acs_lo: Optional[Tensor]  # (c, b, h, Q)  float32 only: the rounding error of acs (acs + acs_lo = float64 sum)
    e: Tensor  # (c, b, Q, h)  exp(acs): decay from the chunk start (0 past a sequence boundary)
    w: Tensor  # (c, b, Q, h)  exp(acs_last - acs): decay to the chunk end (0 before a sequence boundary)
    alpha: Tensor  # (c, b, h)  exp(acs_last): decay over the whole chunk (0 if it holds a boundary)
    tril: Tensor  # (Q, Q) 1.0 on and below the diagonal, 0.0 above
    cross: Optional[Tensor]  # bool (c, b, 1, Q, Q): pairs in different packed sequences, or None


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 (time) of a (batch, seqlen, ...) tensor by ``pad`` positions."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], pad) + tuple(t.shape[2:]))], dim=1)


def _to_chunks(t: Tensor, c: int, Q: int, pad: int) -> Tensor:
    """(b, seqlen, *rest) -> contiguous chunk-major (c, b, Q, *rest), zero-padded at the end."""
    t = _pad_time(t, pad)
    return t.reshape((t.shape[0], c, Q) + tuple(t.shape[2:])).transpose(0, 1).contiguous()


def _from_chunks(t: Tensor, seqlen: int) -> Tensor:
    """(c, b, Q, *rest) -> (b, seqlen, *rest), dropping the padding."""
    c, b, Q = t.shape[:3]
    return t.transpose(0, 1).reshape((b, c * Q) + tuple(t.shape[3:]))[:, :seqlen]


def _build_chunks(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seg: Optional[Tensor],
                  chunk_size: int) -> _Chunks:
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    dims = _Dims(batch, seqlen, nheads, headdim, ngroups, d_state)
    Q = chunk_size
    c = -(-seqlen // Q)
    pad = c * Q - seqlen
    X = _to_chunks(x * dt[..., None], c, Q, pad)
    Bc = _to_chunks(B, c, Q, pad).transpose(2, 3).contiguous()
    Cc = _to_chunks(C, c, Q, pad).transpose(2, 3).contiguous()
    # cumsum in float64: the only rounding left is that of each sum itself
    acs64 = _to_chunks(dt.double() * A.double(), c, Q, pad).cumsum(dim=2)  # (c, b, Q, h)
    last = acs64[:, :, -1]  # (c, b, h)
    from_start, to_end, over_chunk = acs64, last[:, :, None] - acs64, last
    cross = None
    if seg is not None:
        seg_c = _to_chunks(torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1), c, Q, 0)  # (c, b, Q)
        seg_last = seg_c[:, :, -1]  # (c, b)
        seg_prev = torch.cat([torch.zeros_like(seg_last[:1]), seg_last[:-1]])  # segment entering each chunk
        ninf = -math.inf
        from_start = torch.where((seg_c == seg_prev[:, :, None])[..., None], from_start, ninf)
        to_end = torch.where((seg_c == seg_last[:, :, None])[..., None], to_end, ninf)
        over_chunk = torch.where((seg_last == seg_prev)[..., None], over_chunk, ninf)
        cross = (seg_c[:, :, :, None] != seg_c[:, :, None, :])[:, :, None]
    dtype = x.dtype
    acs64 = acs64.transpose(2, 3).contiguous()
    acs = acs64.to(dtype)
    return _Chunks(
        dims=dims, Q=Q, c=c, X=X, Xh=X.transpose(2, 3).contiguous(), B=Bc, C=Cc,
        acs=acs, acs_lo=None if dtype == torch.float64 else (acs64 - acs.double()).to(dtype),
        e=from_start.exp().to(dtype), w=to_end.exp().to(dtype), alpha=over_chunk.exp().to(dtype),
        tril=torch.ones(Q, Q, dtype=dtype, device=x.device).tril(), cross=cross,
    )


class _Scratch:
    """Flat buffers reused by every block of chunks (the (Q x Q) temporaries are allocated once per call)."""

    def __init__(self, like: Tensor, numel: int, count: int) -> None:
        self._buffers = [like.new_empty(numel) for _ in range(count)]

    def get(self, index: int, shape: Tuple[int, ...]) -> Tensor:
        return self._buffers[index][: math.prod(shape)].view(shape)


def _blocks(ch: _Chunks, buffers: int) -> Tuple[_Scratch, list]:
    """Ranges (k0, k1) of chunks whose (Q x Q) blocks are processed together, and scratch space for them."""
    b, h, Q = ch.dims.batch, ch.dims.nheads, ch.Q
    step = max(1, _BLOCK_ELEMENTS // (b * h * Q * Q))
    ranges = [(k0, min(ch.c, k0 + step)) for k0 in range(0, ch.c, step)]
    return _Scratch(ch.X, min(step, ch.c) * b * h * Q * Q, buffers), ranges


def _block_decay(ch: _Chunks, k0: int, k1: int, out: Tensor) -> Tensor:
    """Decay matrices ``exp(acs_i - acs_j)`` of chunks k0..k1 into ``out`` (k, b, h, Q, Q).

    The upper triangle is set to 0 BEFORE the exp (so it holds 1, never the exp of a large positive number) and
    is zeroed through the masked scores of :func:`_block_scores`. Arguments are floored at ``_LOG_DECAY_FLOOR``.
    In float32 the difference is compensated: ``acs_i - acs_j`` is exact when the two are close (Sterbenz), and
    the float32 rounding errors of the sums (``acs_lo``) are added back, so a large cumulative decay within the
    chunk does not cost the precision of the small differences that matter.
    """
    acs = ch.acs[k0:k1]
    torch.sub(acs[..., :, None], acs[..., None, :], out=out)
    if ch.acs_lo is not None:
        lo = ch.acs_lo[k0:k1]
        out.add_(lo[..., :, None]).sub_(lo[..., None, :])
    return out.mul_(ch.tril).clamp_min_(_LOG_DECAY_FLOOR).exp_()


def _mask_pairs(ch: _Chunks, k0: int, k1: int, t: Tensor) -> Tensor:
    """Zero, in place, the (i, j) entries of t (k, b, g, Q, Q) that do not interact (j > i, other sequence)."""
    t.mul_(ch.tril)
    return t if ch.cross is None else t.masked_fill_(ch.cross[k0:k1], 0.0)


def _block_scores(ch: _Chunks, k0: int, k1: int) -> Tensor:
    """Masked C B^T per group for chunks k0..k1: (k, b, g, 1, Q, Q) (the 1 broadcasts over a group's heads)."""
    scores = torch.matmul(ch.C[k0:k1], ch.B[k0:k1].transpose(-1, -2))
    return _mask_pairs(ch, k0, k1, scores).unsqueeze(3)


def _grouped(t: Tensor, ch: _Chunks) -> Tensor:
    """(c, b, Q, h, p) -> view (c, b, g, Q, r*p): the heads of a group side by side."""
    d = ch.dims
    return t.view(ch.c, d.batch, ch.Q, d.ngroups, -1).transpose(2, 3)


def _ungrouped(t: Tensor, ch: _Chunks) -> Tensor:
    """(c, b, g, Q, r*p) -> contiguous (c, b, Q, h, p)."""
    d = ch.dims
    return t.transpose(2, 3).reshape(ch.c, d.batch, ch.Q, d.nheads, d.headdim)


def _state_scale(factor: Tensor, ch: _Chunks) -> Tensor:
    """Per-head factor (b, h) -> (b, g, 1, r*p) broadcastable against an internal state (b, g, n, r*p)."""
    d = ch.dims
    r = d.nheads // d.ngroups
    return factor.view(d.batch, d.ngroups, 1, r, 1).expand(-1, -1, -1, -1, d.headdim).reshape(
        d.batch, d.ngroups, 1, r * d.headdim)


def _states_to_internal(S: Tensor, ngroups: int) -> Tensor:
    """(b, h, p, n) -> (b, g, n, r*p)."""
    b, h, p, n = S.shape
    return S.view(b, ngroups, h // ngroups, p, n).permute(0, 1, 4, 2, 3).reshape(b, ngroups, n, -1)


def _states_to_public(S: Tensor, dims: _Dims) -> Tensor:
    """(b, g, n, r*p) -> (b, h, p, n)."""
    b, g, n = S.shape[:3]
    r = dims.nheads // g
    return S.view(b, g, n, r, dims.headdim).permute(0, 1, 3, 4, 2).reshape(b, dims.nheads, dims.headdim, n)


def _chunked_forward(ch: _Chunks, initial_states: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns y (c, b, Q, h, p), the state entering each chunk (c, b, g, n, r*p) and the final state
    (b, g, n, r*p)."""
    d = ch.dims
    b, Q, h, g, n = d.batch, ch.Q, d.nheads, d.ngroups, d.d_state
    r = h // g
    # chunk-local states U_k = (w o X)^T B, kept as B^T (w o X): (c, b, g, n, r*p)
    U = torch.matmul(ch.B.transpose(-1, -2), _grouped(ch.X * ch.w[..., None], ch))
    # recurrence over chunk states only
    if initial_states is not None:
        S = _states_to_internal(initial_states, g)
    else:
        S = U.new_zeros(U.shape[1:])
    states = torch.empty_like(U)
    for k in range(ch.c):
        states[k] = S
        S = torch.addcmul(U[k], S, _state_scale(ch.alpha[k], ch))
    # read out the entering states with C, then add the chunk-local (quadratic) part block by block
    y = _ungrouped(torch.matmul(ch.C, states), ch)
    y.mul_(ch.e[..., None])
    scratch, ranges = _blocks(ch, 1)
    for k0, k1 in ranges:
        k = k1 - k0
        M = _block_decay(ch, k0, k1, out=scratch.get(0, (k, b, h, Q, Q)))
        M.view(k, b, g, r, Q, Q).mul_(_block_scores(ch, k0, k1))
        y[k0:k1] += torch.matmul(M, ch.Xh[k0:k1]).transpose(2, 3)
    return y, states, S


def _chunked_backward(ch: _Chunks, states: Tensor, gy: Tensor, grad_final: Optional[Tensor]):
    """Gradients w.r.t. X (c, b, Q, h, p), the increments dA = dt*A (c, b, Q, h), B, C (c, b, g, Q, n) and the
    initial state (b, g, n, r*p), given gy = dL/dy (c, b, Q, h, p) and grad_final (b, g, n, r*p) or None."""
    d = ch.dims
    b, c, Q, h, p, g = d.batch, ch.c, ch.Q, d.nheads, d.headdim, d.ngroups
    r = h // g
    # (a) read-out of the entering states: y += e o (C S^T)
    gy_e = _grouped(gy * ch.e[..., None], ch)  # (c, b, g, Q, r*p)
    g_states_out = torch.matmul(ch.C.transpose(-1, -2), gy_e)  # (c, b, g, n, r*p)
    gC = torch.matmul(gy_e, states.transpose(-1, -2))  # (c, b, g, Q, n)
    CS = torch.matmul(ch.C, states)  # (c, b, g, Q, r*p)
    g_acs = (gy_e * CS).view(c, b, g, Q, r, p).sum(-1).transpose(2, 3).reshape(c, b, Q, h)
    del CS, gy_e
    # (b) reverse recurrence over chunk states: S_{k+1} = alpha_k S_k + U_k
    gS = grad_final if grad_final is not None else states.new_zeros(states.shape[1:])
    gU = torch.empty_like(states)
    for k in reversed(range(c)):
        gU[k] = gS
        gS = torch.addcmul(g_states_out[k], gS, _state_scale(ch.alpha[k], ch))
    g_init = gS
    del g_states_out
    g_last = ch.alpha * (gU * states).view(c, b, g, -1, r, p).sum((3, 5)).reshape(c, b, h)  # w.r.t. acs_last
    # (c) chunk-local states U = B^T (w o X)
    Xw = ch.X * ch.w[..., None]  # (c, b, Q, h, p)
    gXw = _ungrouped(torch.matmul(ch.B, gU), ch)  # (c, b, Q, h, p)
    gB = torch.matmul(_grouped(Xw, ch), gU.transpose(-1, -2))  # (c, b, g, Q, n)
    gX = gXw * ch.w[..., None]
    log_w_grad = (gXw * Xw).sum(-1)  # (c, b, Q, h)
    g_last += log_w_grad.sum(2)
    g_acs -= log_w_grad
    del Xw, gXw, gU
    # (d) chunk-local quadratic part, block by block (recomputing the decay matrices)
    gyh = gy.transpose(2, 3).contiguous()  # (c, b, h, Q, p)
    g_acs_h = torch.empty_like(ch.acs)  # (c, b, h, Q)
    scratch, ranges = _blocks(ch, 3)
    for k0, k1 in ranges:
        k = k1 - k0
        shape = (k, b, h, Q, Q)
        L = _block_decay(ch, k0, k1, out=scratch.get(0, shape))
        M = scratch.get(1, shape)
        torch.mul(L.view(k, b, g, r, Q, Q), _block_scores(ch, k0, k1), out=M.view(k, b, g, r, Q, Q))
        gM = torch.matmul(gyh[k0:k1], ch.Xh[k0:k1].transpose(-1, -2), out=scratch.get(2, shape))
        gX[k0:k1] += torch.matmul(M.transpose(-1, -2), gyh[k0:k1]).transpose(2, 3)
        M.mul_(gM)  # gradient w.r.t. the log of L (zero where masked)
        torch.sub(M.sum(-1), M.sum(-2), out=g_acs_h[k0:k1])
        gM.mul_(L)
        g_scores = _mask_pairs(ch, k0, k1, gM.view(k, b, g, r, Q, Q).sum(3))  # (k, b, g, Q, Q)
        gC[k0:k1] += torch.matmul(g_scores, ch.B[k0:k1])
        gB[k0:k1] += torch.matmul(g_scores.transpose(-1, -2), ch.C[k0:k1])
    g_acs += g_acs_h.transpose(2, 3)
    g_acs[:, :, -1] += g_last
    g_dA = g_acs.flip(2).cumsum(2).flip(2)  # acs = cumsum(dA) within each chunk
    return gX, g_dA, gB, gC, g_init


class _ChunkedSSD(torch.autograd.Function):
    """Core of the chunked form: (x, dt, A, B, C, D, initial_states) -> (y without the gate, final state).

    The backward recomputes the chunk-local quadratic blocks (nothing of size seqlen * chunk_size is stored);
    only the state entering each chunk, (c, b, h, p, n), is saved.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, dt, A, B, C, D, initial_states, seg, chunk_size):  # type: ignore[override]
        # inputs are often views of one packed projection: strided operands make every later elementwise op
        # several times slower, so take contiguous copies once (a no-op for contiguous inputs)
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        ch = _build_chunks(x, dt, A, B, C, seg, chunk_size)
        y, states, final = _chunked_forward(ch, initial_states)
        y = _from_chunks(y, x.shape[1])
        if D is not None:
            y.addcmul_(x, _skip_weight(D))
        ctx.save_for_backward(x, dt, A, B, C, D, seg, states)
        ctx.chunk_size = chunk_size
        ctx.has_initial = initial_states is not None
        return y, _states_to_public(final, ch.dims)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad_y, grad_final):  # type: ignore[override]
        x, dt, A, B, C, D, seg, states = ctx.saved_tensors
        ch = _build_chunks(x, dt, A, B, C, seg, ctx.chunk_size)
        d = ch.dims
        seqlen, pad = d.seqlen, ch.c * ch.Q - d.seqlen
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y.to(x.dtype).contiguous()
        gy = _to_chunks(grad_y, ch.c, ch.Q, pad)
        gf = None if grad_final is None else _states_to_internal(grad_final.to(x.dtype), d.ngroups)
        gX, g_dA, gB, gC, g_init = _chunked_backward(ch, states, gy, gf)
        gX = _from_chunks(gX, seqlen)
        g_dA = _from_chunks(g_dA, seqlen)
        gdt = (gX * x).sum(-1) + g_dA * A
        gA = (g_dA * dt).sum((0, 1))
        gx = gX.mul_(dt[..., None])
        gD = None
        if D is not None:
            gx.addcmul_(grad_y, _skip_weight(D))
            gD = (grad_y * x).sum((0, 1))  # (nheads, headdim)
            gD = gD.sum(-1) if D.dim() == 1 else gD
        gB = _from_chunks(gB.transpose(2, 3), seqlen)
        gC = _from_chunks(gC.transpose(2, 3), seqlen)
        g_init = _states_to_public(g_init, d) if ctx.has_initial else None
        return gx, gdt, gA, gB, gC, gD, g_init, None, None


def _chunked_core(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size) -> Tuple[Tensor, Tensor]:
    return _ChunkedSSD.apply(x, dt, A, B, C, D, initial_states, _segments(seq_idx), chunk_size)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
) -> SSDOutput:
    """SSD by the chunked (block) decomposition; time and memory linear in seqlen.

    The sequence is cut into chunks of ``chunk_size`` (any positive int; the tail chunk is zero-padded). Within a
    chunk the quadratic form via matmuls; the chunk-local states; a recurrence over chunk states only; the state
    contribution read out with C. Gradients reach every input through a hand-written backward.
    Returns y (batch, seqlen, nheads, headdim), and the final state (batch, nheads, headdim, d_state) if
    ``return_final_states``.
    """
    return _run_form(_chunked_core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     dt_softplus, dt_limit, return_final_states, need_chunk_size=True)


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    backend: str = "auto",
) -> SSDOutput:
    """The Mamba-2 SSD op with the official ``mamba_ssm`` signature, plus ``backend``.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads); processed as ``softplus(dt + dt_bias)`` (each part optional), then clamped
            to ``dt_limit`` unless that is the default (0, inf).
        A: (nheads,), negative.
        B, C: (batch, seqlen, ngroups, d_state), ngroups dividing nheads.
        chunk_size: positive int (any, not only powers of two).
        D: (nheads,) or (nheads, headdim) skip connection, optional.
        z: (batch, seqlen, nheads, headdim) gate, optional: ``y *= silu(z)``.
        dt_bias: (nheads,), optional.
        initial_states: (batch, nheads, headdim, d_state), optional.
        seq_idx: (batch, seqlen) int, optional: packed sequences; the state is reset where it changes.
        dt_softplus, dt_limit: see ``dt``.
        return_final_states: also return the state after the last position.
        backend: "auto" (Triton kernels for CUDA tensors that are not float64, else PyTorch), "torch" (the chunked
            PyTorch form, any device) or "triton" (mambakit.ops.triton.ssd; chunk_size is then an upper bound on
            its internal chunk of 16..64 positions, which changes nothing but speed).

    Returns:
        y (batch, seqlen, nheads, headdim) in x's dtype, or ``(y, final_states)`` with final_states
        (batch, nheads, headdim, d_state) in float32 (float64 for float64 inputs).

    Raises:
        MambaKitError: an argument has the wrong type, shape, dtype or device.
    """
    if backend not in BACKENDS:
        raise MambaKitError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = isinstance(x, Tensor) and x.is_cuda and x.dtype != torch.float64 and _triton_available()
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        return _triton_form(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                            dt_limit, return_final_states)
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                       seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
                       return_final_states=return_final_states)


BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import mambakit.ops.triton.ssd  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_form(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                 return_final_states) -> SSDOutput:
    """The Triton kernels (mambakit.ops.triton.ssd) for the scan and D skip; dt processing and the gate in PyTorch."""
    _validate_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                   need_chunk_size=True)
    if x.dtype == torch.float64:
        raise MambaKitError("backend='triton' takes float16, bfloat16 or float32 x, got float64 (use 'torch')")
    from mambakit.ops.triton.ssd import ssd_triton_core

    limit = tuple(dt_limit) if tuple(dt_limit) != DEFAULT_DT_LIMIT else None  # the bias, softplus, clamp: in-kernel
    y, final = ssd_triton_core(x, dt, A, B, C, D, initial_states, _segments(seq_idx), chunk_size, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, dt_limit=limit)
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_states else y


ssd = mamba_chunk_scan_combined


# ----------------------------------------------------------------------------------------------------------------------
# Decode step
# ----------------------------------------------------------------------------------------------------------------------


def _validate_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit) -> _Dims:
    state = _require_tensor("state", state)
    if state.dim() != 4 or min(state.shape) < 1:
        raise MambaKitError(
            f"state must have shape (batch, nheads, headdim, d_state) with every size >= 1, got {tuple(state.shape)}"
        )
    batch, nheads, headdim, d_state = state.shape
    device = state.device
    x = _require_tensor("x", x)
    _require_shape("x", x, [("batch", batch), ("nheads", nheads), ("headdim", headdim)], " (from state)")
    dt = _require_tensor("dt", dt)
    _require_shape("dt", dt, [("batch", batch), ("nheads", nheads)])
    A = _require_tensor("A", A)
    _require_shape("A", A, [("nheads", nheads)])
    B = _require_tensor("B", B)
    ok = B.dim() == 3 and B.shape[0] == batch and B.shape[2] == d_state and B.shape[1] >= 1
    if not ok or nheads % B.shape[1] != 0:
        raise MambaKitError(
            f"B must have shape (batch={batch}, ngroups, d_state={d_state}) with nheads={nheads} divisible by "
            f"ngroups, got {tuple(B.shape)}"
        )
    C = _require_tensor("C", C)
    _require_shape("C", C, [("batch", batch), ("ngroups", B.shape[1]), ("d_state", d_state)], " (the shape of B)")
    dims = _Dims(batch, 1, nheads, headdim, B.shape[1], d_state)
    _require_device("x", x, device)
    _check_head_params(dims, device, D, dt_bias)
    if z is not None:
        z = _require_tensor("z", z)
        _require_shape("z", z, [("batch", batch), ("nheads", nheads), ("headdim", headdim)], " (the shape of x)")
    for name, value in (("dt", dt), ("A", A), ("B", B), ("C", C), ("z", z)):
        if value is not None:
            _require_device(name, value, device)
    _check_dt_options(dt_softplus, dt_limit)
    return dims


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = DEFAULT_DT_LIMIT,
    backend: str = "auto",
) -> Tensor:
    """One-token decode step; updates ``state`` IN PLACE.

    Args:
        state: (batch, nheads, headdim, d_state), updated in place (computed in float32, or float64 if state or an
            input is float64, then stored in state's dtype).
        x: (batch, nheads, headdim); z: same shape, optional gate.
        dt: (batch, nheads); dt_bias: (nheads,); dt_softplus, dt_limit: as :func:`mamba_chunk_scan_combined`.
        A: (nheads,); B, C: (batch, ngroups, d_state); D: (nheads,) or (nheads, headdim), optional.
        backend: "auto" (the Triton decode kernel for contiguous CUDA states that are not float64 when dt_limit is
            the default, else PyTorch), "torch" or "triton".

    Returns:
        y (batch, nheads, headdim) in x's dtype: exactly one step of the recurrence of :func:`ssd_recurrent`.
    """
    _validate_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    if backend not in BACKENDS:
        raise MambaKitError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fits = state.is_cuda and state.is_contiguous() and _compute_dtype(state, x, dt, A, B, C) == torch.float32
        backend = "triton" if fits and tuple(dt_limit) == DEFAULT_DT_LIMIT and _triton_available() else "torch"
    if backend == "triton":
        if tuple(dt_limit) != DEFAULT_DT_LIMIT:
            raise MambaKitError(f"backend='triton' supports only the default dt_limit (0, inf), got {dt_limit}")
        from mambakit.ops.triton.state_update import ssd_step_triton

        return ssd_step_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    dtype = _compute_dtype(state, x, dt, A, B, C)
    dt_c = _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    x_c = x.to(dtype)
    new_state, y = _step(state.to(dtype), x_c, dt_c, A.to(dtype), B.to(dtype), C.to(dtype))
    state.copy_(new_state)
    y = _add_skip(y, x_c, None if D is None else D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
