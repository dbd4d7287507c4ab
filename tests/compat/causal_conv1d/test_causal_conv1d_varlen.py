"""mambakit.compat.causal_conv1d.causal_conv1d_varlen against a loop over the sequences written here (exact, as the
official test), and the states it gives continuing each packed sequence's conv in decoding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mambakit.compat.causal_conv1d.causal_conv1d_varlen import (
    causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref,
)
from mambakit.errors import MambaKitError


def states_loop(x, cu, state_len):
    out = torch.zeros(len(cu) - 1, x.shape[1], state_len, dtype=x.dtype)
    for i in range(len(cu) - 1):
        seq = x[cu[i]:cu[i + 1]][-state_len:]  # (n, dim), n <= state_len
        if len(seq):
            out[i, :, state_len - len(seq):] = seq.T
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_the_loop_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    seqlens = [1, 7, 0, 3, 12, 2]
    cu = [0] + torch.tensor(seqlens).cumsum(0).tolist()
    x = torch.randn(cu[-1] + 2, 5, generator=g).to(dtype)  # two tokens after the last sequence are not read
    for state_len in (1, 3, 4, 9):
        got = causal_conv1d_varlen_states(x, torch.tensor(cu, dtype=torch.int32), state_len)
        assert got.shape == (len(seqlens), 5, state_len) and got.dtype == dtype and got.stride(1) == 1
        assert torch.equal(got, states_loop(x, cu, state_len))
        assert torch.equal(causal_conv1d_varlen_states_ref(x, torch.tensor(cu), state_len), got)


def test_states_continue_each_sequence_in_decoding():
    torch.manual_seed(1)
    seqlens, dim, width = [5, 2, 9], 4, 4
    cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0))
    x = torch.randn(int(cu[-1]), dim, dtype=torch.float64)
    w, b = torch.randn(dim, width, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    nxt = torch.randn(len(seqlens), dim, dtype=torch.float64)
    state = causal_conv1d_varlen_states(x, cu, width - 1).contiguous()
    got = causal_conv1d_update(nxt, state, w, b, "silu")
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        full = torch.cat([x[s:e], nxt[i:i + 1]]).T[None]  # the sequence with its next token, (1, dim, len + 1)
        want = causal_conv1d_fn(full, w, b, activation="silu")[0, :, -1]
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


def test_differentiable_and_errors():
    x = torch.randn(6, 3, requires_grad=True)
    causal_conv1d_varlen_states(x, torch.tensor([0, 2, 6]), 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1, 1, 0, 1, 1, 1.0])[:, None].expand(6, 3))
    for cu, match in ((torch.tensor([1, 4]), "cu_seqlens"), (torch.tensor([0, 4, 3]), "cu_seqlens"),
                      (torch.tensor([0, 7]), "total_tokens=6"), (torch.tensor([0.0, 6.0]), "integer")):
        with pytest.raises(MambaKitError, match=match):
            causal_conv1d_varlen_states(x, cu, 3)
    with pytest.raises(MambaKitError, match="state_len"):
        causal_conv1d_varlen_states(x, torch.tensor([0, 6]), 0)
    with pytest.raises(MambaKitError, match="x must have shape"):
        causal_conv1d_varlen_states(x[None], torch.tensor([0, 6]), 3)
