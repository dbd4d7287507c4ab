"""Data of the synthetic tasks that show what selectivity buys: selective copying, induction heads and MQAR; and the
state-tracking tasks parity and modular arithmetic (generated in `mambakit.tasks.state_tracking`).

Every generator takes a seeded ``torch.Generator`` and returns ``(input_ids, targets)``: batch-first int64 tensors of
the same shape (batch, seq_len). ``targets[b, t]`` is the token the model must output *at* position t (the model's
logits at t are compared with it, no shift), and -100 wherever there is no loss. Accuracy is the fraction of the
positions with a target whose argmax prediction equals it.

Vocabularies (``vocab_size`` of each task = the model's vocabulary):

- selective copying: data tokens 0..n_data-1, NOISE = n_data, MARKER = n_data+1. The first seq_len - n_tokens
  positions are noise with n_tokens data tokens at random positions (``selective``; the "copying" variant puts them
  contiguously at the start); the last n_tokens positions are MARKER and their targets are the data tokens in order.
- induction heads: random tokens 0..vocab-1, SPECIAL = vocab. SPECIAL appears once at a random position p followed by
  the target token at p+1, and again at the last position, whose target is the token at p+1.
- MQAR: FILLER = 0, keys in [1, vocab/2), values in [vocab/2, vocab). Positions 0..2n-1 hold n key-value pairs (distinct
  keys); each key is asked once, at a random position of the rest (filler elsewhere), with its value as the target.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.tasks.state_tracking import ARITH_VOCAB, IGNORE, MODULUS, PARITY_VOCAB, modular_arithmetic, parity


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MambaKitError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise MambaKitError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _random_positions(batch: int, span: int, count: int, g: torch.Generator) -> Tensor:
    """(batch, count) distinct positions in [0, span), sorted ascending, uniformly among all subsets."""
    return torch.rand(batch, span, generator=g).argsort(dim=1)[:, :count].sort(dim=1).values


# ----------------------------------------------------------------------------------------------------------------------
# Selective copying (Mamba paper, section 4.1.1) and plain copying
# ----------------------------------------------------------------------------------------------------------------------
def selective_copying_vocab(n_data: int = 16) -> dict[str, int]:
    """Token ids of the copying tasks: {'noise', 'marker', 'vocab_size'}."""
    return {"noise": n_data, "marker": n_data + 1, "vocab_size": n_data + 2}


def selective_copying(batch: int, seq_len: int, n_tokens: int = 16, n_data: int = 16,
                      generator: Optional[torch.Generator] = None, selective: bool = True) -> tuple[Tensor, Tensor]:
    """Selective copying: memorise n_tokens data tokens (values 0..n_data-1) scattered among noise tokens, output them
    in order at the n_tokens MARKER positions that end the sequence.

    seq_len is the total length (context of seq_len - n_tokens positions + n_tokens answer positions).
    selective=False is the plain "copying" task: the data tokens sit contiguously at the start of the context, so a
    fixed time shift (an LTI convolution) solves it.
    """
    _check_int("batch", batch, 1)
    _check_int("n_tokens", n_tokens, 1)
    _check_int("n_data", n_data, 1)
    _check_int("seq_len", seq_len, 2 * n_tokens)
    g = _generator(generator)
    voc = selective_copying_vocab(n_data)
    context = seq_len - n_tokens
    data = torch.randint(0, n_data, (batch, n_tokens), generator=g)
    ids = torch.full((batch, seq_len), voc["noise"], dtype=torch.long)
    if selective:
        pos = _random_positions(batch, context, n_tokens, g)
    else:
        pos = torch.arange(n_tokens).expand(batch, n_tokens)
    ids.scatter_(1, pos, data)
    ids[:, context:] = voc["marker"]
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    targets[:, context:] = data
    return ids, targets


# ----------------------------------------------------------------------------------------------------------------------
# Induction heads (Mamba paper, section 4.1.2)
# ----------------------------------------------------------------------------------------------------------------------
def induction_heads_vocab(vocab: int = 16) -> dict[str, int]:
    """Token ids of the induction-heads task: {'special', 'vocab_size'}."""
    return {"special": vocab, "vocab_size": vocab + 1}


def induction_heads(batch: int, seq_len: int, vocab: int = 16,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Random tokens in [0, vocab); SPECIAL at a random position p in [0, seq_len - 2) followed by the target at p + 1;
    SPECIAL again at the last position, whose target is the token after the first SPECIAL. One target per sequence."""
    _check_int("batch", batch, 1)
    _check_int("seq_len", seq_len, 3)
    _check_int("vocab", vocab, 2)
    g = _generator(generator)
    special = induction_heads_vocab(vocab)["special"]
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    pos = torch.randint(0, seq_len - 2, (batch,), generator=g)
    rows = torch.arange(batch)
    ids[rows, pos] = special
    ids[:, -1] = special
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    targets[:, -1] = ids[rows, pos + 1]
    return ids, targets


# ----------------------------------------------------------------------------------------------------------------------
# Multi-query associative recall (Zoology, Arora et al. 2023)
# ----------------------------------------------------------------------------------------------------------------------
def mqar_vocab(vocab: int) -> dict[str, int]:
    """Token ranges of MQAR: {'filler', 'key_lo', 'key_hi', 'value_lo', 'value_hi', 'vocab_size'} (hi exclusive)."""
    half = vocab // 2
    return {"filler": 0, "key_lo": 1, "key_hi": half, "value_lo": half, "value_hi": vocab, "vocab_size": vocab}


def mqar(batch: int, seq_len: int, n_pairs: int = 8, vocab: int = 256,
         generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """n_pairs key-value pairs k1 v1 k2 v2 ... (distinct keys), then each key once at a random position of the rest of
    the sequence (FILLER = 0 elsewhere), in random order; the target at a query position is the key's value."""
    _check_int("batch", batch, 1)
    _check_int("n_pairs", n_pairs, 1)
    _check_int("seq_len", seq_len, 3 * n_pairs)
    voc = mqar_vocab(_check_int("vocab", vocab, 4))
    n_keys = voc["key_hi"] - voc["key_lo"]
    if n_pairs > n_keys:
        raise MambaKitError(f"n_pairs must be <= the number of keys vocab/2 - 1 = {n_keys}, got {n_pairs}")
    g = _generator(generator)
    keys = torch.rand(batch, n_keys, generator=g).argsort(dim=1)[:, :n_pairs] + voc["key_lo"]
    values = torch.randint(voc["value_lo"], voc["value_hi"], (batch, n_pairs), generator=g)
    ids = torch.full((batch, seq_len), voc["filler"], dtype=torch.long)
    ids[:, 0:2 * n_pairs:2] = keys
    ids[:, 1:2 * n_pairs:2] = values
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    # query slots: n_pairs distinct positions after the context, each asking a different key (random order)
    slots = _random_positions(batch, seq_len - 2 * n_pairs, n_pairs, g) + 2 * n_pairs
    order = torch.rand(batch, n_pairs, generator=g).argsort(dim=1)
    ids.scatter_(1, slots, keys.gather(1, order))
    targets.scatter_(1, slots, values.gather(1, order))
    return ids, targets


# ----------------------------------------------------------------------------------------------------------------------
# One entry point per task name
# ----------------------------------------------------------------------------------------------------------------------
TASKS = ("selective-copying", "copying", "induction-heads", "mqar", "parity", "modular-arithmetic")
#: The state-tracking tasks (mambakit.tasks.state_tracking): a fixed vocabulary, lengths generalised over.
STATE_TRACKING = ("parity", "modular-arithmetic")


def task_vocab_size(name: str, vocab: Optional[int] = None) -> int:
    """The model vocabulary a task needs (vocab: n_data / vocab / MQAR vocab, None = the task's default)."""
    if name in ("selective-copying", "copying"):
        return selective_copying_vocab(vocab or 16)["vocab_size"]
    if name == "induction-heads":
        return induction_heads_vocab(vocab or 16)["vocab_size"]
    if name == "mqar":
        return mqar_vocab(vocab or 256)["vocab_size"]
    if name == "parity":
        return PARITY_VOCAB["vocab_size"]
    if name == "modular-arithmetic":
        return ARITH_VOCAB["vocab_size"]
    raise MambaKitError(f"task must be one of {TASKS}, got {name!r}")


def chance_accuracy(name: str, vocab: int) -> float:
    """Accuracy of a uniform guess among the possible answers: 1/vocab (data tokens), MQAR 1/(number of values),
    parity 1/2, modular arithmetic 1/5."""
    if name == "mqar":
        return 1 / (vocab - vocab // 2)
    if name == "parity":
        return 1 / 2
    if name == "modular-arithmetic":
        return 1 / MODULUS
    if name in TASKS:
        return 1 / vocab
    raise MambaKitError(f"task must be one of {TASKS}, got {name!r}")


def make_batch(name: str, batch: int, seq_len: int, generator: torch.Generator, vocab: Optional[int] = None,
               n_tokens: int = 16, n_pairs: int = 8, brackets: bool = False,
               supervision: str = "final", order: str = "precedence",
               bracket_form: str = "nested") -> tuple[Tensor, Tensor]:
    """A batch of task `name` (one of TASKS); vocab None = the task's default (16, 16, 256; the state-tracking tasks
    have a fixed vocabulary). brackets, order and bracket_form (modular-arithmetic) and supervision (both
    state-tracking tasks): see `mambakit.tasks.state_tracking`."""
    if name == "parity":
        return parity(batch, seq_len, generator, supervision)
    if name == "modular-arithmetic":
        return modular_arithmetic(batch, seq_len, generator, brackets, supervision, order, bracket_form)
    if name == "selective-copying":
        return selective_copying(batch, seq_len, n_tokens, vocab or 16, generator, selective=True)
    if name == "copying":
        return selective_copying(batch, seq_len, n_tokens, vocab or 16, generator, selective=False)
    if name == "induction-heads":
        return induction_heads(batch, seq_len, vocab or 16, generator)
    if name == "mqar":
        return mqar(batch, seq_len, n_pairs, vocab or 256, generator)
    raise MambaKitError(f"task must be one of {TASKS}, got {name!r}")
