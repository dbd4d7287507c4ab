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

# Largest |sum of delta*A| over one chunk that the chunked CPU scan accepts. Its factors are exponentials of at most
# half of this (about e^60 = 1e26), far from fp32 overflow; a chunk with a larger decay range is cut smaller.
_MAX_CHUNK_LOG_DECAY = 120.0
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
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    heads_per_group = dim // Bg.shape[1]
    Bd = Bg.repeat_interleave(heads_per_group, dim=1)  # (batch, dim, d_state, seqlen)
    Cd = Cg.repeat_interleave(heads_per_group, dim=1)
    A = A.to(dtype)
    uf = u.to(dtype)
    h = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    if initial_state is not None:
        h = initial_state.to(dtype)
    reset = _reset_mask(seq_idx) if seq_idx is not None else None
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, :, t, None] * A)
        if reset is not None:
            decay = decay * (~reset[:, t]).to(dtype)[:, None, None]
        h = decay * h + (delta[:, :, t] * uf[:, :, t])[:, :, None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = _finish_output(torch.stack(ys, dim=-1), u, D, z)
    return (y, h) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------------------
# Chunked CPU fast path
# ----------------------------------------------------------------------------------------------------------------------
# Within a chunk of T steps, with sigma_t = A * cumsum(delta)_t (the log of the decay since the chunk start) and a
# per-element reference r = sigma_T / 2:
#     h_t = e^{sigma_t - r} * (e^{r} * H_prev + sum_{s<=t} e^{r - sigma_s} x_s),       x_s = delta_s u_s B_s
# so the recurrence becomes one cumulative sum, with every exponent bounded by |sigma_T| / 2. The adjoint runs
# backwards the same way:  lambda_t = e^{r - sigma_t} * (e^{r} G_next + sum_{s>=t} e^{sigma_s - r} C_s gy_s).
# Only the chunk-boundary states are kept for the backward; everything inside a chunk is recomputed.


def _pick_chunk_size(delta: Tensor, A: Tensor, preferred: int) -> int:
    """Largest power-of-two chunk <= preferred whose worst decay range stays below the overflow-safe bound (0 if none)."""
    batch, dim, seqlen = delta.shape
    a_max = A.abs().amax(dim=1)  # (dim,)
    T = preferred
    while T >= 2:
        pad = (-seqlen) % T
        sums = F.pad(delta, (0, pad)).view(batch, dim, -1, T).sum(-1)  # (batch, dim, nchunks)
        if float((sums * a_max[:, None]).amax()) <= _MAX_CHUNK_LOG_DECAY:
            return T
        T //= 2
    return 0


def _segment_starts(reset: Tensor) -> Tensor:
    """reset: (batch, T) bool -> (batch, T) long: index of the first position of each position's segment."""
    T = reset.shape[-1]
    pos = torch.arange(T, device=reset.device).expand_as(reset)
    starts = torch.where(reset, pos, torch.zeros_like(pos))
    return torch.cummax(starts, dim=-1).values


def _segment_ends(reset: Tensor) -> Tensor:
    """reset: (batch, T) bool -> (batch, T) long: index of the last position of each position's segment."""
    T = reset.shape[-1]
    nxt = torch.zeros_like(reset)
    nxt[:, :-1] = reset[:, 1:]
    pos = torch.arange(T, device=reset.device).expand_as(reset)
    ends = torch.where(nxt, pos, torch.full_like(pos, T - 1))
    return torch.flip(torch.cummin(torch.flip(ends, (-1,)), dim=-1).values, (-1,))


def _segmented_cumsum(x: Tensor, starts: Optional[Tensor]) -> Tensor:
    """Cumulative sum over the last dim of x (batch, G, Dg, N, T), restarted at segment starts (batch, T)."""
    out = torch.cumsum(x, dim=-1)
    if starts is None:
        return out
    shifted = F.pad(out, (1, 0))[..., :-1]  # shifted[t] = out[t-1], 0 at t = 0
    idx = starts[:, None, None, None, :].expand_as(out)
    return out - torch.gather(shifted, -1, idx)


def _segmented_revcumsum(x: Tensor, ends: Optional[Tensor]) -> Tensor:
    """Reverse cumulative sum over the last dim (sum over s >= t), restarted at segment ends (batch, T)."""
    out = torch.flip(torch.cumsum(torch.flip(x, (-1,)), dim=-1), (-1,))
    if ends is None:
        return out
    shifted = F.pad(out, (0, 1))[..., 1:]  # shifted[t] = out[t+1], 0 at t = T-1
    idx = ends[:, None, None, None, :].expand_as(out)
    return out - torch.gather(shifted, -1, idx)


class _ChunkGeometry:
    """Per-chunk decay factors shared by the forward and the backward recomputation.

    Shapes use G groups of Dg channels: delta (batch, G, Dg, 1, T), A (1, G, Dg, N, 1).
    e_in = e^{r - sigma_t} (batch, G, Dg, N, T) and e_r = e^{r} (batch, G, Dg, N), with r = sigma_T / 2.
    """

    def __init__(self, delta: Tensor, A: Tensor):
        dcum = torch.cumsum(delta, dim=-1)  # (batch, G, Dg, 1, T)
        half_total = 0.5 * dcum[..., -1:]
        self.e_in = torch.exp_(A * (half_total - dcum))  # r - sigma_t = A * (dcum_T / 2 - dcum_t)
        self.e_r = torch.exp(A * half_total)[..., 0]


def _chunk_states_forward(delta_c, u_c, B_c, A, H_prev, reset_c):
    """The states h (batch, G, Dg, N, T) of one chunk, from the state H_prev (batch, G, Dg, N) before it."""
    geo = _ChunkGeometry(delta_c, A)
    z = geo.e_in * (delta_c * u_c)
    z *= B_c  # e^{r - sigma_s} x_s
    carry = geo.e_r * H_prev
    if reset_c is not None:  # no carry when a new sequence starts right at the chunk start
        carry = carry * (~reset_c[:, 0]).to(carry.dtype)[:, None, None, None]
    z[..., 0] += carry  # folded into the first term: later segments subtract it with their prefix
    starts = _segment_starts(reset_c) if reset_c is not None else None
    h = _segmented_cumsum(z, starts)
    h /= geo.e_in
    return h, geo


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Core scan y_t = <C_t, h_t> without D/z/bias (those are cheap elementwise ops done by autograd outside)."""

    @staticmethod
    @autocast_off
    def forward(ctx, u, delta, A, B, C, h0, reset, chunk):
        # u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L); h0: (batch, dim, N); reset: (batch, L) or None
        batch, dim, L = u.shape
        G, N = B.shape[1], B.shape[2]
        Dg = dim // G
        A5 = A.view(1, G, Dg, N, 1)
        H = h0.view(batch, G, Dg, N)
        y = torch.empty(batch, G, Dg, L, dtype=u.dtype, device=u.device)
        bounds = list(range(0, L, chunk))
        saved_states = torch.empty(len(bounds), batch, G, Dg, N, dtype=u.dtype, device=u.device)
        u5 = u.view(batch, G, Dg, 1, L)
        d5 = delta.view(batch, G, Dg, 1, L)
        B5 = B.view(batch, G, 1, N, L)
        C5 = C.view(batch, G, 1, N, L)
        for k, s in enumerate(bounds):
            e = min(s + chunk, L)
            saved_states[k] = H
            reset_c = reset[:, s:e] if reset is not None else None
            h, _ = _chunk_states_forward(d5[..., s:e], u5[..., s:e], B5[..., s:e], A5, H, reset_c)
            y[..., s:e] = (h * C5[..., s:e]).sum(3)
            H = h[..., -1]
        ctx.save_for_backward(u, delta, A, B, C, saved_states, reset)
        ctx.chunk = chunk
        return y.view(batch, dim, L), H.reshape(batch, dim, N).clone()

    @staticmethod
    @autocast_off
    def backward(ctx, gy, g_last):
        u, delta, A, B, C, saved_states, reset = ctx.saved_tensors
        chunk = ctx.chunk
        batch, dim, L = u.shape
        G, N = B.shape[1], B.shape[2]
        Dg = dim // G
        A5 = A.view(1, G, Dg, N, 1)
        u5 = u.view(batch, G, Dg, 1, L)
        d5 = delta.view(batch, G, Dg, 1, L)
        B5 = B.view(batch, G, 1, N, L)
        C5 = C.view(batch, G, 1, N, L)
        gy5 = (gy if gy is not None else torch.zeros_like(u)).view(batch, G, Dg, 1, L)
        g_u = torch.empty_like(u5)
        g_delta = torch.empty_like(d5)
        g_A = torch.zeros_like(A5[0, ..., 0])  # (G, Dg, N)
        g_B = torch.empty_like(B5)
        g_C = torch.empty_like(C5)
        # adjoint flowing into the last state of the current chunk from the future
        Gnext = (g_last if g_last is not None else torch.zeros(batch, dim, N, dtype=u.dtype, device=u.device))
        Gnext = Gnext.reshape(batch, G, Dg, N)
        bounds = list(range(0, L, chunk))
        for k in reversed(range(len(bounds))):
            s = bounds[k]
            e = min(s + chunk, L)
            reset_c = reset[:, s:e] if reset is not None else None
            d_c, u_c, B_c, C_c, gy_c = d5[..., s:e], u5[..., s:e], B5[..., s:e], C5[..., s:e], gy5[..., s:e]
            h, geo = _chunk_states_forward(d_c, u_c, B_c, A5, saved_states[k], reset_c)
            # adjoint lambda_t = dLoss/dh_t by a reverse cumulative sum, the carry folded into the last term
            lam = C_c * gy_c
            lam /= geo.e_in
            lam[..., -1] += geo.e_r * Gnext
            lam = _segmented_revcumsum(lam, _segment_ends(reset_c) if reset_c is not None else None)
            lam *= geo.e_in
            g_C[..., s:e] = (gy_c * h).sum(2, keepdim=True)
            lamB = (lam * B_c).sum(3, keepdim=True)  # (batch, G, Dg, 1, T)
            g_u[..., s:e] = lamB * d_c
            du = d_c * u_c
            g_B[..., s:e] = (lam * du).sum(2, keepdim=True)
            # w = dLoss/d(log decay_t) = lambda_t * (h_t - x_t), per state element
            w = h.sub_(du * B_c).mul_(lam)
            g_delta[..., s:e] = lamB * u_c + (w * A5).sum(3, keepdim=True)
            g_A += (w * d_c).sum((0, 4))
            # adjoint into the state before this chunk: through the first step's decay (zero across a reset)
            first = lam[..., 0] * torch.exp(A5[..., 0] * d_c[..., 0])
            if reset_c is not None:
                first = first * (~reset_c[:, 0]).to(first.dtype)[:, None, None, None]
            Gnext = first
        return (g_u.view(batch, dim, L), g_delta.view(batch, dim, L), g_A.view(dim, N), g_B.view(batch, G, N, L),
                g_C.view(batch, G, N, L), Gnext.reshape(batch, dim, N), None, None)


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
    dtype = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    delta_p = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    A_c = A.to(dtype)
    chunk = _pick_chunk_size(delta_p.detach(), A_c.detach(), chunk_size)
    if chunk == 0:  # a single step decays by more than e^-120: the loop handles it exactly
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, seq_idx)
    Bg = _grouped(B).to(dtype).contiguous()
    Cg = _grouped(C).to(dtype).contiguous()
    if initial_state is None:
        h0 = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    else:
        h0 = initial_state.to(dtype)
    reset = _reset_mask(seq_idx) if seq_idx is not None else None
    y, last = _ChunkedSelectiveScan.apply(u.to(dtype).contiguous(), delta_p.contiguous(), A_c.contiguous(), Bg, Cg,
                                          h0.contiguous(), reset, chunk)
    y = _finish_output(y, u, D, z)
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
