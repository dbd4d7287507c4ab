"""Mamba2(d_ssm < d_inner) of mambakit.compat (and of mambakit's own layer) against the official math written out
here in float64: in_proj -> [z0, x0, z, xBC, dt], the conv and the SSM on d_ssm channels, the gated norm over
d_ssm, cat([silu(z0) * x0, y]) -> out_proj. Forward, prefill + decode steps, the official cache, a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm import Mamba2
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2 as MambaKitMamba2


def official_math(layer, u):
    """The official Mamba2 forward with d_mlp = d_inner - d_ssm, sequential, float64. u (batch, L, d_model)."""
    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    u = u.double()
    batch, L, _ = u.shape
    d_ssm, ng, n, hd = layer.d_ssm, layer.ngroups, layer.d_state, layer.headdim
    nheads = d_ssm // hd
    zxbcdt = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias"))
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * ng * n - nheads) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_ssm + 2 * ng * n, nheads], dim=-1)
    w = p["conv1d.weight"]  # (conv_dim, 1, width)
    xBC = F.conv1d(F.pad(xBC.transpose(1, 2), (w.shape[-1] - 1, 0)), w, p.get("conv1d.bias"), groups=w.shape[0])
    xBC = F.silu(xBC).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_ssm, ng * n, ng * n], dim=-1)
    x = x.reshape(batch, L, nheads, hd)
    B, C = B.reshape(batch, L, ng, n), C.reshape(batch, L, ng, n)
    dt = F.softplus(dt + p["dt_bias"]).clamp(*layer.dt_limit)
    A = -torch.exp(p["A_log"])
    D = p["D"].reshape(nheads, hd) if layer.D_has_hdim else p["D"][:, None]
    group = torch.arange(nheads) // (nheads // ng)
    h = torch.zeros(batch, nheads, hd, n, dtype=torch.float64)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * h \
            + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, group, None, :]
        ys.append((h * C[:, t, group, None, :]).sum(-1) + D * x[:, t])
    y = torch.stack(ys, 1).reshape(batch, L, d_ssm)
    if layer.rmsnorm:  # norm_before_gate=False: norm(y * silu(z)) per group of d_ssm / ngroups channels
        g = (y * F.silu(z)).unflatten(-1, (ng, d_ssm // ng))
        y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + layer.norm.eps)).flatten(-2) * p["norm.weight"]
    else:
        y = y * F.silu(z)
    y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias"))


def perturbed(layer):
    """Every parameter away from its init (D = 1, norm weight = 1 would hide mistakes)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.add_(torch.randn(prm.shape, generator=g, dtype=prm.dtype) * 0.2)
    return layer


CASES = {
    "groups2": dict(ngroups=2),
    "hdim_D_bias": dict(D_has_hdim=True, bias=True),
    "no_norm_limit": dict(rmsnorm=False, dt_limit=(0.01, 0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_prefill_and_steps_match_the_official_math(case):
    torch.manual_seed(0)
    layer = perturbed(Mamba2(16, d_state=4, headdim=4, d_ssm=16, use_mem_eff_path=False, layer_idx=0,
                             **CASES[case]).double())
    assert (layer.d_ssm, layer.d_mlp, layer.nheads, layer.conv_dim) == (16, 16, 4, 16 + 2 * layer.ngroups * 4)
    assert layer.in_proj.out_features == 2 * 32 + 2 * layer.ngroups * 4 + 4 and layer.out_proj.in_features == 32
    u = torch.randn(2, 7, 16, dtype=torch.float64)
    want = official_math(layer, u)
    torch.testing.assert_close(layer(u), want, rtol=1e-9, atol=1e-9)
    params = InferenceParams(max_seqlen=7, max_batch_size=2)
    torch.testing.assert_close(layer(u[:, :4], inference_params=params), want[:, :4], rtol=1e-9, atol=1e-9)
    params.seqlen_offset = 4
    for t in range(4, 7):
        torch.testing.assert_close(layer(u[:, t:t + 1], inference_params=params), want[:, t:t + 1],
                                   rtol=1e-9, atol=1e-9)
        params.seqlen_offset += 1


def test_official_step_and_mambakit_state_with_d_ssm():
    torch.manual_seed(1)
    layer = perturbed(Mamba2(16, d_state=4, headdim=8, d_ssm=8, ngroups=1, use_mem_eff_path=False).double())
    conv, ssm = layer.allocate_inference_cache(2, max_seqlen=4, dtype=torch.float64)
    assert conv.shape == (2, 8 + 2 * 4, 4) and ssm.shape == (2, 1, 8, 4)
    u = torch.randn(2, 4, 16, dtype=torch.float64)
    want = official_math(layer, u)
    for t in range(4):
        out, _, _ = layer.step(u[:, t:t + 1], conv, ssm)
        torch.testing.assert_close(out, want[:, t:t + 1], rtol=1e-9, atol=1e-9)
    # mambakit's own layer: the same parameters, forward and its 2-D step
    ours = MambaKitMamba2(16, d_state=4, headdim=8, d_ssm=8).double()
    ours.load_state_dict(layer.state_dict())
    torch.testing.assert_close(ours(u), want, rtol=1e-9, atol=1e-9)
    state = ours.allocate_state(2)
    torch.testing.assert_close(ours.step(u[:, 0], state), want[:, 0], rtol=1e-9, atol=1e-9)


def test_gradients_flow_into_the_mlp_part():
    layer = Mamba2(16, d_state=4, headdim=8, d_ssm=8)
    layer(torch.randn(1, 5, 16)).square().sum().backward()
    rows = layer.in_proj.weight.grad[:2 * 24]  # z0 and x0 rows (d_mlp = 24)
    assert rows.abs().sum() > 0 and all(prm.grad is not None for prm in layer.parameters())


@pytest.mark.parametrize("d_ssm", [0, 40, 12, 16.0])
def test_bad_d_ssm_is_refused(d_ssm):
    with pytest.raises(MambaKitError, match="d_ssm"):
        MambaKitMamba2(16, d_state=4, headdim=8, d_ssm=d_ssm)


def test_mamba_ssm_checkpoint_round_trip_keeps_d_ssm(tmp_path):
    from mambakit.models.config import MambaConfig
    from mambakit.models.lm import MambaLMHeadModel

    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=40, pad_vocab_size_multiple=8,
                      ssm_cfg={"layer": "Mamba2", "d_state": 4, "headdim": 8, "d_ssm": 8, "chunk_size": 16})
    torch.manual_seed(2)
    model = perturbed(MambaLMHeadModel(cfg)).eval()
    assert model.backbone.layers[0].mixer.d_mlp == 24
    model.save_pretrained(tmp_path / "m", format="mamba_ssm")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["ssm_cfg"]["d_ssm"] == 8
    back = MambaLMHeadModel.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(back(ids).logits, model(ids).logits)


def test_hidden_attention_refuses_d_ssm_and_sharding_needs_divisible_mlp():
    """Tensor parallelism shards d_ssm < d_inner (tests/distributed/test_tensor_parallel.py checks the values);
    here only the refusal of an MLP part that does not split over the ranks."""
    from mambakit.distributed.tensor_parallel import shard_mamba2_state_dict
    from mambakit.interpret.hidden_attention import mamba2_hidden_attention

    block = MambaKitMamba2(16, d_state=4, headdim=8, d_ssm=16)
    two = MambaKitMamba2(16, d_state=4, headdim=8, d_ssm=16, ngroups=2)
    assert set(shard_mamba2_state_dict(two.state_dict(), two, 1, 2)) == set(two.state_dict())
    odd = MambaKitMamba2(9, expand=1, d_state=4, headdim=4, ngroups=2, d_ssm=8)  # 1 MLP channel over 2 ranks
    with pytest.raises(MambaKitError, match=r"d_inner - d_ssm .* divisible by the world size 2, got d_inner - d_ssm=1"):
        shard_mamba2_state_dict(odd.state_dict(), odd, 0, 2)
    with pytest.raises(MambaKitError, match="hidden attention of Mamba2 with d_ssm < d_inner"):
        mamba2_hidden_attention(block, torch.randn(1, 4, 16))
