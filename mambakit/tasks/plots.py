"""Plots of the synthetic-task results (PNG; each function returns False when matplotlib is missing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence


def _pyplot() -> Any:
    """matplotlib.pyplot (the command line picks the file-only Agg backend), or None when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _accuracy_axes(ax: Any, chance: Optional[float], xlabel: str, title: str, log2: bool = False,
                   legend_loc: Optional[str] = None) -> None:
    """Accuracy on the y axis in [0, 1] (a dotted chance line when given), grid and legend."""
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", label="chance")
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc) if legend_loc else ax.legend()


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(results: dict[str, Any], path: Path) -> bool:
    """Accuracy vs training step (and, for length evaluations, accuracy vs eval length) as a PNG; False when
    matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    by_len = {int(k): v for k, v in results.get("eval_lengths", {}).items()}
    ncols = 2 if by_len else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    hist = results["history"]
    ax.plot(hist["eval_step"], hist["eval_acc"], "o-", color="tab:blue", label="held-out accuracy")
    if hist["step"]:
        ax.plot(hist["step"], hist["train_acc"], color="tab:blue", alpha=0.25, linewidth=0.8, label="train batch")
    _accuracy_axes(ax, results["chance"], "training step",
                   f"{results['task']} — {results['mixer']} (length {results['config']['seq_len']})",
                   legend_loc="lower right")
    if by_len:
        ax = axes[0][1]
        lengths = sorted(by_len)
        done = [(L, by_len[L]["accuracy"]) for L in lengths if by_len[L]["accuracy"] is not None]
        if done:
            ax.plot([L for L, _ in done], [a for _, a in done], "o-", color="tab:orange", label=results["mixer"])
        ax.axvline(results["config"]["seq_len"], color="gray", linestyle="--", label="training length")
        _accuracy_axes(ax, results["chance"], "evaluation length", "length generalisation", log2=True,
                       legend_loc="lower left")
    _save(plt, fig, path)
    return True


def plot_lengths(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Accuracy vs evaluation length, one line per run (e.g. Mamba vs attention on induction heads)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        pts = sorted((int(L), e["accuracy"]) for L, e in r["eval_lengths"].items() if e["accuracy"] is not None)
        if pts:
            c = r["config"]
            label = (f"{r['mixer']} (d_model {c['d_model']}" + (f", N={c['d_state']}" if c["d_state"] else "")
                     + f", {r['steps_run']} steps)")
            ax.plot([L for L, _ in pts], [a for _, a in pts], "o-", label=label)
    train_lens = sorted({r["config"]["seq_len"] for r in rows})
    for L in train_lens:
        ax.axvline(L, color="gray", linestyle="--", linewidth=0.8)
    _accuracy_axes(ax, rows[0]["chance"], "evaluation length (dashed: training length)",
                   f"{rows[0]['task']}: length generalisation", log2=True)
    _save(plt, fig, path)
    return True


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Accuracy vs d_model, one line per mixer (and d_state), one panel per sequence length."""
    plt = _pyplot()
    if plt is None:
        return False
    seq_lens = sorted({r["config"]["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5 * len(seq_lens), 4), squeeze=False)
    for ax, L in zip(axes[0], seq_lens):
        groups: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["config"]["seq_len"] == L:
                label = r["mixer"] + (f" (N={r['config']['d_state']})" if r["config"]["d_state"] else "")
                groups.setdefault(label, []).append((r["config"]["d_model"], r["accuracy"]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([d for d, _ in pts], [a for _, a in pts], "o-", label=label)
        _accuracy_axes(ax, None, "d_model", f"{rows[0]['task']}, length {L}", log2=True)
    _save(plt, fig, path)
    return True
