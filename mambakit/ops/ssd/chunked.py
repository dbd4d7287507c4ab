"""SSD's chunked (block) decomposition in PyTorch, linear in seqlen, with a hand-written backward."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mambakit.ops.autocast import autocast_off
from mambakit.ops.dt import DEFAULT_DT_LIMIT
from mambakit.ops.segments import segments
from mambakit.ops.ssd.common import SSDOutput, run_form, skip_weight
from mambakit.ops.ssd.validate import Dims

# exp() arguments of the chunk-local decay matrices are floored here: exp(-60) ~ 1e-26 is negligible next to the
# diagonal entries (exactly 1) even in float64, and it keeps exp() out of its very slow underflow/-inf paths on CPU.
_LOG_DECAY_FLOOR = -60.0

# The chunked form processes the (chunk x chunk) blocks of this many chunks at a time, chosen so that one block of
# decay matrices has about this many elements (a few MiB: it stays in cache and memory stays linear in seqlen).
_BLOCK_ELEMENTS = 1 << 20

# Notation: b batch, c chunks, Q chunk_size, h heads = g groups * r heads per group, p headdim, n d_state.
# Per chunk, with acs the within-chunk inclusive cumsum of dt*A and X = dt*x:
#   y      = (L o C B^T) X  +  e o (C S_prev^T)       L[i,j] = exp(acs_i - acs_j) (i >= j), e_i = exp(acs_i)
#   S_next = alpha S_prev + (w o X)^T B              w_l = exp(acs_last - acs_l), alpha = exp(acs_last)
# Internal tensors are chunk-major, (c, b, ...), so that a range of chunks is a contiguous slice. States are kept
# "transposed per group", (b, g, n, r*p): every product with B or C is one matmul per group with the heads of the
# group side by side (B and C are never expanded per head).


class _Chunks(NamedTuple):
    """The chunked layout of one problem (compute dtype), built identically in forward and backward."""

    dims: Dims
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
    dims = Dims(batch, seqlen, nheads, headdim, ngroups, d_state)
    Q = chunk_size
    c = -(-seqlen // Q)
    pad = c * Q - seqlen
    X = _to_chunks(x * dt[..., None], c, Q, pad)
    Bc = _to_chunks(B, c, Q, pad).transpose(2, 3).contiguous()
    Cc = _to_chunks(C, c, Q, pad).transpose(2, 3).contiguous()
    # cumsum in float64: the only rounding left is that of each sum itself
    # A (nheads,), or (b, seqlen, h): the per-position log-decay itself
    log_decay = A.double() if A.dim() == 3 else dt.double() * A.double()
    acs64 = _to_chunks(log_decay, c, Q, pad).cumsum(dim=2)  # (c, b, Q, h)
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


def _states_to_public(S: Tensor, dims: Dims) -> Tensor:
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
    """Core of the chunked form: (x, dt, A, B, C, D, initial_states) -> (y without the gate, final state); A is
    (nheads,) or the per-position log-decay (batch, seqlen, nheads) (then dt only scales the input).

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
            y.addcmul_(x, skip_weight(D))
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
        if A.dim() == 3:  # A is the per-position log-decay: dt only scales the input
            gdt, gA = (gX * x).sum(-1), g_dA
        else:
            gdt = (gX * x).sum(-1) + g_dA * A
            gA = (g_dA * dt).sum((0, 1))
        gx = gX.mul_(dt[..., None])
        gD = None
        if D is not None:
            gx.addcmul_(grad_y, skip_weight(D))
            gD = (grad_y * x).sum((0, 1))  # (nheads, headdim)
            gD = gD.sum(-1) if D.dim() == 1 else gD
        gB = _from_chunks(gB.transpose(2, 3), seqlen)
        gC = _from_chunks(gC.transpose(2, 3), seqlen)
        g_init = _states_to_public(g_init, d) if ctx.has_initial else None
        return gx, gdt, gA, gB, gC, gD, g_init, None, None


def _chunked_core(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size) -> Tuple[Tensor, Tensor]:
    # a chunk longer than the sequence would only add zero padding: (chunk x chunk) blocks of it
    return _ChunkedSSD.apply(x, dt, A, B, C, D, initial_states, segments(seq_idx), min(chunk_size, x.shape[1]))


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
    log_decay: Optional[Tensor] = None,
) -> SSDOutput:
    """SSD by the chunked (block) decomposition; time and memory linear in seqlen.

    The sequence is cut into chunks of ``chunk_size`` (any positive int; the tail chunk is zero-padded). Within a
    chunk the quadratic form via matmuls; the chunk-local states; a recurrence over chunk states only; the state
    contribution read out with C. Gradients reach every input through a hand-written backward.
    ``log_decay`` (batch, seqlen, nheads), with A None: the decay at t is exp(log_decay_t) (differentiable), dt
    only scales the input. Returns y (batch, seqlen, nheads, headdim), and the final state
    (batch, nheads, headdim, d_state) if ``return_final_states``.
    """
    return run_form(_chunked_core, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                     dt_softplus, dt_limit, return_final_states, need_chunk_size=True, log_decay=log_decay)

