"""`mambakit.training.device`: device names and the precision context."""
from __future__ import annotations

import contextlib

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.training.device import precision_context, resolve_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(MambaKitError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MambaKitError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_precision_context() -> None:
    ctx = precision_context(False, torch.device("cpu"))
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx, ctx:  # entered again and again, once per forward
        assert torch.ones(2).dtype == torch.float32
    with pytest.raises(MambaKitError, match="--bf16 needs a CUDA device"):
        precision_context(True, torch.device("cpu"))
