"""InferenceParams and sample of mambakit.compat.mamba_ssm.utils.generation: the official fields and defaults."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm.utils.generation import InferenceParams, sample
from mambakit.errors import MambaKitError


def test_inference_params_fields_and_reset():
    p = InferenceParams(max_seqlen=8, max_batch_size=2, lengths_per_sample=torch.ones(2, dtype=torch.int32))
    assert p.seqlen_offset == 0 and p.batch_size_offset == 0 and p.key_value_memory_dict == {}
    p.seqlen_offset = 5
    p.reset(16, 4)
    assert (p.max_seqlen, p.max_batch_size, p.seqlen_offset) == (16, 4, 0)
    assert int(p.lengths_per_sample.sum()) == 0


def test_sample_defaults_are_greedy_and_top_p_zero_is_off():
    logits = torch.randn(3, 11)
    assert torch.equal(sample(logits), logits.argmax(-1))
    peaked = torch.full((2, 5), -30.0)
    peaked[:, 2] = 30.0
    assert torch.equal(sample(peaked, top_k=0, top_p=0.0), torch.tensor([2, 2]))
    with pytest.raises(MambaKitError, match="top_p"):
        sample(logits, top_k=0, top_p=1.5)
