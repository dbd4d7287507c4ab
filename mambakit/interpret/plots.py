"""Pictures of hidden attention: heatmaps with token labels on both axes, and relevance bars (matplotlib).

matplotlib is imported only when a picture is drawn; without it, MambaKitError says how to install it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from mambakit.errors import MambaKitError

__all__ = ["byte_token_labels", "plot_attention", "plot_explanation", "plot_relevance"]

# At most this many labelled ticks per axis; longer sequences label every k-th token.
MAX_TICK_LABELS = 64


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MambaKitError("drawing pictures needs matplotlib: pip install matplotlib (or mambakit[plot])") from exc
    import matplotlib.pyplot as plt

    return plt


def byte_token_labels(ids: Sequence[int]) -> List[str]:
    """Axis labels of byte tokens: the character for printable ASCII, its repr otherwise (space, newline, bytes of a
    multi-byte UTF-8 character)."""
    labels = []
    for i in ids:
        i = int(i)
        ch = chr(i)
        if i < 128 and ch.isprintable() and not ch.isspace():
            labels.append(ch)
        elif i < 128:
            labels.append(repr(ch))
        else:
            labels.append(repr(bytes([i]))[1:])  # '\xc3'
    return labels


def _as_matrix(matrix: Tensor, what: str) -> Tensor:
    m = torch.as_tensor(matrix).detach().cpu().double()
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise MambaKitError(f"{what} must be an (L, L) matrix (or (1, L, L)), got {tuple(m.shape)}")
    return m


def _ticks(n: int) -> List[int]:
    step = max(1, -(-n // MAX_TICK_LABELS))
    return list(range(0, n, step))


def _check_labels(tokens: Optional[Sequence[str]], n: int) -> List[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise MambaKitError(f"tokens must hold one label per position ({n}), got {len(tokens)}")
    return tokens


def plot_attention(matrix: Tensor, path: Union[str, Path], tokens: Optional[Sequence[str]] = None,
                   title: Optional[str] = None, cmap: str = "viridis") -> Path:
    """Write a heatmap PNG of an (L, L) attention-like matrix (rows: outputs i, columns: source tokens j), with
    token labels on both axes. Returns the path."""
    m = _as_matrix(matrix, "matrix")
    n = m.shape[0]
    labels = _check_labels(tokens, n)
    plt = _pyplot()
    size = min(16.0, max(4.5, 0.22 * n + 2.0))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    try:
        image = ax.imshow(m.numpy(), cmap=cmap, interpolation="nearest", aspect="equal")
        ticks = _ticks(n)
        fontsize = 8 if n <= 40 else 6
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[t] for t in ticks], rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks)
        ax.set_yticklabels([labels[t] for t in ticks], fontsize=fontsize)
        ax.set_xlabel("source token j")
        ax.set_ylabel("output position i")
        if title:
            ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_relevance(scores: Tensor, path: Union[str, Path], tokens: Optional[Sequence[str]] = None,
                   title: Optional[str] = None) -> Path:
    """Write a bar chart PNG of per-token relevance scores (L,) with token labels. Returns the path."""
    s = torch.as_tensor(scores).detach().cpu().double()
    if s.dim() == 2 and s.shape[0] == 1:
        s = s[0]
    if s.dim() != 1:
        raise MambaKitError(f"scores must have shape (L,) (or (1, L)), got {tuple(s.shape)}")
    n = s.shape[0]
    labels = _check_labels(tokens, n)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.25 * n + 2.0)), 3.5))
    try:
        ax.bar(range(n), s.numpy(), color="tab:blue")
        ticks = _ticks(n)
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[t] for t in ticks], rotation=90, fontsize=8 if n <= 40 else 6)
        ax.set_ylabel("relevance")
        if title:
            ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_explanation(explanation, out_dir: Union[str, Path], tokens: Optional[Sequence[str]] = None,
                     layers: Optional[Sequence[int]] = None, batch_index: int = 0) -> List[Path]:
    """Write the pictures of an :class:`~mambakit.interpret.attribution.Explanation` into out_dir:
    ``layer_{i:02d}.png`` (mean hidden attention of layer i, or an attention layer's mean softmax attention, for the
    given layers, default all; i is the layer's index in the model, `explanation.layers`), ``rollout.png``,
    ``attribution.png`` (rollout of the gradient-weighted maps) and ``relevance.png`` (its row for the explained
    prediction). Returns the paths written."""
    out = Path(out_dir)
    n_maps = len(explanation.attentions)
    indices = list(explanation.layers) if explanation.layers is not None else list(range(n_maps))
    kinds = list(explanation.kinds) if explanation.kinds is not None else ["mamba"] * n_maps
    layers = indices if layers is None else layers
    written = []
    form = "full-block" if explanation.form == "block" else "hidden"
    for i in layers:
        if i not in indices:
            raise MambaKitError(f"layer must be one of the token-mixing layers {indices}, got {i}")
        k = indices.index(i)
        title = {"attention": f"layer {i}: mean softmax attention over heads",
                 "parallel": f"layer {i}: mean of softmax attention and |{form} attention|"}.get(
            kinds[k], f"layer {i}: mean |{form} attention|")
        written.append(plot_attention(explanation.attentions[k][batch_index], out / f"layer_{i:02d}.png", tokens,
                                      title))
    written.append(plot_attention(explanation.rollout[batch_index], out / "rollout.png", tokens,
                                  f"attention rollout over {n_maps} layers"))
    written.append(plot_attention(explanation.attribution[batch_index], out / "attribution.png", tokens,
                                  "gradient-weighted attention rollout"))
    pos = explanation.position
    written.append(plot_relevance(explanation.relevance[batch_index], out / "relevance.png", tokens,
                                  f"relevance for the prediction at position {pos}"))
    return written
