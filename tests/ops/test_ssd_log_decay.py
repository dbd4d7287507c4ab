"""SSD with a per-position log-decay (``log_decay=`` in place of ``dt * A``): the PyTorch forms against a float64
loop written here, gradients of every input (log_decay included), packing, initial states, errors."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_chunked, ssd_quadratic, ssd_recurrent


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (torch.linalg.norm((out - ref).double()) / torch.linalg.norm(ref.double())).item()
    assert not math.isnan(err), "relative error is NaN"
    return err


def make(batch: int = 2, seqlen: int = 19, nheads: int = 4, headdim: int = 3, ngroups: int = 2, d_state: int = 5,
         chunk_size: int = 4, D: bool = False, z: bool = False, init: bool = False, packed: bool = False,
         seed: int = 0) -> Dict[str, Any]:
    """float64 inputs; the log-decay is random per position (not dt * A)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kw: Dict[str, Any] = dict(
        x=randn(batch, seqlen, nheads, headdim), dt=torch.rand(batch, seqlen, nheads, generator=g,
                                                               dtype=torch.float64) + 0.1,
        A=None, B=randn(batch, seqlen, ngroups, d_state), C=randn(batch, seqlen, ngroups, d_state),
        chunk_size=chunk_size, log_decay=-2 * torch.rand(batch, seqlen, nheads, generator=g, dtype=torch.float64),
        return_final_states=True)
    if D:
        kw["D"] = randn(nheads)
    if z:
        kw["z"] = randn(batch, seqlen, nheads, headdim)
    if init:
        kw["initial_states"] = randn(batch, nheads, headdim, d_state)
    if packed:
        kw["seq_idx"] = (torch.rand(batch, seqlen, generator=g) < 0.2).to(torch.int32).cumsum(1)
    return kw


def loop_reference(x, dt, B, C, log_decay, D=None, z=None, initial_states=None, seq_idx=None,
                   **_: Any):
    """state_t = exp(log_decay_t) state_{t-1} + dt_t x_t B_t^T (reset where seq_idx changes); y_t = state_t C_t + D x_t,
    times silu(z_t). Plain float64 loops over batch, time and head."""
    batch, seqlen, nheads, headdim = x.shape
    r = nheads // B.shape[2]
    y = torch.zeros_like(x)
    finals = torch.zeros(batch, nheads, headdim, B.shape[3], dtype=x.dtype)
    for b in range(batch):
        for h in range(nheads):
            s = initial_states[b, h].clone() if initial_states is not None else torch.zeros_like(finals[b, h])
            for t in range(seqlen):
                if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    s = torch.zeros_like(s)
                s = math.exp(log_decay[b, t, h]) * s + dt[b, t, h] * torch.outer(x[b, t, h], B[b, t, h // r])
                y[b, t, h] = s @ C[b, t, h // r] + (0 if D is None else D[h] * x[b, t, h])
            finals[b, h] = s
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, finals


CASES = {
    "plain": {},
    "D_z": dict(D=True, z=True),
    "init": dict(init=True),
    "packed_init": dict(packed=True, init=True, seqlen=23, chunk_size=5),
    "one_group_long_chunk": dict(ngroups=1, chunk_size=64),
    "seqlen_1": dict(seqlen=1),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("form", [ssd_chunked, ssd_recurrent, ssd_quadratic])
def test_forms_match_loop(name: str, form) -> None:
    kw = make(**CASES[name])
    y_ref, f_ref = loop_reference(**kw)
    y, final = form(**kw)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(final, f_ref) < 1e-12


def test_log_decay_equal_to_dt_A_is_the_plain_op() -> None:
    kw = make(D=True, init=True, packed=True)
    A = -torch.rand(kw["x"].shape[2], dtype=torch.float64) - 0.1
    plain = {k: v for k, v in kw.items() if k not in ("A", "log_decay")}
    y0, f0 = mamba_chunk_scan_combined(A=A, **plain, backend="torch")
    y1, f1 = mamba_chunk_scan_combined(A=None, log_decay=kw["dt"] * A, **plain, backend="torch")
    assert rel_err(y1, y0) < 1e-13 and rel_err(f1, f0) < 1e-13


def _grads(form, kw: Dict[str, Any], names, gy: torch.Tensor, gf: torch.Tensor):
    leaves = {k: kw[k].clone().requires_grad_(True) for k in names}
    y, final = form(**{**kw, **leaves})
    ((y * gy).sum() + (final * gf).sum()).backward()
    return [leaves[k].grad for k in names]


@pytest.mark.parametrize("name", ["plain", "D_z", "packed_init"])
def test_gradients_match_recurrence(name: str) -> None:
    kw = make(**CASES[name])
    names = [k for k in ("x", "dt", "B", "C", "log_decay", "D", "z", "initial_states") if k in kw]
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(kw["x"].shape, generator=g, dtype=torch.float64)
    gf = torch.randn(kw["x"].shape[0], kw["x"].shape[2], kw["x"].shape[3], kw["B"].shape[3], generator=g,
                     dtype=torch.float64)
    ref = _grads(ssd_recurrent, kw, names, gy, gf)
    out = _grads(ssd_chunked, kw, names, gy, gf)
    for k, a, b in zip(names, out, ref):
        assert torch.isfinite(a).all(), k
        assert rel_err(a, b) < 1e-11, k


def test_gradcheck_chunked_log_decay() -> None:
    kw = make(batch=1, seqlen=7, nheads=2, headdim=2, ngroups=1, d_state=3, chunk_size=3, packed=True, init=True)

    def f(log_decay, dt, x):
        y, final = ssd_chunked(**{**kw, "log_decay": log_decay, "dt": dt, "x": x})
        return y, final

    args = tuple(kw[k].clone().requires_grad_(True) for k in ("log_decay", "dt", "x"))
    assert torch.autograd.gradcheck(f, args)


def test_float32_matches_float64() -> None:
    kw = make(seqlen=40, chunk_size=16, D=True)
    y_ref, _ = loop_reference(**kw)
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y, _ = ssd_chunked(**kw32)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-5


def test_non_finite_log_decay_stays_causal() -> None:
    kw = make(batch=1, nheads=2, seqlen=12, chunk_size=4)
    kw["log_decay"][0, 6, 1] = math.nan
    y, _ = ssd_chunked(**kw)
    y_ref, _ = ssd_recurrent(**kw)
    assert torch.isnan(y[0, 6:, 1]).all() and torch.isnan(y_ref[0, 6:, 1]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert rel_err(y[0, :6], y_ref[0, :6]) < 1e-12


@pytest.mark.parametrize("change,message", [
    (dict(A=torch.ones(4, dtype=torch.float64)), "A must be None when log_decay"),
    (dict(log_decay=torch.zeros(2, 19, 3, dtype=torch.float64)), "log_decay must have shape"),
    (dict(log_decay=torch.zeros(2, 19, 4, dtype=torch.int32)), "log_decay must have dtype"),
])
def test_bad_log_decay_raises(change: Dict[str, Any], message: str) -> None:
    with pytest.raises(MambaKitError, match=message):
        ssd_chunked(**{**make(), **change})


def test_missing_A_without_log_decay_raises() -> None:
    kw = make()
    kw.pop("log_decay")
    with pytest.raises(MambaKitError, match="A must be a torch.Tensor"):
        ssd_chunked(**kw)
