"""A long-context retrieval task for ReMamba's demonstration: find a key's value far back in a noisy prompt.

Tokens: keys 0..n_keys-1, values n_keys..2*n_keys-1, SEP = 2*n_keys, ASK = 2*n_keys+1, noise 2*n_keys+2 ..
3*n_keys+1 (vocab 3*n_keys+2). A prompt of length L is noise (drawn uniformly from the noise tokens) with n_pairs
needles
``SEP key value`` (distinct keys) placed without overlap in the first `zone` fraction of the first L-2 positions,
and ends with ``ASK key``; the answer is that key's value (one token).

`recall_training_batch` / `recall_prompt` (the demonstration's task): the same vocabulary in the MQAR layout of
`mambakit tasks mqar`, pairs ``key value`` at the start and noise instead of MQAR's filler (n_pairs = 1: passkey).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError


def kv_vocab(n_keys: int = 16) -> dict[str, int]:
    """Token ids: {'sep', 'ask', 'noise' (the first noise token), 'vocab_size'}."""
    return {"sep": 2 * n_keys, "ask": 2 * n_keys + 1, "noise": 2 * n_keys + 2, "vocab_size": 3 * n_keys + 2}


def kv_retrieval(batch: int, length: int, n_pairs: int = 2, zone: float = 1.0, n_keys: int = 16,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Returns prompts (batch, length) and answers (batch, 1), int64. zone in (0, 1]: the needles lie in the first
    zone * (length - 2) positions (zone 0.1: at least 90% of the prompt between the needles and the question)."""
    for name, value, low in (("batch", batch, 1), ("n_pairs", n_pairs, 1), ("n_keys", n_keys, 1)):
        if not isinstance(value, int) or value < low:
            raise MambaKitError(f"kv_retrieval {name} must be an integer >= {low}, got {value!r}")
    if n_pairs > n_keys:
        raise MambaKitError(f"kv_retrieval n_pairs must be <= n_keys={n_keys}, got {n_pairs}")
    if not 0 < zone <= 1:
        raise MambaKitError(f"kv_retrieval zone must lie in (0, 1], got {zone!r}")
    slots = int(zone * (length - 2)) // 3  # non-overlapping 3-token slots for the needles
    if slots < n_pairs:
        raise MambaKitError(f"kv_retrieval length {length} with zone {zone} leaves room for {slots} needles, "
                            f"fewer than n_pairs={n_pairs}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    voc = kv_vocab(n_keys)
    ids = torch.randint(voc["noise"], voc["vocab_size"], (batch, length), generator=g)
    keys = torch.rand(batch, n_keys, generator=g).argsort(dim=1)[:, :n_pairs]  # distinct keys
    values = torch.randint(n_keys, 2 * n_keys, (batch, n_pairs), generator=g)
    slot = torch.rand(batch, slots, generator=g).argsort(dim=1)[:, :n_pairs] * 3  # (batch, n_pairs) start positions
    rows = torch.arange(batch)[:, None]
    ids[rows, slot] = voc["sep"]
    ids[rows, slot + 1] = keys
    ids[rows, slot + 2] = values
    asked = torch.randint(0, n_pairs, (batch,), generator=g)
    ids[:, -2] = voc["ask"]
    ids[:, -1] = keys[torch.arange(batch), asked]
    return ids, values[torch.arange(batch), asked][:, None]


def kv_training_batch(batch: int, length: int, n_pairs: int = 2, n_keys: int = 16,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Dense supervision for training a base model from scratch: a kv_retrieval context (needles anywhere) followed
    by every key asked once, ``ASK key value`` in random order. Returns ids (batch, length + 3 * n_pairs - 2) and
    targets of the same shape (the value at the position of each asked key, -100 elsewhere)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    voc = kv_vocab(n_keys)
    prompts, _ = kv_retrieval(batch, length, n_pairs, 1.0, n_keys, g)
    ctx = prompts[:, :-2]  # drop the single question
    rows = torch.arange(batch)[:, None]
    sep = (ctx == voc["sep"]).nonzero()[:, 1].view(batch, n_pairs)  # needle starts, ascending
    keys, values = ctx[rows, sep + 1], ctx[rows, sep + 2]
    order = torch.rand(batch, n_pairs, generator=g).argsort(dim=1)
    queries = torch.stack([torch.full_like(keys, voc["ask"]), keys[rows, order], values[rows, order]], dim=2)
    ids = torch.cat([ctx, queries.flatten(1)], dim=1)
    targets = torch.full_like(ids, -100)
    key_pos = ctx.shape[1] + 1 + 3 * torch.arange(n_pairs)
    targets[:, key_pos] = ids[:, key_pos + 1]
    return ids, targets


# ----------------------------------------------------------------------------------------------------------------------
# Noisy multi-query recall: the MQAR layout (pairs first, queries later) with random noise tokens instead of a filler
# ----------------------------------------------------------------------------------------------------------------------
def _recall_context(batch: int, length: int, n_pairs: int, n_keys: int,
                    g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    for name, value, low in (("batch", batch, 1), ("n_pairs", n_pairs, 1), ("n_keys", n_keys, 1)):
        if not isinstance(value, int) or value < low:
            raise MambaKitError(f"noisy recall {name} must be an integer >= {low}, got {value!r}")
    if n_pairs > n_keys:
        raise MambaKitError(f"noisy recall n_pairs must be <= n_keys={n_keys}, got {n_pairs}")
    if not isinstance(length, int) or length < 3 * n_pairs:
        raise MambaKitError(f"noisy recall length must be an integer >= 3 * n_pairs = {3 * n_pairs}, got {length!r}")
    voc = kv_vocab(n_keys)
    ids = torch.randint(voc["noise"], voc["vocab_size"], (batch, length), generator=g)
    keys = torch.rand(batch, n_keys, generator=g).argsort(dim=1)[:, :n_pairs]  # distinct keys
    values = torch.randint(n_keys, 2 * n_keys, (batch, n_pairs), generator=g)
    ids[:, 0:2 * n_pairs:2] = keys
    ids[:, 1:2 * n_pairs:2] = values
    return ids, keys, values


def recall_training_batch(batch: int, length: int, n_pairs: int = 4, n_keys: int = 16,
                          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Base-model training data (dense supervision, as `mambakit tasks mqar`): ``k1 v1 ... kn vn`` at the start,
    noise tokens (kv_vocab's noise range) elsewhere, and each key asked once (the key token alone) at a random
    position after the pairs; the target there is its value. Returns ids and targets (batch, length), -100 = no
    target. Same vocabulary as kv_retrieval (SEP and ASK unused)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ids, keys, values = _recall_context(batch, length, n_pairs, n_keys, g)
    start = 2 * n_pairs
    slots = torch.rand(batch, length - start, generator=g).argsort(dim=1)[:, :n_pairs] + start
    order = torch.rand(batch, n_pairs, generator=g).argsort(dim=1)
    ids.scatter_(1, slots, keys.gather(1, order))
    targets = torch.full_like(ids, -100)
    targets.scatter_(1, slots, values.gather(1, order))
    return ids, targets


def recall_prompt(batch: int, length: int, n_pairs: int = 4, n_keys: int = 16,
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Long-context evaluation: ``k1 v1 ... kn vn`` at the start, noise up to the last position, which asks one of
    the keys. Returns prompts (batch, length) and answers (batch, 1): the needles are length - 2 * n_pairs positions
    or more from the question."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ids, keys, values = _recall_context(batch, length, n_pairs, n_keys, g)
    asked = torch.randint(0, n_pairs, (batch,), generator=g)
    rows = torch.arange(batch)
    ids[:, -1] = keys[rows, asked]
    return ids, values[rows, asked][:, None]
