"""Issue 21, class 2: a NaN or infinity at position t never reaches an output before t, on every SSD and scan path
(chunked and quadratic PyTorch, the decode steps, Mamba-3, context parallel; the Triton kernels in
test_causality_triton.py): the outputs before t are finite and equal to the run without it."""
from __future__ import annotations

import pytest
import torch

from mambakit.distributed._testing import run_on_ranks
from mambakit.ops.mamba3 import mamba3_scan, mamba3_step
from mambakit.ops.selective_scan import selective_scan_fn, selective_state_update
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_quadratic, ssd_step
from tests.ops.mamba3.helpers import scan_inputs

L, T = 40, 20  # sequence length, the poisoned position (inside the second chunk of 16)
BAD = [float("nan"), float("inf"), -float("inf")]


def ssd_inputs(seed=0, batch=2, nheads=4, ngroups=2):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, L, nheads, 3, generator=g), dt=torch.rand(batch, L, nheads, generator=g),
                A=-torch.rand(nheads, generator=g) - 0.5, B=torch.randn(batch, L, ngroups, 4, generator=g),
                C=torch.randn(batch, L, ngroups, 4, generator=g), D=torch.randn(nheads, generator=g))


def poison(kw, name, value, time_dim=1, lane=(0,)):
    """A copy of kw with kw[name] set to value at batch row 0, position T (and the leading entries of the rest)."""
    out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    index = [0] * out[name].dim()
    index[time_dim] = T
    out[name][tuple(index)] = value
    return out


def assert_causal(y, y_clean, time_dim=1, tol=1e-6):
    """y_clean: the run without the poison (tol: when it is another form than y's)."""
    before = y.narrow(time_dim, 0, T)
    assert torch.isfinite(before).all(), "a later non-finite value reached an earlier output"
    torch.testing.assert_close(before, y_clean.narrow(time_dim, 0, T), rtol=tol, atol=tol)
    assert not torch.isfinite(y[0].narrow(time_dim - 1, T, 1)).all()  # the poisoned position itself is not hidden
    torch.testing.assert_close(y[1], y_clean[1], rtol=tol, atol=tol)  # another batch row is untouched


SSD_FORMS = {
    "chunked": lambda kw: mamba_chunk_scan_combined(**kw, chunk_size=16, backend="torch"),
    "chunked-7": lambda kw: mamba_chunk_scan_combined(**kw, chunk_size=7, backend="torch"),
    "quadratic": lambda kw: ssd_quadratic(**kw, chunk_size=16),
    "ref": lambda kw: mamba_chunk_scan_combined(**kw, chunk_size=16, backend="ref"),
}


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["x", "B", "dt"])
@pytest.mark.parametrize("form", list(SSD_FORMS))
def test_ssd_torch_forms(form, name, value):
    kw = ssd_inputs()
    run = SSD_FORMS[form]
    assert_causal(run(poison(kw, name, value)), run(kw))


def test_ssd_packed_sequences_and_final_state():
    kw = ssd_inputs()
    seq_idx = torch.zeros(2, L, dtype=torch.long)
    seq_idx[:, 10:] = 1
    kw["seq_idx"] = seq_idx
    bad = poison(kw, "x", float("nan"))
    y, final = mamba_chunk_scan_combined(**bad, chunk_size=16, return_final_states=True)
    assert_causal(y, mamba_chunk_scan_combined(**kw, chunk_size=16))
    assert torch.isnan(final[0, 0]).all() and torch.isfinite(final[1]).all()
    # heads of the other group never saw the NaN (x is per head: head 0 is poisoned, heads 1..3 are not)
    torch.testing.assert_close(y[0, :, 1:], mamba_chunk_scan_combined(**kw, chunk_size=16)[0, :, 1:])


def test_ssd_gradients_of_a_clean_input_are_unchanged():
    kw = {k: v.double().requires_grad_() for k, v in ssd_inputs().items()}
    y = mamba_chunk_scan_combined(**kw, chunk_size=16)
    grads = torch.autograd.grad(y.sum(), list(kw.values()))
    ref = torch.autograd.grad(mamba_chunk_scan_combined(**kw, chunk_size=16, backend="ref").sum(), list(kw.values()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def selective_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(2, 4, L, generator=g), delta=torch.rand(2, 4, L, generator=g),
                A=-torch.rand(4, 3, generator=g), B=torch.randn(2, 3, L, generator=g),
                C=torch.randn(2, 3, L, generator=g), D=torch.randn(4, generator=g))


@pytest.mark.parametrize("name", ["u", "delta", "B"])
@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_selective_scan(backend, name):
    kw = selective_inputs()
    y = selective_scan_fn(**poison(kw, name, float("nan"), time_dim=2), backend=backend)
    assert_causal(y, selective_scan_fn(**kw, backend=backend), time_dim=2)


MAMBA3_TIME_DIM = {"K": 1, "V": 1, "Angles": 1, "ADT": 2, "DT": 2, "Trap": 2}


def mamba3_inputs():
    return scan_inputs(batch=2, seqlen=L, nheads=2, ngroups=1, headdim=3, d_state=4, n_angles=2,
                       dtype=torch.float32, packed=False, states=False)


@pytest.mark.parametrize("name", list(MAMBA3_TIME_DIM))
def test_mamba3(name, backend="torch"):
    kw = mamba3_inputs()
    bad = poison(kw, name, float("nan"), time_dim=MAMBA3_TIME_DIM[name])
    y, *final = mamba3_scan(**bad, chunk_size=16, backend=backend, return_final_states=True)
    assert_causal(y, mamba3_scan(**kw, chunk_size=16, backend=backend))
    assert not torch.isfinite(final[1][0]).all() and torch.isfinite(final[1][1]).all()


def test_decode_steps_keep_earlier_outputs():
    """Steps run one token at a time, so a later token cannot reach an earlier output; the step after a NaN is
    NaN (the state carries it), as in the scans."""
    kw = ssd_inputs()
    bad = poison(kw, "x", float("nan"))
    state = torch.zeros(2, 4, 3, 4)
    ys = [ssd_step(state, bad["x"][:, t], bad["dt"][:, t], bad["A"], bad["B"][:, t], bad["C"][:, t], D=bad["D"])
          for t in range(L)]
    assert_causal(torch.stack(ys, 1), mamba_chunk_scan_combined(**kw, chunk_size=16), tol=1e-4)
    s = selective_inputs()
    sb = poison(s, "u", float("nan"), time_dim=2)
    h = torch.zeros(2, 4, 3)
    ys = [selective_state_update(h, sb["u"][..., t], sb["delta"][..., t], sb["A"], sb["B"][..., t], sb["C"][..., t],
                                 D=sb["D"]) for t in range(L)]
    assert_causal(torch.stack(ys, 2), selective_scan_fn(**s), time_dim=2, tol=1e-4)
    m = mamba3_inputs()
    mb = poison(m, "V", float("nan"))
    states = [torch.zeros(2, 2, 2), torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 4), torch.zeros(2, 2, 3)]
    ys = []
    for t in range(L):
        ys.append(mamba3_step(states, mb["Q"][:, t], mb["K"][:, t], mb["V"][:, t], mb["ADT"][..., t],
                              mb["DT"][..., t], mb["Trap"][..., t], mb["Q_bias"], mb["K_bias"], mb["Angles"][:, t],
                              D=mb["D"], Z=mb["Z"][:, t]))
    assert_causal(torch.stack(ys, 1), mamba3_scan(**m, chunk_size=16), tol=1e-4)


def _context_parallel_rank(rank: int, world: int) -> bool:
    from mambakit.distributed.context_parallel import context_parallel_ssd, sequence_shard

    kw = ssd_inputs()
    kw.pop("D")
    bad = poison(kw, "x", float("nan"))
    shard = {k: (sequence_shard(v) if v.dim() > 1 else v) for k, v in bad.items()}
    clean = {k: (sequence_shard(v) if v.dim() > 1 else v) for k, v in kw.items()}
    y = context_parallel_ssd(**shard, chunk_size=16)
    y_clean = context_parallel_ssd(**clean, chunk_size=16)
    start = rank * L // world
    before = max(0, min(y.shape[1], T - start))
    return bool(torch.isfinite(y[:, :before]).all() and torch.equal(y[:, :before], y_clean[:, :before])
                and torch.equal(y[1], y_clean[1]))


def test_context_parallel_on_cpu():
    pytest.importorskip("torch.distributed")
    assert run_on_ranks(_context_parallel_rank, 2) == [True, True]
