"""CUDA-graph decoding: argument checks and the CPU error here, and (with the graph replaced by eager runs of the same
step, `tests.models.eager_graph`) several-token decoders sharing one cache; the GPU tests (same greedy tokens as eager
decoding, same logits step by step, graph reuse, k-token graphs on shared states) run only where CUDA is."""
from __future__ import annotations

import pytest
import torch

from mambakit.cli import main
from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.cuda_graph import GraphedDecoder, check_graphable, graphed_decoder
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err
from tests.models.eager_graph import EagerDecoder, use_eager_graphs

MAMBA2 = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}
MAMBA3 = {"layer": "Mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(arch: str = "mamba1", device="cpu", dtype=None) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=dict({"mamba2": MAMBA2, "mamba3": MAMBA3}.get(arch, {})))
    if arch == "hybrid":
        cfg.update(n_layer=3, attn_layer_idx=[1], attn_cfg={"num_heads": 4, "num_heads_kv": 2})
    return MambaLMHeadModel(MambaConfig(**cfg), device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------------------
# without a GPU
def test_cpu_model_is_refused_with_a_clear_error():
    model = tiny()
    with pytest.raises(MambaKitError, match="CUDA device.*cuda_graph=False"):
        GraphedDecoder(model, 2)
    with pytest.raises(MambaKitError, match="CUDA device"):
        model.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0, cuda_graph=True)
    # the default stays eager and works on the CPU
    assert model.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0).shape == (1, 7)


@pytest.mark.parametrize("batch", [0, -1, 1.5, True, "2", None])
def test_batch_size_must_be_a_positive_int(batch):
    with pytest.raises(MambaKitError, match="batch_size"):
        check_graphable(tiny(), batch)
    with pytest.raises(MambaKitError, match="batch_size"):
        graphed_decoder(tiny(), batch)


def test_attention_layers_are_refused():
    with pytest.raises(MambaKitError, match="attention layers"):
        check_graphable(tiny("hybrid"), 1)


def test_not_an_lm_is_refused():
    with pytest.raises(MambaKitError, match="allocate_cache"):
        check_graphable(torch.nn.Linear(2, 2), 1)


def test_cuda_graph_flag_must_be_bool():
    with pytest.raises(MambaKitError, match="cuda_graph"):
        tiny().generate(torch.tensor([[1, 2]]), 2, cuda_graph="yes")


def test_cli_cuda_graph_on_cpu_exits_2(capsys):
    assert main(["generate", "--checkpoint", ".", "--prompt", "x", "--device", "cpu", "--cuda-graph"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA device" in err and "Traceback" not in err


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "4", None])
def test_decoding_seqlen_must_be_a_positive_int(k):
    with pytest.raises(MambaKitError, match="decoding_seqlen must be a positive integer"):
        GraphedDecoder(tiny(), 2, decoding_seqlen=k)


# ----------------------------------------------------------------------------------------------------------------------
# the graph replaced by eager runs of the same step (CPU)
@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "mamba3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_k4_and_k1_decoders_on_one_cache_continue_each_other(monkeypatch, arch, batch):
    use_eager_graphs(monkeypatch)
    model = tiny(arch, dtype=torch.float64)
    ids = torch.randint(0, 50, (batch, 17), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        full = model(ids).logits
    one = EagerDecoder(model, batch)
    four = EagerDecoder(model, batch, decoding_seqlen=4, cache=one.cache)
    assert four.cache is one.cache and four.tokens.shape == (batch, 4)
    got = [one.prefill(ids[:, :6])[:, None]]
    got.append(four.decode_tokens(ids[:, 6:10]).clone())  # -> logits of positions 6..9
    got.append(one.step(ids[:, 10])[:, None].clone())
    got.append(four.decode_tokens(ids[:, 11:15]).clone())
    got.append(one.decode_tokens(ids[:, 15:16]).clone())  # a k = 1 decoder takes (batch, 1) too
    assert one.seqlen_offset == four.seqlen_offset == 16
    assert rel_err(torch.cat(got, 1), full[:, 5:16]) < 1e-12


def test_a_decoder_built_on_a_filled_cache_keeps_its_states(monkeypatch):
    """The warm-up and the capture run on the shared states: they are put back as they were."""
    use_eager_graphs(monkeypatch)
    model = tiny("mamba2", dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
    one = EagerDecoder(model, 2)
    one.prefill(ids[:, :7])
    before = [t.clone() for s in one.cache.states for t in (s.conv, s.ssm)]
    five = EagerDecoder(model, 2, decoding_seqlen=5, cache=one.cache, warmup=3)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for s in one.cache.states for t in (s.conv, s.ssm)]))
    assert five.seqlen_offset == 7
    assert rel_err(five.decode_tokens(ids[:, 7:12]), full[:, 7:12]) < 1e-12
    with pytest.raises(MambaKitError, match="step takes one token per row.*decode_tokens"):
        five.step(ids[:, 0])
    with pytest.raises(MambaKitError, match=r"tokens must have shape \(batch_size=2, decoding_seqlen=5\)"):
        five.decode_tokens(ids[:, :4])


def test_a_shared_cache_must_fit(monkeypatch):
    use_eager_graphs(monkeypatch)
    model = tiny()
    with pytest.raises(MambaKitError, match="cache must be an InferenceCache"):
        EagerDecoder(model, 2, cache={"states": []})
    with pytest.raises(MambaKitError, match=r"cache must hold the states of model.allocate_cache\(batch_size=2"):
        EagerDecoder(model, 2, decoding_seqlen=2, cache=model.allocate_cache(3))
    with pytest.raises(MambaKitError, match="cache must hold the states"):
        EagerDecoder(model, 2, cache=model.allocate_cache(2, dtype=torch.float64))
    EagerDecoder(model, 2, cache=model.allocate_cache(2))  # a fitting one is taken


# ----------------------------------------------------------------------------------------------------------------------
# GPU only
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_generate_matches_eager(arch, dtype):
    model = tiny(arch, device="cuda", dtype=dtype)
    ids = torch.randint(0, 50, (3, 20), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    eager = model.generate(ids, 24, temperature=0)
    graphed = model.generate(ids, 24, temperature=0, cuda_graph=True)
    assert torch.equal(eager, graphed)
    # sampling with a seed: same tokens too
    a = model.generate(ids, 16, temperature=0.9, top_k=10, seed=5)
    b = model.generate(ids, 16, temperature=0.9, top_k=10, seed=5, cuda_graph=True)
    assert torch.equal(a, b)


@gpu
@pytest.mark.gpu
def test_graph_step_logits_equal_eager_step_and_left_padding():
    model = tiny(device="cuda")
    ids = torch.randint(0, 50, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    dec = GraphedDecoder(model, 2)
    cache = model.allocate_cache(2)
    ref = model(ids, cache=cache, num_last_tokens=1, attention_mask=mask).logits[:, -1]
    got = dec.prefill(ids, attention_mask=mask)
    assert torch.equal(ref, got)
    tok = ref.argmax(-1)
    for _ in range(6):
        ref = model.step(tok, cache)
        got = dec.step(tok)
        assert torch.equal(ref, got)
        tok = ref.argmax(-1)
    assert dec.seqlen_offset == 9 + 6 == cache.seqlen_offset
    # a new prefill starts from a zero state
    again = dec.prefill(ids, attention_mask=mask)
    fresh = model(ids, cache=model.allocate_cache(2), num_last_tokens=1, attention_mask=mask).logits[:, -1]
    assert torch.equal(again, fresh)
    with pytest.raises(MambaKitError, match="tokens must have shape"):
        dec.step(torch.zeros(3, dtype=torch.long, device="cuda"))
    with pytest.raises(MambaKitError, match="input_ids must have shape"):
        dec.prefill(ids[:1])


@gpu
@pytest.mark.gpu
def test_graphed_decoder_is_reused_per_batch_size():
    model = tiny(device="cuda")
    a = graphed_decoder(model, 2)
    assert graphed_decoder(model, 2) is a
    b = graphed_decoder(model, 3)
    assert b is not a and graphed_decoder(model, 3) is b


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_gpu_steps_match_parallel_forward(arch):
    """The CUDA decode step (fused add+RMSNorm and conv-update kernels, graphed) continues the parallel forward."""
    model = tiny(arch, device="cuda")
    ids = torch.randint(0, 50, (2, 16), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
    dec = GraphedDecoder(model, 2)
    got = [dec.prefill(ids[:, :8])]
    for t in range(8, 16):
        got.append(dec.step(ids[:, t]).clone())
    got = torch.stack(got[:-1], 1)
    assert rel_err(got, full[:, 7:15]) < 1e-4


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "mamba3"])
@pytest.mark.parametrize("k", [2, 4])
def test_gpu_k_token_graph_equals_eager(arch, k):
    """The graph of a k-token step (the forward from the cache, captured) gives the eager decode_tokens' logits."""
    model = tiny(arch, device="cuda")
    ids = torch.randint(0, 50, (3, 8 + 3 * k), device="cuda", generator=torch.Generator("cuda").manual_seed(k))
    dec = GraphedDecoder(model, 3, decoding_seqlen=k)
    cache = model.allocate_cache(3)
    with torch.no_grad():
        model(ids[:, :8], cache=cache)
    dec.prefill(ids[:, :8])
    for j in range(3):
        chunk = ids[:, 8 + j * k:8 + (j + 1) * k]
        ref = model.decode_tokens(chunk, cache)
        got = dec.decode_tokens(chunk)
        assert got.shape == (3, k, model.config.padded_vocab_size)
        assert rel_err(got, ref) < 1e-5
    assert dec.seqlen_offset == cache.seqlen_offset == 8 + 3 * k


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "mamba3"])
def test_gpu_k1_and_k4_graphs_share_the_states(arch):
    model = tiny(arch, device="cuda")
    ids = torch.randint(0, 50, (2, 19), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    one = GraphedDecoder(model, 2)
    four = GraphedDecoder(model, 2, decoding_seqlen=4, cache=one.cache)
    ptrs = [[t.data_ptr() for s in d.cache.states for t in vars(s).values()] for d in (one, four)]
    assert ptrs[0] == ptrs[1]
    got = [one.prefill(ids[:, :7])[:, None]]
    got.append(four.decode_tokens(ids[:, 7:11]).clone())
    got.append(one.step(ids[:, 11])[:, None].clone())
    got.append(four.decode_tokens(ids[:, 12:16]).clone())
    got.append(one.step(ids[:, 16])[:, None].clone())
    assert one.seqlen_offset == 17
    assert rel_err(torch.cat(got, 1), full[:, 6:17]) < (1e-3 if arch == "mamba3" else 1e-4)
