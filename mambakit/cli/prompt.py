"""The checks of ``--prompt`` shared by ``generate`` and ``explain``."""
from __future__ import annotations

from typing import List

from mambakit.cli.loading import Tokenizer
from mambakit.errors import MambaKitError


def require_prompt(prompt: str) -> None:
    """Raise MambaKitError for an empty --prompt or one that is not valid UTF-8 (checked before any model is loaded)."""
    if not prompt:
        raise MambaKitError("--prompt must not be empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes of the command line that are not UTF-8 arrive as lone surrogates
        raise MambaKitError(f"--prompt must be valid UTF-8 text, "
                            f"got undecodable bytes at position {exc.start}") from None


def encode_prompt(tokenizer: Tokenizer, prompt: str, vocab_size: int, max_tokens: int) -> List[int]:
    """The token ids of `prompt` (a list of ints, all below `vocab_size`).

    Raises MambaKitError when the prompt encodes to nothing, to more than `max_tokens` (--max-prompt-tokens) ids,
    or to an id outside the model's vocabulary (a tokenizer that does not match the checkpoint).
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise MambaKitError("--prompt encodes to no tokens")
    if len(ids) > max_tokens:
        raise MambaKitError(f"--prompt is {len(ids)} tokens long, more than --max-prompt-tokens {max_tokens}")
    if max(ids) >= vocab_size:
        raise MambaKitError(f"the prompt holds token id {max(ids)}, outside the model's vocabulary of {vocab_size}; "
                            "does the tokenizer match the checkpoint?")
    return ids
