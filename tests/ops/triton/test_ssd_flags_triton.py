"""The SSD forward's non-finite-x flags (issue 26), on the CPU interpreter: the dt kernel flags the blocks of
positions of a head whose x has a NaN or an infinity, and the chunk kernel zeroes x's non-finite entries only in the
programs whose key positions are flagged. The unflagged path must give exactly what the flagged one gives."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_recurrent  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.test_ssd import make_inputs, with_dtype  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

interpreted_module("mambakit.ops.ssd.triton")

BAD = [float("nan"), float("inf"), -float("inf")]
IDS = ["nan", "inf", "-inf"]
SEQLEN, T = 80, 70  # T: the poisoned position, inside the first key block of chunk 2 (chunks of 32, blocks of 16)


def _ssd() -> object:
    return sys.modules["mambakit.ops.ssd.triton"]


@pytest.mark.parametrize("value", BAD, ids=IDS)
def test_flags_mark_only_the_blocks_with_a_non_finite_x(value):
    ssd_mod = _ssd()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 150, 3, 5, generator=g)
    dt = torch.rand(2, 150, 3, generator=g)
    _, flags = ssd_mod._prepare_dt_flags(dt, None, False, None, 192, x)
    assert flags.shape == (2, 3, 3) and flags.dtype == torch.int8
    assert torch.count_nonzero(flags) == 0
    x[1, 100, 2, 4] = value
    x[0, 3, 0, 0] = value
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, other strides
    for xs in (x, x_t):
        dtp, flags = ssd_mod._prepare_dt_flags(dt, None, False, None, 192, xs)
        expected = torch.zeros_like(flags)
        expected[1, 2, 1] = 1
        expected[0, 0, 0] = 1
        assert torch.equal(flags, expected)
        assert torch.isnan(dtp[1, 2, 100]) and torch.isnan(dtp[0, 0, 3]) and torch.isnan(dtp).sum() == 2


def _inputs(dtype):
    kw = make_inputs(batch=2, seqlen=SEQLEN, nheads=2, headdim=5, ngroups=1, d_state=4, chunk_size=32, D="head",
                     dt_softplus=True, dt_bias=True, seed=11)
    del kw["return_final_states"], kw["chunk_size"]
    return with_dtype(kw, dtype)


def _poisoned(kw, value):
    out = dict(kw, x=kw["x"].clone())
    out["x"][0, T, 1, 2] = value
    return out


def _run(kw):
    return mamba_chunk_scan_combined(**kw, chunk_size=32, backend="triton")


def _assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("value, dtype", [(v, torch.float32) for v in BAD] + [(BAD[0], torch.float16)],
                         ids=[f"{i}-fp32" for i in IDS] + ["nan-fp16"])
def test_only_the_flagged_chunks_take_the_zeroing_path_and_nothing_changes(value, dtype, monkeypatch):
    ssd_mod = _ssd()
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 16)  # two key blocks per chunk of 32
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK", 32)
    kw = _inputs(dtype)
    plan = ssd_mod._Plan(kw["x"], kw["B"], 32)
    assert (plan.Q, plan.BQ) == (32, 16) and ssd_mod.DT_BLOCK == 64  # flags: chunks 0-1 clear, chunk 2 flagged
    clean = _run(kw)
    bad = _poisoned(kw, value)
    y = _run(bad)

    # before T every output is what the all-finite run gives, bit for bit: in the unflagged chunks 0 and 1 (plain
    # path in both runs) and in the flagged chunk 2 (zeroing path here, plain path in the clean run)
    assert torch.isfinite(y[:, :T]).all()
    _assert_same(y[:, :T], clean[:, :T])
    # and the same as a run on the data of chunks 0 and 1 alone
    _assert_same(y[:, :64], _run({k: (v[:, :64] if k in ("x", "dt", "B", "C") else v) for k, v in bad.items()}))
    # the other head and the other batch row never see it (their flags are clear)
    _assert_same(y[0, :, 0], clean[0, :, 0])
    _assert_same(y[1], clean[1])
    # the poisoned head is non-finite from T on, in every channel (the dt kernel marked the whole row)
    assert not torch.isfinite(y[0, T:, 1]).any()
    # the finite part against the float64 recurrence
    ref = ssd_recurrent(**with_dtype(bad, torch.float64))
    assert rel_err(y[:, :T].double(), ref[:, :T]) <= (1e-5 if dtype == torch.float32 else 3e-3)
    assert rel_err(y[1].double(), ref[1]) <= (1e-5 if dtype == torch.float32 else 3e-3)

    # every chunk forced onto the zeroing path: the same outputs
    real = ssd_mod._prepare_dt_flags

    def all_flagged(*args):
        dtp, flags = real(*args)
        return dtp, torch.ones_like(flags)

    monkeypatch.setattr(ssd_mod, "_prepare_dt_flags", all_flagged)
    _assert_same(_run(bad), y)



def test_chunk_kernel_compiles_for_sm90():
    """The interpreter compiles nothing: build the chunk kernel, with its branch between the two loops, for Hopper
    (no GPU needed) as a bf16 call with d_state 128 launches it. Only that it builds is checked: without the
    divisibility hints of a real launch (which the helper cannot give) its register use is not the real one."""
    from tests.ops.triton import sm90_resource_usage

    ptrs = {"dt_ptr": "*fp32", "flag_ptr": "*i8", "D_ptr": "*fp32", "seg_ptr": "*i32", "acs_ptr": "*fp32"}
    consts = dict(sx_p=1, sB_n=1, sC_n=1, sy_p=1, HAS_SEG=False, HAS_D=True, D_HDIM=False, Q=128, BQ=64, BP=64,
                  BN=128, FB=64, PREC="tf32")
    usage = sm90_resource_usage("mambakit.ops.ssd.triton_fwd", "_chunk_scan_fwd", "*bf16", {"bf16": (ptrs, consts)})
    if usage is None:
        pytest.skip("this Triton's compile API differs")
    assert "REG:" in usage["bf16"], usage
