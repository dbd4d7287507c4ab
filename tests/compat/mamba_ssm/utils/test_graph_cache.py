"""update_graph_cache / DecodingCGCache of mambakit.compat: argument handling, the CPU error, and (with an eager
stand-in for mambakit's GraphedDecoder, CUDA graphs being GPU-only) the official flow: prefill through
cache.inference_params, then cache.run steps equal to eager decoding; reuse and re-capture; graphs of several
decoding_seqlens on one set of states."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm.models.config_mamba import MambaConfig
from mambakit.compat.mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.compat.mamba_ssm.utils import generation
from mambakit.compat.mamba_ssm.utils.generation import DecodingCGCache, InferenceParams, update_graph_cache
from mambakit.errors import MambaKitError
from tests.models.eager_graph import EagerDecoder, use_eager_graphs


def tiny():
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=30, ssm_cfg={"layer": "Mamba1",
                                                                                        "d_state": 4})).eval()


def test_official_fields():
    c = DecodingCGCache()
    assert (c.max_batch_size, c.max_seqlen, c.device, c.dtype, c.callables, c.mempool, c.inference_params,
            c.run) == (0, 0, None, None, {}, None, None, None)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "CUDA device"), ({"decoding_seqlens": (1, 2)}, "CUDA device"), ({"batch_size": 0}, "batch_size"),
    ({"decoding_seqlens": (1, 0)}, "decoding_seqlens"), ({"decoding_seqlens": ()}, "decoding_seqlens"),
    ({"decoding_seqlens": (2.0,)}, "decoding_seqlens"), ({"decoding_seqlens": (True,)}, "decoding_seqlens"),
    ({"decoding_seqlens": 4}, "decoding_seqlens"), ({"decoding_seqlens": "4"}, "decoding_seqlens"),
    ({"cache": object()}, "cache must be a DecodingCGCache"), ({"max_seqlen": 0}, "max_seqlen"),
    ({"n_warmups": 0}, "n_warmups"), ({"seqlen_og": -1}, "seqlen_og"),
])
def test_argument_errors_and_cpu(kwargs, match):
    args = {"cache": None, "batch_size": 2, "seqlen_og": 3, "max_seqlen": 10, **kwargs}
    with pytest.raises(MambaKitError, match=match):
        update_graph_cache(tiny(), **args)


def test_official_flow_with_an_eager_stand_in(monkeypatch):
    use_eager_graphs(monkeypatch)
    model, ids = tiny(), torch.randint(0, 30, (2, 6))
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


def stand_in(monkeypatch):
    """The graph path of decode / capture_graph on the CPU, with the eager stand-in for the graph."""
    use_eager_graphs(monkeypatch)
    monkeypatch.setattr(generation, "graph_decoding", lambda model: True)


def test_decode_cg_goes_through_the_graph_cache_with_the_eager_tokens(monkeypatch):
    model, ids = tiny(), torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(3))
    eager = generation.decode(ids, model, 12, cg=False, output_scores=True)
    stand_in(monkeypatch)
    for _ in range(2):  # the second call reuses the cache on the model: its states from the first are zeroed
        graphed = generation.decode(ids, model, 12, cg=True, output_scores=True)
        assert torch.equal(graphed.sequences, eager.sequences) and graphed.sequences.shape == (2, 12)
        for a, b in zip(graphed.scores, eager.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert EagerDecoder.made == 1 and EagerDecoder.replays == 2 * (12 - 5 - 1)  # every step after the prefill
    assert isinstance(model._decoding_cache, DecodingCGCache)


def test_decode_cg_on_cpu_decodes_eagerly():
    model, ids = tiny(), torch.randint(0, 30, (1, 4), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, 9, cg=True, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, 9, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, ref.sequences) and not hasattr(model, "_decoding_cache")
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b)


def test_capture_graph_reads_the_states_already_in_inference_params(monkeypatch):
    """A prefill before the capture: the graph advances those very tensors (as official)."""
    stand_in(monkeypatch)
    model, ids = tiny(), torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(5))
    full = model(ids).logits
    params = InferenceParams(max_seqlen=7, max_batch_size=2, lengths_per_sample=torch.zeros(2, dtype=torch.int32))
    model(ids[:, :5], inference_params=params)
    before = dict(params.key_value_memory_dict)
    run = generation.capture_graph(model, params, 2, 7)
    assert all(params.key_value_memory_dict[i][1] is before[i][1] for i in before)
    for t in (5, 6):
        logits = run(ids[:, t:t + 1], torch.full((2, 1), t), t)
        assert logits.shape == (2, 1, full.shape[-1]) and params.lengths_per_sample.tolist() == [t, t]
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    with pytest.raises(MambaKitError, match="input_ids must have shape"):
        run(ids[:1, :1], None, 0)


def test_capture_graph_takes_over_states_of_another_dtype(monkeypatch):
    """States that do not fit the graph (float32 conv states, a float64 graph): its own tensors, holding theirs."""
    stand_in(monkeypatch)
    model, ids = tiny(), torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(5))
    full = model(ids).logits
    params = InferenceParams(max_seqlen=7, max_batch_size=2)
    model(ids[:, :5], inference_params=params)
    before = dict(params.key_value_memory_dict)
    run = generation.capture_graph(model, params, 2, 7, decoding_seqlen=2, dtype=torch.float64)
    assert all(params.key_value_memory_dict[i][0] is not before[i][0] for i in before)
    assert all(params.key_value_memory_dict[i][0].dtype == torch.float64 for i in before)
    torch.testing.assert_close(run(ids[:, 5:7]), full[:, 5:7], rtol=1e-4, atol=1e-4)


def test_capture_graph_refuses_states_of_another_batch(monkeypatch):
    stand_in(monkeypatch)
    model = tiny()
    params = InferenceParams(max_seqlen=7, max_batch_size=3)
    model(torch.randint(0, 30, (3, 4)), inference_params=params)
    with pytest.raises(MambaKitError, match="inference_params holds states of shape"):
        generation.capture_graph(model, params, 2, 7)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "Mamba3"])
def test_graphs_of_several_decoding_seqlens_share_the_states(monkeypatch, layer):
    stand_in(monkeypatch)
    torch.manual_seed(0)
    cfg = {"layer": layer, "d_state": 4} if layer == "Mamba1" else {"layer": layer, "d_state": 8, "headdim": 8,
                                                                    "chunk_size": 4}
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=30, ssm_cfg=cfg)).double().eval()
    ids = torch.randint(0, 30, (3, 16), generator=torch.Generator().manual_seed(6))
    full = model(ids).logits
    cache = update_graph_cache(model, None, 3, 4, 16, decoding_seqlens=(1, 4), dtype=torch.float64)
    assert sorted(cache.callables) == [(3, 1), (3, 4)] and EagerDecoder.made == 2
    params = cache.inference_params
    entries = dict(params.key_value_memory_dict)
    model(ids[:, :4], inference_params=params)  # the prefill fills the states of both graphs
    got = [cache.run(ids[:, 4:8], None, 4), cache.run(ids[:, 8:9], None, 8), cache.run(ids[:, 9:13], None, 9)]
    assert got[0].shape == (3, 4, full.shape[-1])
    # a k added later is captured on the same states, which it keeps through its capture
    assert update_graph_cache(model, cache, 3, 0, 16, decoding_seqlens=(2,), dtype=torch.float64) is cache
    assert sorted(cache.callables) == [(3, 1), (3, 2), (3, 4)] and EagerDecoder.made == 3
    got.append(cache.run(ids[:, 13:15], None, 13))
    got.append(cache.run(ids[:, 15:16], None, 15))
    torch.testing.assert_close(torch.cat(got, 1), full[:, 4:], rtol=1e-10, atol=1e-10)
    assert all(params.key_value_memory_dict[i] is entries[i] for i in entries)
    with pytest.raises(MambaKitError, match=r"input_ids must have shape one of \[\(3, 1\), \(3, 2\), \(3, 4\)\]"):
        cache.run(ids[:, :3], None, 0)


@pytest.mark.parametrize("kwargs,match", [({"decoding_seqlen": 0}, "decoding_seqlen"),
                                          ({"decoding_seqlen": 2.0}, "decoding_seqlen"),
                                          ({"decoding_seqlen": True}, "decoding_seqlen"),
                                          ({"decoding_seqlen": 4}, "CUDA device"),
                                          ({"n_warmups": 0}, "n_warmups"), ({}, "CUDA device")])
def test_capture_graph_argument_errors(kwargs, match):
    with pytest.raises(MambaKitError, match=match):
        generation.capture_graph(tiny(), InferenceParams(max_seqlen=4, max_batch_size=1), 1, 4, **kwargs)


def gpu_model(layer: str) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = {"layer": layer, "d_state": 16} if layer == "Mamba1" else {"layer": layer, "d_state": 16, "headdim": 16}
    return MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=60, ssm_cfg=cfg), device="cuda").eval()


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_gpu_decode_cg_tokens_equal_eager(layer):
    model = gpu_model(layer)
    ids = torch.randint(0, 60, (3, 10), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    eager = model.generate(ids, 30)
    graphed = model.generate(ids, 30, cg=True)
    assert model._decoding_cache.callables and torch.equal(graphed, eager)
    assert torch.equal(model.generate(ids, 30, cg=True), eager)  # the graph reused from a fresh prefill


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_gpu_graphs_of_k1_and_k4_on_shared_states_equal_the_forward(layer):
    model = gpu_model(layer)
    ids = torch.randint(0, 60, (2, 14), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
    cache = update_graph_cache(model, None, 2, 5, 14, decoding_seqlens=(1, 4))
    model(ids[:, :5], inference_params=cache.inference_params)
    got = torch.cat([cache.run(ids[:, 5:9], None, 5), cache.run(ids[:, 9:10], None, 9),
                     cache.run(ids[:, 10:14], None, 10)], 1)
    torch.testing.assert_close(got, full[:, 5:], rtol=1e-4, atol=1e-4)
