"""Decoding with a 16-bit SSM state (`allocate_cache(..., state_dtype=...)`, `generate(state_dtype=...)`): the
states are stored in that dtype, a prefill continues from them, steps follow the float32-state decode within the
rounding, the hybrid stack's attention keeps its KV cache, and the wrong request is refused by name."""
from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.errors import MambaKitError
from mambakit.models.cuda_graph import check_shared_cache
from tests.conftest import rel_err


def _model(layer: str) -> MambaLMHeadModel:
    torch.manual_seed(3)
    cfg = MambaConfig(d_model=48, n_layer=2, vocab_size=97, ssm_cfg={"layer": layer, "d_state": 8}
                      | ({"headdim": 16} if layer == "Mamba2" else {}))
    return MambaLMHeadModel(cfg).eval()


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_prefill_in_pieces_then_steps_follow_the_float32_state(layer, state_dtype):
    model = _model(layer)
    ids = torch.randint(0, 97, (3, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        caches = {dt: model.allocate_cache(3, state_dtype=dt) for dt in (None, state_dtype)}
        assert [s.ssm.dtype for s in caches[state_dtype].states] == [state_dtype] * 2
        assert [s.ssm.dtype for s in caches[None].states] == [torch.float32] * 2
        steps = {}
        for dt, cache in caches.items():
            model(ids[:, :9], cache=cache)  # two prefill pieces: the second starts from the 16-bit state
            model(ids[:, 9:20], cache=cache)
            steps[dt] = torch.stack([model.step(ids[:, t], cache) for t in range(20, 29)], 1)
            assert cache.states[0].ssm.dtype == (state_dtype if dt else torch.float32)
    assert rel_err(steps[None], full[:, 20:]) < 1e-5
    err = rel_err(steps[state_dtype], full[:, 20:])
    assert 0 < err < 2e-2  # rounded (not a float32 state in disguise), and close


def test_generate_with_a_bf16_state_and_left_padding():
    model = _model("Mamba2")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = model.generate(ids, 6, temperature=0, attention_mask=mask, state_dtype=torch.bfloat16)
    ref = model.generate(ids, 6, temperature=0, attention_mask=mask)
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)
    assert (out == ref).float().mean() > 0.8  # greedy tokens may flip only at near-ties


def test_bad_requests_name_the_argument():
    model = _model("Mamba1")
    with pytest.raises(MambaKitError, match=r"state_dtype must be None or one of .*got torch.int8"):
        model.allocate_cache(1, state_dtype=torch.int8)
    torch.manual_seed(0)
    m3 = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=50,
                                      ssm_cfg={"layer": "Mamba3", "d_state": 8, "headdim": 16}))
    with pytest.raises(MambaKitError, match="state_dtype=torch.bfloat16 is for Mamba and Mamba2 layers; Mamba3"):
        m3.allocate_cache(1, state_dtype=torch.bfloat16)
    cache = model.allocate_cache(2)
    with pytest.raises(MambaKitError, match="state_dtype=torch.bfloat16.*state tensor 1 should be"):
        check_shared_cache(model, cache, 2, None, torch.device("cpu"), torch.bfloat16)
    check_shared_cache(model, model.allocate_cache(2, state_dtype=torch.bfloat16), 2, None, torch.device("cpu"),
                       torch.bfloat16)


def test_hybrid_attention_keeps_its_kv_cache():
    from mambakit.models.hybrid import HybridConfig, HybridLM

    torch.manual_seed(0)
    cfg = HybridConfig(d_model=32, vocab_size=50, layers=[{"mixer": "mamba2", "mlp": None},
                                                          {"mixer": "attention", "mlp": None}],
                       mamba2={"d_state": 8, "headdim": 16}, attention={"num_heads": 2})
    model = HybridLM(cfg).eval()
    cache = model.allocate_cache(2, state_dtype=torch.bfloat16)
    assert cache.states[0].ssm.dtype == torch.bfloat16 and cache.states[1].k.dtype == torch.float32
    ids = torch.randint(0, 50, (2, 10))
    out = model.generate(ids, 4, temperature=0, state_dtype=torch.bfloat16)
    assert out.shape == (2, 14)
