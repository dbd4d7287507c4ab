"""Decoding through the norm-fused GEMV kernels (`mambakit.ops.norm_linear`): on the CPU the decode path is the
unfused one, bit for bit (with bfloat16 weights, the unfused one in float32: `mambakit.ops.cpu_linear`); on CUDA
(gpu-marked) bfloat16 greedy tokens through the fused steps, eager and graphed,
equal those of the unfused steps, and the fused step continues the parallel forward."""
from __future__ import annotations

import pytest
import torch

from mambakit.layers.step import PreNorm
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.ops import norm_linear
from mambakit.ops.cpu_linear import use_cpu_linear
from mambakit.ops.norm import add_rms_norm, rms_norm
from tests.conftest import rel_err

MAMBA2 = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}


def _model(arch: str, device="cpu", dtype=None, d_model=32, n_layer=2, vocab=50) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                      ssm_cfg=dict(MAMBA2) if arch == "mamba2" else {})
    return MambaLMHeadModel(cfg, device=device, dtype=dtype).eval()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_cpu_block_step_is_the_unfused_one_bit_for_bit(arch):
    model = _model(arch, dtype=torch.bfloat16)
    block = model.backbone.layers[1]
    assert block._fuses_step_norm() is False  # autograd on
    hidden, residual = torch.randn(1, 1, 32).bfloat16(), torch.randn(1, 1, 32)
    s1, s2 = block.mixer.allocate_state(1), block.mixer.allocate_state(1)
    with torch.no_grad():
        assert block._fuses_step_norm()
        out, res = block(hidden, residual, state=s1, step=True)
        if use_cpu_linear(hidden[:, 0], block.mixer.in_proj.weight):  # 16-bit weights: the norm stays float32
            ref_res = residual + hidden
            normed = rms_norm(ref_res, block.norm.weight, block.norm.eps)
        else:
            normed, ref_res = add_rms_norm(hidden, residual, block.norm.weight, block.norm.eps, True)
        ref = block.mixer.step(normed, s2)
    assert torch.equal(out, ref) and torch.equal(res, ref_res) and torch.equal(s1.ssm, s2.ssm)


def test_hooked_in_proj_keeps_its_hook():
    model = _model("mamba1")
    mixer = model.backbone.layers[0].mixer
    seen = []
    mixer.in_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    state = mixer.allocate_state(2)
    with torch.no_grad():
        out, res = mixer.step(torch.randn(2, 1, 32), state, pre_norm=PreNorm(None, torch.ones(32), 1e-5, True))
    assert seen == [(2, 64 * 2)] and out.shape == res.shape == (2, 1, 32)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_bf16_greedy_tokens_fused_equal_unfused(monkeypatch, arch, batch):
    model = _model(arch, device="cuda", dtype=torch.bfloat16, d_model=256, n_layer=4, vocab=512)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper logits: greedy ties from rounding are rare
    ids = torch.randint(0, 512, (batch, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    tokens = {}
    for name, limit in (("fused", 16), ("unfused", 0)):
        monkeypatch.setattr(norm_linear, "GEMV_MAX_BATCH", limit)
        model.__dict__.pop("_graphed_decoders", None)  # a graph captured under the other setting is kept there
        for graph in (False, True):
            tokens[name, graph] = model.generate(ids, 32, temperature=0.0, cuda_graph=graph)
    assert torch.equal(tokens["fused", False], tokens["unfused", False])
    assert torch.equal(tokens["fused", True], tokens["fused", False])
    assert torch.equal(tokens["unfused", True], tokens["unfused", False])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_gpu_fused_steps_continue_the_forward(monkeypatch, arch):
    monkeypatch.setattr(norm_linear, "GEMV_MAX_BATCH", 16)  # the kernels at batch 2 too (by default only batch 1)
    model = _model(arch, device="cuda")
    ids = torch.randint(0, 50, (2, 16), device="cuda")
    with torch.no_grad():
        assert norm_linear.use_gemv(torch.ones(2, 32, device="cuda"), model.lm_head.weight[:, :32])
        full = model(ids).logits
        cache = model.allocate_cache(2)
        model(ids[:, :8], cache=cache)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(8, 16)], 1)
    assert rel_err(steps, full[:, 8:]) < 1e-4
