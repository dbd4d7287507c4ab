"""`ssd_backward`'s output arguments on the interpreter: dB / dC written into strided slices of a bigger buffer
(dB_out / dC_out, as the Mamba-2 inner path passes its conv-gradient buffer), need_dinit (no initial-state gradient
computed without an initial state), the processed or raw dt's gradient; every gradient against autograd through the
float64 recurrence, with packed sequences and initial states."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.ops.segments import segments  # noqa: E402
from mambakit.ops.ssd import ssd_recurrent  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.test_ssd import CASES, make_inputs, with_dtype  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

interpreted_module("mambakit.ops.ssd.triton")

GRAD_KEYS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def _reference(kw64, gy, gf):
    ref = with_dtype(kw64, torch.float64, requires_grad=True)
    ref.pop("z", None)
    y, final = ssd_recurrent(**ref)
    keys = [k for k in GRAD_KEYS if k in ref]
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), [ref[k] for k in keys])
    return dict(zip(keys, grads))


def _backward(kw64, gy, gf, raw_dt: bool, need_dinit: bool, monkeypatch=None):
    ssd = sys.modules["mambakit.ops.ssd.triton"]
    kw = with_dtype(kw64, torch.float32)
    x, dt, A, B, C = (kw[k] for k in ("x", "dt", "A", "B", "C"))
    D, init, bias = kw.get("D"), kw.get("initial_states"), kw.get("dt_bias")
    processing = (bias, kw["dt_softplus"], kw.get("dt_limit"))
    _, _, saved = ssd.ssd_forward(x, dt, A, B, C, D, init, segments(kw.get("seq_idx")), kw["chunk_size"],
                                  *processing)
    batch, seqlen, ngroups, N = B.shape
    # dB and dC as column slices of one buffer (batch, seqlen, 3 + 2 * ngroups * N), the rest a sentinel
    buf = torch.full((batch, seqlen, 3 + 2 * ngroups * N), 7.0)
    dB_out = buf[..., 1:1 + ngroups * N].unflatten(-1, (ngroups, N))
    dC_out = buf[..., 2 + ngroups * N:2 + 2 * ngroups * N].unflatten(-1, (ngroups, N))
    dt_grad = ssd.DtGrad(dt, *processing) if raw_dt else None
    dx, ddt, dA, dB, dC, dD, dinit, dbias = ssd.ssd_backward(
        x, A, B, C, D, saved, gy.float(), gf.float(), kw["chunk_size"], dt_grad=dt_grad, dB_out=dB_out,
        dC_out=dC_out, need_dinit=need_dinit)
    assert dB.data_ptr() == dB_out.data_ptr() and dC.data_ptr() == dC_out.data_ptr()
    assert dB.dtype == B.dtype and dC.dtype == C.dtype
    for col in (0, 1 + ngroups * N, buf.shape[-1] - 1):
        assert torch.all(buf[..., col] == 7.0), "a column outside dB_out / dC_out was written"
    out = dict(x=dx, dt=ddt, A=dA, B=dB, C=dC)
    if D is not None:
        out["D"] = dD
    if bias is not None and raw_dt:
        out["dt_bias"] = dbias
    if need_dinit:
        out["initial_states"] = dinit
    else:
        assert dinit is None
    return out


@pytest.mark.parametrize("name,raw_dt,blocks", [("packed", False, False), ("everything", True, False),
                                                ("groups3-dhead", True, False), ("exact-chunks", False, False),
                                                ("chunk-gt-seqlen", True, False), ("everything", True, True),
                                                ("packed", False, True)])
def test_outputs_into_strided_buffers_match_the_recurrence(name, raw_dt, blocks, monkeypatch):
    opts = dict(CASES[name])
    if blocks:  # 64-position chunks of 4 blocks of 16: dB summed over the later query blocks' slots
        ssd = sys.modules["mambakit.ops.ssd.triton"]
        monkeypatch.setattr(ssd, "MAX_BLOCK", 16)
        monkeypatch.setattr(ssd, "MAX_CHUNK_FP32", 64)
        opts["chunk_size"] = 64
    kw64 = make_inputs(seed=5, **opts)
    if not raw_dt:  # the processed dt's gradient: the reference must see the processed dt as its input
        assert "dt_bias" not in kw64 and not kw64["dt_softplus"]
    kw64.pop("z", None)
    g = torch.Generator().manual_seed(11)
    gy = torch.randn(kw64["x"].shape, generator=g, dtype=torch.float64)
    batch, _, nheads, headdim = kw64["x"].shape
    gf = torch.randn(batch, nheads, headdim, kw64["B"].shape[-1], generator=g, dtype=torch.float64)
    ref = _reference(kw64, gy, gf)
    need_dinit = "initial_states" in kw64
    got = _backward(kw64, gy, gf, raw_dt, need_dinit)
    assert set(got) == set(ref) - ({"dt_bias"} if not raw_dt else set())
    errors = {k: rel_err(got[k].double(), ref[k]) for k in got}
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_no_initial_state_gradient_without_need_dinit():
    # need_dinit=False: dinit None, every other gradient unchanged (bit for bit)
    kw64 = make_inputs(seed=2, **CASES["packed-ragged"])
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(kw64["x"].shape, generator=g, dtype=torch.float64)
    batch, _, nheads, headdim = kw64["x"].shape
    gf = torch.randn(batch, nheads, headdim, kw64["B"].shape[-1], generator=g, dtype=torch.float64)
    with_init = _backward(kw64, gy, gf, True, True)
    without = _backward(kw64, gy, gf, True, False)
    assert "initial_states" not in without
    ref = _reference(kw64, gy, gf)
    assert rel_err(with_init["initial_states"].double(), ref["initial_states"]) <= 1e-5
    for k, v in without.items():
        assert torch.equal(v, with_init[k]), k
