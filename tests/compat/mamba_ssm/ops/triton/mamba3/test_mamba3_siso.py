"""mamba_ssm.ops.triton.mamba3 (`mamba3_siso_combined`, `mamba3_siso_step`) against mambakit's float64 step
recurrence (mamba3_scan_ref): batched with Input_States, packed with cu_seqlens (an empty sequence included, per
sequence states in and out), the step loop; gradients in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
from mambakit.compat.mamba_ssm.ops.triton.mamba3.mamba3_siso_step import mamba3_siso_step
from mambakit.errors import MambaKitError
from mambakit.ops.mamba3 import mamba3_scan_ref

NHEADS, NHEADS_QK, HEADDIM_V, D_STATE, N_ANGLES = 4, 2, 3, 8, 2


def inputs(batch, seqlen, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    DT = F.softplus(r(batch, NHEADS, seqlen) - 1)
    t = dict(Q=r(batch, seqlen, NHEADS_QK, D_STATE), K=r(batch, seqlen, NHEADS_QK, D_STATE),
             V=r(batch, seqlen, NHEADS, HEADDIM_V), ADT=-DT * (torch.rand(NHEADS, 1, generator=g) + 0.2), DT=DT,
             Trap=r(batch, NHEADS, seqlen), Q_bias=r(NHEADS, D_STATE), K_bias=r(NHEADS, D_STATE),
             Angles=r(batch, seqlen, NHEADS, N_ANGLES), D=r(NHEADS), Z=r(batch, seqlen, NHEADS, HEADDIM_V))
    return {k: v.to(dtype) for k, v in t.items()}


def states(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, NHEADS, *s, generator=g, dtype=torch.float64)
                 for s in ((N_ANGLES,), (HEADDIM_V, D_STATE), (D_STATE,), (HEADDIM_V,)))


def test_batched_with_input_states_matches_the_recurrence():
    kw, start = inputs(2, 9), states(2)
    leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
    got = mamba3_siso_combined(**leaves, Input_States=start, chunk_size=4, return_final_states=True)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
    want = mamba3_scan_ref(**ref_leaves, Input_States=start, return_final_states=True)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    (got[0] * torch.linspace(-1, 1, got[0].numel(), dtype=torch.float64).view_as(got[0])).sum().backward()
    (want[0] * torch.linspace(-1, 1, want[0].numel(), dtype=torch.float64).view_as(want[0])).sum().backward()
    for k in ("Q", "V", "ADT", "Trap", "Angles"):
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cu_seqlens_scans_each_sequence_from_its_own_states(dtype):
    seqlens = [5, 0, 7, 1]
    cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0)).to(torch.int32)
    kw, start = inputs(1, sum(seqlens), dtype), tuple(s.to(dtype) for s in states(len(seqlens)))
    out, *final = mamba3_siso_combined(**kw, Input_States=start, chunk_size=4, return_final_states=True,
                                       cu_seqlens=cu)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert out.dtype == dtype and all(s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                                      for s in final)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = tuple(s[i:i + 1].double() for s in start)
        if a == b:
            for s, s0 in zip(final, one):
                torch.testing.assert_close(s[i:i + 1].double(), s0)
            continue
        part = {k: (v[:, :, a:b] if k in ("ADT", "DT", "Trap") else v if k in ("Q_bias", "K_bias", "D")
                    else v[:, a:b]).double() for k, v in kw.items()}
        y, *want = mamba3_scan_ref(**part, Input_States=one, return_final_states=True)
        torch.testing.assert_close(out[:, a:b].double(), y, **tol)
        for s, w in zip(final, want):
            torch.testing.assert_close(s[i:i + 1].double(), w, **tol)


def test_step_loop_matches_the_recurrence_and_leaves_its_inputs():
    kw, start = inputs(2, 6), states(2)
    before = tuple(s.clone() for s in start)
    cur, ys = start, []
    for t in range(6):
        step = {k: (v[:, :, t] if k in ("ADT", "DT", "Trap") else v if k in ("Q_bias", "K_bias", "D") else v[:, t])
                for k, v in kw.items()}
        y, cur = mamba3_siso_step(**step, Input_States=cur)
        assert cur[3] is step["V"]
        ys.append(y)
    y, *want = mamba3_scan_ref(**kw, Input_States=start, return_final_states=True)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-9, atol=1e-9)
    for s, w in zip(cur, want):
        torch.testing.assert_close(s, w, rtol=1e-9, atol=1e-9)
    for s, s0 in zip(start, before):
        assert torch.equal(s, s0)


def test_bad_arguments_are_named():
    kw = inputs(1, 4)
    with pytest.raises(MambaKitError, match="Input_States"):
        mamba3_siso_combined(**kw, Input_States=(None, None, None, None)[:3])
    with pytest.raises(MambaKitError, match="cu_seqlens"):
        mamba3_siso_combined(**kw, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(MambaKitError, match="Input_States"):
        mamba3_siso_combined(**kw, Input_States=states(3), cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32))
    step = {k: (v[:, :, 0] if k in ("ADT", "DT", "Trap") else v if k in ("Q_bias", "K_bias", "D") else v[:, 0])
            for k, v in kw.items()}
    with pytest.raises(MambaKitError, match="Input_States"):
        mamba3_siso_step(**step)
