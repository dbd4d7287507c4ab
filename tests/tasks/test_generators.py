"""The synthetic-task generators: shapes, dtypes, seeding, and answers recomputed from the inputs by plain Python."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.tasks.generators import (
    IGNORE,
    TASKS,
    induction_heads,
    induction_heads_vocab,
    make_batch,
    mqar,
    mqar_vocab,
    selective_copying,
    selective_copying_vocab,
    task_vocab_size,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TASKS)
def test_shapes_dtypes_and_vocab(name):
    ids, targets = make_batch(name, 5, 64, gen())
    assert ids.shape == targets.shape == (5, 64)
    assert ids.dtype == targets.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < task_vocab_size(name)
    has = targets != IGNORE
    assert has.any(1).all(), "every sequence has at least one target"
    assert int(targets[has].min()) >= 0 and int(targets[has].max()) < task_vocab_size(name)


@pytest.mark.parametrize("name", TASKS)
def test_seeded(name):
    a = make_batch(name, 3, 48, gen(1))
    b = make_batch(name, 3, 48, gen(1))
    c = make_batch(name, 3, 48, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("selective", [True, False])
def test_copying_answer_from_input(selective):
    n_tokens, n_data, L = 6, 5, 40
    voc = selective_copying_vocab(n_data)
    ids, targets = selective_copying(64, L, n_tokens, n_data, gen(3), selective=selective)
    starts = set()
    for row_ids, row_t in zip(ids.tolist(), targets.tolist()):
        context, answer = row_ids[: L - n_tokens], row_ids[L - n_tokens:]
        data = [t for t in context if t != voc["noise"]]  # the rule: the non-noise tokens, in order
        assert len(data) == n_tokens
        assert answer == [voc["marker"]] * n_tokens
        assert row_t == [IGNORE] * (L - n_tokens) + data
        positions = [i for i, t in enumerate(context) if t != voc["noise"]]
        if not selective:
            assert positions == list(range(n_tokens))
        starts.add(positions[0])
    if selective:
        assert len(starts) > 1, "selective copying scatters the data tokens"


def test_induction_answer_from_input():
    vocab, L = 6, 30
    special = induction_heads_vocab(vocab)["special"]
    ids, targets = induction_heads(200, L, vocab, gen(4))
    first_positions = set()
    for row_ids, row_t in zip(ids.tolist(), targets.tolist()):
        where = [i for i, t in enumerate(row_ids) if t == special]
        assert len(where) == 2 and where[1] == L - 1
        p = where[0]
        assert p + 1 < L - 1
        assert row_t == [IGNORE] * (L - 1) + [row_ids[p + 1]]
        first_positions.add(p)
    assert len(first_positions) > 10


def test_mqar_answer_from_input():
    n_pairs, vocab, L = 5, 32, 40
    voc = mqar_vocab(vocab)
    ids, targets = mqar(100, L, n_pairs, vocab, gen(5))
    for row_ids, row_t in zip(ids.tolist(), targets.tolist()):
        pairs = row_ids[: 2 * n_pairs]
        keys, values = pairs[0::2], pairs[1::2]
        assert len(set(keys)) == n_pairs
        assert all(voc["key_lo"] <= k < voc["key_hi"] for k in keys)
        assert all(voc["value_lo"] <= v < voc["value_hi"] for v in values)
        table = dict(zip(keys, values))
        expected = [IGNORE] * (2 * n_pairs)
        for t in row_ids[2 * n_pairs:]:  # the rule: a key after the context asks for its value
            expected.append(table[t] if t != voc["filler"] else IGNORE)
        assert row_t == expected
        asked = [t for t in row_ids[2 * n_pairs:] if t != voc["filler"]]
        assert sorted(asked) == sorted(keys), "each key is asked exactly once"


@pytest.mark.parametrize("call, name", [
    (lambda: selective_copying(2, 20, n_tokens=16), "seq_len"),
    (lambda: selective_copying(0, 64), "batch"),
    (lambda: induction_heads(2, 2), "seq_len"),
    (lambda: induction_heads(2, 16, vocab=1), "vocab"),
    (lambda: mqar(2, 20, n_pairs=8), "seq_len"),
    (lambda: mqar(2, 200, n_pairs=20, vocab=16), "n_pairs"),
    (lambda: make_batch("nope", 2, 16, gen()), "task"),
    (lambda: selective_copying(2, 64, generator=3), "generator"),
])
def test_bad_arguments(call, name):
    with pytest.raises(MambaKitError, match=name):
        call()
