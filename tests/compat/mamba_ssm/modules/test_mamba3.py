"""mambakit.compat.mamba_ssm.modules.mamba3.Mamba3: the official constructor keywords, state_dict names and shapes,
forward(u, seq_idx, cu_seqlens, inference_params), step(u, angle, ssm, k, v) and allocate_inference_cache; equal
to mambakit's Mamba3 layer with the same parameters (float64, small awkward shapes)."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm import Mamba3 as TopLevelMamba3
from mambakit.compat.mamba_ssm.modules.mamba3 import Mamba3
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.errors import MambaKitError
from mambakit.layers.mamba3 import Mamba3 as MambaKitMamba3

F64 = torch.float64
D_MODEL, SEQLEN = 16, 11
SMALL = dict(d_state=8, headdim=8, chunk_size=5, dtype=F64)  # 4 heads, 2 rotated pairs, 11 = 2 chunks + 1
CASES = {"siso": dict(), "siso_norm_groups": dict(is_outproj_norm=True, ngroups=2),
         "mimo_norm": dict(is_mimo=True, mimo_rank=3, is_outproj_norm=True),
         "mimo_rope1": dict(is_mimo=True, mimo_rank=2, rope_fraction=1.0)}


def _pair(kw: dict, seed: int = 0):
    torch.manual_seed(seed)
    compat = Mamba3(D_MODEL, **SMALL, **kw, layer_idx=0)
    with torch.no_grad():
        for p in compat.parameters():  # move the constant-initialised ones (biases, D, norms, mimo) apart
            p.add_(0.1 * torch.randn_like(p))
    ours = MambaKitMamba3(D_MODEL, **SMALL, **kw)
    ours.load_state_dict(compat.state_dict())
    return compat, ours


def _inputs(batch=2, seed=1):
    return torch.randn(batch, SEQLEN, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_official_keywords_names_and_shapes():
    layer = Mamba3(32, 16, 2, 16, 1, 0.5, 0.001, 0.1, 1e-4, 1e-4, True, True, 2, True, 16, 0.1, 3, 24,
                   dtype=F64, some_future_option=1)
    assert layer.fuse_pregate_headwise_norm and layer.chunk_size == 16 and layer.layer_idx == 3
    H, R, N, P, S = 4, 2, 16, 16, 4
    want = {"in_proj.weight": (2 * 64 + 2 * N * R + 3 * H + S, 32), "dt_bias": (H,), "B_bias": (H, R, N),
            "C_bias": (H, R, N), "B_norm.weight": (N,), "C_norm.weight": (N,), "mimo_x": (H, R, P),
            "mimo_z": (H, R, P), "mimo_o": (H, R, P), "D": (H,), "norm.weight": (64,), "out_proj.weight": (32, 64)}
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == want
    siso = Mamba3(32, d_state=16, headdim=16)
    assert set(siso.state_dict()) == set(want) - {"mimo_x", "mimo_z", "mimo_o", "norm.weight"}
    assert siso.B_bias.shape == (H, 1, N) and siso.rotary_dim_divisor == 4
    assert TopLevelMamba3 is Mamba3
    torch.testing.assert_close(layer.mimo_x, torch.full((H, R, P), 0.5, dtype=torch.float32))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_step_equal_mambakit_layer(case):
    compat, ours = _pair(CASES[case])
    u = _inputs()
    out = compat(u)
    assert out.shape == u.shape
    torch.testing.assert_close(out, ours(u), rtol=0, atol=0)
    states = compat.allocate_inference_cache(2, SEQLEN)
    assert states[2].shape == (2, compat.mimo_rank, 4, 8) and all(s.dtype == F64 for s in states)
    steps = []
    for t in range(4):
        y, *states = compat.step(u[:, t], *states)
        assert y.shape == (2, D_MODEL)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), out[:, :4], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["siso", "mimo_norm"])
def test_inference_params_prefill_then_decode(case):
    compat, _ = _pair(CASES[case], seed=2)
    u = _inputs(seed=3)
    want = compat(u)
    params = InferenceParams(max_seqlen=SEQLEN, max_batch_size=2)
    got = [compat(u[:, :6], inference_params=params)]
    params.seqlen_offset = 6
    for t in range(6, SEQLEN):
        got.append(compat(u[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-9, atol=1e-10)
    assert len(params.key_value_memory_dict[0]) == 4


@pytest.mark.parametrize("case", ["siso", "mimo_norm"])
@pytest.mark.parametrize("batch", [1, 3])
def test_several_tokens_after_the_prompt_continue_from_the_cache(case, batch):
    """Once seqlen_offset > 0, k > 1 new tokens continue from the four cached states, as k steps would."""
    compat, _ = _pair(CASES[case], seed=2)
    u = _inputs(batch=batch, seed=batch)
    want = compat(u)
    params = InferenceParams(max_seqlen=SEQLEN, max_batch_size=batch)
    got = [compat(u[:, :3], inference_params=params)]
    for a, b in ((3, 5), (5, 6), (6, SEQLEN)):  # 2 tokens, 1 (a step), 5
        params.seqlen_offset = a
        got.append(compat(u[:, a:b], inference_params=params))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-9, atol=1e-10)


def test_packed_sequences_equal_each_alone():
    compat, ours = _pair(CASES["siso_norm_groups"], seed=4)
    lengths = [4, 6, 1]
    u = _inputs(batch=1, seed=5)
    cu = torch.tensor([0, 4, 10, 11], dtype=torch.int32)
    alone = [ours(u[:, a:b]) for a, b in zip(cu.tolist(), cu.tolist()[1:])]
    torch.testing.assert_close(compat(u, cu_seqlens=cu), torch.cat(alone, 1), rtol=1e-9, atol=1e-10)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    torch.testing.assert_close(compat(u, seq_idx=seq_idx), torch.cat(alone, 1), rtol=1e-9, atol=1e-10)
    params = InferenceParams(max_seqlen=SEQLEN, max_batch_size=3)
    compat(u, cu_seqlens=cu, inference_params=params)
    ssm = params.key_value_memory_dict[0][1]
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        state = ours.allocate_state(1)
        ours(u[:, a:b], state=state)
        torch.testing.assert_close(ssm[i], state.ssm[0], rtol=1e-9, atol=1e-10)


def test_refusals_name_the_argument():
    with pytest.raises(MambaKitError, match="rope_fraction"):
        Mamba3(D_MODEL, **SMALL, rope_fraction=0.25)
    compat, _ = _pair(CASES["siso"])
    angle, ssm, k, v = compat.allocate_inference_cache(2, 4)
    with pytest.raises(MambaKitError, match="k_state"):
        compat.step(_inputs()[:, 0], angle, ssm, k[:, 0], v)
    with pytest.raises(MambaKitError, match="layer_idx"):
        Mamba3(D_MODEL, **SMALL)(_inputs(), inference_params=InferenceParams(max_seqlen=4, max_batch_size=2))
    with pytest.raises(MambaKitError, match="cu_seqlens"):
        compat(_inputs(), cu_seqlens=torch.tensor([0, 11]))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["siso", "mimo_norm"])
def test_cuda_forward_and_decode_match_cpu_float64(case):
    torch.manual_seed(6)
    layer = Mamba3(32, d_state=16, headdim=16, chunk_size=16, layer_idx=0, **CASES[case]).double()
    u = torch.randn(2, 40, 32, dtype=F64)
    want = layer(u)
    cuda = Mamba3(32, d_state=16, headdim=16, chunk_size=16, layer_idx=0, **CASES[case]).cuda()
    cuda.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    got = cuda(u.float().cuda())
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-3)
    params = InferenceParams(max_seqlen=40, max_batch_size=2)
    steps = [cuda(u[:, :30].float().cuda(), inference_params=params)]
    for t in range(30, 40):
        params.seqlen_offset = t
        steps.append(cuda(u[:, t:t + 1].float().cuda(), inference_params=params))
    torch.testing.assert_close(torch.cat(steps, 1).double().cpu(), want, rtol=1e-3, atol=1e-3)
