"""CPU decoding of a float16 model (issue 25: 16-bit logits within llama.cpp f16's distance of float32): prefill and
one-token steps run in float16 on the CPU, stay finite, and land several times closer to the float32 model than the
same model in bfloat16 (float16 keeps 3 more mantissa bits), for Mamba-1 and Mamba-2."""
from __future__ import annotations

import copy

import pytest
import torch

from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err

ARCHS = {"mamba1": {"layer": "Mamba1", "d_state": 8},
         "mamba2": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}}


def _decode(model: MambaLMHeadModel, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (batch, 1 + steps, vocab) in float64: the prefill's last row, then one step per token fed."""
    cache = model.allocate_cache(batch_size=prompt.shape[0])
    with torch.inference_mode():
        rows = [model(prompt, cache=cache).logits[:, -1]]
        rows += [model.step(tokens[:, t], cache) for t in range(tokens.shape[1])]
    return torch.stack(rows, 1).double()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float16_decode_is_closer_to_float32_than_bfloat16(arch):
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=96, ssm_cfg=ARCHS[arch])).eval()
    prompt = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    ref = _decode(model, prompt, tokens)
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        low = copy.deepcopy(model).to(dtype)
        assert low.lm_head.weight.dtype == dtype
        errors[dtype] = rel_err(_decode(low, prompt, tokens), ref)  # inf when anything is not finite
    assert errors[torch.float16] < 2e-3, errors
    assert errors[torch.float16] * 4 < errors[torch.bfloat16], errors
