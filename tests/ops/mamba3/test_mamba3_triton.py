"""The Mamba-3 SISO Triton forward kernel against the float64 recurrence, on the CPU through the Triton interpreter:
odd shapes (padded blocks), several chunks, initial states, packed sequences, half inputs, dispatch and errors."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.errors import MambaKitError  # noqa: E402
from mambakit.ops.mamba3 import mamba3_scan  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.mamba3.helpers import angle_err, as_dtype, scan_inputs  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton")

SHAPES = {
    "default": dict(),
    "one_sequence": dict(packed=False, states=False),
    "odd_dims": dict(batch=1, seqlen=70, nheads=2, ngroups=1, headdim=20, d_state=18, n_angles=9),
    "one_token": dict(seqlen=1, nheads=2, ngroups=2),
    "wide_head": dict(batch=1, seqlen=33, nheads=1, ngroups=1, headdim=80, d_state=16, n_angles=4, gate=False),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_matches_recurrence_float32(name):
    kw = scan_inputs(**SHAPES[name])
    ref = mamba3_scan(**kw, return_final_states=True, backend="ref")
    out = kernels.mamba3_scan_triton(**as_dtype(kw, torch.float32), return_final_states=True, chunk_size=16)
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.float32
    assert angle_err(out[1], ref[1]) < 1e-5
    for a, b in zip(out[:1] + out[2:], ref[:1] + ref[2:]):
        assert rel_err(a, b) < 1e-5


def test_half_inputs_and_dispatch():
    kw = scan_inputs(batch=1, seqlen=40, nheads=2, ngroups=1, headdim=8, d_state=8, n_angles=4)
    ref = mamba3_scan(**as_dtype(kw, torch.float32), chunk_size=16)
    y = mamba3_scan(**as_dtype(kw, torch.bfloat16), chunk_size=32, backend="triton")
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 2e-2
    assert rel_err(mamba3_scan(**as_dtype(kw, torch.float32), backend="triton"), ref) < 1e-5


def test_errors():
    with pytest.raises(MambaKitError, match="float64"):
        kernels.mamba3_scan_triton(**scan_inputs(seqlen=8))
