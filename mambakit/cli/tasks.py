"""``mambakit tasks NAME``: train a small model from scratch on a synthetic task and print its accuracy.

:func:`add_tasks_parser` registers the subcommand; :func:`tasks_main` runs it (from a parsed namespace, or from a list
of arguments). Bad input raises MambaKitError naming the argument, which the command line prints as one
``error: ...`` line (exit status 2). The Mamba-ND tasks (``mambakit tasks mamba-nd-digits ...``) have their own
parsers, routed to by the first argument (:mod:`mambakit.cli.nd`).

``--mixer``, ``--d-model``, ``--d-state`` and ``--seq-len`` take several values: every combination is trained (a
sweep, e.g. MQAR over lengths and widths) and a summary plot ``NAME_sweep.png`` is written.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional, Sequence, Union

from mambakit.cli.args import THREADS_HELP, Parser, integer, number, seed, threads
from mambakit.cli.process import keep_freed_memory
from mambakit.errors import MambaKitError
from mambakit.tasks.generators import TASKS
from mambakit.tasks.runner import MIXERS, run_sweep, run_task

DEFAULT_OUT = "runs/tasks"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help=f"the task: {' | '.join(TASKS)}")
    p.add_argument("--mixer", nargs="+", default=["mamba"], metavar="MIXER",
                   help=f"sequence mixer(s): {' | '.join(MIXERS)} (default: mamba)")
    p.add_argument("--steps", type=integer, help="optimizer steps (default: per task, see mambakit.tasks.TASK_DEFAULTS)")
    p.add_argument("--batch-size", type=integer, help="sequences per step (default: per task)")
    p.add_argument("--d-model", type=integer, nargs="+", help="model width(s) (default: per task)")
    p.add_argument("--n-layer", type=integer, help="number of blocks (default: per task)")
    p.add_argument("--d-state", type=integer, nargs="+",
                   help="SSM state size(s) (default: s4 64, mamba 16, mamba2 64; ignored by attention)")
    p.add_argument("--seq-len", type=integer, nargs="+", help="training length(s) (default: per task)")
    p.add_argument("--lr", type=number, help="peak learning rate (default: per task)")
    p.add_argument("--weight-decay", type=number,
                   help="AdamW weight decay of the matrices (default: per task; induction-heads 0, others 0.1)")
    p.add_argument("--warmup", type=integer, help="linear warmup steps (default: min(100, steps / 10))")
    p.add_argument("--seed", type=seed, default=0, help="seed of the model and the data (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG and JSON results (default: %(default)s)")
    p.add_argument("--eval-lengths", type=integer, nargs="*",
                   help="also evaluate at these lengths after training (default: induction-heads 256 1024 4096 16384 "
                   "65536)")
    p.add_argument("--eval-samples", type=integer, default=256,
                   help="held-out sequences at the training length (default: %(default)s)")
    p.add_argument("--eval-interval", type=integer,
                   help="training steps between held-out evaluations (default: steps / 10)")
    p.add_argument("--vocab", type=integer, help="data tokens (default: 16; mqar: 256 token ids)")
    p.add_argument("--n-tokens", type=integer,
                   help="(selective-)copying: tokens to memorise (default: selective-copying 4, copying 16)")
    p.add_argument("--n-pairs", type=integer, help="mqar: key-value pairs per sequence (default: 32)")
    p.add_argument("--headdim", type=integer, help="mamba2 head size (default: the first of 64, 32, 16, 8 dividing "
                   "2*d_model)")
    p.add_argument("--num-heads", type=integer, help="attention heads (default: d_model / 16)")
    p.add_argument("--stop-at", type=number, help="stop once the held-out accuracy reaches this (0..1]")
    p.add_argument("--max-time", type=number, help="stop training after this many seconds (per run)")
    p.add_argument("--eval-chunk", type=integer, default=4096,
                   help="tokens per chunk when evaluating long sequences through the cache (default: %(default)s)")
    p.add_argument("--long-eval-tokens", type=integer, default=1 << 19,
                   help="token budget per extra eval length: max(4, budget // length) sequences (default: %(default)s)")
    p.add_argument("--max-attention-len", type=integer, default=16384,
                   help="skip attention evaluations above this length (time and memory grow with it) "
                   "(default: %(default)s)")
    p.add_argument("--brackets", action="store_true", help="modular-arithmetic: expressions with brackets")
    p.add_argument("--supervision", choices=("final", "running"),
                   help="parity / modular-arithmetic training targets: final answer only or running answers "
                   "(default: running; the held-out accuracy is always the final answer's)")
    p.add_argument("--threads", type=threads, help=THREADS_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_tasks_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tasks`` on an argparse subparsers object (``parser.add_subparsers(...)``); its handler is
    :func:`tasks_main` (set as ``func``). Returns the subcommand's parser."""
    p = subparsers.add_parser(
        "tasks",
        help="train a small model on a synthetic task (selective copying, induction heads, MQAR)",
        description="Train a small S4 / Mamba / Mamba-2 / attention model from scratch on a synthetic task that "
        "shows what selectivity buys, print its held-out accuracy and write a plot (accuracy vs training step, and "
        "vs evaluation length).",
    )
    _add_arguments(p)
    p.set_defaults(func=tasks_main)
    return p


def _fmt(acc: Optional[float]) -> str:
    return "  n/a " if acc is None else f"{100 * acc:5.1f}%"


def tasks_main(args: Union[argparse.Namespace, Sequence[str]]) -> int:
    """Run ``mambakit tasks`` from a parsed namespace or an argument list (a usage error in the list raises
    MambaKitError); prints the accuracies, returns 0. Keeps freed memory in this process (see
    :func:`mambakit.cli.process.keep_freed_memory`)."""
    if isinstance(args, argparse.Namespace):
        ns = args
    else:
        parser = Parser(prog="mambakit tasks", raising=True)
        _add_arguments(parser)
        ns = parser.parse_args(list(args))
    if ns.name not in TASKS:
        raise MambaKitError(f"NAME must be one of {', '.join(TASKS)}; got {ns.name!r}")
    bad = [m for m in ns.mixer if m not in MIXERS]
    if bad:
        raise MambaKitError(f"--mixer must be one of {', '.join(MIXERS)}; got {bad[0]!r}")
    common = dict(steps=ns.steps, batch=ns.batch_size, lr=ns.lr, n_layer=ns.n_layer, seed=ns.seed, device=ns.device,
                  eval_lengths=ns.eval_lengths, vocab=ns.vocab, n_tokens=ns.n_tokens, n_pairs=ns.n_pairs,
                  headdim=ns.headdim, num_heads=ns.num_heads, weight_decay=ns.weight_decay, warmup=ns.warmup,
                  eval_interval=ns.eval_interval, eval_samples=ns.eval_samples, stop_at=ns.stop_at,
                  max_time=ns.max_time, threads=ns.threads, brackets=ns.brackets, supervision=ns.supervision,
                  eval_chunk=ns.eval_chunk, long_eval_tokens=ns.long_eval_tokens,
                  max_attention_len=ns.max_attention_len, progress=not ns.no_progress)
    keep_freed_memory()
    d_models: List[Optional[int]] = list(ns.d_model or [None])
    seq_lens: List[Optional[int]] = list(ns.seq_len or [None])
    d_states: List[Optional[int]] = list(ns.d_state or [None])
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if len(ns.mixer) * len(d_models) * len(seq_lens) * len(d_states) == 1:
        rows = [run_task(ns.name, ns.mixer[0], d_model=d_models[0], d_state=d_states[0], seq_len=seq_lens[0],
                         out=ns.out, log=log, **common)]
    else:
        rows = run_sweep(ns.name, ns.mixer, d_models, seq_lens, out=ns.out, d_states=d_states, log=log, **common)
    print(f"{'task':18s} {'mixer':9s} {'d_model':>7s} {'d_state':>7s} {'seq_len':>7s} {'params':>8s} "
          f"{'steps':>6s} {'accuracy':>8s}")
    for r in rows:
        c = r["config"]
        print(f"{r['task']:18s} {r['mixer']:9s} {c['d_model']:7d} {str(c['d_state'] or '-'):>7s} {c['seq_len']:7d} "
              f"{r['n_params']:8d} {r['steps_run']:6d} {_fmt(r['accuracy']):>8s}")
        for L, e in r["eval_lengths"].items():
            print(f"    at length {int(L):>8d}: {_fmt(e['accuracy'])}" + (f"  ({e['skipped']})" if e.get("skipped")
                                                                           else f"  ({e['samples']} sequences)"))
        if r.get("plot"):
            print(f"    plot: {r['plot']}")
    if len(rows) > 1 and ns.out:
        print(f"sweep plot: {ns.out}/{rows[0]['task']}_sweep.png"
              + (f", lengths plot: {ns.out}/{rows[0]['task']}_lengths.png" if rows[0]["eval_lengths"] else ""))
    sys.stdout.flush()
    return 0
