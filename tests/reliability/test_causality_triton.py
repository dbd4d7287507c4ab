"""Issue 21, class 2 on the Triton kernels (the CPU interpreter, small shapes): SSD, the selective scan and the
Mamba-3 forward keep a NaN at position t out of every output before t."""
from __future__ import annotations

from tests.ops.triton import interpreted_module  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.ops.mamba3 import mamba3_scan  # noqa: E402
from mambakit.ops.selective_scan import selective_scan_fn  # noqa: E402
from mambakit.ops.ssd import mamba_chunk_scan_combined  # noqa: E402
from tests.reliability.test_causality import (  # noqa: E402
    BAD, L, MAMBA3_TIME_DIM, assert_causal, mamba3_inputs, poison, selective_inputs, ssd_inputs,
)

for _name in ("mambakit.ops.ssd.triton", "mambakit.ops.selective_scan.triton", "mambakit.ops.mamba3.triton"):
    interpreted_module(_name)


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["x", "B", "dt"])
def test_ssd(name, value):
    kw = ssd_inputs(batch=2, nheads=2, ngroups=1)

    def run(k):
        return mamba_chunk_scan_combined(**k, chunk_size=16, backend="triton")
    assert_causal(run(poison(kw, name, value)), run(kw))


@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.01, 2.0)])
def test_ssd_nan_dt_survives_softplus_and_clamp(limit):
    kw = ssd_inputs(batch=2, nheads=2, ngroups=1)

    def run(k):
        return mamba_chunk_scan_combined(**k, chunk_size=16, backend="triton", dt_softplus=True, dt_limit=limit)
    assert_causal(run(poison(kw, "dt", float("nan"))), run(kw))


def test_ssd_packed_sequences_and_final_state():
    kw = ssd_inputs(batch=2, nheads=2, ngroups=1)
    seq_idx = torch.zeros(2, L, dtype=torch.int32)
    seq_idx[:, 10:] = 1
    kw["seq_idx"] = seq_idx
    y, final = mamba_chunk_scan_combined(**poison(kw, "x", float("nan")), chunk_size=16, backend="triton",
                                         return_final_states=True)
    clean = mamba_chunk_scan_combined(**kw, chunk_size=16, backend="triton")
    assert_causal(y, clean)
    assert torch.isnan(final[0, 0]).any() and torch.isfinite(final[1]).all()
    torch.testing.assert_close(y[0, :, 1:], clean[0, :, 1:])  # the other head never saw the NaN


@pytest.mark.parametrize("name", ["u", "delta", "B"])
def test_selective_scan(name):
    kw = selective_inputs()
    y = selective_scan_fn(**poison(kw, name, float("nan"), time_dim=2), backend="triton")
    assert_causal(y, selective_scan_fn(**kw, backend="triton"), time_dim=2)


@pytest.mark.parametrize("name", list(MAMBA3_TIME_DIM))
def test_mamba3(name):
    kw = mamba3_inputs()
    bad = poison(kw, name, float("nan"), time_dim=MAMBA3_TIME_DIM[name])
    with torch.no_grad():
        y, *final = mamba3_scan(**bad, chunk_size=16, backend="triton", return_final_states=True)
        clean = mamba3_scan(**kw, chunk_size=16, backend="triton")
    assert_causal(y, clean)
    assert not torch.isfinite(final[1][0]).all() and torch.isfinite(final[1][1]).all()
