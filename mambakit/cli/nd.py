"""``mambakit tasks mamba-nd-digits`` and ``mambakit tasks mamba-nd-video``: train Mamba-ND (or its ViT baseline) on
an offline 2-D or 3-D classification task and print the test accuracy.

:func:`add_nd_parsers` registers the two tasks on a subparsers object (in ``mambakit``: the routes of ``tasks``, see
:class:`mambakit.cli.args.Commands`); each sets ``func`` to :func:`nd_task_main`, which takes the parsed namespace and
returns an exit status (bad options raise MambaKitError, which the command line prints as one error line).
Standalone: :func:`main` (``python -m mambakit.nd.cli mamba-nd-digits --steps 100``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Dict, Optional, Sequence

from mambakit.cli.args import (
    Parser, checked, non_negative_int, positive_float, positive_int, positive_ints, seed, threads,
)
from mambakit.errors import MambaKitError
from mambakit.nd.model import HEADS, MIXERS
from mambakit.nd.orders import ORDER_MODES
from mambakit.nd.train import COMMON_DEFAULTS, MODELS, TASK_DEFAULTS, run_nd_task

_DESCRIPTIONS = {
    "mamba-nd-digits": ("train Mamba-ND on 2-D handwritten digits (scikit-learn, 10 classes)",
                        "Train Mamba-ND (or the ViT baseline) on scikit-learn's 8x8 handwritten digits, upsampled "
                        "to --image-size, patched by a strided convolution; print the test accuracy."),
    "mamba-nd-video": ("train Mamba-ND on 3-D videos of moving digits (40 classes)",
                       "Train Mamba-ND (or the ViT baseline) on short videos of a digit moving right, left, down or "
                       "up across a canvas; the class is digit x direction (40). Print the test accuracy."),
}
_non_negative_number = checked(float, "a non-negative number", lambda v: math.isfinite(v) and v >= 0)


def add_nd_arguments(p: argparse.ArgumentParser, task: str) -> None:
    """The options of one Mamba-ND task command (unset ones fall back to mambakit.nd.train's defaults)."""
    C, T = COMMON_DEFAULTS, TASK_DEFAULTS[task]
    p.add_argument("--model", choices=MODELS, help=f"'mamba' (Mamba-ND) or 'vit' (ViT baseline of equal parameter "
                   f"count, same depth and patching) (default: {C['model']})")
    p.add_argument("--head", choices=HEADS, help="'classify': norm, mean over tokens, linear; 'dense': every token "
                   "predicts the sample's label (needs context from the whole grid at every position); accuracy "
                   f"per token (default: {C['head']})")
    p.add_argument("--mixer", choices=MIXERS, help=f"1-D layer inside each block (default: {C['mixer']})")
    p.add_argument("--order-mode", choices=ORDER_MODES,
                   help="'alternate': one scan order per layer, cycling as in the paper; 'fixed': raster order in "
                   "every layer (ablation); 'bidirectional': forward + reversed scans summed inside each layer "
                   "(shared mixer); 'multi': one mixer per scan direction, outputs summed "
                   f"(default: {C['order_mode']})")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default: {T['steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"samples per step (default: {T['batch_size']})")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default: {T['lr']})")
    p.add_argument("--weight-decay", type=_non_negative_number,
                   help=f"AdamW weight decay (default: {C['weight_decay']})")
    p.add_argument("--warmup-steps", type=non_negative_int, help="linear warmup steps (default: min(100, steps/10))")
    p.add_argument("--d-model", type=positive_int, help=f"Mamba-ND width; the ViT's width is matched to its parameter "
                   f"count (default: {C['d_model']})")
    p.add_argument("--depth", type=positive_int, help=f"number of blocks (default: {C['depth']})")
    p.add_argument("--d-state", type=positive_int, help="SSM state size (default: 16 for mamba1, 64 for mamba2)")
    p.add_argument("--patch", type=positive_ints, help=f"patch size, one int or one per axis, e.g. 2,4,4 "
                   f"(default: {T['patch']})")
    if task == "mamba-nd-digits":
        p.add_argument("--image-size", type=positive_int, help=f"digits upsampled to this size (default: "
                       f"{T['image_size']})")
        p.add_argument("--no-augment", action="store_true", help="no random shifts of the training images")
    else:
        p.add_argument("--frames", type=positive_int, help=f"frames per video (default: {T['frames']})")
        p.add_argument("--canvas", type=positive_ints, help=f"canvas size H or H,W (default: {T['canvas']})")
    p.add_argument("--seed", type=seed, help=f"random seed of the model and the training batches "
                   f"(the train/test split is fixed) (default: {C['seed']})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default: {C['device']})")
    p.add_argument("--threads", type=threads, help=f"torch CPU threads (default: {C['threads']}; more only helps "
                   "on an otherwise idle machine)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_nd_parsers(subparsers: Any) -> Dict[str, argparse.ArgumentParser]:
    """Register ``mamba-nd-digits`` and ``mamba-nd-video`` on an argparse subparsers object (or the routes of
    ``tasks``); each sets ``func`` = :func:`nd_task_main` and ``nd_task`` = its name. Returns the parsers."""
    parsers = {}
    for task, (short, long) in _DESCRIPTIONS.items():
        p = subparsers.add_parser(task, help=short, description=long)
        add_nd_arguments(p, task)
        p.set_defaults(func=nd_task_main, nd_task=task)
        parsers[task] = p
    return parsers


def options_from_namespace(ns: argparse.Namespace) -> Dict[str, Any]:
    """The keyword options of run_nd_task given on the command line (unset ones left out)."""
    keys = ("model", "head", "mixer", "order_mode", "steps", "batch_size", "lr", "weight_decay", "warmup_steps",
            "d_model", "depth", "d_state", "patch", "image_size", "frames", "canvas", "seed", "device", "threads")
    opts = {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}
    if getattr(ns, "no_augment", False):
        opts["augment"] = False
    opts["progress"] = not getattr(ns, "no_progress", False)
    return opts


def format_result(r: Dict[str, Any]) -> str:
    """A few lines summarising a run_nd_task result."""
    what = "ViT" if r["model"] == "vit" else f"Mamba-ND ({r['mixer']}, {r['order_mode']})"
    if r.get("head") == "dense":
        what += ", dense head (per-token accuracy)"
    n_correct = int(round(r["test_accuracy"] * r["n_test"]))
    lines = [
        f"{r['task']}: {what}, d_model {r['d_model']}, depth {r['depth']}, {r['params']:,} parameters, "
        f"{r['steps']} steps x {r['batch_size']}, seed {r['seed']}, {r['device']}",
        f"test accuracy: {100 * r['test_accuracy']:.2f}% ("
        + (f"{n_correct}/{r['n_test']}; " if r.get("head", "classify") == "classify" else f"{r['n_test']} samples; ")
        + f"chance {100 * r['chance_accuracy']:.1f}%), test loss {r['test_loss']:.4f}, final train loss "
        f"{r['final_train_loss']:.4f}",
        f"wall time: {r['wall_time_s']:.1f} s (training {r['train_time_s']:.1f} s)",
    ]
    if r.get("scan_orders"):
        lines.append("scan orders per layer: " + " | ".join(" + ".join(o) for o in r["scan_orders"]))
    return "\n".join(lines)


def nd_task_main(ns: argparse.Namespace) -> int:
    """Run the task named by ``ns.nd_task`` with the namespace's options; print the result; return 0."""
    result = run_nd_task(ns.nd_task, **options_from_namespace(ns))
    print(format_result(result))
    if getattr(ns, "json", None):
        try:
            with open(ns.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as exc:
            raise MambaKitError(f"cannot write --json {ns.json!r}: {exc}") from exc
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m mambakit.nd.cli") -> int:
    """Standalone entry: ``TASK [options]``, TASK a Mamba-ND task; exit status 2 on bad input. ``prog`` names the
    command in usage and error messages."""
    parser = Parser(prog=prog, description="Mamba-ND tasks.")
    sub = parser.add_subparsers(dest="task", metavar="TASK", parser_class=Parser)
    sub.required = True
    add_nd_parsers(sub)
    return parser.run(sys.argv[1:] if argv is None else argv)
