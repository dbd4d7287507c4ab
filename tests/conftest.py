"""Shared test helpers: relative error, the gpu marker (tests marked gpu skip without a CUDA device)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
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

