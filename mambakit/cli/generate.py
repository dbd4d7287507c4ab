"""``mambakit generate``: print a prompt followed by a trained model's continuation."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from mambakit.cli.args import (
    add_threads_argument,
    checked,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    seed,
)
from mambakit.cli.loading import find_checkpoint, load_model, load_tokenizer
from mambakit.cli.prompt import encode_prompt, require_prompt
from mambakit.cli.remamba import add_remamba_arguments, load_for_generate, remamba_config
from mambakit.errors import MambaKitError
from mambakit.models.generation import MAX_NEW_TOKENS
from mambakit.train import resolve_device

new_tokens = checked(int, f"an integer in [1, {MAX_NEW_TOKENS}]", lambda v: 1 <= v <= MAX_NEW_TOKENS)

DEFAULT_MAX_PROMPT_TOKENS = 100_000


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on an argparse subparsers object; its handler is :func:`generate_main` (set as
    ``func``). Returns the subcommand's parser."""
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model",
                              description="Print the prompt followed by the model's continuation.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (or a training --out folder holding checkpoint/)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=new_tokens, default=200,
                   help=f"tokens to generate, 1 to {MAX_NEW_TOKENS} (default: %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="sampling temperature, 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens, 0 = all; a k "
                   "above the vocabulary size keeps all, as in transformers (default: %(default)s)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=None, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="refuse longer prompts (default: %(default)s)")
    add_remamba_arguments(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the one-token decoding step from a CUDA graph (CUDA devices and SSM-only models)")
    add_threads_argument(p)
    p.set_defaults(func=generate_main)
    return p


def generate_main(ns: argparse.Namespace) -> int:
    """Run ``mambakit generate`` from its parsed namespace: writes the prompt and its continuation to stdout,
    returns 0. Bad input (empty or too long prompt, unreadable checkpoint, no tokenizer for a large vocabulary,
    --cuda-graph without CUDA or with ReMamba) raises MambaKitError."""
    require_prompt(ns.prompt)
    device = resolve_device(ns.device)
    if ns.cuda_graph and torch.device(device).type != "cuda":
        raise MambaKitError(f"--cuda-graph needs a CUDA device, got --device {ns.device} ({device})")
    checkpoint = find_checkpoint(ns.checkpoint)
    remamba = remamba_config(ns)
    if remamba is not None and ns.cuda_graph:
        raise MambaKitError("--cuda-graph is not supported with the ReMamba options: drop one of them")
    model = load_model(checkpoint, device)
    if remamba is not None:
        model = load_for_generate(ns, model, checkpoint)
    vocab = model.config.vocab_size
    tokenizer = load_tokenizer(checkpoint, vocab)
    ids = encode_prompt(tokenizer, ns.prompt, vocab, ns.max_prompt_tokens)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, prompt length)
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                             top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed,
                             **({"remamba": remamba} if remamba is not None else {}),
                             **({"cuda_graph": True} if ns.cuda_graph else {}))
    all_ids = [i for i in out[0].tolist() if i < vocab]  # drop ids of the vocabulary's padding, if ever sampled
    sys.stdout.write(tokenizer.decode(all_ids) + "\n")
    sys.stdout.flush()
    return 0
