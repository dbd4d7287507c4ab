"""The private SSD steps official tests call (`_chunk_cumsum_fwd`, `_chunk_state_fwd` and `_state_passing_fwd` with
seq_idx) against float64 loops written here: packed sequences of awkward lengths, chunk sizes that do not divide
them, each sequence's final state from the steps and `chunk_state_varlen` against its own recurrence."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.triton.ssd_chunk_state import (
    _chunk_cumsum_fwd, _chunk_state_fwd, chunk_state, chunk_state_varlen,
)
from mambakit.compat.mamba_ssm.ops.triton.ssd_state_passing import _state_passing_fwd
from mambakit.errors import MambaKitError

NHEADS, HEADDIM, NGROUPS, DSTATE = 4, 3, 2, 5


def recurrence(x, dt, A, B):
    """float64 final state of one sequence: s = exp(dt_t A) s + dt_t x_t B_t^T; x (L, h, p), dt (L, h), B (L, g, n)."""
    x, dt, A, B = (t.double() for t in (x, dt, A, B))
    Bh = B.repeat_interleave(x.shape[1] // B.shape[1], 1)
    s = torch.zeros(x.shape[1], x.shape[2], B.shape[2], dtype=torch.float64)
    for t in range(x.shape[0]):
        s = torch.exp(dt[t] * A)[:, None, None] * s + (dt[t, :, None] * x[t])[..., None] * Bh[t, :, None]
    return s


def test_chunk_cumsum_fwd_processes_dt_and_sums_per_chunk():
    g = torch.Generator().manual_seed(1)
    dt, A, bias = torch.randn(2, 7, NHEADS, generator=g), -torch.rand(NHEADS, generator=g), torch.randn(NHEADS,
                                                                                                     generator=g)
    dA_cumsum, dt_out = _chunk_cumsum_fwd(dt, A, 3, dt_bias=bias, dt_softplus=True, dt_limit=(0.1, 1.5))
    assert dA_cumsum.shape == dt_out.shape == (2, NHEADS, 3, 3) and dt_out.dtype == torch.float32
    want = F.softplus(dt.double() + bias.double()).clamp(0.1, 1.5)
    want = F.pad(want, (0, 0, 0, 2)).view(2, 3, 3, NHEADS).permute(0, 3, 1, 2)
    torch.testing.assert_close(dt_out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dA_cumsum.double(), (want * A.double()[:, None, None]).cumsum(-1), rtol=1e-6,
                               atol=1e-6)
    assert (dt_out[:, :, 2, 1:] == 0).all()
    _, plain = _chunk_cumsum_fwd(dt, A, 4)
    torch.testing.assert_close(plain[:, :, 0].transpose(1, 2), dt[:, :4])


@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_with_seq_idx_give_each_sequence_alone(chunk_size, dtype):
    g = torch.Generator().manual_seed(chunk_size)
    seqlens = [3, 9, 1, 6, 4]
    cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0))
    total = int(cu[-1])
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(seqlens)])[None]
    B = (torch.randn(total, NGROUPS, DSTATE, generator=g) / 2).to(dtype)
    x = torch.randn(total, NHEADS, HEADDIM, generator=g).to(dtype)
    A = -torch.rand(NHEADS, generator=g) - 0.1
    dt = F.softplus(torch.randn(total, NHEADS, generator=g) - 1)
    dA_cumsum, dt_r = _chunk_cumsum_fwd(dt[None], A, chunk_size)
    states = _chunk_state_fwd(B[None], x[None], dt_r, dA_cumsum, seq_idx=seq_idx)
    passed, final = _state_passing_fwd(states.flatten(-2), dA_cumsum[..., -1], seq_idx=seq_idx, chunk_size=chunk_size)
    assert passed.dtype == torch.float32 and final.dtype == torch.float32
    out = chunk_state_varlen(B, x, dt_r[0], dA_cumsum[0], cu, passed[0].unflatten(-1, (HEADDIM, DSTATE)))
    want = torch.stack([recurrence(x[a:b], dt[a:b], A, B[a:b]) for a, b in zip(cu[:-1], cu[1:])])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=3e-2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(final.unflatten(-1, (HEADDIM, DSTATE))[0].double(), want[-1], **tol)
    # without seq_idx the chunk states are the plain ones
    torch.testing.assert_close(_chunk_state_fwd(B[None], x[None], dt_r, dA_cumsum), chunk_state(B[None], x[None], dt_r,
                                                                                                   dA_cumsum))


def test_private_steps_name_bad_arguments():
    dt, A = torch.rand(1, 6, NHEADS), -torch.rand(NHEADS)
    with pytest.raises(MambaKitError, match="A"):
        _chunk_cumsum_fwd(dt, A[:2], 4)
    with pytest.raises(MambaKitError, match="chunk_size"):
        _chunk_cumsum_fwd(dt, A, 0)
    dA, dt_r = _chunk_cumsum_fwd(dt, A, 4)
    B, x = torch.randn(1, 6, NGROUPS, DSTATE), torch.randn(1, 6, NHEADS, HEADDIM)
    with pytest.raises(MambaKitError, match="seq_idx"):
        _chunk_state_fwd(B, x, dt_r, dA, seq_idx=torch.zeros(1, 5, dtype=torch.long))
    states = _chunk_state_fwd(B, x, dt_r, dA).flatten(-2)
    with pytest.raises(MambaKitError, match="chunk_size"):
        _state_passing_fwd(states, dA[..., -1], seq_idx=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(MambaKitError, match="states"):
        _chunk_state_fwd(B, x, dt_r, dA, states=torch.empty(3))
    assert math.isfinite(float(states.sum()))
