"""update_graph_cache / DecodingCGCache of mambakit.compat: argument handling, the CPU error, and (with an eager
stand-in for mambakit's GraphedDecoder, CUDA graphs being GPU-only) the official flow: prefill through
cache.inference_params, then cache.run steps equal to eager decoding; reuse and re-capture."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm.models.config_mamba import MambaConfig
from mambakit.compat.mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.compat.mamba_ssm.utils import generation
from mambakit.compat.mamba_ssm.utils.generation import DecodingCGCache, InferenceParams, update_graph_cache
from mambakit.errors import MambaKitError


def tiny():
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=30, ssm_cfg={"layer": "Mamba1",
                                                                                        "d_state": 4})).eval()


def test_official_fields():
    c = DecodingCGCache()
    assert (c.max_batch_size, c.max_seqlen, c.device, c.dtype, c.callables, c.mempool, c.inference_params,
            c.run) == (0, 0, None, None, {}, None, None, None)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "CUDA device"), ({"decoding_seqlens": (1, 2)}, "decoding_seqlens"), ({"batch_size": 0}, "batch_size"),
    ({"cache": object()}, "cache must be a DecodingCGCache"), ({"max_seqlen": 0}, "max_seqlen"),
    ({"n_warmups": 0}, "n_warmups"), ({"seqlen_og": -1}, "seqlen_og"),
])
def test_argument_errors_and_cpu(kwargs, match):
    args = {"cache": None, "batch_size": 2, "seqlen_og": 3, "max_seqlen": 10, **kwargs}
    with pytest.raises(MambaKitError, match=match):
        update_graph_cache(tiny(), **args)


class EagerDecoder:
    """GraphedDecoder's interface without the graph."""
    made = 0

    def __init__(self, model, batch_size, dtype=None, warmup=2):
        EagerDecoder.made += 1
        self.model, self.cache = model, model.allocate_cache(batch_size, dtype=dtype)

    def step(self, tokens):
        return self.model.step(tokens.reshape(-1), self.cache)


def test_official_flow_with_an_eager_stand_in(monkeypatch):
    monkeypatch.setattr(generation, "GraphedDecoder", EagerDecoder)
    monkeypatch.setattr(generation, "check_graphable", lambda model, batch: torch.device("cpu"))
    model, ids = tiny(), torch.randint(0, 30, (2, 6))
    EagerDecoder.made = 0
    cache = update_graph_cache(model, None, 2, 4, 8)
    params = cache.inference_params
    assert params.seqlen_offset == 0 and params.lengths_per_sample.tolist() == [4, 4]
    assert (cache.max_batch_size, cache.max_seqlen, cache.dtype) == (2, 8, torch.float32)
    model(ids[:, :4], inference_params=params)
    full = model(ids).logits
    for t in (4, 5):
        params.seqlen_offset = t
        logits = cache.run(ids[:, t:t + 1], torch.full((2, 1), t), t)
        assert logits.shape == (2, 1, full.shape[-1])
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    assert update_graph_cache(model, cache, 2, 0, 8) is cache and EagerDecoder.made == 1  # reused
    update_graph_cache(model, cache, 2, 0, 16)
    update_graph_cache(model, cache, 3, 0, 16)
    assert EagerDecoder.made == 3 and list(cache.callables) == [(3, 1)]
    with pytest.raises(MambaKitError, match="input_ids must have shape"):
        cache.run(ids[:2, :1], None, 0)
    assert isinstance(params, InferenceParams)
