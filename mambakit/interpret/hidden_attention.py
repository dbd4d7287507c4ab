"""Hidden attention: a selective SSM block as a data-controlled causal linear operator ``y = alpha x``.

Mamba-1, per batch element and inner channel d (Ali et al., "The Hidden Attention of Mamba Models")::

    alpha_d[i, j] = sum_n C_i[n] * exp(A[d, n] * sum_{k=j+1..i} delta_{k,d}) * delta_{j,d} * B_j[n]     (j <= i)

so that the scan output is ``y_d = alpha_d u_d + D_d u_d`` (u = silu(conv(x)), the scan input).

Mamba-2, per head h, the SSD quadratic form's matrix (taken from :func:`mambakit.ops.ssd.ssd_attention_matrix`)::

    alpha_h[i, j] = (C_i . B_j) * exp(A_h * sum_{k=j+1..i} dt_{k,h}) * dt_{j,h}                       (j <= i)

The full-block form (Zimerman et al., "Explaining Modern Gated-Linear RNNs via a Unified Implicit Attention
Formulation") also folds in the causal depthwise conv (a banded Toeplitz matrix ``M`` per channel), the SiLU of the
conv output as a data-dependent diagonal ``S = diag(sigmoid(conv(x)))`` (silu(v) = sigmoid(v) v) and the output
gate ``G`` (``silu(z)``; for Mamba-2 with the gated RMSNorm also the norm's per-token scale and weight)::

    o = G (alpha + D) S M x  +  G (alpha + D) S b          (b: the conv bias; o: the input of out_proj)

per inner channel, with x the conv input (the x half of in_proj's output). B, C, delta and the diagonals are
evaluated on the given input and then held fixed: the matrices are exact for that input, not a linearisation of
the whole map in x.

All matrices are computed in the scan's compute dtype (float64 for float64 layers, float32 otherwise). Decays come
from differences of a float64 cumulative sum of delta, masked to -inf above the diagonal (and across packed
sequences) BEFORE the exp, so no exp of a positive number is ever taken and large delta*A gives exact zeros, never
NaN. Mamba-1 matrices are built in blocks of rows (and of channels): the diagonal block from the masked differences
directly, the columns left of it as a product of two decays split at the block's first row (both factors <= 1, the
sum over the state then a matmul). A long sequence needs memory for the result and one block only; select channels
(or heads) to shrink the result itself.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.ops.conv1d import causal_conv1d_fn
from mambakit.ops.dt import process_dt
from mambakit.ops.segments import causal_segment_mask, segments
from mambakit.ops.selective_scan import prepare_delta
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_attention_matrix

__all__ = [
    "BlockAttention",
    "block_attention",
    "conv_toeplitz",
    "hidden_attention",
    "mamba1_block_attention",
    "mamba1_hidden_attention",
    "mamba2_block_attention",
    "mamba2_hidden_attention",
    "selective_scan_attention",
]

# Elements of the largest temporary of one (channels x rows) block of the Mamba-1 computation: 4M = 32 MiB in float64.
DEFAULT_BLOCK_ELEMENTS = 1 << 22
# Rows of the Mamba-1 matrices computed at once (the diagonal block is rows x rows x d_state).
DEFAULT_BLOCK_ROWS = 64

Channels = Optional[Union[Sequence[int], Tensor, slice]]


class BlockAttention(NamedTuple):
    """The full-block implicit attention of a Mamba block: ``o[:, c] = matrix[:, c] @ x[:, c] + offset[:, c]``.

    matrix: (batch, channels, seqlen, seqlen); offset: (batch, channels, seqlen) (the conv bias carried through);
    channels: (channels,) the inner-channel indices (into d_inner) the rows belong to.
    """

    matrix: Tensor
    offset: Tensor
    channels: Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def _channel_index(channels: Channels, total: int, what: str, device) -> Tensor:
    """Channels as a long tensor of indices in [0, total) (None: all; negative indices count from the end)."""
    if channels is None:
        return torch.arange(total, device=device)
    if isinstance(channels, slice):
        idx = torch.arange(total, device=device)[channels]
    else:
        idx = torch.as_tensor(channels, device=device)
        if idx.dim() == 0:
            idx = idx[None]
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise MambaKitError(f"{what} must be a 1-D sequence of integer indices, got {channels!r}")
        idx = idx.long()
    if idx.numel() == 0:
        raise MambaKitError(f"{what} must select at least one of the {total} {what}, got none")
    if int(idx.min()) < -total or int(idx.max()) >= total:
        raise MambaKitError(f"{what} indices must lie in [0, {total}), got values in "
                            f"[{int(idx.min())}, {int(idx.max())}]")
    return idx % total


def _check_hidden(layer: nn.Module, hidden_states: Tensor) -> None:
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != layer.d_model:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
        raise MambaKitError(f"hidden_states must have shape (batch, seqlen, d_model={layer.d_model}), got {got}")
    if hidden_states.shape[1] == 0:
        raise MambaKitError("hidden_states must have seqlen >= 1, got 0")


def _keep_mask(seqlen: int, seq_idx: Optional[Tensor], device) -> Tensor:
    """bool (batch or 1, seqlen, seqlen): True where j <= i and i, j lie in the same packed sequence."""
    return causal_segment_mask(seqlen, segments(seq_idx), device)


def _auto_blocks(batch: int, nchannels: int, seqlen: int, d_state: int, block_rows: Optional[int],
                 max_elements: int) -> Tuple[int, int]:
    """(channels per block, rows per block): the diagonal block's temporaries (batch, c, rows, rows, d_state) and
    the block of output rows (batch, c, rows, seqlen) each stay within max_elements."""
    if block_rows is None:
        block_rows = DEFAULT_BLOCK_ROWS
    elif not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise MambaKitError(f"block_rows must be a positive int, got {block_rows!r}")
    block_rows = min(block_rows, seqlen)
    per_channel = batch * block_rows * max(block_rows * d_state, seqlen)
    block_channels = max(1, min(nchannels, max_elements // per_channel))
    return block_channels, block_rows


def conv_toeplitz(weight: Tensor, seqlen: int, seq_idx: Optional[Tensor] = None) -> Tensor:
    """The causal depthwise conv as explicit matrices: ``M[..., c, i, j] = weight[c, j - i + width - 1]`` for
    ``0 <= i - j < width`` (and i, j in the same packed sequence), else 0, so ``conv(x)_c = M_c x_c`` (no bias).

    weight: (channels, width). Returns (channels, seqlen, seqlen), or (batch, channels, seqlen, seqlen) with seq_idx.
    Built by running :func:`mambakit.ops.conv1d.causal_conv1d_fn` on the identity (the conv math is not restated).
    """
    if weight.dim() != 2:
        raise MambaKitError(f"weight must have shape (channels, width), got {tuple(weight.shape)}")
    channels = weight.shape[0]
    eye = torch.eye(seqlen, dtype=weight.dtype, device=weight.device)  # column j = e_j
    if seq_idx is None:
        cols = causal_conv1d_fn(eye.expand(channels, seqlen, seqlen).reshape(1, channels * seqlen, seqlen),
                                weight.repeat_interleave(seqlen, dim=0))  # row (c, j) = M_c e_j as a sequence
        return cols.view(channels, seqlen, seqlen).transpose(-1, -2)
    batch = seq_idx.shape[0]
    out = []
    for b in range(batch):
        cols = causal_conv1d_fn(eye.expand(channels, seqlen, seqlen).reshape(1, channels * seqlen, seqlen),
                                weight.repeat_interleave(seqlen, dim=0), seq_idx=seq_idx[b:b + 1])
        out.append(cols.view(channels, seqlen, seqlen).transpose(-1, -2))
    return torch.stack(out)


def _right_multiply_conv(T: Tensor, weight: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """``T @ M`` for rows T (batch, channels, rows, n) and the conv Toeplitz M (n x n) of each channel.

    (r M)[j] = sum_t r[j + t] w[width - 1 - t] is the causal conv of the time-reversed row, reversed back; the conv
    op itself applies it (with the same packed-sequence rule, on the reversed seq_idx).
    """
    batch, channels, rows, n = T.shape
    flipped = T.flip(-1).reshape(batch, channels * rows, n)
    w = weight.to(T.dtype).repeat_interleave(rows, dim=0)  # (channels * rows, width)
    sidx = seq_idx[:, :n].flip(-1) if seq_idx is not None else None
    out = causal_conv1d_fn(flipped, w, None, seq_idx=sidx)
    return out.view(batch, channels, rows, n).flip(-1)


def _add_to_diagonal(T: Tensor, values: Tensor, r0: int) -> None:
    """T (batch, channels, rows, n) += values (channels,) on the entries (i, r0 + i), in place."""
    rows = T.shape[2]
    diag = T.diagonal(offset=r0, dim1=-2, dim2=-1)  # (batch, channels, rows): a view
    diag += values.to(T.dtype)[None, :, None].expand(-1, -1, rows)


# ----------------------------------------------------------------------------------------------------------------------
# Mamba-1: the op on tensors
# ----------------------------------------------------------------------------------------------------------------------
def _scan_attention_blocks(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, channels: Tensor,
                           seq_idx: Optional[Tensor], block_rows: Optional[int],
                           max_elements: int) -> Iterator[Tuple[int, int, int, int, Tensor]]:
    """Yield (k0, k1, r0, r1, alpha) with alpha (batch, k1 - k0, r1 - r0, r1): rows r0..r1 of the matrices of
    channels[k0:k1], columns 0..r1 (the rest of each row is zero). delta: processed (batch, dim, L); B, C:
    (batch, groups, N, L).

    With cs the inclusive cumulative sum of delta (float64), the decay from j to i is exp(A (cs_i - cs_j)):
      * diagonal block (r0 <= j, i < r1): the differences cs_i - cs_j, masked to -inf above the diagonal (and across
        packed sequences) before the exp;
      * columns j < r0 <= i: split at the reference cs_{r0-1}, which lies between cs_j and cs_i, so
        exp(A (cs_i - cs_j)) = exp(A (cs_i - ref)) exp(A (ref - cs_j)), a product of two factors <= 1 (no overflow;
        a factor that underflows makes the exact product smaller still), and the sum over the state is a matmul.
    """
    batch, dim, L = delta.shape
    groups, N = B.shape[1], B.shape[2]
    per_group = dim // groups
    dtype = delta.dtype
    cs = torch.cumsum(delta.double(), dim=-1)  # (batch, dim, L), float64: differences keep their precision
    keep = _keep_mask(L, seq_idx, delta.device)  # (batch or 1, L, L)
    cross = None if seq_idx is None else ~keep
    cb, rb = _auto_blocks(batch, channels.numel(), L, N, block_rows, max_elements)
    for k0 in range(0, channels.numel(), cb):
        k1 = min(channels.numel(), k0 + cb)
        ch = channels[k0:k1]
        grp = ch // per_group
        A_c = A[ch].to(dtype)  # (c, N)
        Bt = B[:, grp].to(dtype).transpose(-1, -2)  # (batch, c, L, N)
        Ct = C[:, grp].to(dtype).transpose(-1, -2)
        d_c = delta[:, ch]  # (batch, c, L)
        cs_c = cs[:, ch]
        BD = Bt * d_c[..., None]  # delta_j B_j[n]
        for r0 in range(0, L, rb):
            r1 = min(L, r0 + rb)
            alpha = Bt.new_empty(batch, k1 - k0, r1 - r0, r1)
            # diagonal block: masked differences, exp, contraction over the state
            diff = (cs_c[:, :, r0:r1, None] - cs_c[:, :, None, r0:r1]).to(dtype)  # (batch, c, rows, rows)
            log_decay = diff[..., None] * A_c[None, :, None, None, :]  # (batch, c, rows, rows, N)
            log_decay.masked_fill_(~keep[:, None, r0:r1, r0:r1, None], -math.inf)
            E = log_decay.exp_()
            E.mul_(Ct[:, :, r0:r1, None, :]).mul_(BD[:, :, None, r0:r1, :])
            alpha[..., r0:r1] = E.sum(-1)
            del E, log_decay
            if r0 > 0:
                ref = cs_c[:, :, r0 - 1: r0]  # (batch, c, 1)
                left = torch.exp((cs_c[:, :, r0:r1] - ref).to(dtype)[..., None] * A_c[None, :, None, :])
                right = torch.exp((ref - cs_c[:, :, :r0]).to(dtype)[..., None] * A_c[None, :, None, :])
                left.mul_(Ct[:, :, r0:r1])  # (batch, c, rows, N)
                right.mul_(BD[:, :, :r0])  # (batch, c, r0, N)
                alpha[..., :r0] = torch.matmul(left, right.transpose(-1, -2))  # (out= into a view is slow)
                if cross is not None:
                    alpha[..., :r0].masked_fill_(cross[:, None, r0:r1, :r0], 0.0)
            yield k0, k1, r0, r1, alpha


def selective_scan_attention(
    delta: Tensor, A: Tensor, B: Tensor, C: Tensor, channels: Channels = None, seq_idx: Optional[Tensor] = None,
    block_rows: Optional[int] = None, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """The hidden-attention matrices of the selective scan (Mamba-1): ``scan(u)_d = alpha_d @ u_d``.

    delta: (batch, dim, seqlen), already processed (bias added, softplus applied: the delta the scan uses);
    A: (dim, d_state); B, C: (batch, d_state, seqlen) or grouped (batch, groups, d_state, seqlen);
    channels: indices into dim (default all); seq_idx: (batch, seqlen) packed sequences (no attention across a
    change); block_rows: rows per block (default DEFAULT_BLOCK_ROWS; channels per block then fit max_block_elements).
    Returns (batch, len(channels), seqlen, seqlen) in float64 for float64 delta, else float32; zero above the diagonal.
    """
    if delta.dim() != 3:
        raise MambaKitError(f"delta must have shape (batch, dim, seqlen), got {tuple(delta.shape)}")
    batch, dim, L = delta.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise MambaKitError(f"A must have shape (dim={dim}, d_state), got {tuple(A.shape)}")
    N = A.shape[1]
    Bg = B.unsqueeze(1) if B.dim() == 3 else B
    Cg = C.unsqueeze(1) if C.dim() == 3 else C
    for name, t in (("B", Bg), ("C", Cg)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != (N, L) or dim % t.shape[1] != 0:
            raise MambaKitError(f"{name} must have shape (batch={batch}, d_state={N}, seqlen={L}) or (batch, groups, "
                                f"d_state, seqlen) with groups dividing dim={dim}, got {tuple(t.shape)}")
    if Bg.shape[1] != Cg.shape[1]:
        raise MambaKitError(f"B and C must have the same number of groups, got {Bg.shape[1]} and {Cg.shape[1]}")
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, L):
        raise MambaKitError(f"seq_idx must have shape (batch={batch}, seqlen={L}), got {tuple(seq_idx.shape)}")
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    idx = _channel_index(channels, dim, "channels", delta.device)
    out = torch.zeros(batch, idx.numel(), L, L, dtype=dtype, device=delta.device)
    for k0, k1, r0, r1, alpha in _scan_attention_blocks(delta.to(dtype), A, Bg, Cg, idx, seq_idx, block_rows,
                                                        max_block_elements):
        out[:, k0:k1, r0:r1, :r1] = alpha
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Layer views: everything the matrices of one layer need, computed once from the layer's own ssm_inputs
# ----------------------------------------------------------------------------------------------------------------------
class _Mamba1View:
    """A Mamba-1 layer evaluated on hidden_states. Units of the "ssm" form are inner channels."""

    def __init__(self, layer: Mamba, hidden_states: Tensor, seq_idx: Optional[Tensor], mask: Optional[Tensor]):
        _check_hidden(layer, hidden_states)
        self.layer, self.seq_idx = layer, seq_idx
        s = layer.ssm_inputs(hidden_states, seq_idx=seq_idx, mask=mask)
        self.dtype = dtype = torch.float64 if s.u.dtype == torch.float64 else torch.float32
        self.delta = prepare_delta(s.delta, s.delta_bias, s.delta_softplus, dtype)  # what the scan uses
        self.A, self.B, self.C, self.D = s.A.to(dtype), s.B.to(dtype), s.C.to(dtype), s.D.to(dtype)
        self.u = s.u.to(dtype)  # (batch, d_inner, L): the scan input, what alpha multiplies
        self.x = s.x.to(dtype)  # (batch, d_inner, L): the conv input, what the block matrix multiplies
        self.z = s.z.to(dtype)
        self.mask = None if mask is None else mask.to(dtype)
        self.batch, self.nchannels, self.seqlen = self.u.shape
        self.nunits = self.nchannels

    def ssm_gate(self) -> Tensor:
        """(batch, d_inner, L): the diagonal applied after the scan (silu(z))."""
        return F.silu(self.z)

    def alpha_grad(self, units: Tensor, r0: int, r1: int, grad_out: Tensor, gate: Tensor) -> Tensor:
        """d(score)/d(alpha_d[i, j]) = grad_out_d[i] G_d[i] u_d[j] for rows r0..r1, columns 0..r1, where grad_out
        (batch, d_inner, L) is d(score)/d(out_proj input) and gate = ssm_gate(): (batch, len(units), rows, r1)."""
        gG = grad_out[:, units, r0:r1] * gate[:, units, r0:r1]
        return gG[..., None] * self.u[:, units, None, :r1]

    def ssm_blocks(self, units: Tensor, block_rows: Optional[int], max_elements: int):
        Bg, Cg = self.B.unsqueeze(1), self.C.unsqueeze(1)
        return _scan_attention_blocks(self.delta, self.A, Bg, Cg, units, self.seq_idx, block_rows, max_elements)

    def block_blocks(self, channels: Tensor, block_rows: Optional[int], max_elements: int):
        """Yield (k0, k1, r0, r1, matrix rows (batch, c, rows, r1), offset (batch, c, rows))."""
        conv = self.layer.conv1d
        weight = conv.weight[:, 0].to(self.dtype)  # (d_inner, width)
        bias = conv.bias.to(self.dtype) if conv.bias is not None else None
        v = causal_conv1d_fn(self.x, weight, bias, activation=None, seq_idx=self.seq_idx)  # pre-activation
        gate = torch.sigmoid(v)  # silu(v) = sigmoid(v) v
        if self.mask is not None:
            gate = gate * self.mask[:, None, :]
        out_gate = self.ssm_gate()
        for k0, k1, r0, r1, alpha in self.ssm_blocks(channels, block_rows, max_elements):
            ch = channels[k0:k1]
            yield (k0, k1, r0, r1) + _fold_block(alpha, r0, self.D[ch], gate[:, ch], weight[ch],
                                                 None if bias is None else bias[ch], out_gate[:, ch], self.seq_idx,
                                                 self.mask)


def _fold_block(alpha: Tensor, r0: int, D: Tensor, gate: Tensor, weight: Tensor, bias: Optional[Tensor],
                out_gate: Tensor, seq_idx: Optional[Tensor], mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Rows r0..r0+rows of ``G (alpha + D) S M`` and of the offset ``G (alpha + D) S b``.

    alpha: (batch, c, rows, n) rows of the SSM matrices (columns 0..n), overwritten; D, bias: (c,); gate = diag of
    S and out_gate = diag of G: (batch, c, L); weight: (c, width).
    """
    rows, n = alpha.shape[2], alpha.shape[3]
    T = alpha
    _add_to_diagonal(T, D, r0)  # alpha + D I
    T.mul_(gate[:, :, None, :n])  # (alpha + D) S
    if bias is not None:
        offset = T.sum(-1) * bias[None, :, None]
    else:
        offset = T.new_zeros(T.shape[:3])
    T = _right_multiply_conv(T, weight, seq_idx)  # (alpha + D) S M
    if mask is not None:  # the conv reads the masked x: a padded input never reaches the output
        T.mul_(mask[:, None, None, :n])
    g = out_gate[:, :, r0:r0 + rows]
    T.mul_(g[..., None])
    offset.mul_(g)
    return T, offset


class _Mamba2View:
    """A Mamba-2 layer evaluated on hidden_states. Units of the "ssm" form are heads."""

    def __init__(self, layer: Mamba2, hidden_states: Tensor, seq_idx: Optional[Tensor], mask: Optional[Tensor]):
        _check_hidden(layer, hidden_states)
        if layer.d_mlp:
            raise MambaKitError(f"hidden attention of Mamba2 with d_ssm < d_inner (a gated MLP beside the SSM) is not "
                                f"supported, got d_ssm={layer.d_ssm}, d_inner={layer.d_inner}")
        self.layer, self.seq_idx = layer, seq_idx
        s = layer.ssm_inputs(hidden_states, seq_idx=seq_idx, mask=mask)
        self.s = s
        self.dtype = dtype = torch.float64 if s.x.dtype == torch.float64 else torch.float32
        if s.dt_args:
            self.dt = process_dt(s.dt, dtype=dtype, **s.dt_args)
        else:
            self.dt = s.dt.to(dtype)  # already processed (masked input)
        self.A, self.B, self.C = s.A.to(dtype), s.B.to(dtype), s.C.to(dtype)
        self.batch, self.seqlen, self.nheads, self.headdim = s.x.shape
        self.nchannels = layer.d_inner
        self.nunits = self.nheads
        self.ngroups = layer.ngroups
        D = s.D.to(dtype)
        self.D = (D[:, None].expand(-1, self.headdim) if D.dim() == 1 else D).reshape(-1)  # (d_inner,)
        self.xh = s.x.to(dtype)  # (batch, L, nheads, headdim): what alpha_h multiplies, per head channel
        self.u = self.xh.flatten(2).transpose(1, 2)  # (batch, d_inner, L)
        self.x = s.xBC[:, : layer.d_inner].to(dtype)  # (batch, d_inner, L): the conv input of the x channels
        self.z = s.z.to(dtype).transpose(1, 2)  # (batch, d_inner, L)
        self.mask = None if mask is None else mask.to(dtype)
        self._gate = None

    def heads_matrix(self, heads: Tensor) -> Tensor:
        """alpha_h for the given heads: (batch, len(heads), L, L), from the SSD op."""
        if heads.numel() == self.nheads and bool((heads == torch.arange(self.nheads, device=heads.device)).all()):
            return ssd_attention_matrix(self.dt, self.A, self.B, self.C, seq_idx=self.seq_idx)
        group = heads // (self.nheads // self.ngroups)  # each selected head becomes its own group
        return ssd_attention_matrix(self.dt[..., heads], self.A[heads], self.B[:, :, group], self.C[:, :, group],
                                    seq_idx=self.seq_idx)

    def ssm_gate(self) -> Tensor:
        """(batch, d_inner, L): the diagonal between y = SSD(x) + D x and out_proj: silu(z) times, with the gated
        RMSNorm, the norm's per-token, per-group scale and its weight (data-dependent, held fixed)."""
        if self._gate is None:
            self._gate = _mamba2_output_gate(self.layer, self.s, self.dt, self.A, self.B, self.C, self.seq_idx,
                                             self.dtype)
        return self._gate

    def alpha_grad(self, units: Tensor, r0: int, r1: int, grad_out: Tensor, gate: Tensor) -> Tensor:
        """d(score)/d(alpha_h[i, j]) = sum_p grad_out_{h,p}[i] G_{h,p}[i] x_{h,p}[j] (alpha_h is shared by the
        channels of head h), rows r0..r1, columns 0..r1: (batch, len(units), rows, r1)."""
        b, L = self.batch, self.seqlen
        gG = (grad_out * gate).reshape(b, self.nheads, self.headdim, L)[:, units, :, r0:r1]
        xh = self.u.reshape(b, self.nheads, self.headdim, L)[:, units, :, :r1]
        return torch.matmul(gG.transpose(-1, -2), xh)

    def ssm_blocks(self, units: Tensor, block_rows: Optional[int], max_elements: int):
        """Yield (k0, k1, 0, L, alpha) over blocks of heads (the SSD op builds whole matrices)."""
        L = self.seqlen
        per = max(1, max_elements // max(1, self.batch * L * L * 3))
        for k0 in range(0, units.numel(), per):
            k1 = min(units.numel(), k0 + per)
            yield k0, k1, 0, L, self.heads_matrix(units[k0:k1])

    def block_blocks(self, channels: Tensor, block_rows: Optional[int], max_elements: int):
        """Yield (k0, k1, 0, L, matrix (batch, c, L, L), offset (batch, c, L)) over blocks of channels."""
        conv = self.layer.conv1d
        d_inner = self.nchannels
        weight = conv.weight[:d_inner, 0].to(self.dtype)
        bias = conv.bias[:d_inner].to(self.dtype) if conv.bias is not None else None
        v = causal_conv1d_fn(self.x, weight, bias, activation=None, seq_idx=self.seq_idx)
        gate = torch.sigmoid(v)
        if self.mask is not None:
            gate = gate * self.mask[:, None, :]
        out_gate = self.ssm_gate()
        L = self.seqlen
        per = max(1, max_elements // max(1, self.batch * L * L * 3))
        for k0 in range(0, channels.numel(), per):
            k1 = min(channels.numel(), k0 + per)
            ch = channels[k0:k1]
            heads, inverse = torch.unique(ch // self.headdim, return_inverse=True)
            alpha = self.heads_matrix(heads)[:, inverse]  # (batch, c, L, L)
            yield (k0, k1, 0, L) + _fold_block(alpha, 0, self.D[ch], gate[:, ch], weight[ch],
                                               None if bias is None else bias[ch], out_gate[:, ch], self.seq_idx,
                                               self.mask)


def _mamba2_output_gate(layer: Mamba2, s, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, seq_idx: Optional[Tensor],
                        dtype: torch.dtype) -> Tensor:
    """(batch, d_inner, L) diagonal G with ``out_proj input = G * (SSD(x) + D x)``."""
    z = s.z.to(dtype)  # (batch, L, d_inner)
    silu_z = F.silu(z)
    if not layer.rmsnorm:
        return silu_z.transpose(1, 2)
    y = mamba_chunk_scan_combined(s.x.to(dtype), dt, A, B, C, layer.chunk_size, D=s.D.to(dtype), seq_idx=seq_idx)
    y = y.flatten(2)  # (batch, L, d_inner)
    scale = layer.norm.rms_scale(y, z, dtype=dtype)  # per token and group, (batch, L, d_inner)
    return (silu_z * scale * layer.norm.weight.to(dtype)).transpose(1, 2)


def layer_view(layer: nn.Module, hidden_states: Tensor, seq_idx: Optional[Tensor] = None,
               mask: Optional[Tensor] = None):
    """The internal view of a Mamba or Mamba2 layer on hidden_states (used by the attribution code)."""
    if isinstance(layer, Mamba):
        return _Mamba1View(layer, hidden_states, seq_idx, mask)
    if isinstance(layer, Mamba2):
        return _Mamba2View(layer, hidden_states, seq_idx, mask)
    raise MambaKitError(f"hidden attention needs a Mamba or Mamba2 layer, got {type(layer).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# Public layer-level functions
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def mamba1_hidden_attention(layer: Mamba, hidden_states: Tensor, channels: Channels = None,
                            block_rows: Optional[int] = None, seq_idx: Optional[Tensor] = None,
                            mask: Optional[Tensor] = None,
                            max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Tensor:
    """alpha_d of a Mamba-1 layer on hidden_states (batch, seqlen, d_model): (batch, len(channels), seqlen, seqlen).

    ``selective_scan(u)_d = alpha_d @ u_d + D_d u_d`` with u = ``layer.ssm_inputs(...).u``. channels: indices into
    d_inner (default all); block_rows: rows computed at once (default DEFAULT_BLOCK_ROWS);
    seq_idx, mask: as the layer's forward.
    """
    if not isinstance(layer, Mamba):
        raise MambaKitError(f"layer must be a Mamba (Mamba-1) layer, got {type(layer).__name__}")
    view = _Mamba1View(layer, hidden_states, seq_idx, mask)
    idx = _channel_index(channels, view.nchannels, "channels", view.u.device)
    out = view.u.new_zeros(view.batch, idx.numel(), view.seqlen, view.seqlen)
    for k0, k1, r0, r1, alpha in view.ssm_blocks(idx, block_rows, max_block_elements):
        out[:, k0:k1, r0:r1, :r1] = alpha
    return out


@torch.no_grad()
def mamba2_hidden_attention(layer: Mamba2, hidden_states: Tensor, heads: Channels = None,
                            seq_idx: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """alpha_h of a Mamba-2 layer on hidden_states (batch, seqlen, d_model): (batch, len(heads), seqlen, seqlen).

    ``SSD(x)[:, :, h] = alpha_h @ x[:, :, h] + D_h x[:, :, h]`` (the same matrix for every channel of head h), with x
    = ``layer.ssm_inputs(...).x``. The matrix is the SSD quadratic form's, from ``ssd_attention_matrix``.
    """
    if not isinstance(layer, Mamba2):
        raise MambaKitError(f"layer must be a Mamba2 layer, got {type(layer).__name__}")
    view = _Mamba2View(layer, hidden_states, seq_idx, mask)
    idx = _channel_index(heads, view.nheads, "heads", view.u.device)
    return view.heads_matrix(idx)


def _collect_block(view, channels: Channels, block_rows: Optional[int], max_elements: int) -> BlockAttention:
    idx = _channel_index(channels, view.nchannels, "channels", view.u.device)
    L = view.seqlen
    matrix = view.u.new_zeros(view.batch, idx.numel(), L, L)
    offset = view.u.new_zeros(view.batch, idx.numel(), L)
    for k0, k1, r0, r1, T, off in view.block_blocks(idx, block_rows, max_elements):
        matrix[:, k0:k1, r0:r1, :r1] = T
        offset[:, k0:k1, r0:r1] = off
    return BlockAttention(matrix=matrix, offset=offset, channels=idx)


@torch.no_grad()
def mamba1_block_attention(layer: Mamba, hidden_states: Tensor, channels: Channels = None,
                           block_rows: Optional[int] = None, seq_idx: Optional[Tensor] = None,
                           mask: Optional[Tensor] = None,
                           max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> BlockAttention:
    """The full-block form of a Mamba-1 layer: ``o_c = matrix_c @ x_c + offset_c`` where o is the input of out_proj
    and x the conv input (``layer.ssm_inputs(...).x``), per inner channel c. matrix = silu(z) (alpha + D)
    diag(sigmoid(conv(x))) M_conv, offset = the conv bias through the same maps."""
    if not isinstance(layer, Mamba):
        raise MambaKitError(f"layer must be a Mamba (Mamba-1) layer, got {type(layer).__name__}")
    return _collect_block(_Mamba1View(layer, hidden_states, seq_idx, mask), channels, block_rows,
                          max_block_elements)


@torch.no_grad()
def mamba2_block_attention(layer: Mamba2, hidden_states: Tensor, channels: Channels = None,
                           seq_idx: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                           max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> BlockAttention:
    """The full-block form of a Mamba-2 layer: ``o_c = matrix_c @ x_c + offset_c`` per inner channel c = h * headdim
    + p, where o is the input of out_proj and x the x part of the conv input (``layer.ssm_inputs(...).xBC[:,
    :d_inner]``). matrix = G (alpha_h + D) diag(sigmoid(conv(x))) M_conv with G = silu(z) times the gated RMSNorm's
    per-token scale and weight. B and C are treated as data-dependent (held fixed), as in Zimerman et al.

    Note: the layer's RMSNormGated computes in float32 even for float64 inputs; this form computes the norm scale
    in the compute dtype, so for a float64 layer with rmsnorm it matches the layer to float32 precision only.
    """
    if not isinstance(layer, Mamba2):
        raise MambaKitError(f"layer must be a Mamba2 layer, got {type(layer).__name__}")
    return _collect_block(_Mamba2View(layer, hidden_states, seq_idx, mask), channels, None, max_block_elements)


def hidden_attention(layer: nn.Module, hidden_states: Tensor, channels: Channels = None, **kwargs) -> Tensor:
    """alpha of a Mamba (per inner channel) or Mamba2 (per head; `channels` selects heads) layer."""
    if isinstance(layer, Mamba):
        return mamba1_hidden_attention(layer, hidden_states, channels, **kwargs)
    if isinstance(layer, Mamba2):
        return mamba2_hidden_attention(layer, hidden_states, channels, **kwargs)
    raise MambaKitError(f"hidden attention needs a Mamba or Mamba2 layer, got {type(layer).__name__}")


def block_attention(layer: nn.Module, hidden_states: Tensor, channels: Channels = None, **kwargs) -> BlockAttention:
    """The full-block form of a Mamba or Mamba2 layer (see mamba1_block_attention / mamba2_block_attention)."""
    if isinstance(layer, Mamba):
        return mamba1_block_attention(layer, hidden_states, channels, **kwargs)
    if isinstance(layer, Mamba2):
        return mamba2_block_attention(layer, hidden_states, channels, **kwargs)
    raise MambaKitError(f"block attention needs a Mamba or Mamba2 layer, got {type(layer).__name__}")
