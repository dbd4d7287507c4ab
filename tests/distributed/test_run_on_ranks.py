"""run_on_ranks repeats a run whose rank was killed by a signal, and raises a rank's exception at once."""
from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

from mambakit.distributed._testing import run_on_ranks


def _abort_once(rank: int, world: int, marker: str) -> int:
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()
    return rank * 10


def _raise(rank: int, world: int) -> int:
    raise ValueError(f"rank {rank} refuses")


def test_a_rank_killed_by_a_signal_is_run_again(tmp_path):
    with pytest.warns(UserWarning, match="SIGABRT"):
        assert run_on_ranks(_abort_once, 2, str(tmp_path / "aborted")) == [0, 10]


def test_an_exception_is_raised_without_a_rerun():
    with pytest.raises(mp.ProcessRaisedException, match="refuses"):
        run_on_ranks(_raise, 2)
