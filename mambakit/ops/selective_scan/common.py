"""The selective scan's input check and the pieces every form shares (D skip, z gate, grouped B/C layout).

Layouts (official `mamba_ssm.selective_scan_fn`): u, delta, z (batch, dim, seqlen); A (dim, d_state); B, C each
(batch, d_state, seqlen), grouped (batch, groups, d_state, seqlen) or time-invariant (dim, d_state), in any
combination (`grouped_pair` brings the two to one grouped layout); D, delta_bias (dim,); states (batch, dim, d_state);
seq_idx (batch, seqlen) integer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.dt import compute_dtype, process_dt

__all__ = [
    "check_selective_scan_inputs", "compute_dtype", "finish_output", "grouped", "grouped_pair", "prepare_delta",
]


def shape_error(name: str, expected: str, got: Tensor) -> MambaKitError:
    """The error for a tensor argument of the wrong shape."""
    return MambaKitError(f"{name} must have shape {expected}, got {tuple(got.shape)}")


def check_selective_scan_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], initial_state: Optional[Tensor], seq_idx: Optional[Tensor],
) -> None:
    """Validate shapes, dtypes and devices once at the public boundary; raise MambaKitError naming the argument."""
    if u.dim() != 3:
        raise shape_error("u", "(batch, dim, seqlen)", u)
    batch, dim, seqlen = u.shape
    if not u.is_floating_point():
        raise MambaKitError(f"u must be a floating-point tensor, got dtype {u.dtype}")
    if seqlen == 0:
        raise MambaKitError("u must have seqlen >= 1, got 0")
    if delta.shape != u.shape:
        raise shape_error("delta", f"(batch={batch}, dim={dim}, seqlen={seqlen}) like u", delta)
    if A.shape[:1] != (dim,) or A.dim() != 2:
        raise shape_error("A", f"(dim={dim}, d_state)", A)
    if A.is_complex():
        raise MambaKitError("A must be real (complex A is not supported), got a complex tensor")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2:
            ok = t.shape == (dim, d_state)
        elif t.dim() == 3:
            ok = t.shape == (batch, d_state, seqlen)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (d_state, seqlen) and t.shape[1] >= 1 and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise shape_error(
                name, f"(batch={batch}, d_state={d_state}, seqlen={seqlen}), (batch, groups, d_state, seqlen) "
                f"with groups dividing dim={dim}, or time-invariant (dim={dim}, d_state={d_state})", t)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise shape_error(name, f"(dim={dim},)", t)
    if z is not None and z.shape != u.shape:
        raise shape_error("z", f"(batch={batch}, dim={dim}, seqlen={seqlen}) like u", z)
    if initial_state is not None and initial_state.shape != (batch, dim, d_state):
        raise shape_error("initial_state", f"(batch={batch}, dim={dim}, d_state={d_state})", initial_state)
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise shape_error("seq_idx", f"(batch={batch}, seqlen={seqlen})", seq_idx)
        if seq_idx.is_floating_point() or seq_idx.is_complex():
            raise MambaKitError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias),
                    ("initial_state", initial_state), ("seq_idx", seq_idx)):
        if t is not None and t.device != u.device:
            raise MambaKitError(f"{name} must be on the same device as u ({u.device}), got {t.device}")



def prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """delta (batch, dim, seqlen) processed as every form does (`mambakit.ops.dt.process_dt`, bias over dim)."""
    return process_dt(delta, delta_bias, delta_softplus, dtype=dtype, channel_dim=1)


def finish_output(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """y (batch, dim, seqlen) + D * u, times silu(z) where given; returned in u's dtype."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def grouped(t: Tensor) -> Tensor:
    """(batch, d_state, seqlen) -> (batch, 1, d_state, seqlen); grouped input unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _groups(t: Tensor, dim: int) -> int:
    """How many groups of channels share one B/C row: 1 (batch, d_state, seqlen), groups (batch, groups, d_state,
    seqlen), dim for time-invariant (dim, d_state) (one row per channel)."""
    if t.dim() == 2:
        return dim
    return t.shape[1] if t.dim() == 4 else 1


def _with_groups(t: Tensor, groups: int, batch: int, dim: int, seqlen: int) -> Tensor:
    """B or C (any checked layout) as (batch, groups, d_state, seqlen); `groups` a multiple of its own group count.
    Views where possible (time-invariant and single-group rows are expanded with stride 0), else a repeat."""
    if t.dim() == 2:  # (dim, d_state): groups == dim
        return t[None, :, :, None].expand(batch, dim, t.shape[1], seqlen)
    t = grouped(t)
    own = t.shape[1]
    if own == groups:
        return t
    if own == 1:
        return t.expand(-1, groups, -1, -1)
    return t.repeat_interleave(groups // own, dim=1)


def grouped_pair(B: Tensor, C: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """B and C (checked, each in any layout) in one grouped layout (batch, G, d_state, seqlen), G the least common
    multiple of their group counts (a divisor of dim; dim when either is time-invariant), as the official reference
    reads mixed forms: a (batch, g, d_state, seqlen) row serves dim / g consecutive channels, a (dim, d_state) row one
    channel at every step. Matching layouts pass unchanged but for the group axis."""
    batch, dim, seqlen = u.shape
    groups = math.lcm(_groups(B, dim), _groups(C, dim))
    return (_with_groups(B, groups, batch, dim, seqlen), _with_groups(C, groups, batch, dim, seqlen))
