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
