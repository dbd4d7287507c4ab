"""``mambakit explain``: pictures of a trained model's hidden attention for one prompt, and the tokens that mattered
most for the prediction after it.

:func:`add_explain_parser` registers the subcommand; :func:`explain_main` runs it (from a parsed namespace, or from a
list of arguments). Bad input raises MambaKitError, which the command line prints as one error line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Sequence, Union

import torch

from mambakit.cli.args import add_threads_argument, integer, Parser, positive_int
from mambakit.cli.loading import Tokenizer, find_checkpoint, load_model, load_tokenizer
from mambakit.cli.prompt import encode_prompt, require_prompt
from mambakit.data import ByteTokenizer
from mambakit.errors import MambaKitError
from mambakit.interpret.attribution import FORMS, explain, mixer_layer_indices, token_relevance
from mambakit.interpret.plots import byte_token_labels, plot_explanation
from mambakit.train import resolve_device

DEFAULT_OUT = "explain"
DEFAULT_MAX_PROMPT_TOKENS = 1024
TOP_K = 5


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (or a training --out folder holding checkpoint/)")
    p.add_argument("--prompt", required=True, help="text whose next-token prediction is explained")
    p.add_argument("--layer", type=integer, default=None,
                   help="draw the hidden attention of this layer only (0-based; default: every layer; an attention "
                   "layer of a hybrid shows its softmax attention)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--form", choices=FORMS, default="block",
                   help="'block': the full-block matrices (conv, SiLU and gates folded in; attributes to tokens), "
                   "'ssm': the scan's matrices alone (attributes to conv outputs) (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="refuse longer prompts (the maps are quadratic in length) (default: %(default)s)")


def add_explain_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explain`` on an argparse subparsers object (``parser.add_subparsers(...)``); its handler is
    :func:`explain_main` (set as ``func``). Returns the subcommand's parser."""
    p = subparsers.add_parser(
        "explain",
        help="pictures of a model's hidden attention and the tokens behind its next prediction",
        description="Draw heatmaps of the hidden attention of each layer (mean over channels), its rollout across "
        "layers and the gradient-weighted rollout for the prediction after the prompt, and print the prompt's "
        f"top-{TOP_K} source tokens for that prediction.",
    )
    _add_arguments(p)
    add_threads_argument(p)
    p.set_defaults(func=explain_main)
    return p


def _token_labels(tokenizer: Tokenizer, ids: List[int]) -> List[str]:
    """One short printable label per token id (for the axes of the pictures)."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_token_labels(ids)
    labels = []
    for i in ids:
        text = tokenizer.decode([i])
        labels.append(text if text.isprintable() and text.strip() == text and text else repr(text))
    return labels


def _quoted_token(tokenizer: Tokenizer, i: int) -> str:
    """Token `i` as printed in the text output: always quoted, repr-style (``'d'``, ``' '``, ``'\\n'``, ``'\\xc3'``)."""
    if isinstance(tokenizer, ByteTokenizer):
        return repr(chr(i)) if i < 128 else repr(bytes([i]))[1:]
    return repr(tokenizer.decode([i]))


def explain_main(args: Union[argparse.Namespace, Sequence[str]]) -> int:
    """Run ``mambakit explain``. args: the parsed namespace (from the parser of :func:`add_explain_parser`) or the
    subcommand's arguments as strings. Reads a mambakit, transformers or mamba_ssm checkpoint, writes the PNGs into
    --out, prints the top source tokens, returns 0.

    Raises MambaKitError for bad input: bad arguments, missing or unreadable checkpoint, empty or too long prompt,
    --layer out of range or an MLP-only layer, a model with mixers other than Mamba / Mamba2 / attention (MHA).
    """
    if not isinstance(args, argparse.Namespace):
        parser = Parser(prog="mambakit explain", raising=True)
        _add_arguments(parser)
        args = parser.parse_args(list(args))
    require_prompt(args.prompt)
    device = resolve_device(args.device)
    checkpoint = find_checkpoint(args.checkpoint)
    model = load_model(checkpoint, device)
    mixing = mixer_layer_indices(model)
    n_layer = len(model.backbone.layers)
    if args.layer is not None and args.layer not in mixing:
        if not 0 <= args.layer < n_layer:
            raise MambaKitError(f"--layer must lie in [0, {n_layer}) for this {n_layer}-layer model, got {args.layer}")
        raise MambaKitError(f"--layer {args.layer} is an MLP layer, which mixes no tokens; the token-mixing layers "
                            f"are {mixing}")
    vocab = model.config.vocab_size
    tokenizer = load_tokenizer(checkpoint, vocab)
    ids = encode_prompt(tokenizer, args.prompt, vocab, args.max_prompt_tokens)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, prompt length)
    ex = explain(model, input_ids, form=args.form)
    labels = _token_labels(tokenizer, ids)
    out = Path(args.out)
    written = plot_explanation(ex, out, labels, layers=None if args.layer is None else [args.layer])

    probs = torch.softmax(ex.logits[0, :vocab].double(), -1)  # (vocab,)
    target = int(ex.target[0])
    quoted = [_quoted_token(tokenizer, i) for i in ids]
    predicted = _quoted_token(tokenizer, target)
    print(f"prediction after the last token {quoted[-1]}: {predicted} (p = {float(probs[target]):.3f})")
    if len(ids) > 1:
        self_share = float(ex.relevance[0, -1])
        others = token_relevance(ex.attribution, exclude_self=True)[0]  # (prompt length,)
        k = min(TOP_K, len(ids) - 1)
        scores, positions = torch.topk(others[:-1], k)
        print(f"top-{k} source tokens (gradient-weighted {args.form} attention rollout; the predicting token itself "
              f"holds {self_share:.3f} of the row, the shares below are of the rest):")
        width = len(str(len(ids) - 1))
        for rank, (score, pos) in enumerate(zip(scores.tolist(), positions.tolist()), 1):
            print(f"  {rank}. position {pos:>{width}}  {quoted[pos]:<8} {score:.3f}")
    print(f"wrote {len(written)} pictures to {out}")
    sys.stdout.flush()
    return 0
