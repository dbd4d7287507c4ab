"""Causal depthwise conv1d: against nn.functional.conv1d, continuation from a state, one-step updates, packing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.ops.conv1d import causal_conv1d_fn, causal_conv1d_update, conv_state_after
from tests.conftest import rel_err


def reference(x, weight, bias):
    width = weight.shape[1]
    y = F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y)


@pytest.mark.parametrize("batch,dim,seqlen,width", [(1, 3, 1, 4), (2, 5, 17, 4), (2, 4, 9, 2), (1, 2, 3, 5)])
def test_matches_padded_conv(batch, dim, seqlen, width):
    x = torch.randn(batch, dim, seqlen, dtype=torch.float64)
    w, b = torch.randn(dim, width, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    assert rel_err(causal_conv1d_fn(x, w, b, "silu"), reference(x, w, b)) < 1e-14


def test_continuation_and_steps_equal_one_pass():
    x = torch.randn(2, 4, 20, dtype=torch.float64)
    w, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    full = causal_conv1d_fn(x, w, b, "silu")
    state = conv_state_after(x[..., :2], 4)  # shorter than the width: zeros in front
    part = [causal_conv1d_fn(x[..., :2], w, b, "silu")]
    part.append(causal_conv1d_fn(x[..., 2:11], w, b, "silu", conv_state=state))
    state = conv_state_after(x[..., 2:11], 4, state)
    for t in range(11, 20):
        part.append(causal_conv1d_update(x[..., t], state, w, b, "silu")[..., None])
    assert rel_err(torch.cat(part, -1), full) < 1e-14


def test_packed_sequences_do_not_leak():
    lengths = [3, 1, 6]
    x = torch.randn(1, 3, sum(lengths), dtype=torch.float64)
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    y = causal_conv1d_fn(x, w, b, "silu", seq_idx=seq_idx)
    start = 0
    for n in lengths:
        assert rel_err(y[..., start:start + n], reference(x[..., start:start + n], w, b)) < 1e-14
        start += n


def test_state_after_skips_right_padding():
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    state = conv_state_after(x, 4, mask=mask)
    assert torch.equal(state[0], x[0, :, :4])
    assert torch.equal(state[1], x[1, :, 2:])


def test_bad_shapes():
    x = torch.randn(2, 3, 5)
    with pytest.raises(MambaKitError, match="weight"):
        causal_conv1d_fn(x, torch.randn(4, 4))
    with pytest.raises(MambaKitError, match="conv_state"):
        causal_conv1d_fn(x, torch.randn(3, 4), conv_state=torch.zeros(2, 3, 3))
    with pytest.raises(MambaKitError, match="activation"):
        causal_conv1d_fn(x, torch.randn(3, 4), activation="relu")


def _segment_loop(x, weight, bias, seq_idx):
    """float64 per-sequence conv: each run of one seq_idx value convolved alone, padding (seq_idx < 0) output 0."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        idx = seq_idx[b].tolist()
        t = 0
        while t < len(idx):
            end = t
            while end < len(idx) and idx[end] == idx[t]:
                end += 1
            if idx[t] >= 0:
                out[b, :, t:end] = reference(x[b:b + 1, :, t:end].double(), weight.double(), bias.double())[0]
            t = end
    return out


def test_seq_idx_minus_one_is_padding_with_output_zero():
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 5, 13), torch.randn(5, 4), torch.randn(5)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1],
                            [-1, -1, 2, 2, 2, 2, 3, 3, -1, 4, 4, 4, 4]], dtype=torch.int32)
    y = causal_conv1d_fn(x, w, b, "silu", seq_idx=seq_idx)
    assert rel_err(y, _segment_loop(x, w, b, seq_idx)) < 1e-6
    assert bool((y.masked_select(seq_idx[:, None, :] < 0) == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_seq_idx_accumulate_in_float32(dtype):
    torch.manual_seed(4)
    x = torch.randn(2, 6, 80).to(dtype).requires_grad_()
    w, b = torch.randn(6, 4).to(dtype).requires_grad_(), torch.randn(6).to(dtype).requires_grad_()
    seq_idx = (torch.arange(80) // 23)[None].repeat(2, 1)
    gy = torch.randn(2, 6, 80, dtype=torch.float64)
    y = causal_conv1d_fn(x, w, b, "silu", seq_idx=seq_idx)
    assert y.dtype == dtype
    grads = torch.autograd.grad((y.double() * gy).sum(), (x, w, b))
    p64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = causal_conv1d_fn(*p64, "silu", seq_idx=seq_idx)
    refs = torch.autograd.grad((y64 * gy).sum(), p64)
    # only the final rounding to the half dtype: the 160-term weight gradient sums stay in float32
    eps = torch.finfo(dtype).eps
    assert rel_err(y, y64) <= eps
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= eps


@pytest.mark.gpu
def test_cuda_seq_idx_padding_and_half_accumulation():
    torch.manual_seed(5)
    x = torch.randn(2, 8, 40, device="cuda").bfloat16()
    w, b = torch.randn(8, 4, device="cuda"), torch.randn(8, device="cuda")
    seq_idx = torch.tensor([[0] * 20 + [1] * 12 + [-1] * 8, [-1] * 5 + [2] * 35], dtype=torch.int32, device="cuda")
    y = causal_conv1d_fn(x, w, b, "silu", seq_idx=seq_idx)
    want = _segment_loop(x.cpu(), w.cpu(), b.cpu(), seq_idx.cpu())
    assert rel_err(y.cpu(), want) <= torch.finfo(torch.bfloat16).eps
    assert bool((y.masked_select(seq_idx[:, None, :] < 0) == 0).all())
