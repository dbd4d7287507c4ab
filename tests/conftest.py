"""Shared test helpers: relative error, fresh random inputs, the slow/gpu markers."""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or inf anywhere gives inf so that it never passes a tolerance."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(out64).all() and torch.isfinite(ref64).all()):
        return float("inf")
    denom = torch.linalg.norm(ref64)
    num = torch.linalg.norm(out64 - ref64)
    return float(num / denom) if denom > 0 else float(num)


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from torch's global RNG (itself seeded per run by pytest's order)."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    return g
