"""``mambakit train``: train a byte-level Mamba language model (on one process, or data-parallel under torchrun), or
fine-tune an existing checkpoint with its own tokenizer (``--init-from FOLDER``)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from mambakit.cli.args import (
    add_threads_argument,
    non_empty,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)
from mambakit.distributed.launch import launch, under_torchrun
from mambakit.distributed.sampler import check_batch_split
from mambakit.errors import MambaKitError
from mambakit.cli.loading import TOKENIZER_NAME, Tokenizer, find_checkpoint, load_tokenizer
from mambakit.train import ARCHS, DEFAULTS, TrainArgs, resolve_run, train
from mambakit.finetune import FinetuneArgs, finetune

FINETUNE = FinetuneArgs(init_from="", out="")  # the defaults of a fine-tuning run
#: options that a fine-tuning run takes from its checkpoint, or does not have
_NOT_WITH_INIT = {"arch": "--arch", "d_model": "--d-model", "n_layer": "--n-layer", "d_state": "--d-state",
                  "resume": "--resume", "nproc": "--nproc", "fsdp": "--fsdp"}


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object; its handler is :func:`train_main` (set as ``func``).
    Returns the subcommand's parser."""
    p = subparsers.add_parser(
        "train",
        help="train a byte-level Mamba language model",
        description="Train a byte-level Mamba LM. With no options: the built-in corpus (the Python standard "
        "library's sources) and a small model sized for a few minutes on a laptop CPU.",
    )
    p.add_argument("--data", type=non_empty,
                   help="a text file or a folder of text files (default: the built-in corpus)")
    p.add_argument("--out", default="runs/mamba", help="output folder: checkpoint/, loss.png, summary.json "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default: {DEFAULTS['steps']})")
    p.add_argument("--arch", choices=tuple(ARCHS), help=f"mixer layer (default: {DEFAULTS['arch']})")
    p.add_argument("--d-model", type=positive_int, help=f"model width (default: {DEFAULTS['d_model']})")
    p.add_argument("--n-layer", type=positive_int, help=f"number of blocks (default: {DEFAULTS['n_layer']})")
    p.add_argument("--d-state", type=positive_int, help="SSM state size (default: 16 for mamba1, 64 for mamba2)")
    p.add_argument("--seq-len", type=positive_int, help=f"training sequence length in bytes "
                   f"(default: {DEFAULTS['seq_len']})")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per optimizer step, all ranks and micro-batches "
                   f"together (the global batch; default: {DEFAULTS['batch_size']})")
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches accumulated per optimizer step on each rank "
                   f"(default: {DEFAULTS['grad_accum']})")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default: {DEFAULTS['lr']})")
    p.add_argument("--warmup-steps", type=non_negative_int, help="linear warmup steps (default: min(100, steps/10))")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help=f"AdamW weight decay on matrices (default: {DEFAULTS['weight_decay']})")
    p.add_argument("--eval-interval", type=positive_int,
                   help=f"steps between validation losses (default: {DEFAULTS['eval_interval']})")
    p.add_argument("--eval-batches", type=positive_int,
                   help=f"fixed validation batches per evaluation (default: {DEFAULTS['eval_batches']})")
    p.add_argument("--save-interval", type=positive_int, help="steps between checkpoints (default: eval interval)")
    p.add_argument("--seed", type=seed, help=f"random seed (default: {DEFAULTS['seed']})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out (without it, "
                   "a new run into a folder holding one is refused)")
    p.add_argument("--sample-prompt", help=f"prompt of the sample printed at the end "
                   f"(default: {DEFAULTS['sample_prompt']!r})")
    p.add_argument("--sample-tokens", type=non_negative_int,
                   help=f"bytes generated for the final sample, 0 = none (default: {DEFAULTS['sample_tokens']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune = p.add_argument_group("fine-tuning a checkpoint (--init-from)")
    tune.add_argument("--init-from", type=non_empty, metavar="FOLDER",
                      help="continue training this checkpoint (transformers mamba / mamba2 / falcon_mamba or a "
                      "hybrid, mamba_ssm, mambakit) with its own tokenizer.json; writes --out/checkpoint in "
                      "transformers format. Its shape comes from the folder (no --arch, --d-model, --n-layer, "
                      f"--d-state); other defaults: --steps {FINETUNE.steps}, --lr {FINETUNE.lr}, --weight-decay "
                      f"{FINETUNE.weight_decay}, --warmup-steps min({FINETUNE.warmup_steps}, steps/10), "
                      f"--eval-interval {FINETUNE.eval_interval}, --eval-batches {FINETUNE.eval_batches}, no sample")
    tune.add_argument("--lora-rank", type=non_negative_int, help="with --init-from: train LoRA adapters of this rank "
                      "on the in_proj / out_proj of every Mamba mixer (merged into the saved weights) instead of all "
                      "weights; 0 = full fine-tuning (default: 0)")
    tune.add_argument("--lora-alpha", type=positive_float, help=f"LoRA scale alpha (the update is alpha / rank * BA; "
                      f"default: {FINETUNE.lora_alpha})")
    dist_group = p.add_argument_group("distributed (data-parallel) training")
    dist_group.add_argument("--nproc", type=positive_int, help="run N data-parallel processes on this machine "
                            "(launches torchrun; same as 'torchrun --nproc-per-node N -m mambakit train ...')")
    dist_group.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state "
                            "(FSDP2) instead of replicating them (DDP)")
    dist_group.add_argument("--bf16", action="store_true", help="bf16 autocast with fp32 master weights (CUDA only)")
    dist_group.add_argument("--cuda-graph", action="store_true", help="replay each step's forward, loss and backward "
                            "as one CUDA graph (CUDA, one process, no --grad-accum; removes the launch overhead)")
    add_threads_argument(p)
    p.set_defaults(func=train_main)
    return p


def train_main(ns: argparse.Namespace) -> int:
    """Run ``mambakit train`` from its parsed namespace (with ``argv``, the command line, for --nproc); returns 0.
    Bad options raise MambaKitError."""
    if ns.init_from is not None:
        return finetune_main(ns)
    for name in ("lora_rank", "lora_alpha"):
        if getattr(ns, name) is not None:
            raise MambaKitError(f"--{name.replace('_', '-')} needs --init-from (LoRA adapts an existing checkpoint)")
    args = TrainArgs(
        out=ns.out, resume=ns.resume, progress=not ns.no_progress, data=ns.data, steps=ns.steps, d_model=ns.d_model,
        n_layer=ns.n_layer, d_state=ns.d_state, arch=ns.arch, seq_len=ns.seq_len, batch_size=ns.batch_size, lr=ns.lr,
        warmup_steps=ns.warmup_steps, weight_decay=ns.weight_decay, eval_interval=ns.eval_interval,
        eval_batches=ns.eval_batches, save_interval=ns.save_interval, seed=ns.seed, device=ns.device,
        sample_prompt=ns.sample_prompt, sample_tokens=ns.sample_tokens, grad_accum=ns.grad_accum, fsdp=ns.fsdp,
        bf16=ns.bf16, cuda_graph=ns.cuda_graph, overwrite=ns.overwrite,
    )
    if ns.nproc is not None and not under_torchrun():
        resolved, _ = resolve_run(args)  # bad options fail here, in one process, before anything is launched
        check_batch_split(resolved.batch_size, ns.nproc, resolved.grad_accum)
        return launch(ns.nproc, ns.argv)  # re-runs this command line in N processes (without --nproc)
    if ns.nproc is not None and str(ns.nproc) != os.environ.get("WORLD_SIZE"):
        raise MambaKitError(f"--nproc {ns.nproc} contradicts torchrun's world size {os.environ.get('WORLD_SIZE')}; "
                            "drop --nproc when starting with torchrun")
    train(args)
    return 0


def finetune_main(ns: argparse.Namespace) -> int:
    """``mambakit train --init-from FOLDER``: fine-tune a checkpoint (`mambakit.training.finetune`)."""
    given = [flag for name, flag in _NOT_WITH_INIT.items() if getattr(ns, name) not in (None, False)]
    if given:
        raise MambaKitError(f"{', '.join(given)} cannot be combined with --init-from (the model's shape comes from "
                            "the checkpoint; a fine-tune runs in one process and starts afresh: to continue one, "
                            "--init-from its --out folder's checkpoint into a new --out)")
    source = find_checkpoint(Path(ns.init_from).expanduser())  # a training --out folder: its checkpoint/
    if not source.is_dir():
        raise MambaKitError(f"--init-from {ns.init_from!r} is not a folder")
    if (source / TOKENIZER_NAME).is_file():
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            raise MambaKitError(f"--init-from {ns.init_from!r} has a {TOKENIZER_NAME}, and reading it needs the "
                                "'tokenizers' package: pip install tokenizers") from None
    given_values = {name: getattr(ns, name) for name in (
        "data", "steps", "seq_len", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay",
        "eval_interval", "eval_batches", "seed", "device", "sample_tokens", "lora_rank", "lora_alpha")}
    args = FinetuneArgs(init_from=str(source), out=ns.out, bf16=ns.bf16, overwrite=ns.overwrite,
                        progress=not ns.no_progress, **{k: v for k, v in given_values.items() if v is not None})
    if ns.warmup_steps is None:
        args.warmup_steps = min(FINETUNE.warmup_steps, args.steps // 10)
    args.save_interval = ns.save_interval if ns.save_interval is not None else args.eval_interval
    args.sample_prompt = ns.sample_prompt if ns.sample_prompt is not None else DEFAULTS["sample_prompt"]
    tokenizer = _finetune_tokenizer(source)
    finetune(args, tokenizer)
    return 0


def _finetune_tokenizer(source: Path) -> Tokenizer:
    """The folder's tokenizer.json; bytes only for a byte-level model (a vocabulary of at most MAX_BYTE_VOCAB ids,
    read from its config.json); else MambaKitError."""
    try:
        raw = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    vocab = raw.get("vocab_size") if isinstance(raw.get("vocab_size"), int) else 0
    return load_tokenizer(source, vocab)
