"""Aggregations and attributions over a whole `MambaLMHeadModel` or hybrid `HybridLM` built on the hidden-attention
matrices (and, for the attention layers of a hybrid, their own softmax attention).

* :func:`layer_attentions` -- per layer, the mean over inner channels of the absolute full-block matrices
  (``form="block"``, the default: conv, SiLU and output gate folded in), or over channels (Mamba-1) / heads (Mamba-2)
  of the scan's own matrices alpha (``form="ssm"``), (batch, L, L) each.
* :func:`attention_rollout` -- Abnar & Zuidema's rollout: each layer's map is row-normalised, the identity (the
  residual stream) added with equal weight, rows normalised again, and the layers multiplied, first layer first.
* :func:`gradient_weighted_attentions` -- attention x positive part of the gradient of one output logit w.r.t. the
  attention (Chefer et al.'s recipe), per layer, then rolled out by :func:`explain`.
* :func:`token_relevance` -- the row of a rollout for one prediction: how much each source token matters.

The gradient w.r.t. the attention. Every mixer's output before out_proj is, for the given input, exactly linear
in its matrices: ``o_d = G_d (alpha_d u_d + D_d u_d)`` ("ssm" form; G = silu(z), times the gated RMSNorm's
per-token scale and weight for Mamba-2) or ``o_d = Omega_d x_d + offset_d`` ("block" form). One backward pass gives
``g = d logit / d o`` for every layer (all later layers, norms and the head included). Treating the matrix as an
independent input of the layer at that point of the forward (the data-dependent diagonals and the inputs u, x held
at their values, as the implicit-attention view does), the chain rule gives it exactly::

    d logit / d alpha_d[i, j] = g_d[i] G_d[i] u_d[j]          d logit / d Omega_d[i, j] = g_d[i] x_d[j]

(for Mamba-2 alpha_h is shared by the headdim channels of head h, so its gradient sums over them). The weighted map
is ``mean_d (alpha_d * d logit / d alpha_d)^+``: the positive part of each channel's first-order contribution of
source token j, through row i, to the chosen logit. No L x L matrix is ever put in the autograd graph.

Why "block" is the default: alpha maps the conv OUTPUT at position j to position i, and the conv has already mixed
tokens j - d_conv + 1 .. j into it. On a trained selective-copy model the alpha-based maps point d_conv - 1 tokens
after the token that decides the answer (where the conv window first holds both the marker and the marked token);
the full-block maps, whose columns are the conv INPUTS, point at the token itself (see benchmarks/interpret_sanity.py).

Mamba, Mamba2 and attention (`MHA`) mixers are supported (other mixers, e.g. S4, raise MambaKitError). An
attention layer's map is its softmax attention P averaged over heads (`mambakit.interpret.softmax_attention`; the
same in both forms), its gradient-weighted map ``mean_h (P_h * d logit / d P_h)^+``. MLP and MoE layers (after a
mixer, or alone as a layer of a hybrid) are position-wise and do not mix tokens: the rollout skips them. A Falcon-H1
layer (`ParallelMixer`: attention and Mamba-2 side by side on the same input, outputs summed) has one map per
layer, the mean of its two branches' maps (each computed on the input that branch sees, its multiplier applied),
and likewise one gradient-weighted map, the mean of the two branches'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.interpret.hidden_attention import DEFAULT_BLOCK_ELEMENTS, layer_view
from mambakit.interpret.softmax_attention import attention_values, softmax_attention
from mambakit.layers.attention import MHA
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.parallel_mixer import ParallelMixer

__all__ = [
    "Explanation",
    "FORMS",
    "attention_rollout",
    "explain",
    "gradient_weighted_attentions",
    "layer_attentions",
    "mixer_layer_indices",
    "mixer_layers",
    "token_relevance",
]

FORMS = ("ssm", "block")


def _kind(mixer: nn.Module) -> str:
    if isinstance(mixer, ParallelMixer):
        return "parallel"
    return "attention" if isinstance(mixer, MHA) else "mamba2" if isinstance(mixer, Mamba2) else "mamba"


def _branches(mixer: nn.Module) -> List[nn.Module]:
    """The modules whose maps make up a layer's map: both branches of a ParallelMixer, else the mixer itself."""
    return [mixer.mamba, mixer.attn] if isinstance(mixer, ParallelMixer) else [mixer]


def _mixer_blocks(model: nn.Module) -> List[tuple[int, nn.Module]]:
    backbone = getattr(model, "backbone", None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise MambaKitError(f"model must be a MambaLMHeadModel or HybridLM (with backbone.layers), got "
                            f"{type(model).__name__}")
    found = []
    for i, block in enumerate(layers):
        mixer = block.mixer
        if mixer is None:  # an MLP-only layer of a hybrid: position-wise, nothing to draw
            continue
        if not isinstance(mixer, (Mamba, Mamba2, MHA, ParallelMixer)):
            raise MambaKitError(f"layer {i} is a {type(mixer).__name__} mixer; hidden attention is defined for Mamba, "
                                "Mamba2, attention (MHA) and parallel attention + Mamba-2 mixers only (S4 and others "
                                "are not supported)")
        found.append((i, mixer))
    if not found:
        raise MambaKitError("the model has no token-mixing layer (Mamba, Mamba2 or attention) to explain")
    return found


def mixer_layers(model: nn.Module) -> List[nn.Module]:
    """The token mixers of a MambaLMHeadModel or HybridLM, in order (MLP-only layers have none and are skipped);
    MambaKitError for a mixer that is not Mamba, Mamba2 or MHA."""
    return [mixer for _, mixer in _mixer_blocks(model)]


def mixer_layer_indices(model: nn.Module) -> List[int]:
    """The layer (block) index of each of `mixer_layers(model)`: range(n_layer) for a MambaLMHeadModel; for a
    hybrid with MLP-only layers, the layers that mix tokens."""
    return [i for i, _ in _mixer_blocks(model)]


def _check_ids(model: nn.Module, input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise MambaKitError(f"input_ids must have shape (batch, seqlen) with seqlen >= 1, got {got}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise MambaKitError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise MambaKitError(f"form must be one of {FORMS}, got {form!r}")


def _position(position: int, seqlen: int) -> int:
    if not isinstance(position, int) or isinstance(position, bool) or not -seqlen <= position < seqlen:
        raise MambaKitError(f"position must be an int in [-{seqlen}, {seqlen}), got {position!r}")
    return position % seqlen


# ----------------------------------------------------------------------------------------------------------------------
# One forward (and backward) with hooks
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _Trace:
    mixer_inputs: List[List[Tensor]]  # per layer, per branch (`_branches`): its input (batch, L, d_model), detached
    grads: Optional[List[List[Tensor]]]  # per layer, per branch: d score / d out_proj input, (batch, d_inner, L)
    target: Optional[Tensor]  # (batch,) token ids whose logit was explained
    logits: Tensor  # (batch, vocab) at the explained position


def _trace(model: nn.Module, input_ids: Tensor, with_grad: bool, target: Optional[Union[int, Tensor]],
           position: int) -> _Trace:
    branches = [b for m in mixer_layers(model) for b in _branches(m)]
    _check_ids(model, input_ids)
    pos = _position(position, input_ids.shape[1])
    inputs: List[Optional[Tensor]] = [None] * len(branches)
    outs: List[Optional[Tensor]] = [None] * len(branches)
    handles = []

    def save_input(i):
        def hook(module, args):
            inputs[i] = args[0].detach()
        return hook

    def save_out(i):
        def hook(module, args):
            outs[i] = args[0]
        return hook

    for i, branch in enumerate(branches):
        handles.append(branch.register_forward_pre_hook(save_input(i)))
        handles.append(branch.out_proj.register_forward_pre_hook(save_out(i)))
    if with_grad:  # the graph starts at the embedding output, whatever the parameters' requires_grad
        handles.append(model.backbone.embedding.register_forward_hook(
            lambda module, args, output: output.detach().requires_grad_(True)))
    try:
        with torch.set_grad_enabled(with_grad):
            logits = model(input_ids).logits[:, pos]  # (batch, vocab)
        vocab = getattr(getattr(model, "config", None), "vocab_size", logits.shape[-1])
        if target is None:
            tgt = logits[:, :vocab].detach().argmax(-1)
        else:
            tgt = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
            if int(tgt.min()) < 0 or int(tgt.max()) >= logits.shape[-1]:
                raise MambaKitError(f"target must be a token id in [0, {logits.shape[-1]}), got {target!r}")
        grads = None
        if with_grad:
            score = logits.gather(1, tgt[:, None]).sum()
            got = torch.autograd.grad(score, outs, allow_unused=True)
            grads = [(torch.zeros_like(o) if g is None else g).detach().transpose(1, 2) for g, o in zip(got, outs)]
    finally:
        for h in handles:
            h.remove()
    return _Trace(mixer_inputs=_per_layer(model, inputs), grads=None if grads is None else _per_layer(model, grads),
                  target=tgt, logits=logits.detach())


def _per_layer(model: nn.Module, flat: List[Tensor]) -> List[List[Tensor]]:
    """A list over every branch of every mixer, cut into one list per mixer."""
    out, k = [], 0
    for mixer in mixer_layers(model):
        n = len(_branches(mixer))
        out.append(flat[k:k + n])
        k += n
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Per-layer maps
# ----------------------------------------------------------------------------------------------------------------------
def _mixer_maps(mixer: nn.Module, hiddens: List[Tensor], form: str, grads: Optional[List[Tensor]], absolute: bool,
                block_rows: Optional[int], max_elements: int):
    """`_layer_maps` of one mixer: for a ParallelMixer the mean of its branches' maps, each from its own input."""
    maps = [_layer_maps(branch, h, form, None if grads is None else g, absolute, block_rows, max_elements)
            for branch, h, g in zip(_branches(mixer), hiddens, grads or [None] * len(hiddens))]
    if len(maps) == 1:
        return maps[0]
    attn = sum(a for a, _ in maps) / len(maps)
    return attn, None if grads is None else sum(w for _, w in maps) / len(maps)


@torch.no_grad()
def _layer_maps(mixer: nn.Module, hidden: Tensor, form: str, grad_out: Optional[Tensor], absolute: bool,
                block_rows: Optional[int], max_elements: int):
    """(mean attention (batch, L, L), mean positive grad x attention (batch, L, L) or None) of one Mamba, Mamba2 or
    MHA layer."""
    if isinstance(mixer, MHA):
        return _attention_maps(mixer, hidden, grad_out)
    view = layer_view(mixer, hidden)
    b, L = view.batch, view.seqlen
    attn = view.u.new_zeros(b, L, L)
    weighted = view.u.new_zeros(b, L, L) if grad_out is not None else None
    if grad_out is not None:
        grad_out = grad_out.to(view.dtype)
    if form == "ssm":
        units = torch.arange(view.nunits, device=view.u.device)
        gate = view.ssm_gate() if grad_out is not None else None
        for k0, k1, r0, r1, alpha in view.ssm_blocks(units, block_rows, max_elements):
            attn[:, r0:r1, :r1] += (alpha.abs() if absolute else alpha).sum(1)
            if weighted is not None:
                contrib = alpha * view.alpha_grad(units[k0:k1], r0, r1, grad_out, gate)
                weighted[:, r0:r1, :r1] += contrib.clamp_min_(0).sum(1)
        count = view.nunits
    else:
        channels = torch.arange(view.nchannels, device=view.u.device)
        for k0, k1, r0, r1, T, _ in view.block_blocks(channels, block_rows, max_elements):
            attn[:, r0:r1, :r1] += (T.abs() if absolute else T).sum(1)
            if weighted is not None:
                ch = channels[k0:k1]
                contrib = T * grad_out[:, ch, r0:r1, None] * view.x[:, ch, None, :r1]
                weighted[:, r0:r1, :r1] += contrib.clamp_min_(0).sum(1)
        count = view.nchannels
    attn /= count
    if weighted is not None:
        weighted /= count
    return attn, weighted


@torch.no_grad()
def _attention_maps(mixer: MHA, hidden: Tensor, grad_out: Optional[Tensor]):
    """An attention layer's (mean over heads of P, mean over heads of (P * d logit / d P)^+ or None), (batch, L, L).
    grad_out: d logit / d (out_proj input), (batch, num_heads * head_dim, L)."""
    P = softmax_attention(mixer, hidden)  # (batch, heads, L, L)
    if grad_out is None:
        return P.mean(1), None
    b, _, L = grad_out.shape
    g = grad_out.to(P.dtype).transpose(1, 2).reshape(b, L, mixer.num_heads, mixer.head_dim).transpose(1, 2)
    dP = torch.matmul(g, attention_values(mixer, hidden).to(P.dtype).transpose(-1, -2))  # (batch, heads, L, L)
    return P.mean(1), (P * dP).clamp_min_(0).mean(1)


def layer_attentions(model: nn.Module, input_ids: Tensor, form: str = "block", absolute: bool = True,
                     block_rows: Optional[int] = None,
                     max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> List[Tensor]:
    """Per token-mixing layer (`mixer_layers`), the mean over channels (or Mamba-2 heads) of the hidden-attention
    matrices, or over heads of an attention layer's softmax attention: a list of tensors (batch, L, L). absolute:
    average |matrix| (default; the rollout needs non-negative maps) or the
    signed matrices. form: "block" (the full-block matrices, mean over inner channels) or "ssm" (alpha: mean over
    inner channels for Mamba-1, over heads for Mamba-2)."""
    _check_form(form)
    trace = _trace(model, input_ids, with_grad=False, target=None, position=-1)
    return [_mixer_maps(m, h, form, None, absolute, block_rows, max_block_elements)[0]
            for m, h in zip(mixer_layers(model), trace.mixer_inputs)]


def gradient_weighted_attentions(model: nn.Module, input_ids: Tensor, target: Optional[Union[int, Tensor]] = None,
                                 position: int = -1, form: str = "block", block_rows: Optional[int] = None,
                                 max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> List[Tensor]:
    """Per layer, ``mean_d (alpha_d * d logit / d alpha_d)^+`` (batch, L, L) for the logit of `target` (default:
    the most likely token) at `position` (default the last). See the module docstring for the gradient."""
    return explain(model, input_ids, target=target, position=position, form=form, block_rows=block_rows,
                   max_block_elements=max_block_elements).grad_attentions


# ----------------------------------------------------------------------------------------------------------------------
# Rollout and relevance
# ----------------------------------------------------------------------------------------------------------------------
def _row_normalise(m: Tensor) -> Tensor:
    s = m.sum(-1, keepdim=True)
    return torch.where(s > 0, m / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(m))


def attention_rollout(attentions: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema) over layers, first layer first: (batch, L, L), rows summing to 1.

    Each map (batch, L, L), non-negative, is row-normalised (a zero row stays zero), the identity added (the residual
    stream, with the same weight as the mixer), rows normalised again, and the maps multiplied:
    ``R = A_hat_n ... A_hat_1``. R[i, j]: how much of position i's representation flows from input token j.
    """
    if len(attentions) == 0:
        raise MambaKitError("attentions must hold at least one (batch, L, L) map, got none")
    first = attentions[0]
    if first.dim() != 3 or first.shape[-1] != first.shape[-2]:
        raise MambaKitError(f"attentions must be (batch, L, L) maps, got {tuple(first.shape)}")
    rollout = None
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)
    for i, a in enumerate(attentions):
        if a.shape != first.shape:
            raise MambaKitError(f"attentions[{i}] has shape {tuple(a.shape)}, expected {tuple(first.shape)}")
        if bool((a < 0).any()):
            raise MambaKitError(f"attentions[{i}] has negative entries; the rollout needs non-negative maps "
                                "(use absolute=True or the positive part)")
        a_hat = _row_normalise(_row_normalise(a) + eye)
        rollout = a_hat if rollout is None else torch.matmul(a_hat, rollout)
    return rollout


def token_relevance(rollout: Tensor, position: int = -1, exclude_self: bool = False) -> Tensor:
    """The relevance of each source token for the prediction made at `position`: row `position` of a rollout,
    (batch, L) summing to 1 (tokens after the position get 0). exclude_self: drop the predicting token's own entry
    (the residual path makes it large) and renormalise the rest."""
    if rollout.dim() != 3:
        raise MambaKitError(f"rollout must have shape (batch, L, L), got {tuple(rollout.shape)}")
    pos = _position(position, rollout.shape[-1])
    row = rollout[:, pos].clone()
    if exclude_self:
        row[:, pos] = 0
        row = _row_normalise(row)
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """What :func:`explain` computes for one prediction (per batch element).

    attentions: per layer, mean |hidden attention matrix| (batch, L, L); rollout: their rollout (batch, L, L);
    grad_attentions: per layer, mean positive attention x gradient (batch, L, L); attribution: their rollout;
    relevance: row `position` of attribution (batch, L); target: (batch,) explained token ids; position: the
    explained position (>= 0); logits: (batch, vocab) at that position; form: "ssm" or "block"; layers: the layer
    (block) index of each map (`mixer_layer_indices`); kinds: each map's mixer, "mamba", "mamba2", "attention" or
    "parallel" (Falcon-H1's attention + Mamba-2 side by side).
    """

    attentions: List[Tensor]
    rollout: Tensor
    grad_attentions: List[Tensor]
    attribution: Tensor
    relevance: Tensor
    target: Tensor
    position: int
    logits: Tensor
    form: str
    layers: Optional[List[int]] = None
    kinds: Optional[List[str]] = None


def explain(model: nn.Module, input_ids: Tensor, target: Optional[Union[int, Tensor]] = None, position: int = -1,
            form: str = "block", block_rows: Optional[int] = None,
            max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Explanation:
    """Hidden-attention maps, their rollout, the gradient-weighted maps and their rollout, and the token relevance
    for the logit of `target` (default: the most likely token) predicted at `position` (default: the last).

    One forward and one backward pass of the model, then per layer the matrices built block by block (never all
    at once) from the layer's own scan inputs.
    """
    _check_form(form)
    trace = _trace(model, input_ids, with_grad=True, target=target, position=position)
    pos = _position(position, input_ids.shape[1])
    attentions, weighted = [], []
    for mixer, hidden, grad in zip(mixer_layers(model), trace.mixer_inputs, trace.grads):
        a, w = _mixer_maps(mixer, hidden, form, grad, True, block_rows, max_block_elements)
        attentions.append(a)
        weighted.append(w)
    attribution = attention_rollout(weighted)
    return Explanation(attentions=attentions, rollout=attention_rollout(attentions), grad_attentions=weighted,
                       attribution=attribution, relevance=token_relevance(attribution, pos), target=trace.target,
                       position=pos, logits=trace.logits, form=form, layers=mixer_layer_indices(model),
                       kinds=[_kind(m) for m in mixer_layers(model)])
