"""`mamba_ssm.ops.triton.ssd_chunk_scan`: the SSD output of each chunk from its own positions and the state entering
it (`chunk_scan`, `chunk_scan_ref`), in PyTorch on any device; layouts as in `ssd_chunk_state`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.compat.mamba_ssm.ops.triton.ssd_chunk_state import check_chunked, to_chunks
from mambakit.errors import MambaKitError
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
    return y.to(x.dtype)


def chunk_scan_ref(B: Tensor, C: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, prev_states: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None) -> Tensor:
    """The official reference's signature: the same computation as `chunk_scan`."""
    return chunk_scan(B, C, x, dt, dA_cumsum, prev_states, D=D, z=z)
