"""The selective scan's chunked PyTorch path (the CPU fast path; runs on any device), with its own backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.autocast import autocast_off
from mambakit.ops.segments import sequence_starts
from mambakit.ops.selective_scan.common import (
    check_selective_scan_inputs, compute_dtype, finish_output, grouped_pair, prepare_delta,
)

DEFAULT_CHUNK = 64


# elementwise work (decays exp(delta*A), inputs delta*u*B, read-out with C, every gradient term) runs as a few
# vectorised ops over the chunk; the recurrence itself is one fused multiply-add per step (h_t = a_t h_{t-1} + x_t),
# and the adjoint one per step backwards (lambda_t = C_t gy_t + a_{t+1} lambda_{t+1}). Decays are products of
# factors <= 1, so nothing can overflow. Resets (seq_idx) zero the decay where a new sequence starts. Only the
# states at chunk boundaries are kept for the backward, which recomputes the rest chunk by chunk.


def _chunk_decays(delta_c: Tensor, A: Tensor, keep_c: Optional[Tensor]) -> Tensor:
    """a_t = exp(delta_t * A), zeroed where a new sequence starts. delta_c (T, b, G, Dg, 1) -> (T, b, G, Dg, N)."""
    dA = torch.exp_(delta_c * A)
    if keep_c is not None:
        dA *= keep_c[:, :, None, None, None]
    return dA


def _chunk_states(dA: Tensor, du_c: Tensor, B_c: Tensor, H_prev: Tensor) -> Tensor:
    """States of one chunk: buf (T + 1, b, G, Dg, N) with buf[0] = H_prev and buf[t + 1] = h_t."""
    T = dA.shape[0]
    buf = torch.empty((T + 1,) + dA.shape[1:], dtype=dA.dtype, device=dA.device)
    buf[0] = H_prev
    torch.mul(du_c, B_c, out=buf[1:])  # x_t = delta_t u_t B_t
    for t in range(T):
        torch.addcmul(buf[t + 1], dA[t], buf[t], out=buf[t + 1])
    return buf


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Core scan y_t = <C_t, h_t> without D/z/bias (those are cheap elementwise ops done by autograd outside).

    Time-major inputs: u, delta (L, b, dim); A (dim, N); B, C (L, b, G, N); h0 (b, dim, N); keep (L, b) or None.
    Returns y (L, b, dim) and the last state (b, dim, N).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, u, delta, A, B, C, h0, keep, chunk):
        L, batch, dim = u.shape
        G, N = B.shape[2], B.shape[3]
        Dg = dim // G
        A5 = A.view(G, Dg, N)
        d5 = delta.view(L, batch, G, Dg, 1)
        du5 = (delta * u).view(L, batch, G, Dg, 1)
        B5 = B.view(L, batch, G, 1, N)
        C5 = C.view(L, batch, G, 1, N)
        y = torch.empty(L, batch, G, Dg, dtype=u.dtype, device=u.device)
        bounds = list(range(0, L, chunk))
        saved_states = torch.empty((len(bounds), batch, G, Dg, N), dtype=u.dtype, device=u.device)
        H = h0.view(batch, G, Dg, N)
        for k, s in enumerate(bounds):
            e = min(s + chunk, L)
            saved_states[k] = H
            dA = _chunk_decays(d5[s:e], A5, keep[s:e] if keep is not None else None)
            buf = _chunk_states(dA, du5[s:e], B5[s:e], H)
            torch.sum(buf[1:] * C5[s:e], dim=-1, out=y[s:e])
            H = buf[-1]
        ctx.save_for_backward(u, delta, A, B, C, saved_states, keep)
        ctx.chunk = chunk
        return y.view(L, batch, dim), H.reshape(batch, dim, N).clone()

    @staticmethod
    @autocast_off
    def backward(ctx, gy, g_last):
        u, delta, A, B, C, saved_states, keep = ctx.saved_tensors
        chunk = ctx.chunk
        L, batch, dim = u.shape
        G, N = B.shape[2], B.shape[3]
        Dg = dim // G
        A5 = A.view(G, Dg, N)
        u5 = u.view(L, batch, G, Dg, 1)
        d5 = delta.view(L, batch, G, Dg, 1)
        du5 = (delta * u).view(L, batch, G, Dg, 1)
        B5 = B.view(L, batch, G, 1, N)
        C5 = C.view(L, batch, G, 1, N)
        gy5 = (gy if gy is not None else torch.zeros_like(u)).view(L, batch, G, Dg, 1)
        g_u = torch.empty_like(u5)
        g_delta = torch.empty_like(d5)
        g_B = torch.empty_like(B5)
        g_C = torch.empty_like(C5)
        g_A = torch.zeros_like(A5)
        # adjoint of the last state of the current chunk coming from the future (or from the returned last state)
        G_next = (g_last if g_last is not None else torch.zeros(batch, dim, N, dtype=u.dtype, device=u.device))
        G_next = G_next.reshape(batch, G, Dg, N)
        bounds = list(range(0, L, chunk))
        for k in reversed(range(len(bounds))):
            s = bounds[k]
            e = min(s + chunk, L)
            T = e - s
            dA = _chunk_decays(d5[s:e], A5, keep[s:e] if keep is not None else None)
            buf = _chunk_states(dA, du5[s:e], B5[s:e], saved_states[k])
            h, h_prev = buf[1:], buf[:-1]
            lam = C5[s:e] * gy5[s:e]  # lambda_t = dLoss/dh_t, built backwards in place
            lam[-1] += G_next
            for t in range(T - 2, -1, -1):
                torch.addcmul(lam[t], dA[t + 1], lam[t + 1], out=lam[t])
            g_C[s:e] = (h * gy5[s:e]).sum(3, keepdim=True)
            lamB = (lam * B5[s:e]).sum(-1, keepdim=True)  # (T, b, G, Dg, 1)
            g_u[s:e] = lamB * d5[s:e]
            g_B[s:e] = (lam * du5[s:e]).sum(3, keepdim=True)
            G_next = dA[0] * lam[0]  # into the state before the chunk (zero across a reset)
            w = dA.mul_(h_prev).mul_(lam)  # dLoss/d(log a_t) = lambda_t a_t h_{t-1}
            g_delta[s:e] = lamB * u5[s:e] + (w * A5).sum(-1, keepdim=True)
            g_A += (w * d5[s:e]).sum((0, 1))
        return (g_u.view(L, batch, dim), g_delta.view(L, batch, dim), g_A.view(dim, N), g_B.view(L, batch, G, N),
                g_C.view(L, batch, G, N), G_next.reshape(batch, dim, N), None, None)


def selective_scan_chunked(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None, chunk_size: int = DEFAULT_CHUNK,
):
    """Chunked PyTorch selective scan (CPU fast path; also runs on any device). Same contract as `selective_scan_ref`.

    Memory beyond the inputs is O(batch * dim * d_state * (seqlen / chunk_size + chunk_size)): only the states at chunk
    boundaries are kept for the backward pass, which recomputes the rest chunk by chunk.
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise MambaKitError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    dtype = compute_dtype(u)
    batch, dim, seqlen = u.shape
    delta_p = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    # time-major copies: one row per time step
    u_t = u.to(dtype).permute(2, 0, 1).contiguous()
    d_t = delta_p.permute(2, 0, 1).contiguous()
    B_t, C_t = (t.to(dtype).permute(3, 0, 1, 2).contiguous() for t in grouped_pair(B, C, u))
    if initial_state is None:
        h0 = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    else:
        h0 = initial_state.to(dtype).contiguous()
    keep = (~sequence_starts(seq_idx)).to(dtype).t().contiguous() if seq_idx is not None else None  # (seqlen, batch)
    y, last = _ChunkedSelectiveScan.apply(u_t, d_t, A.to(dtype).contiguous(), B_t, C_t, h0, keep, chunk_size)
    y = finish_output(y.permute(1, 2, 0), u, D, z)
    return (y, last) if return_last_state else y
