"""What the subcommands that read a trained model share: its folder, the model (any supported format) and its
tokenizer."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Protocol, Union

import torch

from mambakit.data import ByteTokenizer
from mambakit.errors import MambaKitError
from mambakit.models.checkpoint import CONFIG_NAME
from mambakit.models.pretrained import from_pretrained
from mambakit.train import CHECKPOINT_SUBDIR

TOKENIZER_NAME = "tokenizer.json"
# A byte-level model has 256 token ids, its vocabulary padded to a multiple of 8 at most.
MAX_BYTE_VOCAB = 256 + 8


class Tokenizer(Protocol):
    """What the command line needs of a tokenizer (ByteTokenizer's interface)."""

    vocab_size: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: List[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from tokenizer.json, behind the ByteTokenizer interface."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception types
            raise MambaKitError(f"cannot read tokenizer {str(path)!r}: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def find_checkpoint(path: Union[str, Path]) -> Path:
    """The checkpoint folder: `path` itself, or `path`/checkpoint for a training output folder."""
    p = Path(path)
    if not (p / CONFIG_NAME).exists() and (p / CHECKPOINT_SUBDIR / CONFIG_NAME).exists():
        return p / CHECKPOINT_SUBDIR
    return p


def load_model(checkpoint: Path, device: Union[str, torch.device]) -> torch.nn.Module:
    """The `MambaLMHeadModel` of a mambakit, transformers or mamba_ssm checkpoint folder, in eval mode on `device`.
    Raises CheckpointError (a MambaKitError) naming what is missing or wrong."""
    return from_pretrained(checkpoint, device=device)


def load_tokenizer(checkpoint: Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer.json when present and `tokenizers` is installed, else bytes.

    vocab_size: the model's vocabulary; bytes for a model of more than MAX_BYTE_VOCAB tokens raise MambaKitError
    (the folder lacks the tokenizer of its model family).
    """
    tokenizer_json = checkpoint / TOKENIZER_NAME
    if tokenizer_json.is_file():
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            print(f"warning: {tokenizer_json} found but the 'tokenizers' package is not installed; "
                  "using bytes", file=sys.stderr)
        else:
            return HFTokenizer(tokenizer_json)
    if vocab_size > MAX_BYTE_VOCAB:
        raise MambaKitError(f"{checkpoint} has a vocabulary of {vocab_size} tokens but no {TOKENIZER_NAME}; "
                            f"copy the {TOKENIZER_NAME} of the model family (e.g. EleutherAI/gpt-neox-20b for the "
                            "original Mamba checkpoints) into the folder")
    return ByteTokenizer()
