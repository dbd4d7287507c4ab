"""The ``mambakit`` command line: ``train``, ``generate``, ``explain`` and ``tasks`` (synthetic tasks, Mamba-ND).

Bad input (missing data, unreadable checkpoint, invalid numbers, unknown device, ...) prints one line
``error: ...`` on stderr and exits with status 2; it never shows a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from mambakit.errors import MambaKitError

DEFAULT_MAX_PROMPT_TOKENS = 100_000


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: parse with `kind`, accept when `test` holds, else a message naming `what`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from mambakit.train import DEFAULTS

    p = sub.add_parser(
        "train",
        help="train a byte-level Mamba language model",
        description="Train a byte-level Mamba LM. With no options: the built-in corpus (the Python standard "
        "library's sources) and a small model sized for a few minutes on a laptop CPU.",
    )
    p.add_argument("--data", help="a text file or a folder of text files (default: the built-in corpus)")
    p.add_argument("--out", default="runs/mamba", help="output folder: checkpoint/, loss.png, summary.json "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default: {DEFAULTS['steps']})")
    p.add_argument("--arch", choices=("mamba1", "mamba2"), help=f"mixer layer (default: {DEFAULTS['arch']})")
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
    p.add_argument("--seed", type=non_negative_int, help=f"random seed (default: {DEFAULTS['seed']})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--sample-prompt", help=f"prompt of the sample printed at the end "
                   f"(default: {DEFAULTS['sample_prompt']!r})")
    p.add_argument("--sample-tokens", type=non_negative_int,
                   help=f"bytes generated for the final sample, 0 = none (default: {DEFAULTS['sample_tokens']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist_group = p.add_argument_group("distributed (data-parallel) training")
    dist_group.add_argument("--nproc", type=positive_int, help="run N data-parallel processes on this machine "
                            "(launches torchrun; same as 'torchrun --nproc-per-node N -m mambakit train ...')")
    dist_group.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state "
                            "(FSDP2) instead of replicating them (DDP)")
    dist_group.add_argument("--bf16", action="store_true", help="bf16 autocast with fp32 master weights (CUDA only)")
    p.set_defaults(func=_cmd_train)


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model",
                       description="Print the prompt followed by the model's continuation.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (or a training --out folder holding checkpoint/)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="sampling temperature, 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens, 0 = all "
                   "(default: %(default)s)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="refuse longer prompts (default: %(default)s)")
    from mambakit.remamba.cli import add_remamba_arguments

    add_remamba_arguments(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the one-token decoding step from a CUDA graph (CUDA devices and SSM-only models)")
    p.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mambakit`` and its subcommands."""
    parser = _Parser(prog="mambakit", description="Mamba selective state-space language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train_parser(sub)
    _add_generate_parser(sub)
    from mambakit.interpret.cli import add_explain_parser
    from mambakit.tasks.cli import add_tasks_parser

    add_explain_parser(sub)
    add_tasks_parser(sub)
    return parser


ND_TASKS = ("mamba-nd-digits", "mamba-nd-video")


def _cmd_train(ns: argparse.Namespace) -> int:
    from mambakit.distributed.launch import launch, under_torchrun
    from mambakit.distributed.sampler import check_batch_split
    from mambakit.train import TrainArgs, resolve_run, train

    args = TrainArgs(
        out=ns.out, resume=ns.resume, progress=not ns.no_progress, data=ns.data, steps=ns.steps, d_model=ns.d_model,
        n_layer=ns.n_layer, d_state=ns.d_state, arch=ns.arch, seq_len=ns.seq_len, batch_size=ns.batch_size, lr=ns.lr,
        warmup_steps=ns.warmup_steps, weight_decay=ns.weight_decay, eval_interval=ns.eval_interval,
        eval_batches=ns.eval_batches, save_interval=ns.save_interval, seed=ns.seed, device=ns.device,
        sample_prompt=ns.sample_prompt, sample_tokens=ns.sample_tokens, grad_accum=ns.grad_accum, fsdp=ns.fsdp,
        bf16=ns.bf16,
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


class _HFTokenizer:
    """A `tokenizers.Tokenizer` read from tokenizer.json, behind the ByteTokenizer interface."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception types
            raise MambaKitError(f"cannot read tokenizer {str(path)!r}: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _find_checkpoint(path: str) -> Path:
    """The checkpoint folder: `path` itself, or `path`/checkpoint for a training output folder."""
    from mambakit.models.checkpoint import CONFIG_NAME
    from mambakit.train import CHECKPOINT_SUBDIR

    p = Path(path)
    if not (p / CONFIG_NAME).exists() and (p / CHECKPOINT_SUBDIR / CONFIG_NAME).exists():
        return p / CHECKPOINT_SUBDIR
    return p


def _load_tokenizer(checkpoint: Path) -> Any:
    """tokenizer.json from the checkpoint when present and `tokenizers` is installed, else bytes."""
    from mambakit.data import ByteTokenizer

    tokenizer_json = checkpoint / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            print(f"warning: {tokenizer_json} found but the 'tokenizers' package is not installed; "
                  "using bytes", file=sys.stderr)
        else:
            return _HFTokenizer(tokenizer_json)
    return ByteTokenizer()


def _cmd_generate(ns: argparse.Namespace) -> int:
    import torch

    from mambakit.models.pretrained import from_pretrained
    from mambakit.train import resolve_device

    if not ns.prompt:
        raise MambaKitError("--prompt must not be empty")
    device = resolve_device(ns.device)
    if ns.cuda_graph and torch.device(device).type != "cuda":
        raise MambaKitError(f"--cuda-graph needs a CUDA device, got --device {ns.device} ({device})")
    checkpoint = _find_checkpoint(ns.checkpoint)
    from mambakit.remamba.cli import remamba_config

    remamba = remamba_config(ns)
    if remamba is not None and ns.cuda_graph:
        raise MambaKitError("--cuda-graph is not supported with the ReMamba options: drop one of them")
    model = from_pretrained(checkpoint, device=device)  # mambakit, transformers or mamba_ssm folder
    if remamba is not None:
        from mambakit.remamba.cli import load_for_generate

        model = load_for_generate(ns, model, checkpoint)
    tokenizer = _load_tokenizer(checkpoint)
    if tokenizer.__class__.__name__ == "ByteTokenizer" and model.config.vocab_size > 256 + 8:
        raise MambaKitError(f"{checkpoint} has a vocabulary of {model.config.vocab_size} tokens but no tokenizer.json; "
                            "copy the tokenizer.json of the model family (e.g. EleutherAI/gpt-neox-20b for the "
                            "original Mamba checkpoints) into the folder")
    ids = tokenizer.encode(ns.prompt)
    if not ids:
        raise MambaKitError("--prompt encodes to no tokens")
    if len(ids) > ns.max_prompt_tokens:
        raise MambaKitError(f"--prompt is {len(ids)} tokens long, more than --max-prompt-tokens "
                            f"{ns.max_prompt_tokens}")
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise MambaKitError(f"the prompt holds token id {max(ids)}, outside the model's vocabulary of {vocab}; "
                            "does the tokenizer match the checkpoint?")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                             top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed,
                             **({"remamba": remamba} if remamba is not None else {}),
                             **({"cuda_graph": True} if ns.cuda_graph else {}))
    all_ids = [i for i in out[0].tolist() if i < vocab]  # drop ids of the vocabulary's padding, if ever sampled
    sys.stdout.write(tokenizer.decode(all_ids) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mambakit`` command line; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "tasks" and argv[1] in ND_TASKS:  # the Mamba-ND tasks have their own options
        from mambakit.nd.cli import main as nd_main

        return nd_main(argv[1:], prog="mambakit tasks")
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    ns.argv = argv  # the command line as given (``train --nproc N`` re-runs it under torchrun)
    try:
        return ns.func(ns)
    except MambaKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
