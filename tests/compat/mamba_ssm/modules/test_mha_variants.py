"""The MHA variants of mamba_ssm (causal=False, interleaved rotary, mlp_dim, d_conv) against a float64 composition
written here (in_proj, the MLP part, a depthwise causal conv, rotary as complex rotations, softmax attention,
out_proj), and their decoding through inference_params against the full forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.modules.mha import MHA
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.errors import MambaKitError

F64 = torch.float64
EMBED, HEADS, HEADS_KV, SEQLEN = 24, 4, 2, 7  # head_dim 6


def rotate(t, rotary_dim, base, interleaved):
    """t (batch, seqlen, heads, head_dim): feature pairs as complex numbers times exp(i * position * freq)."""
    if rotary_dim == 0:
        return t
    half = rotary_dim // 2
    freq = base ** (-torch.arange(half, dtype=F64) / half)
    turn = torch.polar(torch.ones(t.shape[1], half, dtype=F64), torch.arange(t.shape[1], dtype=F64)[:, None] * freq)
    rot = t[..., :rotary_dim]
    if interleaved:
        pairs = torch.view_as_complex(rot.unflatten(-1, (half, 2)).contiguous())
        rot = torch.view_as_real(pairs * turn[:, None]).flatten(-2)
    else:
        pairs = torch.complex(rot[..., :half], rot[..., half:]) * turn[:, None]
        rot = torch.cat([pairs.real, pairs.imag], -1)
    return torch.cat([rot, t[..., rotary_dim:]], -1)


def reference(layer, x):
    """The official MHA forward, composed in float64."""
    qkv = x @ layer.in_proj.weight.T + layer.in_proj.bias
    qkv_dim = layer.head_dim * (HEADS + 2 * HEADS_KV)
    qkv, mlp = qkv[..., :qkv_dim], qkv[..., qkv_dim:]
    if layer.d_conv:
        w = layer.conv1d.weight  # (qkv_dim, 1, d_conv)
        qkv = F.conv1d(F.pad(qkv.transpose(1, 2), (layer.d_conv - 1, 0)), w, layer.conv1d.bias,
                       groups=qkv_dim).transpose(1, 2)
    q, k, v = qkv.split([HEADS * layer.head_dim, HEADS_KV * layer.head_dim, HEADS_KV * layer.head_dim], -1)
    q, k, v = (t.unflatten(-1, (-1, layer.head_dim)) for t in (q, k, v))
    q, k = (rotate(t, layer.rotary_emb_dim, layer.rotary_emb_base, layer.rotary_emb_interleaved) for t in (q, k))
    k, v = (t.repeat_interleave(HEADS // HEADS_KV, 2) for t in (k, v))
    scores = torch.einsum("blhd,bshd->bhls", q, k) / layer.head_dim ** 0.5
    if layer.causal:
        scores = scores.masked_fill(~torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).tril(), -torch.inf)
    context = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v).flatten(-2)
    if mlp.shape[-1]:
        up, gate = mlp.chunk(2, -1)
        context = torch.cat([context, up * F.silu(gate)], -1)
    return context @ layer.out_proj.weight.T + layer.out_proj.bias


VARIANTS = {
    "bidirectional": dict(causal=False, rotary_emb_dim=6),
    "interleaved_partial": dict(causal=True, rotary_emb_dim=4, rotary_emb_interleaved=True),
    "mlp": dict(causal=True, mlp_dim=100, rotary_emb_dim=6),
    "conv": dict(causal=True, d_conv=3),
    "all": dict(causal=True, mlp_dim=256, d_conv=4, rotary_emb_dim=6, rotary_emb_interleaved=True),
    "bidirectional_conv_mlp": dict(causal=False, mlp_dim=8, d_conv=2),
}


def make(kw, seed=0):
    torch.manual_seed(seed)
    return MHA(EMBED, HEADS, num_heads_kv=HEADS_KV, layer_idx=0, dtype=F64, **kw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_float64_composition(name):
    layer = make(VARIANTS[name])
    x = torch.randn(2, SEQLEN, EMBED, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    out, want = layer(x), reference(layer, x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    params = [x] + list(layer.parameters())
    w = torch.randn(out.shape, dtype=F64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((want * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_official_sizes_and_names():
    layer = make(VARIANTS["all"])
    assert list(layer.state_dict()) == ["in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias",
                                        "out_proj.weight", "out_proj.bias"]
    qkv_dim = 6 * (HEADS + 2 * HEADS_KV)
    assert layer.in_proj.weight.shape == (qkv_dim + 256, EMBED) and layer.out_proj.weight.shape == (EMBED, 24 + 128)
    assert make(VARIANTS["mlp"]).mlp_dim == 256  # rounded up to a multiple of 256, as official
    assert MHA(EMBED, HEADS).causal is False  # the official default
    kv, conv = layer.allocate_inference_cache(3, 9)
    assert kv.shape == (3, 9, 2, HEADS_KV, 6) and conv.shape == (3, qkv_dim, 4)


@pytest.mark.parametrize("name", ["all", "conv", "interleaved_partial"])
def test_decoding_with_inference_params_equals_forward(name):
    layer = make(VARIANTS[name], seed=2)
    x = torch.randn(2, SEQLEN, EMBED, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        full = layer(x)
        params = InferenceParams(max_seqlen=SEQLEN, max_batch_size=2)
        got = [layer(x[:, :3], inference_params=params)]
        for t in range(3, SEQLEN):
            params.seqlen_offset = t
            got.append(layer(x[:, t:t + 1], inference_params=params))
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-10, atol=1e-12)


def test_refusals_name_the_argument():
    with pytest.raises(MambaKitError, match="d_conv"):
        MHA(EMBED, HEADS, d_conv=-1)
    with pytest.raises(MambaKitError, match="mlp_dim"):
        MHA(EMBED, HEADS, mlp_dim=1.5)
    with pytest.raises(MambaKitError, match="mask"):
        make(VARIANTS["conv"])(torch.randn(1, 3, EMBED, dtype=F64), mask=torch.ones(1, 3))


@pytest.mark.gpu
def test_cuda_variants_match_float64():
    layer = make(VARIANTS["all"], seed=4)
    x = torch.randn(2, SEQLEN, EMBED, generator=torch.Generator().manual_seed(5), dtype=F64)
    want = reference(layer, x)
    got = layer.float().cuda()(x.float().cuda())
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
