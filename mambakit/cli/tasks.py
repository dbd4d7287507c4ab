"""``mambakit tasks NAME``: train a small model from scratch on a synthetic task and print its accuracy.

:func:`add_tasks_parser` registers the subcommand; :func:`tasks_main` runs it (from a parsed namespace, or from a list
of arguments). Bad input raises MambaKitError naming the argument, which the command line prints as one
``error: ...`` line (exit status 2). The Mamba-ND tasks (``mambakit tasks mamba-nd-digits ...``) have their own
parsers, routed to by the first argument (:mod:`mambakit.cli.nd`).

``--mixer``, ``--d-model``, ``--d-state`` and ``--seq-len`` take several values: every combination is trained (a
sweep, e.g. MQAR over lengths and widths) and a summary plot ``NAME_sweep.png`` is written. ``mambakit tasks --list``
prints every built-in task (the Mamba-ND ones too) with the defaults of its options.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Union

from mambakit.cli.args import THREADS_HELP, Parser, integer, number, seed, threads
from mambakit.cli.nd import add_nd_arguments
from mambakit.cli.process import keep_freed_memory
from mambakit.errors import MambaKitError
from mambakit.nd.train import COMMON_DEFAULTS as ND_COMMON_DEFAULTS
from mambakit.nd.train import TASK_DEFAULTS as ND_TASK_DEFAULTS
from mambakit.tasks.generators import TASKS
from mambakit.tasks.runner import DEFAULT_D_STATE, MIXERS, TASK_DEFAULTS, run_sweep, run_task

DEFAULT_OUT = "runs/tasks"
#: The Mamba-ND tasks, routed to their own parsers (:mod:`mambakit.cli.nd`).
ND_TASKS = tuple(ND_TASK_DEFAULTS)
#: One line per built-in task, for --list.
DESCRIPTIONS = {
    "selective-copying": "memorise the data tokens scattered among noise tokens and repeat them in order "
                         "(Mamba paper 4.1.1)",
    "copying": "the same with the data tokens contiguous at the start (a fixed time shift, as an LTI model has, "
               "solves it)",
    "induction-heads": "after a special token, recall the token that followed its first occurrence; evaluated "
                       "far beyond the training length",
    "mqar": "multi-query associative recall: key-value pairs, then each key again, whose value is the answer",
    "parity": "state tracking: the parity of a bit string (running or final answer); trained short, evaluated "
              "longer (Mamba-3 paper)",
    "modular-arithmetic": "state tracking: an expression mod 5, * before + - (--order left: left to right; "
                          "--brackets: Deletang et al.'s nested + - form, --bracket-form chain: + - * with some "
                          "operands bracketed); trained short, evaluated longer",
    "mamba-nd-digits": "2-D: classify scikit-learn's 8x8 handwritten digits (Mamba-ND or its ViT baseline)",
    "mamba-nd-video": "3-D: classify short videos of a moving digit, digit x direction (Mamba-ND or ViT)",
}
#: TASK_DEFAULTS keys whose flag is spelled otherwise.
_FLAGS = {"batch": "batch-size"}


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text at spaces only, so that task names (``induction-heads``) stay whole."""

    def _split_lines(self, text: str, width: int) -> List[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _value(value: Any, sep: str = " ") -> str:
    """A default as typed on the command line: (256, 1024) -> '256 1024' (sep ','  for a comma list), () -> 'none'."""
    if isinstance(value, (tuple, list)):
        return sep.join(map(str, value)) if value else "none"
    return str(value)


def _per_task(key: str) -> str:
    """'selective-copying 2000, copying 1500, ...': the value of TASK_DEFAULTS[task][key] of each task having it."""
    return ", ".join(f"{task} {_value(d[key])}" for task, d in TASK_DEFAULTS.items() if key in d)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", nargs="?",
                   help=f"the task: {' | '.join(TASKS + ND_TASKS)} (the Mamba-ND tasks take their own options: "
                   f"'mambakit tasks {ND_TASKS[0]} --help')")
    p.add_argument("--list", action="store_true", help="list the built-in tasks with their defaults and exit")
    p.add_argument("--mixer", nargs="+", default=["mamba"], metavar="MIXER",
                   help=f"sequence mixer(s): {' | '.join(MIXERS)} (default: mamba)")
    p.add_argument("--steps", type=integer, help=f"optimizer steps (default: {_per_task('steps')})")
    p.add_argument("--batch-size", type=integer, help=f"sequences per step (default: {_per_task('batch')})")
    p.add_argument("--d-model", type=integer, nargs="+", help=f"model width(s) (default: {_per_task('d_model')})")
    p.add_argument("--n-layer", type=integer, help=f"number of blocks (default: {_per_task('n_layer')})")
    p.add_argument("--d-state", type=integer, nargs="+", help="SSM state size(s) (default: "
                   + ", ".join(f"{m} {n}" for m, n in DEFAULT_D_STATE.items() if n) + "; ignored by attention)")
    p.add_argument("--seq-len", type=integer, nargs="+", help=f"training length(s) (default: {_per_task('seq_len')})")
    p.add_argument("--lr", type=number, help=f"peak learning rate (default: {_per_task('lr')})")
    p.add_argument("--weight-decay", type=number,
                   help=f"AdamW weight decay of the matrices (default: {_per_task('weight_decay')})")
    p.add_argument("--warmup", type=integer, help="linear warmup steps (default: min(100, steps / 10))")
    p.add_argument("--seed", type=seed, default=0, help="seed of the model and the data (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG and JSON results (default: %(default)s)")
    p.add_argument("--eval-lengths", type=integer, nargs="*",
                   help=f"also evaluate at these lengths after training (default: {_per_task('eval_lengths')})")
    p.add_argument("--eval-samples", type=integer, default=256,
                   help="held-out sequences at the training length (default: %(default)s)")
    p.add_argument("--eval-interval", type=integer,
                   help="training steps between held-out evaluations (default: steps / 10)")
    p.add_argument("--vocab", type=integer, help=f"data tokens; mqar: token ids (default: {_per_task('vocab')})")
    p.add_argument("--n-tokens", type=integer,
                   help=f"(selective-)copying: tokens to memorise (default: {_per_task('n_tokens')})")
    p.add_argument("--n-pairs", type=integer,
                   help=f"mqar: key-value pairs per sequence (default: {_per_task('n_pairs')})")
    p.add_argument("--headdim", type=integer, help="mamba2 / mamba3 head size (default: "
                   f"{_per_task('headdim')}, else the first of 64, 32, 16, 8 dividing 2*d_model)")
    p.add_argument("--dt-init", type=number, nargs=2, metavar=("MIN", "MAX"),
                   help="range of the SSM mixers' initial step (dt_min dt_max) (default: "
                   f"{_per_task('dt_init')}, else the mixer's own, 0.001 0.1)")
    p.add_argument("--num-heads", type=integer, help="attention heads (default: d_model / 16)")
    p.add_argument("--stop-at", type=number, help="stop once the held-out accuracy reaches this (0..1] (default: "
                   "none, all steps run)")
    p.add_argument("--max-time", type=number, help="stop training after this many seconds (per run) (default: none)")
    p.add_argument("--eval-chunk", type=integer, default=4096,
                   help="tokens per chunk when evaluating long sequences through the cache (default: %(default)s)")
    p.add_argument("--long-eval-tokens", type=integer, default=1 << 19,
                   help="token budget per extra eval length: max(4, budget // length) sequences (default: %(default)s)")
    p.add_argument("--max-attention-len", type=integer, default=16384,
                   help="skip attention evaluations above this length (time and memory grow with it) "
                   "(default: %(default)s)")
    p.add_argument("--brackets", action="store_true", help="modular-arithmetic: expressions with brackets")
    p.add_argument("--order", choices=("precedence", "left"),
                   help="modular-arithmetic: evaluate * before + - (precedence, as Deletang et al.) or every "
                   f"operator left to right (left) (default: {_per_task('order')})")
    p.add_argument("--bracket-form", choices=("nested", "chain"),
                   help="modular-arithmetic --brackets: nested, Deletang et al.'s ( L op R ) with + - and unary "
                   "minus (running answers: the signed sum of the digits so far), or chain, E op T with + - * and "
                   f"some operands in brackets (default: {_per_task('bracket_form')})")
    p.add_argument("--supervision", choices=("final", "running"),
                   help="parity / modular-arithmetic training targets: final answer only or running answers "
                   f"(default: {_per_task('supervision')}; the held-out accuracy is always the final answer's)")
    p.add_argument("--threads", type=threads, help=THREADS_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_tasks_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tasks`` on an argparse subparsers object (``parser.add_subparsers(...)``); its handler is
    :func:`tasks_main` (set as ``func``). Returns the subcommand's parser."""
    p = subparsers.add_parser(
        "tasks",
        help="train a small model on a synthetic task (selective copying, induction heads, MQAR) or a Mamba-ND task",
        description="Train a small S4 / Mamba / Mamba-2 / attention model from scratch on a synthetic task that "
        "shows what selectivity buys, print its held-out accuracy and write a plot (accuracy vs training step, and "
        "vs evaluation length). The options below are those of the synthetic tasks; 'mambakit tasks --list' shows "
        "every task with its defaults.",
        epilog=f"Mamba-ND tasks (images, video): {', '.join(ND_TASKS)}; their options and defaults: "
        f"'mambakit tasks {ND_TASKS[0]} --help'.",
        formatter_class=_HelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=tasks_main)
    return p


def _fmt(acc: Optional[float]) -> str:
    return "  n/a " if acc is None else f"{100 * acc:5.1f}%"


def _nd_defaults(task: str) -> Dict[str, str]:
    """The defaults of a Mamba-ND task's options, keyed by flag (``--order-mode``): the value it runs with, or the
    rule its help states when the value is derived (``--d-state``)."""
    parser = argparse.ArgumentParser()
    add_nd_arguments(parser, task)
    values = {**ND_COMMON_DEFAULTS, **ND_TASK_DEFAULTS[task]}
    out = {}
    for action in parser._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag is None or action.dest == "help":
            continue
        if action.dest in values and values[action.dest] is not None:
            out[flag] = _value(values[action.dest], sep=",")
        elif action.dest == "no_augment":
            out[flag] = "not given (random shifts on)" if values["augment"] else "given"
        else:
            stated = re.search(r"\(default: ([^)]*(?:\([^)]*\)[^)]*)*)\)\s*$", action.help or "")
            out[flag] = f"({stated.group(1)})" if stated else "none"
    return out


def list_tasks() -> str:
    """The text of ``mambakit tasks --list``: each built-in task, what it is, and the defaults of its options (the
    synthetic tasks' options common to all of them last)."""
    lines = []
    for task, d in TASK_DEFAULTS.items():
        flags = ", ".join(f"--{_FLAGS.get(k, k).replace('_', '-')} {_value(v)}" for k, v in d.items())
        lines += _entry(task, flags)
    d_state = ", ".join(f"{m} {n}" for m, n in DEFAULT_D_STATE.items() if n)
    lines += _entry("  and all of these", f"--mixer mamba, --d-state per mixer ({d_state}), --seed 0, "
                    "--eval-samples 256, "
                    "--warmup min(100, steps / 10), --eval-interval steps / 10 (the rest: 'mambakit tasks --help')")
    for task in ND_TASKS:
        flags = ", ".join(f"{flag} {value}" for flag, value in _nd_defaults(task).items() if value != "none")
        lines += _entry(task, flags)
    return "\n".join(lines)


def _entry(head: str, flags: str) -> List[str]:
    title = f"{head}: {DESCRIPTIONS[head]}" if head in DESCRIPTIONS else head + ":"
    return textwrap.wrap(title, 110, break_on_hyphens=False) + textwrap.wrap(
        flags, 110, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)


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
    if ns.list:
        print(list_tasks())
        return 0
    if ns.name is None:
        raise MambaKitError(f"NAME is required: one of {', '.join(TASKS + ND_TASKS)} (or --list)")
    if ns.name in ND_TASKS:  # options given before a Mamba-ND task's name reach this parser
        raise MambaKitError(f"the options of {ns.name} come after its name: 'mambakit tasks {ns.name} [options]' "
                            f"(see 'mambakit tasks {ns.name} --help')")
    if ns.name not in TASKS:
        raise MambaKitError(f"NAME must be one of {', '.join(TASKS + ND_TASKS)}; got {ns.name!r}")
    bad = [m for m in ns.mixer if m not in MIXERS]
    if bad:
        raise MambaKitError(f"--mixer must be one of {', '.join(MIXERS)}; got {bad[0]!r}")
    common = dict(steps=ns.steps, batch=ns.batch_size, lr=ns.lr, n_layer=ns.n_layer, seed=ns.seed, device=ns.device,
                  eval_lengths=ns.eval_lengths, vocab=ns.vocab, n_tokens=ns.n_tokens, n_pairs=ns.n_pairs,
                  headdim=ns.headdim, num_heads=ns.num_heads, weight_decay=ns.weight_decay, warmup=ns.warmup,
                  eval_interval=ns.eval_interval, eval_samples=ns.eval_samples, stop_at=ns.stop_at,
                  max_time=ns.max_time, threads=ns.threads, brackets=ns.brackets, supervision=ns.supervision,
                  dt_init=ns.dt_init, order=ns.order, bracket_form=ns.bracket_form,
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
