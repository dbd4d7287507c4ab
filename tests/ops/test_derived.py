"""`mambakit.ops.derived`: tensors derived from weights are kept per weight version and made again when the weight
changes (in place, `load_state_dict`, `.data =`), found through a view of the weight, not kept for inference tensors;
the decode step of a model sees a weight changed between two steps."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.ops import derived as dv


def test_kept_while_the_weight_is_unchanged_and_remade_after_each_change():
    lin = nn.Linear(5, 7)
    w = lin.weight
    t = dv.float_copy(w, torch.float64)
    assert t.shape == (7, 5) and t.dtype == torch.float64
    assert torch.equal(t, w.detach().double())
    assert dv.float_copy(w, torch.float64) is t  # kept
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    t2 = dv.float_copy(w, torch.float64)
    assert t2 is not t and torch.equal(t2, w.detach().double())
    lin.load_state_dict({"weight": torch.randn(7, 5), "bias": torch.zeros(7)})  # copies in place
    assert torch.equal(dv.float_copy(w, torch.float64), w.detach().double())
    w.data = torch.randn(7, 5)  # new storage
    assert torch.equal(dv.float_copy(w, torch.float64), w.detach().double())


def test_a_view_finds_its_parameter_and_each_view_has_its_own_entry():
    conv = nn.Conv1d(6, 6, 4, groups=6)
    first = dv.float_copy(conv.weight.squeeze(1), torch.float64)
    assert first.shape == (6, 4) and dv.float_copy(conv.weight.squeeze(1), torch.float64) is first
    other = dv.float_copy(conv.weight[:3, 0], torch.float64)  # another view of the same parameter
    assert torch.equal(other, conv.weight.detach()[:3, 0].double())
    with torch.no_grad():
        conv.weight.add_(1)  # through the parameter: the view's entry is stale
    assert torch.equal(dv.float_copy(conv.weight.squeeze(1), torch.float64), conv.weight.detach().squeeze(1).double())


def test_negative_exp_and_same_dtype_and_inference_tensors():
    a_log = nn.Parameter(torch.randn(3, 4))
    assert torch.equal(dv.negative_exp(a_log, torch.float32), -torch.exp(a_log.detach()))
    assert dv.float_copy(a_log, torch.float32) is a_log  # no copy in its own dtype
    with torch.inference_mode():
        t = torch.randn(3, 4)
        assert torch.equal(dv.negative_exp(t, torch.float32), -torch.exp(t))
        t.mul_(3)  # no version counter: made at every call, never stale
        assert torch.equal(dv.negative_exp(t, torch.float32), -torch.exp(t))


def test_entries_go_with_their_weight():
    w = torch.randn(4, 4)
    dv.float_copy(w, torch.float64)
    key = (id(w), ("to", torch.float64))
    assert key in dv._CACHE
    del w
    gc.collect()
    assert key not in dv._CACHE


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_sees_weights_changed_between_steps(layer, dtype):
    """Every small weight of the mixers (A_log, D, biases, conv, x_proj / dt_proj: the lean step's kept copies and
    cpu_linear's) changed in place between two steps: the next step equals that of a fresh copy of the changed
    model."""
    torch.manual_seed(0)
    ssm = {"layer": layer} if layer == "Mamba1" else {"layer": layer, "d_state": 16, "headdim": 16}
    model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=96, ssm_cfg=ssm)).to(dtype).eval()
    prompt = torch.randint(0, 96, (2, 5))
    with torch.inference_mode():
        cache = model.allocate_cache(2)
        model(prompt, cache=cache)
        model.step(torch.tensor([3, 4]), cache)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mixer" in name and "in_proj" not in name and "out_proj" not in name:
                p.mul_(0.75).add_(0.01)
    fresh = MambaLMHeadModel(model.config).to(dtype).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        cache2 = fresh.allocate_cache(2)
        fresh(prompt, cache=cache2)
        fresh.step(torch.tensor([3, 4]), cache2)
        for state, state2 in zip(cache.states, cache2.states):  # the old weights' state, in the fresh model's cache
            state2.conv.copy_(state.conv)
            state2.ssm.copy_(state.ssm)
        out = model.step(torch.tensor([1, 2]), cache)
        ref = fresh.step(torch.tensor([1, 2]), cache2)
    assert torch.equal(out, ref)
