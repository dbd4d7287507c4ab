"""The Mamba-3 SISO Triton backward on the CPU through the Triton interpreter: every gradient (of y and of the
final states) against the float64 chunked form's autograd, odd shapes (padded blocks, two headdim blocks, seqlen
not a multiple of the chunk), initial states, packed sequences; bit-identical gradients run to run."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.ops.mamba3 import mamba3_scan  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.mamba3.helpers import as_dtype, assert_grads_repeat, scan_grads, scan_inputs  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton")

SHAPES = {
    "default": dict(),
    "odd_dims": dict(batch=1, seqlen=45, nheads=2, ngroups=1, headdim=20, d_state=18, n_angles=9, packed=False),
    "one_token": dict(seqlen=1, nheads=2, ngroups=2, headdim=3),
    "two_headdim_blocks": dict(batch=1, seqlen=21, nheads=1, ngroups=1, headdim=70, d_state=16, n_angles=4,
                               gate=False),
    "no_states_no_D": dict(batch=2, seqlen=33, nheads=3, ngroups=3, headdim=4, d_state=6, n_angles=2, states=False),
}


def _triton(**kw):
    return kernels.mamba3_scan_triton(**kw, return_final_states=True, chunk_size=16)


def _torch(**kw):
    return mamba3_scan(**kw, return_final_states=True, chunk_size=5, backend="torch")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gradients_match_float64_chunked(name):
    kw = scan_inputs(**SHAPES[name])
    if name == "no_states_no_D":
        del kw["D"]
    _, ref = scan_grads(kw, _torch)
    _, got = scan_grads(as_dtype(kw, torch.float32), _triton)
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == torch.float32
        assert rel_err(got[n], ref[n]) < 1e-5, n


@pytest.mark.parametrize("parts", [("y",), ("ssm",)])
def test_gradients_of_one_output(parts):  # the backward gets no gradient for the other output
    kw = scan_inputs(batch=1, seqlen=40, nheads=2, ngroups=1, headdim=6, d_state=8, n_angles=2)
    _, ref = scan_grads(kw, _torch, parts=parts)
    _, got = scan_grads(as_dtype(kw, torch.float32), _triton, parts=parts)
    for n in ref:
        if ref[n] is None:  # Z and Q when only the state is used (the kernel's zeros are as good)
            assert got[n] is None or not got[n].any(), n
        else:
            assert rel_err(got[n], ref[n]) < 1e-5, n


def test_bit_identical_run_to_run():
    kw = as_dtype(scan_inputs(batch=1, seqlen=50, nheads=2, ngroups=1, headdim=70, d_state=10, n_angles=3),
                  torch.float32)
    assert_grads_repeat(kw, _triton)


def test_inference_saves_no_states():  # without gradients the forward keeps no per-chunk states
    kw = as_dtype(scan_inputs(seqlen=40), torch.float32)
    with torch.no_grad():
        y = kernels.mamba3_scan_triton(**kw, chunk_size=16)
    assert not y.requires_grad and rel_err(y, mamba3_scan(**kw, backend="torch")) < 1e-5
