"""The Mamba-3 block (SISO; MIMO configs in the step-loop tests): official names/shapes/packing/init, step loop ==
forward (float64 and float32, batch 1..5, several head dims), chunked prefill then steps, padding masks, packed
sequences, config errors."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.mamba3 import Mamba3, Mamba3State, heavy_tail
from tests.conftest import rel_err


def test_official_shapes_and_init():
    m = Mamba3(d_model=768, d_state=128, headdim=64)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {"in_proj.weight": (2 * 1536 + 2 * 128 + 3 * 24 + 32, 768), "dt_bias": (24,),
                      "B_bias": (24, 1, 128), "C_bias": (24, 1, 128), "B_norm.weight": (128,),
                      "C_norm.weight": (128,), "D": (24,), "out_proj.weight": (768, 1536)}
    assert torch.equal(m.B_bias, torch.ones(24, 1, 128)) and torch.equal(m.D, torch.ones(24))
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    full = Mamba3(d_model=64, d_state=10, headdim=16, rope_fraction=1.0, ngroups=2, is_outproj_norm=True)
    assert full.num_rope_angles == 5 and full.in_proj.out_features == 2 * 128 + 2 * 2 * 10 + 3 * 8 + 5
    assert tuple(full.norm.weight.shape) == (128,)


def test_heavy_tail_activation():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y = heavy_tail(x)
    assert torch.allclose(y, torch.tensor([0.25, 1 / 1.5, 1.0, 1.5, 3.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g[2], torch.tensor(1.0, dtype=torch.float64))


CONFIGS = [dict(headdim=8), dict(headdim=16, ngroups=2, rope_fraction=1.0),
           dict(headdim=4, A_activation="softplus", is_outproj_norm=True), dict(headdim=6, d_state=7, expand=3),
           dict(headdim=32, d_state=16)]
MIMO_CONFIGS = [dict(headdim=8, is_mimo=True, mimo_rank=4),
                dict(headdim=16, ngroups=2, rope_fraction=1.0, is_mimo=True, mimo_rank=2),
                dict(headdim=4, A_activation="softplus", is_outproj_norm=True, is_mimo=True, mimo_rank=3)]


def _layer(seed=0, dtype=torch.float64, d_model=32, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("d_state", 8)
    m = Mamba3(d_model=d_model, chunk_size=8, **kwargs).to(dtype)
    with torch.no_grad():  # biases and norms away from their init, so that a wrong wiring shows
        mimo = (m.mimo_x, m.mimo_z, m.mimo_o) if m.is_mimo else ()
        for p in (m.B_bias, m.C_bias, m.D, m.B_norm.weight, m.C_norm.weight, *mimo):
            p.add_(torch.randn_like(p) * 0.5)
    return m


@pytest.mark.parametrize("kwargs", CONFIGS + MIMO_CONFIGS)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
def test_step_loop_equals_forward_float64(kwargs, batch):
    m = _layer(**kwargs)
    x = torch.randn(batch, 13, 32, dtype=torch.float64)
    full = m(x)
    state = m.allocate_state(batch, dtype=torch.float64)
    steps = torch.cat([m.step(x[:, t:t + 1], state) for t in range(13)], 1)
    assert rel_err(steps, full) < 1e-12
    two_d = m.allocate_state(batch, dtype=torch.float64)
    assert rel_err(m.step(x[:, 0], two_d), full[:, 0]) < 1e-12


def forward_and_step_loop(m, x):
    """(forward(x), the step loop's outputs over x (batch, seqlen, d_model) from a fresh state, that state after
    it) in float32, without autograd."""
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(x.shape[0])
        steps = torch.cat([m.step(x[:, t:t + 1], state) for t in range(x.shape[1])], 1)
    return full, steps, state


@pytest.mark.parametrize("kwargs", CONFIGS[:3] + MIMO_CONFIGS)
def test_step_loop_equals_forward_float32(kwargs):
    m = _layer(dtype=torch.float32, **kwargs)
    full, steps, state = forward_and_step_loop(m, torch.randn(3, 40, 32))
    assert state.ssm.dtype == torch.float32
    assert rel_err(steps, full) < 1e-5


@pytest.mark.parametrize("kwargs", CONFIGS[:3])
def test_chunked_prefill_then_steps_equal_one_forward(kwargs):
    m = _layer(**kwargs)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    full = m(x)
    state = m.allocate_state(2, dtype=torch.float64)
    parts = [m(x[:, :11], state=state), m(x[:, 11:12], state=state), m(x[:, 12:21], state=state)]
    parts += [m.step(x[:, t:t + 1], state) for t in range(21, 30)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-12
    reference = m.allocate_state(2, dtype=torch.float64)
    m(x, state=reference)
    for a, b in zip(state.parts(), reference.parts()):
        assert rel_err(a, b) < 1e-12


def _compare_states(a, b, tol=1e-12):
    for x, y in zip(a.parts(), b.parts()):
        assert rel_err(x, y) < tol


def test_padding_mask_left_right_and_between():
    m = _layer(**CONFIGS[1])
    tokens = torch.randn(1, 7, 32, dtype=torch.float64)
    alone_state = m.allocate_state(1, dtype=torch.float64)
    alone = m(tokens, state=alone_state)
    layouts = {  # where the 7 tokens go among 16 positions
        "left": list(range(9, 16)), "right": list(range(7)), "between": [1, 2, 5, 6, 7, 12, 13]}
    for name, where in layouts.items():
        x = torch.randn(1, 16, 32, dtype=torch.float64)
        mask = torch.zeros(1, 16, dtype=torch.long)
        x[:, where], mask[:, where] = tokens, 1
        state = m.allocate_state(1, dtype=torch.float64)
        out = m(x, state=state, mask=mask)
        assert rel_err(out[:, where], alone) < 1e-12, name
        _compare_states(state, alone_state)


def test_padding_mask_continuing_from_a_state():
    m = _layer(**CONFIGS[0])
    prefix, tokens = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 6, 32, dtype=torch.float64)
    ref_state = m.allocate_state(2, dtype=torch.float64)
    m(prefix, state=ref_state)
    ref = m(tokens, state=ref_state)
    state = m.allocate_state(2, dtype=torch.float64)
    m(prefix, state=state)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    mask = torch.zeros(2, 10, dtype=torch.long)
    x[0, 4:], mask[0, 4:] = tokens[0], 1  # row 0: leading pads
    where1 = [0, 1, 4, 5, 8, 9]
    x[1, where1], mask[1, where1] = tokens[1], 1  # row 1: pads between and at the end
    out = m(x, state=state, mask=mask)
    assert rel_err(out[0, 4:], ref[0]) < 1e-12 and rel_err(out[1, where1], ref[1]) < 1e-12
    _compare_states(state, ref_state)
    before = m.allocate_state(1, dtype=torch.float64)
    m(prefix[:1], state=before)
    kept = Mamba3State(*(t.clone() for t in before.parts()))
    m(torch.randn(1, 4, 32, dtype=torch.float64), state=before, mask=torch.zeros(1, 4, dtype=torch.long))
    _compare_states(before, kept, tol=1e-15)  # a row of pads only leaves the state as it was


def test_nan_stays_causal_and_out_of_pads():
    m = _layer(**CONFIGS[1])
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    clean = m(x)
    poisoned = x.clone()
    poisoned[:, 11] = float("nan")
    out = m(poisoned)
    assert rel_err(out[:, :11], clean[:, :11]) < 1e-14 and not torch.isfinite(out[:, 11]).all()
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[:, 11] = 0
    mask[1, 15:] = 0
    poisoned[1, 15:] = float("nan")
    state = m.allocate_state(2, dtype=torch.float64)
    out = m(poisoned, state=state, mask=mask)
    assert torch.isfinite(state.ssm).all()
    for row in range(2):  # the NaN pads change neither the tokens' outputs nor the state
        tokens = mask[row].bool()
        alone_state = m.allocate_state(1, dtype=torch.float64)
        alone = m(x[row:row + 1, tokens], state=alone_state)
        assert rel_err(out[row:row + 1, tokens], alone) < 1e-12
        for a, b in zip(state.parts(), alone_state.parts()):
            assert rel_err(a[row:row + 1], b) < 1e-12


def test_packed_sequences_equal_separate_calls():
    m = _layer(**CONFIGS[2])
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    seq_idx = torch.zeros(1, 20, dtype=torch.long)
    seq_idx[:, 9:] = 1
    packed = m(x, seq_idx=seq_idx)
    assert rel_err(packed, torch.cat((m(x[:, :9]), m(x[:, 9:])), 1)) < 1e-12


def test_gradients_reach_every_parameter():
    m = _layer(dtype=torch.float32, **CONFIGS[2])
    m(torch.randn(2, 12, 32)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs,msg", [
    (dict(d_model=30, headdim=16), "divisible by headdim"),
    (dict(d_model=32, headdim=16, ngroups=3), "divisible by ngroups"),
    (dict(d_model=32, headdim=16, chunk_size=0), "chunk_size"),
    (dict(d_model=32, headdim=16, is_mimo=1), "is_mimo must be a bool"),
    (dict(d_model=32, headdim=16, is_mimo=True, mimo_rank=0), "mimo_rank must be a positive integer"),
    (dict(d_model=32, headdim=16, rope_fraction=0.25), "rope_fraction must be 0.5 or 1.0"),
    (dict(d_model=32, headdim=16, A_activation="exp"), "A_activation must be one of"),
    (dict(d_model=32, headdim=16, d_state=3), "d_state \\* rope_fraction must be >= 2"),
])
def test_invalid_configurations(kwargs, msg):
    with pytest.raises(MambaKitError, match=msg):
        Mamba3(**kwargs)
