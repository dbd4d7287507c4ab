"""mambakit.compat's Mamba2.forward(cu_seqlens=): a packed batch of 1 equals each sequence run alone (outputs,
gradients and, with inference_params, the cached states), in float64."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm import Mamba2
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.errors import MambaKitError

LENGTHS = [5, 0, 9, 1, 3]  # an empty sequence, one token, several chunks of 4


def layer_and_input():
    torch.manual_seed(1)
    layer = Mamba2(12, d_state=6, headdim=6, ngroups=2, chunk_size=4, layer_idx=0).double()
    bounds = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    x = torch.randn(1, int(bounds[-1]), 12, dtype=torch.float64, requires_grad=True)
    return layer, x, bounds


def pieces(bounds):
    return [(int(a), int(b)) for a, b in zip(bounds, bounds[1:]) if b > a]


def test_packed_forward_and_gradients_equal_each_sequence_alone():
    layer, x, bounds = layer_and_input()
    packed = layer(x, cu_seqlens=bounds)
    alone = torch.cat([layer(x[:, a:b]) for a, b in pieces(bounds)], dim=1)
    torch.testing.assert_close(packed, alone)
    weight = torch.randn_like(packed)
    grads = torch.autograd.grad((packed * weight).sum(), [x, *layer.parameters()])
    grads_alone = torch.autograd.grad((alone * weight).sum(), [x, *layer.parameters()])
    for g, ref in zip(grads, grads_alone):
        assert not g.isnan().any()
        torch.testing.assert_close(g, ref)
    assert not torch.allclose(layer(x), packed)  # the restart matters


def test_flat_input_and_matching_seq_idx():
    layer, x, bounds = layer_and_input()
    ref = layer(x, cu_seqlens=bounds)
    seq_idx = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))[None]
    torch.testing.assert_close(layer(x, seq_idx=seq_idx, cu_seqlens=bounds), ref)
    flat = layer(x[0], seqlen=x.shape[1], cu_seqlens=bounds)
    assert flat.shape == x[0].shape
    torch.testing.assert_close(flat, ref[0])


def test_prefill_into_the_cache_then_steps():
    layer, x, bounds = layer_and_input()
    x = x.detach()
    params = InferenceParams(max_seqlen=16, max_batch_size=len(LENGTHS))
    packed = layer(x, cu_seqlens=bounds, inference_params=params)
    torch.testing.assert_close(packed, layer(x, cu_seqlens=bounds))
    conv, ssm = params.key_value_memory_dict[0]
    assert ssm.shape[0] == len(LENGTHS)
    nxt = torch.randn(len(LENGTHS), 1, 12, dtype=torch.float64)
    params.seqlen_offset = 1
    stepped = layer(nxt, inference_params=params)
    for i, (a, b) in enumerate(zip(bounds.tolist(), bounds.tolist()[1:])):
        alone = layer(torch.cat([x[:, a:b], nxt[i:i + 1]], dim=1))
        torch.testing.assert_close(stepped[i:i + 1], alone[:, -1:])


@pytest.mark.parametrize("case,match", [
    ("batch", "batch 1"), ("bounds", "cu_seqlens must rise"), ("seq_idx", "seq_idx must agree"),
    ("offset", "seqlen_offset must be 0"),
])
def test_bad_cu_seqlens_raise(case, match):
    layer, x, bounds = layer_and_input()
    x = x.detach()
    with pytest.raises(MambaKitError, match=match):
        if case == "batch":
            layer(x.expand(2, -1, -1), cu_seqlens=bounds)
        elif case == "bounds":
            layer(x, cu_seqlens=torch.tensor([0, 3, 2, x.shape[1]]))
        elif case == "seq_idx":
            layer(x, seq_idx=torch.zeros(1, x.shape[1], dtype=torch.int32), cu_seqlens=bounds)
        else:
            params = InferenceParams(max_seqlen=30, max_batch_size=5)
            params.seqlen_offset = 2
            layer(x, cu_seqlens=bounds, inference_params=params)
