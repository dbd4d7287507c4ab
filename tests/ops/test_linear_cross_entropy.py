"""linear_cross_entropy: value and both gradients against the materialised logits (float64), chunking, ignored
labels, the upstream gradient, tied weights, bf16 autocast, partial requires_grad, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mambakit.ops.loss.chunked as chunked
from mambakit.errors import MambaKitError
from mambakit.ops.loss import default_chunk_tokens, linear_cross_entropy, linear_cross_entropy_ref
from tests.conftest import rel_err


def _inputs(n: int, d: int, vocab: int, dtype=torch.float64, ignored: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, dtype=dtype) / d ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignored
    drop[:1] = False  # the first token is kept: some label counts
    labels[drop] = -100
    return hidden, weight, labels


def _value_and_grads(loss_fn, hidden, weight, labels, scale: float = 1.0, **kw):
    loss = loss_fn(hidden, weight, labels, **kw) * scale
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("n,d,vocab,chunk", [(37, 11, 23, None), (37, 11, 23, 1), (37, 11, 23, 5), (37, 11, 23, 37),
                                             (37, 11, 23, 1000), (1, 3, 2, None), (130, 8, 257, 64)])
def test_matches_the_materialised_logits(n, d, vocab, chunk):
    hidden, weight, labels = _inputs(n, d, vocab, seed=n + vocab)
    out = _value_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=chunk)
    ref = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)
    assert out[0].dtype == torch.float64
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 1e-13


def test_reference_is_torch_s_cross_entropy():
    hidden, weight, labels = _inputs(9, 4, 7, dtype=torch.float32)
    want = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)
    assert torch.equal(linear_cross_entropy_ref(hidden, weight, labels), want)


def test_default_chunks_are_equal_and_bounded(monkeypatch):
    assert default_chunk_tokens(16384, 50280) == 1261  # 13 chunks of at most 2**26 // 50280 = 1334 tokens
    assert default_chunk_tokens(5, 2 ** 27) == 1
    assert default_chunk_tokens(0, 10) == 1
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 23 * 4)  # 4 tokens at most: 37 tokens in 10 chunks of 4
    assert default_chunk_tokens(37, 23) == 4
    hidden, weight, labels = _inputs(37, 11, 23)
    out = _value_and_grads(linear_cross_entropy, hidden, weight, labels)
    ref = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 1e-13


@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_ignore_index_and_grad_output(ignore_index):
    hidden, weight, labels = _inputs(29, 6, 13, ignored=0.0, seed=3)
    labels[::3] = ignore_index
    out = _value_and_grads(linear_cross_entropy, hidden, weight, labels, 3.0, ignore_index=ignore_index,
                           chunk_tokens=4)
    ref = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=ignore_index) * 3.0
    ref = (ref, *torch.autograd.grad(ref, (hidden, weight)))
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 1e-13
    assert torch.all(out[1][::3] == 0)  # ignored tokens get no gradient


def test_every_label_ignored_is_nan_with_zero_gradients_as_torch():
    hidden, weight, labels = _inputs(7, 4, 5)
    labels[:] = -100
    loss, gh, gw = _value_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=3)
    ref, rh, rw = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert torch.equal(gh, rh) and torch.equal(gw, rw) and not gw.any()


def test_no_tokens_is_nan_as_torch():
    hidden, weight, labels = _inputs(0, 4, 5)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(hidden, weight, labels))
    loss.backward()
    assert hidden.grad.shape == (0, 4) and not weight.grad.any()


def test_tied_weight_gradients_add_up():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(17, 6, dtype=torch.float64)
    ids = torch.randint(0, 17, (31,))
    labels = torch.randint(0, 17, (31,))
    grads = []
    for fn in (linear_cross_entropy, linear_cross_entropy_ref):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))
        (fn(hidden, emb.weight, labels) * 2).backward()
        grads.append(emb.weight.grad.clone())
    assert rel_err(grads[0], grads[1]) < 1e-13


def test_bf16_autocast_on_cpu_is_within_bf16_of_float32():
    hidden, weight, labels = _inputs(67, 32, 301, dtype=torch.float32, seed=5)
    ref = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _value_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=16)
        plain = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)  # F.linear under autocast
    assert out[0].dtype == torch.float32 and out[1].dtype == out[2].dtype == torch.float32
    for o, p, r in zip(out, plain, ref):
        assert rel_err(o, r) < 2e-2
        assert rel_err(o, p) < 2e-2


def test_bf16_inputs_without_autocast():
    hidden, weight, labels = _inputs(40, 16, 50, dtype=torch.float32, seed=8)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    out = _value_and_grads(linear_cross_entropy, h16, w16, labels, chunk_tokens=7)
    ref = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)
    assert out[1].dtype == out[2].dtype == torch.bfloat16
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 2e-2


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_requires_grad_on_one_input_only(which):
    hidden, weight, labels = _inputs(21, 5, 9)
    ref = _value_and_grads(linear_cross_entropy_ref, hidden, weight, labels)
    h = hidden if which == "hidden" else hidden.detach()
    w = weight if which == "weight" else weight.detach()
    loss = linear_cross_entropy(h, w, labels, chunk_tokens=4)
    (grad,) = torch.autograd.grad(loss, h if which == "hidden" else w)
    assert rel_err(loss, ref[0]) < 1e-13
    assert rel_err(grad, ref[1] if which == "hidden" else ref[2]) < 1e-13


def test_without_autograd_only_the_value():
    hidden, weight, labels = _inputs(21, 5, 9)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    assert loss.grad_fn is None
    assert rel_err(loss, linear_cross_entropy_ref(hidden, weight, labels)) < 1e-13


def test_double_backward_through_retain_graph_is_unchanged():
    hidden, weight, labels = _inputs(12, 4, 6)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=5)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_unchecked_labels():
    hidden, weight, labels = _inputs(12, 4, 6)
    want = linear_cross_entropy(hidden, weight, labels)
    assert torch.equal(linear_cross_entropy(hidden, weight, labels, check_labels=False), want)
    with pytest.raises(RuntimeError, match="index"):  # out of range: the gather refuses it, not MambaKitError
        linear_cross_entropy(hidden, weight, torch.full_like(labels, 6), check_labels=False)


def test_second_derivatives_are_refused():
    hidden, weight, labels = _inputs(12, 4, 6)
    (gh,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):  # not silently zero
        gh.sum().backward()


@pytest.mark.parametrize("change,match", [
    (lambda h, w, y: (h[None], w, y), "hidden must have shape"),
    (lambda h, w, y: (h, w[:, :-1], y), "weight must have shape"),
    (lambda h, w, y: (h, w, y[:-1]), "labels must have shape"),
    (lambda h, w, y: (h, w, y.float()), "labels must be an integer"),
    (lambda h, w, y: (h.long(), w, y), "hidden must be float16"),
    (lambda h, w, y: (h, w.float(), y), "one dtype outside autocast"),
    (lambda h, w, y: (h, w, torch.full_like(y, 9)), r"labels must lie in \[0, vocab=9\)"),
    (lambda h, w, y: (h, w, torch.full_like(y, -2)), r"got values in \[-2, -2\]"),
    (lambda h, w, y: (h.tolist(), w, y), "hidden must be a torch.Tensor"),
    (lambda h, w, y: (h, w.to("meta"), y), "must be on one device"),
])
def test_errors(change, match):
    hidden, weight, labels = _inputs(6, 4, 9)
    with pytest.raises(MambaKitError, match=match):
        linear_cross_entropy(*change(hidden.detach(), weight.detach(), labels))


@pytest.mark.parametrize("kw,match", [({"chunk_tokens": 0}, "chunk_tokens"), ({"chunk_tokens": 2.0}, "chunk_tokens"),
                                      ({"ignore_index": None}, "ignore_index")])
def test_option_errors(kw, match):
    hidden, weight, labels = _inputs(6, 4, 9)
    with pytest.raises(MambaKitError, match=match):
        linear_cross_entropy(hidden, weight, labels, **kw)
