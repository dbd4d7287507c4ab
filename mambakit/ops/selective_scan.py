"""Selective scan (the S6 recurrence of Mamba-1): reference loop, chunked CPU fast path, dispatch.

Layout follows the official `mamba_ssm.selective_scan_fn`:
    u, delta, z: (batch, dim, seqlen)
    A:           (dim, d_state), real and negative
    B, C:        (batch, d_state, seqlen) or grouped (batch, groups, d_state, seqlen)
    D, delta_bias: (dim,)
    initial_state / last state: (batch, dim, d_state)
    seq_idx:     (batch, seqlen) integer; the state is reset wherever it changes (packed sequences)

Per step t:  delta = softplus(delta + bias) if asked
             h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
             y_t = <C_t, h_t> + D * u_t,   y_t *= silu(z_t) if z is given
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.autocast import autocast_off

_DEFAULT_CHUNK = 64


# ----------------------------------------------------------------------------------------------------------------------
# Input checking and the shared pre/post-processing (delta bias + softplus, D skip, z gate)
# ----------------------------------------------------------------------------------------------------------------------
def _shape_error(name: str, expected: str, got: Tensor) -> MambaKitError:
    return MambaKitError(f"{name} must have shape {expected}, got {tuple(got.shape)}")


def check_selective_scan_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], initial_state: Optional[Tensor], seq_idx: Optional[Tensor],
) -> None:
    """Validate shapes, dtypes and devices once at the public boundary; raise MambaKitError naming the argument."""
    if u.dim() != 3:
        raise _shape_error("u", "(batch, dim, seqlen)", u)
    batch, dim, seqlen = u.shape
    if not u.is_floating_point():
        raise MambaKitError(f"u must be a floating-point tensor, got dtype {u.dtype}")
    if seqlen == 0:
        raise MambaKitError("u must have seqlen >= 1, got 0")
    if delta.shape != u.shape:
        raise _shape_error("delta", f"(batch={batch}, dim={dim}, seqlen={seqlen}) like u", delta)
    if A.shape[:1] != (dim,) or A.dim() != 2:
        raise _shape_error("A", f"(dim={dim}, d_state)", A)
    if A.is_complex():
        raise MambaKitError("A must be real (complex A is not supported), got a complex tensor")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape == (batch, d_state, seqlen)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (d_state, seqlen) and t.shape[1] >= 1 and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise _shape_error(
                name, f"(batch={batch}, d_state={d_state}, seqlen={seqlen}) or (batch, groups, d_state, seqlen) "
                f"with groups dividing dim={dim}", t)
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise MambaKitError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise _shape_error(name, f"(dim={dim},)", t)
    if z is not None and z.shape != u.shape:
        raise _shape_error("z", f"(batch={batch}, dim={dim}, seqlen={seqlen}) like u", z)
    if initial_state is not None and initial_state.shape != (batch, dim, d_state):
        raise _shape_error("initial_state", f"(batch={batch}, dim={dim}, d_state={d_state})", initial_state)
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise _shape_error("seq_idx", f"(batch={batch}, seqlen={seqlen})", seq_idx)
        if seq_idx.is_floating_point() or seq_idx.is_complex():
            raise MambaKitError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias),
                    ("initial_state", initial_state), ("seq_idx", seq_idx)):
        if t is not None and t.device != u.device:
            raise MambaKitError(f"{name} must be on the same device as u ({u.device}), got {t.device}")


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish_output(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def _grouped(t: Tensor) -> Tensor:
    """(batch, d_state, seqlen) -> (batch, 1, d_state, seqlen); grouped input unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _reset_mask(seq_idx: Tensor) -> Tensor:
    """(batch, seqlen) bool, True where a new sequence starts (never at t = 0: the initial state applies there)."""
    reset = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset


# ----------------------------------------------------------------------------------------------------------------------
# Reference: the plain sequential recurrence
# ----------------------------------------------------------------------------------------------------------------------
def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
):
    """The definition every fast path is tested against: a Python loop over time (differentiable by autograd).

    Returns y: (batch, dim, seqlen) in u's dtype, and with `return_last_state` also the state after the last step,
    (batch, dim, d_state) in float32 (float64 for float64 inputs).
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    dtype = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)  # (batch, groups, d_state, seqlen)
    heads_per_group = dim // Bg.shape[1]
    A = A.to(dtype)
    h = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    if initial_state is not None:
        h = initial_state.to(dtype)
    keep = (~_reset_mask(seq_idx)).to(dtype).unbind(-1) if seq_idx is not None else None
    # per-step slices via unbind: their backward stacks small gradients instead of scattering into full tensors
    steps = zip(delta.unbind(-1), u.to(dtype).unbind(-1), Bg.unbind(-1), Cg.unbind(-1))
    ys = []
    for t, (delta_t, u_t, B_t, C_t) in enumerate(steps):
        decay = torch.exp(delta_t[:, :, None] * A)  # (batch, dim, d_state)
        if keep is not None:
            decay = decay * keep[t][:, None, None]
        B_t = B_t.repeat_interleave(heads_per_group, dim=1)  # (batch, dim, d_state)
        C_t = C_t.repeat_interleave(heads_per_group, dim=1)
        h = decay * h + (delta_t * u_t)[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = _finish_output(torch.stack(ys, dim=-1), u, D, z)
    return (y, h) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------------------
# Chunked CPU fast path
# ----------------------------------------------------------------------------------------------------------------------
# Time-major layout: rows are time steps, each row the whole (batch, G, Dg, N) state. Per chunk of T steps, the
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
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None, chunk_size: int = _DEFAULT_CHUNK,
):
    """Chunked PyTorch selective scan (CPU fast path; also runs on any device). Same contract as `selective_scan_ref`.

    Memory beyond the inputs is O(batch * dim * d_state * (seqlen / chunk_size + chunk_size)): only the states at chunk
    boundaries are kept for the backward pass, which recomputes the rest chunk by chunk.
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise MambaKitError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    dtype = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    delta_p = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    # time-major copies: one row per time step
    u_t = u.to(dtype).permute(2, 0, 1).contiguous()
    d_t = delta_p.permute(2, 0, 1).contiguous()
    B_t = _grouped(B).to(dtype).permute(3, 0, 1, 2).contiguous()
    C_t = _grouped(C).to(dtype).permute(3, 0, 1, 2).contiguous()
    if initial_state is None:
        h0 = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    else:
        h0 = initial_state.to(dtype).contiguous()
    keep = (~_reset_mask(seq_idx)).to(dtype).t().contiguous() if seq_idx is not None else None  # (seqlen, batch)
    y, last = _ChunkedSelectiveScan.apply(u_t, d_t, A.to(dtype).contiguous(), B_t, C_t, h0, keep, chunk_size)
    y = _finish_output(y.permute(1, 2, 0), u, D, z)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "triton", "ref")


def selective_scan_fn(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, return_last_state: bool = False,
    initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None, backend: str = "auto",
):
    """Selective scan with the official `mamba_ssm` signature (plus initial_state, seq_idx and backend).

    backend: "auto" (Triton kernels for CUDA tensors when available, else the chunked PyTorch path), "torch" (chunked
    PyTorch), "triton" or "ref" (the sequential loop). Returns y (batch, dim, seqlen), or (y, last_state) with
    `return_last_state=True`.
    """
    if backend not in BACKENDS:
        raise MambaKitError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if (u.is_cuda and _triton_available()) else "torch"
    if backend == "triton":
        from mambakit.ops.triton.selective_scan import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state, seq_idx)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, seq_idx)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, seq_idx)


def _triton_available() -> bool:
    try:
        import mambakit.ops.triton.selective_scan  # noqa: F401
    except ImportError:
        return False
    return True





# ----------------------------------------------------------------------------------------------------------------------
# One-token decode step
# ----------------------------------------------------------------------------------------------------------------------
def selective_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
) -> Tensor:
    """One step of the recurrence for decoding, updating `state` in place (official `selective_state_update`).

    state: (batch, dim, d_state); x, dt, z: (batch, dim); A: (dim, d_state); B, C: (batch, d_state) or
    (batch, groups, d_state); D, dt_bias: (dim,). Returns y: (batch, dim) in x's dtype.
    """
    if state.is_cuda and _triton_available():
        from mambakit.ops.triton.state_update import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and t.shape != (batch, dim):
            raise _shape_error(name, f"(batch={batch}, dim={dim})", t)
    if A.shape != (dim, d_state):
        raise _shape_error("A", f"(dim={dim}, d_state={d_state})", A)
    dtype = state.dtype
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    if Bg.shape[0] != batch or Bg.shape[2] != d_state or dim % Bg.shape[1] != 0 or Cg.shape != Bg.shape:
        raise _shape_error("B", f"(batch={batch}, d_state={d_state}) or (batch, groups, d_state), C alike", B)
    reps = dim // Bg.shape[1]
    Bd = Bg.to(dtype).repeat_interleave(reps, dim=1)  # (batch, dim, d_state)
    Cd = Cg.to(dtype).repeat_interleave(reps, dim=1)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.to(dtype)
    state.mul_(torch.exp(dt[..., None] * A.to(dtype))).add_((dt * xf)[..., None] * Bd)
    y = (state * Cd).sum(-1)
    if D is not None:
        y = y + xf * D.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
