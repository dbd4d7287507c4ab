"""CPU decoding of a bfloat16 model with float32 accumulation (`mambakit.ops.cpu_linear`): its steps equal float32
arithmetic on the same (bfloat16-rounded) weights, where torch's bfloat16 products are ~100x further off; with the
default bfloat16 conv state, after a bfloat16 prefill, they are closer to the exact forward than the bfloat16 forward
is; greedy tokens agree with the float32 model's where the logits are far apart (a vocabulary of 8)."""
from __future__ import annotations

import copy

import pytest
import torch

from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.ops import cpu_linear
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not cpu_linear.fp32_accumulation_available(),
                                reason="this torch has no fbgemm fp16 product")

MAMBA2 = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}


@pytest.fixture(autouse=True)
def _fp32_accumulation_on(monkeypatch):
    """These tests are of the fbgemm product (mambakit.ops.cpu_linear.ENABLED, the default), whatever the default."""
    monkeypatch.setattr(cpu_linear, "ENABLED", True)


def _models(arch: str, vocab: int = 70) -> tuple[MambaLMHeadModel, MambaLMHeadModel, MambaLMHeadModel]:
    """(float32 model, its bfloat16 copy, a float32 model holding the bfloat16-rounded weights)."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=48, n_layer=2, vocab_size=vocab, ssm_cfg=dict(MAMBA2) if arch == "mamba2" else {})
    fp32 = MambaLMHeadModel(cfg).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    rounded = copy.deepcopy(bf16).float()
    return fp32, bf16, rounded


def _steps(model: MambaLMHeadModel, ids: torch.Tensor, conv_dtype=None) -> torch.Tensor:
    """Logits (steps, batch, vocab) of one step per column of ids (batch, steps) from an empty cache."""
    with torch.no_grad():
        cache = model.allocate_cache(ids.shape[0], dtype=conv_dtype)
        return torch.stack([model.step(ids[:, i], cache).float() for i in range(ids.shape[1])])


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_bf16_steps_are_float32_arithmetic(arch, monkeypatch):
    _, bf16, rounded = _models(arch)
    ids = torch.randint(0, 70, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = _steps(rounded, ids)
    out = _steps(bf16, ids, conv_dtype=torch.float32)  # the conv state in float32 too: nothing rounds to bf16
    assert out.dtype == torch.float32
    # only float32 rounding differs (the summation order of the products)
    assert rel_err(out, ref) < 1e-5
    monkeypatch.setattr(cpu_linear, "ENABLED", False)
    assert rel_err(_steps(bf16, ids, conv_dtype=torch.float32), ref) > 1e-3  # torch's bf16 products


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_bf16_decode_continues_the_exact_forward(arch):
    _, bf16, rounded = _models(arch)
    ids = torch.randint(0, 70, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = rounded(ids).logits[0, 4:11]  # (7, vocab): float32 arithmetic on the same weights
        cache = bf16.allocate_cache(1)
        prefill = bf16(ids[:, :5], cache=cache).logits[0, -1]
        steps = [prefill] + [bf16.step(ids[:, i], cache)[0] for i in range(5, 11)]
    out = torch.stack([s.float() for s in steps])
    # what is left is the bf16 prefill's and the bf16 conv state's rounding (2^-9 relative per value): closer to the
    # exact logits than the bf16 forward, which rounds every product's output too (torch's bf16 products, the old
    # decode path, are ~1.3x further off than that forward here), and never NaN (rel_err gives inf)
    forward_err = rel_err(bf16(ids).logits[0, 4:11].float(), ref)
    assert rel_err(out, ref) < forward_err


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_greedy_tokens_match_float32_on_sharpened_logits(arch):
    # eight tokens: the top two logits lie far apart next to the bf16 weight rounding's effect (~2^-9 relative)
    fp32, bf16, _ = _models(arch, vocab=8)
    prompt = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(3))
    ref = fp32.generate(prompt, max_new_tokens=24, temperature=0)
    out = bf16.generate(prompt, max_new_tokens=24, temperature=0)
    assert torch.equal(out, ref)
