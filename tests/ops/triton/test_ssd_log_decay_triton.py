"""The Triton SSD kernels with a per-position log-decay (``log_decay=``), forward, final state and every gradient
(log_decay's included) in float32 against the float64 recurrence, on the CPU through the Triton interpreter."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")

import torch

from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_recurrent
from tests.conftest import rel_err
from tests.ops.test_ssd_log_decay import make
from tests.ops.triton import interpreted_module

interpreted_module("mambakit.ops.ssd.triton")

KEYS = ("x", "dt", "B", "C", "log_decay", "D", "z", "initial_states")


def _run(fn, kw, gy, gf, **extra):
    y, final = fn(**kw, **extra)
    loss = (y.double() * gy).sum() + (final.double() * gf).sum()
    keys = [k for k in KEYS if k in kw]
    return y, final, dict(zip(keys, torch.autograd.grad(loss, [kw[k] for k in keys])))


def _leaves(kw, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(True) if k in KEYS and v is not None else v)
            for k, v in kw.items()}


CASES = {
    "plain": {},
    "D_z": dict(D=True, z=True),
    "packed_init": dict(packed=True, init=True, seqlen=23),
    "one_group": dict(ngroups=1, nheads=3),
    "several_chunks": dict(seqlen=75, batch=1, nheads=2, ngroups=1, d_state=8, headdim=4, packed=True,
                           chunk_size=64),
    "seqlen_1": dict(seqlen=1),
}


def _compare(kw, dtype=torch.float32, tol=1e-5):
    g = torch.Generator().manual_seed(3)
    x = kw["x"]
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gf = torch.randn(x.shape[0], x.shape[2], x.shape[3], kw["B"].shape[-1], generator=g, dtype=torch.float64)
    yr, fr, gr = _run(ssd_recurrent, _leaves(kw, torch.float64), gy, gf)
    y, f, gt = _run(mamba_chunk_scan_combined, _leaves(kw, dtype), gy, gf, backend="triton")
    assert y.dtype == dtype and f.dtype == torch.float32
    errors = {"y": rel_err(y, yr), "final": rel_err(f, fr)}
    errors.update({f"d{k}": rel_err(gt[k], gr[k]) for k in gr})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    assert gt["log_decay"].shape == kw["log_decay"].shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_recurrence(name):
    _compare(make(**dict(CASES[name], chunk_size=64)))


@pytest.mark.parametrize("fused,pairs", [(True, True), (True, False), (False, False)])
def test_state_paths_and_blocks(fused, pairs, monkeypatch):
    # the fused state pass (one or two chunks per step) and the state passing through memory; chunks of several
    # blocks (the cumsum of the log-decay carried across blocks)
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "FUSED_STATES", fused)
    monkeypatch.setattr(ssd_mod, "STATE_PAIRS", pairs)
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 16)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK_FP32", 32)
    _compare(make(**dict(CASES["several_chunks"], init=True, D=True)))


def test_half_inputs():
    _compare(make(**dict(CASES["packed_init"], chunk_size=64)), dtype=torch.float16, tol=3e-3)


def test_log_decay_equal_to_dt_A_gives_the_plain_kernels():
    kw = make(D=True, packed=True, seqlen=21)
    A = -torch.rand(kw["x"].shape[2], dtype=torch.float64) - 0.1
    plain = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in kw.items() if k not in ("A", "log_decay")}
    y0, f0 = mamba_chunk_scan_combined(A=A.float(), **plain, backend="triton")
    y1, f1 = mamba_chunk_scan_combined(A=None, log_decay=(kw["dt"] * A).float(), **plain, backend="triton")
    assert rel_err(y1, y0) < 1e-6 and rel_err(f1, f0) < 1e-6
