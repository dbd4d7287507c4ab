"""Loading in bfloat16 on the CPU: the weights file is not kept mapped, the model holds only what it should, and its
decode stays close to the same weights computed in float64 (the recurrent state kept in float32)."""
from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch

from mambakit.models.checkpoint import load_checkpoint, save_checkpoint
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.models.pretrained import from_pretrained, save_pretrained

FP32_KEPT = ("A_log", "D", "dt_bias")  # kept in float32 whatever the model dtype (as mamba_ssm)


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.fixture(scope="module", params=["Mamba1", "Mamba2"])
def model(request) -> MambaLMHeadModel:
    torch.manual_seed(0)
    ssm = {"layer": request.param, "d_state": 8} | ({"headdim": 8} if request.param == "Mamba2" else {})
    return MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=96, ssm_cfg=ssm)).eval()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_bf16_load_keeps_no_mapping_of_the_file(model, fmt, tmp_path):
    folder = tmp_path / fmt
    if fmt == "native":
        save_checkpoint(model, folder)
        loaded = load_checkpoint(folder, dtype=torch.bfloat16)
    else:
        save_pretrained(model, folder, format="hf")
        loaded = from_pretrained(folder, dtype="bfloat16")
    gc.collect()
    assert not _mapped(folder / "model.safetensors")
    for name, p in loaded.named_parameters():
        kept = name.rsplit(".", 1)[-1] in FP32_KEPT
        assert p.dtype == (torch.float32 if kept else torch.bfloat16), name
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name  # no view of a larger buffer


def _decode(m: MambaLMHeadModel, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    cache = m.allocate_cache(batch_size=1)
    with torch.inference_mode():
        rows = [m(prompt, cache=cache).logits[0, -1]]
        rows += [m.step(t.view(1), cache)[0] for t in tokens[:-1]]
    return torch.stack(rows).double()


def test_bf16_decode_is_close_to_its_weights_in_float64(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    exact = copy.deepcopy(bf16).double()  # the same (rounded) weights, computed in float64
    prompt = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 96, (8,), generator=torch.Generator().manual_seed(2))
    assert all(s.ssm.dtype == torch.float32 for s in bf16.allocate_cache(batch_size=1).states)
    got, ref = _decode(bf16, prompt, tokens)[:, :96], _decode(exact, prompt, tokens)[:, :96]
    assert torch.isfinite(got).all()
    # bf16 activations between the products: a few units of bf16 rounding (2**-8) of the logits' scale
    assert (got - ref).abs().median() < 4 * 2**-8 * ref.abs().median()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
