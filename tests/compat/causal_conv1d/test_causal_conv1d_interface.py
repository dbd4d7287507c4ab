"""mambakit.compat.causal_conv1d against float64 loops written here: the official argument forms (initial and final
states, seq_idx with -1 padding, several-token updates, circular buffers, state indices) and float32 accumulation
for half inputs. Tolerances: the official tests' (float32 rtol 3e-4, atol 1e-3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mambakit.errors import MambaKitError

TOL = dict(rtol=3e-4, atol=1e-3)


def conv_loop(x, weight, bias=None, seq_idx=None, initial=None, activation=None):
    """out[b, d, t] = sum_k w[d, k] * xx[b, d, t + k] over the window of t, in float64, taps of another sequence
    dropped, output 0 where seq_idx < 0."""
    x, weight = x.double(), weight.double()
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    hist = initial.double() if initial is not None else x.new_zeros(batch, dim, width - 1)
    xx = torch.cat([hist, x], -1)
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    for t in range(seqlen):
        for k in range(width):
            src = t - (width - 1) + k
            tap = xx[:, :, t + k] * weight[:, k]
            if seq_idx is not None:
                same = (seq_idx[:, src] == seq_idx[:, t]) if src >= 0 else torch.zeros(batch, dtype=torch.bool)
                tap = tap * same[:, None]
            out[:, :, t] += tap
    if bias is not None:
        out += bias.double()[:, None]
    if activation == "silu":
        out = F.silu(out)
    if seq_idx is not None:
        out = out.masked_fill(seq_idx[:, None, :] < 0, 0.0)
    return out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_initial_and_final_states(width, activation):
    torch.manual_seed(width)
    x = torch.randn(2, 5, 7, requires_grad=True)
    w, b = torch.randn(5, width, requires_grad=True), torch.randn(5, requires_grad=True)
    init = torch.randn(2, 5, width - 1, requires_grad=True)
    final_out = torch.empty(2, 5, width - 1)
    out, final = causal_conv1d_fn(x, w, b, None, init, True, final_out, activation)
    ref = conv_loop(x, w, b, initial=init, activation=activation)
    torch.testing.assert_close(out.double(), ref, **TOL)
    assert final is final_out
    torch.testing.assert_close(final, x[..., -(width - 1):].detach())
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * g).sum(), (x, w, b, init))
    x64, w64, b64, i64 = (t.detach().double().requires_grad_() for t in (x, w, b, init))
    refs = torch.autograd.grad((conv_loop(x64, w64, b64, initial=i64, activation=activation) * g).sum(),
                               (x64, w64, b64, i64))
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got.double(), want, **TOL)


def test_final_states_of_a_short_sequence_keep_the_initial_inputs():
    x, w, init = torch.randn(1, 3, 1), torch.randn(3, 4), torch.randn(1, 3, 3)
    _, final = causal_conv1d_fn(x, w, initial_states=init, return_final_states=True)
    torch.testing.assert_close(final, torch.cat([init[..., 1:], x], -1))


def test_seq_idx_padding_gives_zero_and_no_taps_cross_sequences():
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 4, 9), torch.randn(4, 4), torch.randn(4)
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, -1, 2, 2, -1, -1]], dtype=torch.int32)
    out = causal_conv1d_fn(x, w, b, seq_idx, activation="silu")
    torch.testing.assert_close(out.double(), conv_loop(x, w, b, seq_idx=seq_idx, activation="silu"), **TOL)
    assert bool((out[0, :, :2] == 0).all()) and bool((out[1, :, 7:] == 0).all())


def test_half_inputs_accumulate_in_float32():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 64).bfloat16().requires_grad_()
    w = torch.randn(8, 4).bfloat16().requires_grad_()
    seq_idx = torch.arange(64).div(20, rounding_mode="floor")[None].repeat(2, 1)
    out = causal_conv1d_fn(x, w, None, seq_idx, activation="silu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    conv_loop(x64, w64, seq_idx=seq_idx, activation="silu").sum().backward()
    # the weight gradient sums 128 products: in bfloat16 its error would be ~1e-1, in float32 only the final rounding
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-2, atol=2e-2)


def test_seq_idx_with_states_is_refused():
    with pytest.raises(MambaKitError, match="seq_idx"):
        causal_conv1d_fn(torch.randn(1, 2, 3), torch.randn(2, 4), seq_idx=torch.zeros(1, 3, dtype=torch.long),
                         return_final_states=True)


def update_loop(x, state, weight, bias=None, activation=None):
    """Several tokens fed one by one through a state holding the last state_len inputs (float64)."""
    width = weight.shape[1]
    outs = []
    for t in range(x.shape[-1]):
        seen = torch.cat([state, x[..., t:t + 1]], -1)
        state = seen[..., 1:]
        y = (seen[..., -width:] * weight).sum(-1) + (0 if bias is None else bias)
        outs.append(F.silu(y) if activation == "silu" else y)
    return torch.stack(outs, -1), state


@pytest.mark.parametrize("seqlen", [1, 3])
@pytest.mark.parametrize("state_len", [3, 4, 6])
def test_update_several_tokens(seqlen, state_len):
    torch.manual_seed(seqlen * 10 + state_len)
    x, w, b = torch.randn(2, 5, seqlen), torch.randn(5, 4), torch.randn(5)
    state = torch.randn(2, 5, state_len)
    want, want_state = update_loop(x.double(), state.double(), w.double(), b.double(), "silu")
    out = causal_conv1d_update(x, state, w, b, "silu")
    torch.testing.assert_close(out.double(), want, **TOL)
    torch.testing.assert_close(state.double(), want_state, **TOL)


def test_update_two_dim_x_is_one_token():
    x, w, state = torch.randn(2, 5), torch.randn(5, 4), torch.randn(2, 5, 4)
    want, want_state = update_loop(x[..., None].double(), state.double(), w.double())
    out = causal_conv1d_update(x, state, w)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.double(), want[..., 0], **TOL)
    torch.testing.assert_close(state.double(), want_state, **TOL)


def test_update_circular_buffer():
    torch.manual_seed(3)
    width, state_len = 4, 6
    x, w = torch.randn(2, 3, 2), torch.randn(3, width)
    history = torch.randn(2, 3, 9)  # the inputs so far; the buffer holds the last state_len of them circularly
    cache_seqlens = torch.tensor([9, 7], dtype=torch.int32)
    buf = torch.zeros(2, 3, state_len)
    for row, n in enumerate(cache_seqlens.tolist()):
        for t in range(n):
            buf[row, :, t % state_len] = history[row, :, t]
    out = causal_conv1d_update(x, buf, w, cache_seqlens=cache_seqlens)
    for row, n in enumerate(cache_seqlens.tolist()):
        seq = torch.cat([history[row, :, :n], x[row]], -1)[None].double()
        want = conv_loop(seq, w)[0, :, -2:]
        torch.testing.assert_close(out[row].double(), want, **TOL)
        for t in range(2):
            torch.testing.assert_close(buf[row, :, (n + t) % state_len], x[row, :, t])


def test_update_state_indices_and_padding():
    torch.manual_seed(4)
    x, w = torch.randn(3, 5, 1), torch.randn(5, 4)
    pool = torch.randn(6, 5, 4)
    before = pool.clone()
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    out = causal_conv1d_update(x, pool, w, conv_state_indices=idx)
    for row, slot in ((0, 4), (2, 1)):
        want, want_state = update_loop(x[row:row + 1].double(), before[slot:slot + 1].double(), w.double())
        torch.testing.assert_close(out[row:row + 1].double(), want, **TOL)
        torch.testing.assert_close(pool[slot:slot + 1].double(), want_state, **TOL)
    assert bool((out[1] == 0).all())
    untouched = [0, 2, 3, 5]
    assert torch.equal(pool[untouched], before[untouched])


def test_update_checks_the_state_shape():
    with pytest.raises(MambaKitError, match="conv_state"):
        causal_conv1d_update(torch.randn(2, 5), torch.randn(2, 5, 2), torch.randn(5, 4))
