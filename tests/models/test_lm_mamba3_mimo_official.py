"""Mamba-3 MIMO checkpoints in the official mamba_ssm layout: a synthetic official state dict (random tensors, the
official names and shapes) loads, and its logits equal a float64 evaluation of the official math written here from
the official sources (the TileLang training kernel's rotation: state dim i turns with dim i + d_state/2); saving in
mamba_ssm format writes the same tensors back; odd d_state is refused."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import CheckpointError, MambaConfig, MambaLMHeadModel
from mambakit.models.io import from_pretrained, save_pretrained
from tests.conftest import rel_err

D_MODEL, VOCAB = 16, 40
CASES = [
    dict(d_state=8, headdim=8, mimo_rank=2, ngroups=1, rope_fraction=0.5, is_outproj_norm=False),
    dict(d_state=12, headdim=4, mimo_rank=4, ngroups=2, rope_fraction=1.0, is_outproj_norm=True),
]


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _official_mixer(p: dict, u: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The official MIMO Mamba3 forward, step by step in float64, from its tensors p (names without the prefix).
    u: (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""
    N, P, R, G = cfg["d_state"], cfg["headdim"], cfg["mimo_rank"], cfg["ngroups"]
    d_inner = 2 * D_MODEL
    H = d_inner // P
    S = int(N * cfg["rope_fraction"]) // 2 * 2 // 2
    z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(
        u @ p["in_proj.weight"].T, [d_inner, d_inner, R * G * N, R * G * N, H, H, H, S], dim=-1)
    b, L = u.shape[:2]
    B = _rms(B.reshape(b, L, R, G, N), p["B_norm.weight"]).repeat_interleave(H // G, dim=3)  # (b, L, R, H, N)
    C = _rms(C.reshape(b, L, R, G, N), p["C_norm.weight"]).repeat_interleave(H // G, dim=3)
    x, z = x.reshape(b, L, H, P), z.reshape(b, L, H, P)
    dt = F.softplus(dd_dt + p["dt_bias"])
    A = torch.clamp(-torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A.clamp(max=0))), max=-1e-4)
    lam = torch.sigmoid(trap)

    def turn(v, theta):  # the kernel's rotation: dim n with dim n + N/2 for n < S (the others unchanged)
        lo, hi = v[..., :N // 2].clone(), v[..., N // 2:].clone()
        c, s = torch.cos(theta), torch.sin(theta)
        a, d = lo[..., :S].clone(), hi[..., :S].clone()
        lo[..., :S], hi[..., :S] = c * a - s * d, s * a + c * d
        return torch.cat((lo, hi), -1)

    mx, mz, mo = (p[n].transpose(0, 1) for n in ("mimo_x", "mimo_z", "mimo_o"))  # (R, H, P)
    h = u.new_zeros(b, H, P, N)
    theta = u.new_zeros(b, H, S)
    prev = u.new_zeros(b, H, P, N)  # sum_r x_r k_r^T of the step before
    out = []
    for t in range(L):
        theta = theta + math.pi * torch.tanh(ang[:, t])[:, None, :] * dt[:, t, :, None]
        k = turn(B[:, t] + p["B_bias"].transpose(0, 1), theta[:, None])  # (b, R, H, N)
        q = turn(C[:, t] + p["C_bias"].transpose(0, 1), theta[:, None])
        xr = x[:, t, None] * mx  # (b, R, H, P)
        now = torch.einsum("brhp,brhn->bhpn", xr, k)
        alpha = torch.exp(A[:, t] * dt[:, t])  # (b, H)
        beta, gamma = alpha * (1 - lam[:, t]) * dt[:, t], lam[:, t] * dt[:, t]
        h = alpha[..., None, None] * h + beta[..., None, None] * prev + gamma[..., None, None] * now
        prev = now
        y = torch.einsum("bhpn,brhn->brhp", h, q) + p["D"][:, None] * xr
        zr = z[:, t, None] * mz
        if cfg["is_outproj_norm"]:  # RMSNormGated per head, norm before gate
            y = _rms(y, p["norm.weight"].reshape(H, P)) * F.silu(zr)
        else:
            y = y * F.silu(zr)
        out.append((y * mo).sum(1).reshape(b, d_inner))
    return torch.stack(out, 1) @ p["out_proj.weight"].T


def _official_lm(sd: dict, ids: torch.Tensor, cfg: dict, n_layer: int) -> torch.Tensor:
    hidden, residual = sd["backbone.embedding.weight"][ids], None
    for i in range(n_layer):
        residual = hidden if residual is None else hidden + residual
        pre = f"backbone.layers.{i}."
        hidden = _official_mixer({k[len(pre) + 6:]: v for k, v in sd.items() if k.startswith(pre + "mixer.")},
                                 _rms(residual, sd[pre + "norm.weight"]), cfg)
    return _rms(hidden + residual, sd["backbone.norm_f.weight"]) @ sd["lm_head.weight"].T


def _official_folder(path, cfg: dict, seed: int):
    """A folder as the official LM writes it, with random float32 tensors of the official names and shapes
    (residual_in_fp32 off: the float64 model then rounds nothing)."""
    ssm_cfg = {"layer": "Mamba3", "is_mimo": True, "expand": 2, "chunk_size": 16, **cfg}
    config = dict(d_model=D_MODEL, d_intermediate=0, n_layer=2, vocab_size=VOCAB, ssm_cfg=ssm_cfg, attn_layer_idx=[],
                  attn_cfg={}, rms_norm=True, residual_in_fp32=False, fused_add_norm=True, pad_vocab_size_multiple=8,
                  tie_embeddings=False)
    shapes = {k: v.shape for k, v in MambaLMHeadModel(MambaConfig(**config)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 1.0) for k, s in shapes.items()}  # float32
    sd["lm_head.weight"] = torch.randn(shapes["backbone.embedding.weight"], generator=g)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.save(sd, path / "pytorch_model.bin")
    return sd


@pytest.mark.parametrize("case", range(len(CASES)))
def test_official_mimo_checkpoint_loads_and_saves_back(case, tmp_path):
    cfg = CASES[case]
    sd = {k: t.double() for k, t in _official_folder(tmp_path / "official", cfg, seed=case).items()}
    model = from_pretrained(tmp_path / "official", dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(ids).logits[..., :VOCAB]
    assert rel_err(got, _official_lm(sd, ids, cfg, 2)[..., :VOCAB]) < 1e-10
    with torch.no_grad():  # decoding from the state continues the same model
        cache = model.allocate_cache(2, dtype=torch.float64)
        model(ids[:, :6], cache=cache)
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(6, 11)], 1)
    assert rel_err(stepped[..., :VOCAB], got[:, 6:]) < 1e-10
    out = save_pretrained(model, tmp_path / "again", format="mamba_ssm")
    back = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(sd) and all(torch.equal(back[k].double(), sd[k]) for k in sd)
    assert json.loads((out / "config.json").read_text())["ssm_cfg"]["is_mimo"] is True


def test_odd_d_state_refused(tmp_path):
    m = MambaLMHeadModel(MambaConfig(d_model=D_MODEL, n_layer=1, vocab_size=VOCAB, ssm_cfg={
        "layer": "Mamba3", "is_mimo": True, "mimo_rank": 2, "d_state": 7, "headdim": 8}))
    with pytest.raises(CheckpointError, match="even d_state"):
        save_pretrained(m, tmp_path / "ssm", format="mamba_ssm")
    assert not (tmp_path / "ssm").exists()
    d = tmp_path / "hand"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(d_model=D_MODEL, n_layer=1, vocab_size=VOCAB, ssm_cfg={
        "layer": "Mamba3", "is_mimo": True, "d_state": 7})))
    with pytest.raises(CheckpointError, match="even d_state"):
        from_pretrained(d)
