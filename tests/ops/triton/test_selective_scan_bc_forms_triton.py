"""The Triton selective scan (CPU interpreter) with B and C in different layouts: time-invariant with varying,
single-group with grouped, against the float64 loop of tests/ops/test_selective_scan_bc_forms.py."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.ops.test_selective_scan_bc_forms import FP32, check, inputs  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

selective_scan_triton = interpreted_module("mambakit.ops.selective_scan.triton").selective_scan_triton

PAIRS = [("invariant", "single"), ("groups2", "invariant"), ("single", "groups3"), ("groups3", "groups2"),
         ("invariant", "invariant")]


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_triton_mixed_bc_layouts(pair):
    check(lambda **kw: selective_scan_triton(**kw, chunk=8, fwd_block_t=4, bwd_block_t=2),
          inputs(pair, seed=11), FP32)
