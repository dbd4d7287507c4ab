"""`mamba_ssm.ops.triton.ssd_chunk_scan`: the SSD output of each chunk from its own positions and the state entering
it (`chunk_scan`, `chunk_scan_ref`), in PyTorch on any device; layouts as in `ssd_chunk_state`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.compat.mamba_ssm.ops.triton.ssd_chunk_state import check_chunked, to_chunks
from mambakit.errors import MambaKitError
from mambakit.ops.causal import nan_where, not_finite
from mambakit.ops.checks import require_tensors
from mambakit.ops.dt import compute_dtype
from mambakit.ops.ssd.common import add_skip

__all__ = ["chunk_scan", "chunk_scan_ref"]


def chunk_scan(B: Tensor, C: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, prev_states: Tensor,
               D: Optional[Tensor] = None, z: Optional[Tensor] = None) -> Tensor:
    """Official signature: B, C (batch, seqlen, ngroups, dstate); x (batch, seqlen, nheads, headdim); dt, dA_cumsum
    (batch, nheads, nchunks, chunk_size); prev_states (batch, nchunks, nheads, headdim, dstate), the state entering
    each chunk; D (nheads,) or (nheads, headdim); z (batch, seqlen, nheads, headdim). Position l of chunk c:
    y_l = sum_{s <= l in c} exp(dA_cumsum[l] - dA_cumsum[s]) dt_s (C_l . B_s) x_s
    + exp(dA_cumsum[l]) prev_states[c] C_l, then + D x_l, then * silu(z_l). Returns out (batch, seqlen, nheads,
    headdim) in x's dtype, computed in float32 (float64 for float64 inputs); seqlen may stop inside the last chunk
    (the official needs seqlen = nchunks * chunk_size). Differentiable by autograd in every tensor."""
    dims = check_chunked(B, x, dt, dA_cumsum, C=C)
    require_tensors(prev_states=prev_states, D=D, z=z)
    want = (dims.batch, dims.nchunks, dims.nheads, dims.headdim, dims.dstate)
    if tuple(prev_states.shape) != want:
        raise MambaKitError(f"prev_states must have shape (batch, nchunks, nheads, headdim, dstate) = {want}, got "
                            f"{tuple(prev_states.shape)}")
    if z is not None and z.shape != x.shape:
        raise MambaKitError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if D is not None and tuple(D.shape) not in ((dims.nheads,), (dims.nheads, dims.headdim)):
        raise MambaKitError(f"D must have shape (nheads,) or (nheads, headdim) = ({dims.nheads}, {dims.headdim}), "
                            f"got {tuple(D.shape)}")
    fp = compute_dtype(B, C, x, dt, dA_cumsum, prev_states)
    x_in = x
    x, dt, B, dA_cumsum, poison = _guard(x, dt, B, dA_cumsum, dims)
    Bc, Cc = to_chunks(B, dims, fp, heads=True), to_chunks(C, dims, fp, heads=True)  # (b, c, l, h, n)
    dA = dA_cumsum.to(fp)
    causal = torch.ones(dims.chunk_size, dims.chunk_size, dtype=torch.bool, device=x.device).tril()
    # masked before exp: the differences above the diagonal are positive and may overflow
    decay = (dA[..., :, None] - dA[..., None, :]).masked_fill(~causal, -torch.inf).exp()  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay * dt.to(fp)[..., None, :]
    y = torch.einsum("bhcls,bcshp->bclhp", scores, to_chunks(x, dims, fp))
    y = y + torch.einsum("bclhn,bchpn->bclhp", Cc, prev_states.to(fp)) * dA.exp().permute(0, 2, 3, 1)[..., None]
    y = add_skip(y.flatten(1, 2)[:, :dims.seqlen], x.to(fp), None if D is None else D.to(fp))
    if z is not None:
        y = y * F.silu(z.to(fp))
    return (y if poison is None else nan_where(poison[..., None], y)).to(x_in.dtype)


def _by_position(t: Tensor, dims) -> Tensor:
    """(batch, nheads, nchunks, chunk_size) -> (batch, seqlen, nheads)."""
    return t.permute(0, 2, 3, 1).flatten(1, 2)[:, :dims.seqlen]


def _by_chunk(t: Tensor, dims) -> Tensor:
    """(batch, seqlen, ...) -> (batch, nchunks, chunk_size, ...), padded past seqlen."""
    pad = [0, 0] * (t.dim() - 2) + [0, dims.nchunks * dims.chunk_size - dims.seqlen]
    return F.pad(t, pad).unflatten(1, (dims.nchunks, dims.chunk_size))


def _guard(x: Tensor, dt: Tensor, B: Tensor, dA_cumsum: Tensor, dims):
    """Keep non-finite values causal, as the recurrence and the official kernel do (the products over a chunk's
    positions would spread 0 * nan to its earlier outputs): the non-finite x * dt, B and dA_cumsum entries are
    zeroed, and poison (batch, seqlen, nheads) marks each chunk's positions from its first such entry on (None when
    everything is finite)."""
    bad_xdt = not_finite(x * _by_position(dt, dims)[..., None], (3,))
    bad_B = not_finite(B, (3,))
    bad = bad_xdt | not_finite(_by_position(dA_cumsum, dims)) \
        | bad_B.repeat_interleave(dims.nheads // dims.ngroups, dim=2)
    if not bool(bad.any()):
        return x, dt, B, dA_cumsum, None
    poison = _by_chunk(bad.to(torch.int32), dims).cummax(dim=2).values.bool().flatten(1, 2)[:, :dims.seqlen]
    dt = dt.masked_fill(_by_chunk(bad_xdt, dims).permute(0, 3, 1, 2), 0.0)
    dA_cumsum = torch.where(torch.isfinite(dA_cumsum), dA_cumsum, torch.zeros_like(dA_cumsum))
    return x.masked_fill(bad_xdt[..., None], 0.0), dt, B.masked_fill(bad_B[..., None], 0.0), dA_cumsum, poison


def chunk_scan_ref(B: Tensor, C: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, prev_states: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None) -> Tensor:
    """The official reference's signature: the same computation as `chunk_scan`."""
    return chunk_scan(B, C, x, dt, dA_cumsum, prev_states, D=D, z=z)
