"""mambakit.compat's Mamba and Mamba2: the official constructor keywords (accepted, ignored or refused clearly),
inference_params on forward, the official step and allocate_inference_cache, against mambakit's own layers."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm import Mamba, Mamba2
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba as MambaKitMamba
from mambakit.layers.mamba2 import Mamba2 as MambaKitMamba2


def mixers():
    torch.manual_seed(0)
    return [Mamba(16, d_state=4, use_fast_path=False, layer_idx=0),
            Mamba2(16, d_state=8, headdim=8, use_mem_eff_path=False, d_ssm=32, layer_idx=0)]


@pytest.mark.parametrize("index", [0, 1], ids=["Mamba", "Mamba2"])
def test_prefill_then_steps_match_the_full_forward(index):
    layer = mixers()[index].double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    full = layer(x)
    params = InferenceParams(max_seqlen=6, max_batch_size=2)
    torch.testing.assert_close(layer(x[:, :4], inference_params=params), full[:, :4])
    params.seqlen_offset = 4
    for t in (4, 5):
        torch.testing.assert_close(layer(x[:, t:t + 1], inference_params=params), full[:, t:t + 1])
        params.seqlen_offset += 1


@pytest.mark.parametrize("index", [0, 1], ids=["Mamba", "Mamba2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_several_tokens_after_the_prompt_continue_from_the_cache(index, batch):
    """Once seqlen_offset > 0, k > 1 new tokens (speculative decoding) continue from the cached state, as k steps."""
    layer = mixers()[index].double()
    x = torch.randn(batch, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    full = layer(x)
    params = InferenceParams(max_seqlen=12, max_batch_size=batch)
    got = [layer(x[:, :4], inference_params=params)]
    for a, b in ((4, 6), (6, 7), (7, 12)):  # 2 tokens, 1 (a step), 5
        params.seqlen_offset = a
        got.append(layer(x[:, a:b], inference_params=params))
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("index", [0, 1], ids=["Mamba", "Mamba2"])
def test_official_step_and_cache(index):
    layer = mixers()[index].double()
    conv, ssm = layer.allocate_inference_cache(2, max_seqlen=5, dtype=torch.float64)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    full = layer(x)
    for t in range(3):
        out, conv2, ssm2 = layer.step(x[:, t:t + 1], conv, ssm)
        assert conv2 is conv and ssm2 is ssm and out.shape == (2, 1, 16)
        torch.testing.assert_close(out, full[:, t:t + 1])


def test_same_parameters_as_mambakit_layers():
    a, b = mixers()
    assert isinstance(a, MambaKitMamba) and isinstance(b, MambaKitMamba2)
    torch.manual_seed(0)
    ours = MambaKitMamba(16, d_state=4, layer_idx=0)
    assert a.state_dict().keys() == ours.state_dict().keys()


def test_mamba2_positional_order_and_flat_input():
    layer = Mamba2(16, 8, 4, None, 2, 8)  # d_model, d_state, d_conv, conv_init, expand, headdim
    assert (layer.d_state, layer.headdim) == (8, 8)
    u = torch.randn(2 * 5, 16)
    out = layer(u, seqlen=5)
    assert out.shape == u.shape
    torch.testing.assert_close(out, layer(u.view(2, 5, 16)).reshape(10, 16))


def test_refusals_name_the_argument():
    with pytest.raises(MambaKitError, match="init_process_group"):  # sharded: needs torch.distributed
        Mamba2(16, headdim=8, process_group=object())
    with pytest.raises(MambaKitError, match="d_ssm"):
        Mamba2(16, headdim=8, d_ssm=48)  # wider than d_inner = 32
