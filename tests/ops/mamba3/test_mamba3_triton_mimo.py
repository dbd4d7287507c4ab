"""The Mamba-3 MIMO Triton scan on the CPU through the Triton interpreter, against the float64 step recurrence:
forward, final states and every gradient at awkward shapes (rank 1, 2, 3 (padded to 4) and 4; seqlen not a multiple of
the chunk; one token; initial states; packed sequences), bit-identical gradients run to run, causality of NaN and
infinities, dispatch and errors. float32 only (bfloat16 dots are broken in the interpreter: the GPU test has them)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.errors import MambaKitError  # noqa: E402
from mambakit.ops.mamba3.mimo import mamba3_mimo_scan, mamba3_mimo_scan_ref  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.mamba3.helpers import angle_err, as_dtype, assert_grads_repeat, mimo_inputs, scan_grads  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton_mimo")

SHAPES = {
    "rank3_packed_states": dict(),  # seqlen 23, chunks of 4 steps (16 rows of rank 4)
    "rank4_odd": dict(rank=4, batch=1, seqlen=19, nheads=2, ngroups=1, headdim=3, d_state=8, n_angles=4,
                      packed=False),
    "rank2_one_token": dict(rank=2, batch=2, seqlen=1, nheads=2, ngroups=2, headdim=2, d_state=4, n_angles=1),
    "rank1_no_states": dict(rank=1, batch=2, seqlen=17, nheads=3, ngroups=3, headdim=4, d_state=5, n_angles=2,
                            states=False),
    "rank2_two_headdim_blocks": dict(rank=2, batch=1, seqlen=13, nheads=1, ngroups=1, headdim=40, d_state=6,
                                     n_angles=3, states=False),
}


def _triton(**kw):
    return kernels.mamba3_mimo_scan_triton(**kw, chunk_size=4, return_final_states=True)


def _ref(**kw):
    return mamba3_mimo_scan_ref(**kw, return_final_states=True)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_and_gradients_match_float64_recurrence(name):
    shape = dict(SHAPES[name])
    kw = {n: t for n, t in mimo_inputs(**shape).items() if n != "D" or shape.get("states", True)}  # some without D
    ref_out, ref = scan_grads(kw, _ref)
    out, got = scan_grads(as_dtype(kw, torch.float32), _triton)
    assert out[0].dtype == torch.float32 and out[0].shape == ref_out[0].shape
    assert rel_err(out[0], ref_out[0]) < 1e-5
    assert angle_err(out[1].detach(), ref_out[1].detach()) < 1e-5
    for a, b in zip(out[2:], ref_out[2:]):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == torch.float32 and bool(torch.isfinite(got[n]).all()), n
        assert rel_err(got[n], ref[n]) < 1e-5, n


def test_gradients_bit_identical_run_to_run():
    kw = as_dtype(mimo_inputs(rank=2, batch=1, seqlen=21, nheads=2, headdim=40, d_state=6, n_angles=2),
                  torch.float32)
    assert_grads_repeat(kw, _triton)


@pytest.mark.parametrize("where,value", [("V", float("nan")), ("V", float("inf")), ("K", float("nan"))])
def test_non_finite_input_stays_causal(where, value):
    kw = as_dtype(mimo_inputs(rank=4, batch=2, seqlen=22, packed=False), torch.float32)
    clean = _triton(**kw)
    t, head = 13, 1
    bad = dict(kw)
    bad[where] = kw[where].clone()
    if where == "V":
        bad["V"][1, t, head, 2] = value
    else:
        bad["K"][1, t, 2, head // 2, 3] = value  # rank 2 of the group of head 1
    out = _triton(**bad)
    ref = _ref(**bad)
    assert torch.equal(out[0][0], clean[0][0])  # the other batch row is untouched
    before = out[0][1, :t]
    assert bool(torch.isfinite(before).all()) and rel_err(before, clean[0][1, :t]) < 1e-6
    # whatever the recurrence makes non-finite is NaN here, and beyond that only the rest of those (batch, head)
    # lanes from t on (the kernels poison whole lanes)
    for got, want in ((out[0], ref[0]), (out[2], ref[2])):
        assert bool(torch.isnan(got[~torch.isfinite(want)]).all())
    lanes = (~torch.isfinite(ref[0])).any(-1).any(2)  # (batch, seqlen, nheads)
    assert bool(lanes[1, t:, head].all()) and not bool(lanes[:, :t].any())
    assert torch.equal(torch.isnan(out[0]).any(-1).any(2), lanes)
    assert bool(torch.isnan(out[0].transpose(2, 3)[lanes]).all())


def test_dispatch_and_errors():
    kw = mimo_inputs(rank=2, batch=1, seqlen=9, nheads=2, ngroups=1, headdim=4, d_state=4, n_angles=2)
    k32 = as_dtype(kw, torch.float32)
    ref = mamba3_mimo_scan(**kw, backend="ref")
    assert rel_err(mamba3_mimo_scan(**k32, backend="triton"), ref) < 1e-5
    assert rel_err(mamba3_mimo_scan(**kw), ref) < 1e-12  # auto: the chunked form (float64 here)
    with pytest.raises(MambaKitError, match="backend"):
        mamba3_mimo_scan(**kw, backend="cuda")
    with pytest.raises(MambaKitError, match="float32"):
        kernels.mamba3_mimo_scan_triton(**kw)
    with pytest.raises(MambaKitError, match="chunk_size"):
        kernels.mamba3_mimo_scan_triton(**k32, chunk_size=0)
    with pytest.raises(MambaKitError, match="MIMO_V"):
        kernels.mamba3_mimo_scan_triton(**dict(k32, MIMO_V=k32["MIMO_V"][:, :1]))
