"""mambakit.compat's GatedMLP, MHA and Block: official parameter names and shapes, float64 references written out
here, decoding through inference_params equal to the full forward, clear refusals."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.compat.mamba_ssm import Mamba2
from mambakit.compat.mamba_ssm.modules.block import Block
from mambakit.compat.mamba_ssm.modules.mha import MHA
from mambakit.compat.mamba_ssm.modules.mlp import GatedMLP
from mambakit.compat.mamba_ssm.ops.triton.layer_norm import RMSNorm
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.errors import MambaKitError

f64 = torch.float64


def test_gated_mlp_layout_and_values():
    torch.manual_seed(0)
    mlp = GatedMLP(10, hidden_features=20, multiple_of=8, bias=True).double()
    assert mlp.fc1.weight.shape == (48, 10) and mlp.fc2.weight.shape == (10, 24)
    assert GatedMLP(12).fc2.weight.shape == (12, 128)  # int(8 * 12 / 3) = 32 -> 128
    x = torch.randn(3, 5, 10, dtype=f64)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    up, gate = h[..., :24], h[..., 24:]
    ref = (up * gate * torch.sigmoid(gate)) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), ref)
    assert GatedMLP(6, 4, out_features=3, activation=F.gelu, multiple_of=1)(torch.randn(2, 6)).shape == (2, 3)


def attention_ref(layer: MHA, x: torch.Tensor) -> torch.Tensor:
    """Causal attention written out: explicit scores, -inf above the diagonal, half-split rotary."""
    b, s, _ = x.shape
    h, hkv, d, rd = layer.num_heads, layer.num_heads_kv, layer.head_dim, layer.rotary_emb_dim
    qkv = F.linear(x, layer.in_proj.weight, layer.in_proj.bias)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(b, s, h, d), k.view(b, s, hkv, d), v.view(b, s, hkv, d)
    pos = torch.arange(s, dtype=f64)
    ang = pos[:, None] / (10000.0 ** (torch.arange(0, rd, 2, dtype=f64) / rd))  # (s, rd / 2)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(t):
        a, c, rest = t[..., :rd // 2], t[..., rd // 2:rd], t[..., rd:]
        return torch.cat([a * cos - c * sin, c * cos + a * sin, rest], dim=-1)

    q, k = rope(q), rope(k)
    group = torch.arange(h) // (h // hkv)
    scores = torch.einsum("bihd,bjhd->bhij", q, k[:, :, group]) * d ** -0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v[:, :, group]).reshape(b, s, h * d)
    return F.linear(out, layer.out_proj.weight, layer.out_proj.bias)


def mha():
    torch.manual_seed(2)
    return MHA(24, 4, num_heads_kv=2, head_dim=6, causal=True, layer_idx=3, rotary_emb_dim=4).double()


def test_mha_official_parameters_and_reference():
    layer = mha()
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"in_proj.weight": (48, 24), "in_proj.bias": (48,), "out_proj.weight": (24, 24),
                      "out_proj.bias": (24,)}
    x = torch.randn(2, 7, 24, dtype=f64, requires_grad=True)
    out, ref = layer(x), attention_ref(layer, x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0])


def test_mha_decodes_through_the_official_cache():
    layer = mha()
    x = torch.randn(2, 6, 24, dtype=f64)
    full = layer(x)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    torch.testing.assert_close(layer(x[:, :4], inference_params=params), full[:, :4])
    kv, conv = params.key_value_memory_dict[3]
    assert kv.shape == (2, 8, 2, 2, 6) and conv is None
    for t in (4, 5):
        params.seqlen_offset = t
        torch.testing.assert_close(layer(x[:, t:t + 1], inference_params=params), full[:, t:t + 1])
    assert kv[:, 6:].abs().sum() == 0
    with pytest.raises(MambaKitError, match="kv cache"):
        params.seqlen_offset = 8
        layer(x[:, :1], inference_params=params)


def block(fused, mixer="mamba2", residual_in_fp32=False, norm=RMSNorm):
    torch.manual_seed(3)
    if mixer == "mamba2":
        mixer_cls = functools.partial(Mamba2, d_state=4, headdim=4, chunk_size=4, layer_idx=0)
    else:
        mixer_cls = functools.partial(MHA, num_heads=2, causal=True, layer_idx=0)
    mlp_cls = functools.partial(GatedMLP, hidden_features=12, multiple_of=4)
    return Block(8, mixer_cls, mlp_cls, norm_cls=functools.partial(norm, eps=1e-5), fused_add_norm=fused,
                 residual_in_fp32=residual_in_fp32)


def rms(t, w):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w


@pytest.mark.parametrize("fused", [False, True])
def test_block_matches_its_definition(fused):
    blk = block(fused).double()
    x, res = torch.randn(2, 5, 8, dtype=f64), torch.randn(2, 5, 8, dtype=f64)
    out, residual = blk(x, res)
    r1 = x + res
    r2 = blk.mixer(rms(r1, blk.norm.weight)) + r1
    torch.testing.assert_close(residual, r2)
    torch.testing.assert_close(out, blk.mlp(rms(r2, blk.norm2.weight)))
    first, first_res = blk(x)  # the first block: no residual yet
    torch.testing.assert_close(first_res, blk.mixer(rms(x, blk.norm.weight)) + x)


@pytest.mark.parametrize("fused", [False, True])
def test_block_residual_in_fp32_and_layer_norm(fused):
    blk = block(fused, mixer="mha", residual_in_fp32=True, norm=nn.LayerNorm).to(torch.bfloat16)
    out, residual = blk(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
    assert blk.mlp is not None and Block(8, lambda d: nn.Linear(d, d), nn.Identity).mlp is None
    with pytest.raises(MambaKitError, match="fused_add_norm"):
        Block(8, lambda d: nn.Linear(d, d), nn.Identity, norm_cls=nn.Identity, fused_add_norm=True)


def test_block_decodes_with_inference_params():
    blk = block(True).double()
    x = torch.randn(2, 5, 8, dtype=f64)
    full, full_res = blk(x)
    params = InferenceParams(max_seqlen=5, max_batch_size=2)
    out, res = blk(x[:, :3], inference_params=params)
    torch.testing.assert_close(out, full[:, :3])
    for t in (3, 4):
        params.seqlen_offset = t
        out, res = blk(x[:, t:t + 1], inference_params=params)
        torch.testing.assert_close(out, full[:, t:t + 1])
        torch.testing.assert_close(res, full_res[:, t:t + 1])
    conv, ssm = blk.allocate_inference_cache(2, 5, dtype=f64)
    assert conv.shape[0] == ssm.shape[0] == 2
