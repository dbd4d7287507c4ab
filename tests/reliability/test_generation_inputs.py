"""Generation against hostile arguments and non-finite models: a MambaKitError naming the argument (never a raw
torch error or a silent wrong result), for every sampling option, the attention mask, and NaN weights."""
from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaKitError, MambaLMHeadModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=50, ssm_cfg={"d_state": 4})).eval()


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])

HOSTILE = [  # (option, value, words the message must contain)
    ("temperature", float("nan"), "temperature"), ("temperature", float("inf"), "temperature"),
    ("temperature", -1.0, "temperature"), ("temperature", "1", "temperature"),
    ("top_k", 2.5, "top_k"), ("top_k", -1, "top_k"), ("top_k", True, "top_k"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_p", float("nan"), "top_p"),
    ("min_p", 1.0, "min_p"), ("min_p", -0.1, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("repetition_penalty", float("nan"), "repetition_penalty"),
    ("seed", 2**64, "seed"), ("seed", -1, "seed"), ("seed", 1.5, "seed"),
    ("eos_token_id", 50, "eos_token_id"), ("eos_token_id", -1, "eos_token_id"),
    ("max_new_tokens", True, "max_new_tokens"), ("max_new_tokens", -1, "max_new_tokens"),
    ("max_new_tokens", 2.0, "max_new_tokens"), ("cuda_graph", "yes", "cuda_graph"),
]


@pytest.mark.parametrize("option,value,words", HOSTILE, ids=[f"{o}={v!r}" for o, v, _ in HOSTILE])
def test_hostile_sampling_options_are_refused(model, option, value, words):
    kwargs = {"max_new_tokens": 3, option: value}
    with pytest.raises(MambaKitError, match=words):
        model.generate(IDS, **kwargs)


def test_input_ids_not_a_tensor(model):
    with pytest.raises(MambaKitError, match="input_ids"):
        model.generate([[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("mask,words", [
    ([[1, 1, 0], [1, 1, 1]], "left-padded"),       # right padding would continue from a pad
    ([[0, 1, 0], [1, 1, 1]], "left-padded"),
    ([[2, 1, 1], [1, 1, 1]], "only 0"),
    ([[0, 0, 0], [1, 1, 1]], "no token"),
    ([[1, 1], [1, 1]], "shape"),
])
def test_bad_attention_masks_are_refused(model, mask, words):
    with pytest.raises(MambaKitError, match=words):
        model.generate(IDS, max_new_tokens=2, temperature=0, attention_mask=torch.tensor(mask))


def test_forward_refuses_mask_values_other_than_0_and_1(model):
    with pytest.raises(MambaKitError, match="only 0"):
        model(IDS, attention_mask=torch.tensor([[1, 1, 1], [0.5, 1, 1]]))


def test_left_padded_mask_is_accepted_and_equals_the_row_alone(model):
    ids = torch.tensor([[0, 0, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = model.generate(ids, max_new_tokens=4, temperature=0, attention_mask=mask)
    alone = model.generate(ids[:1, 2:], max_new_tokens=4, temperature=0)
    assert torch.equal(out[0, 4:], alone[0, 2:])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_weights_stop_generation_with_an_error(temperature):
    torch.manual_seed(0)
    bad = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=50, ssm_cfg={"d_state": 4})).eval()
    with torch.no_grad():
        bad.backbone.layers[0].mixer.out_proj.weight[0, 0] = float("nan")
    with pytest.raises(MambaKitError, match="non-finite logits"):
        bad.generate(IDS, max_new_tokens=5, temperature=temperature, seed=0)


def test_finite_model_generates_without_complaint(model):
    out = model.generate(IDS, max_new_tokens=5, temperature=0.8, top_k=10, top_p=0.9, min_p=0.01, seed=3,
                         repetition_penalty=1.2, eos_token_id=7)
    assert out.shape == (2, 8) and int(out.max()) < 50
