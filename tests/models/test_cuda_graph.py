"""CUDA-graph decoding: argument checks and the CPU error here; the GPU tests (same greedy tokens as eager decoding,
same logits step by step, graph reuse) run only where CUDA is (through `device`)."""
from __future__ import annotations

import pytest
import torch

from mambakit.cli import main
from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.cuda_graph import GraphedDecoder, check_graphable, graphed_decoder
from mambakit.models.lm import MambaLMHeadModel

MAMBA2 = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(arch: str = "mamba1", device="cpu", dtype=None) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=dict(MAMBA2) if arch == "mamba2" else {})
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
    from tests.conftest import rel_err

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
