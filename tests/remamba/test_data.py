"""The demonstration's key-value retrieval data."""
import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.remamba.data import kv_retrieval, kv_training_batch, kv_vocab


def test_kv_retrieval_layout():
    voc = kv_vocab(8)
    ids, ans = kv_retrieval(5, 100, n_pairs=2, zone=0.1, n_keys=8, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (5, 100) and ans.shape == (5, 1)
    for row, a in zip(ids, ans[:, 0]):
        seps = (row == voc["sep"]).nonzero()[:, 0]
        assert len(seps) == 2 and int(seps.max()) + 2 < 10  # needles in the first 10%
        assert row[-2] == voc["ask"]
        hit = [s for s in seps if row[s + 1] == row[-1]]
        assert len(hit) == 1 and row[hit[0] + 2] == a
        assert bool((row[:-2][row[:-2] >= voc["noise"]] < voc["vocab_size"]).all())


def test_kv_training_batch_targets():
    ids, tgt = kv_training_batch(3, 30, n_pairs=3, n_keys=8, generator=torch.Generator().manual_seed(1))
    assert ids.shape == tgt.shape == (3, 28 + 9)
    assert int((tgt != -100).sum()) == 9


def test_kv_errors():
    with pytest.raises(MambaKitError, match="zone"):
        kv_retrieval(1, 100, zone=0.0)
    with pytest.raises(MambaKitError, match="n_pairs"):
        kv_retrieval(1, 10, n_pairs=3, zone=0.5)


def test_recall_training_batch_layout():
    from mambakit.remamba.data import recall_training_batch

    voc = kv_vocab(8)
    ids, tgt = recall_training_batch(4, 40, n_pairs=3, n_keys=8, generator=torch.Generator().manual_seed(2))
    assert ids.shape == tgt.shape == (4, 40)
    for row, t in zip(ids, tgt):
        keys, values = row[0:6:2], row[1:6:2]
        assert len(set(keys.tolist())) == 3 and bool((keys < 8).all()) and bool(((values >= 8) & (values < 16)).all())
        asked = (t != -100).nonzero()[:, 0]
        assert len(asked) == 3 and int(asked.min()) >= 6
        for pos in asked:
            i = keys.tolist().index(int(row[pos]))
            assert t[pos] == values[i]
        rest = torch.ones(40, dtype=torch.bool)
        rest[:6] = False
        rest[asked] = False
        assert bool((row[rest] >= voc["noise"]).all()) and bool((row[rest] < voc["vocab_size"]).all())


def test_recall_prompt_layout_and_errors():
    from mambakit.remamba.data import recall_prompt

    voc = kv_vocab(8)
    ids, ans = recall_prompt(5, 64, n_pairs=2, n_keys=8, generator=torch.Generator().manual_seed(3))
    assert ids.shape == (5, 64) and ans.shape == (5, 1)
    for row, a in zip(ids, ans[:, 0]):
        keys, values = row[0:4:2].tolist(), row[1:4:2]
        assert values[keys.index(int(row[-1]))] == a
        assert bool((row[4:-1] >= voc["noise"]).all())
    with pytest.raises(MambaKitError, match="length"):
        recall_prompt(1, 5, n_pairs=2)
    with pytest.raises(MambaKitError, match="n_pairs"):
        recall_prompt(1, 64, n_pairs=9, n_keys=8)
