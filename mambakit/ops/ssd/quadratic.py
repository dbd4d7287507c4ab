"""SSD's quadratic ("dual", attention) form over the whole sequence, and its matrix."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.dt import DEFAULT_DT_LIMIT, compute_dtype
from mambakit.ops.segments import causal_segment_mask, segments
from mambakit.ops.ssd.common import SSDOutput, add_skip, run_form
from mambakit.ops.ssd.validate import INT_DTYPES, require_device, require_shape, require_tensor


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
    cumsum must not cost the small differences): dt (batch, seqlen, nheads) -> (batch, nheads, seqlen). A (nheads,),
    or (batch, seqlen, nheads): the per-position log-decay itself."""
    log_decay = A.double() if A.dim() == 3 else dt.double() * A.double()
    return torch.cumsum(log_decay, dim=1).transpose(1, 2)


def _attention_matrix(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seg: Optional[Tensor]) -> Tensor:
    """The quadratic form's matrix (batch, nheads, seqlen, seqlen) in dt's dtype; seg from
    `mambakit.ops.segments.segments`."""
    batch, seqlen, nheads = dt.shape
    ngroups = B.shape[2]
    r = nheads // ngroups
    keep = causal_segment_mask(seqlen, seg, dt.device)  # (batch or 1, seqlen, seqlen)
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
    dt = require_tensor("dt", dt)
    if dt.dim() != 3 or min(dt.shape) < 1:
        raise MambaKitError(f"dt must have shape (batch, seqlen, nheads) with every size >= 1, got {tuple(dt.shape)}")
    batch, seqlen, nheads = dt.shape
    A = require_tensor("A", A)
    require_shape("A", A, [("nheads", nheads)])
    B = require_tensor("B", B)
    if not (B.dim() == 4 and tuple(B.shape[:2]) == (batch, seqlen) and min(B.shape) >= 1
            and nheads % B.shape[2] == 0):
        raise MambaKitError(
            f"B must have shape (batch={batch}, seqlen={seqlen}, ngroups, d_state) with nheads={nheads} "
            f"divisible by ngroups, got {tuple(B.shape)}"
        )
    C = require_tensor("C", C)
    require_shape("C", C, [("batch", batch), ("seqlen", seqlen), ("ngroups", B.shape[2]), ("d_state", B.shape[3])],
                   " (the shape of B)")
    if seq_idx is not None:
        seq_idx = require_tensor("seq_idx", seq_idx, INT_DTYPES)
        require_shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
    for name, value in (("A", A), ("B", B), ("C", C), ("seq_idx", seq_idx)):
        if value is not None:
            require_device(name, value, dt.device)
    dtype = compute_dtype(dt, A, B, C)
    return _attention_matrix(dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), segments(seq_idx))


def _quadratic_core(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size=None) -> Tuple[Tensor, Tensor]:
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    r = nheads // ngroups
    seg = segments(seq_idx)
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
    return add_skip(y.transpose(1, 2), x, D), final


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
    log_decay: Optional[Tensor] = None,
) -> SSDOutput:
    """SSD by the attention ("dual") form ``y = (L o C B^T)(dt x)`` over the whole sequence.

    ``L[i, j] = exp(sum_{k=j+1..i} dt_k A)`` for i >= j (same packed sequence) else 0, from a masked segment-sum.
    Time and memory are quadratic in seqlen (batch * nheads * seqlen^2). Same arguments as
    :func:`mamba_chunk_scan_combined` (``chunk_size`` is accepted and ignored; ``log_decay`` in place of dt * A).
    Returns y
    (batch, seqlen, nheads, headdim), and the final state (batch, nheads, headdim, d_state) if
    ``return_final_states``.
    """
    return run_form(_quadratic_core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     dt_softplus, dt_limit, return_final_states, need_chunk_size=False, log_decay=log_decay)

