"""Mamba-3 through the LM: built from ssm_cfg={"layer": "Mamba3"} (any accepted spelling), decoding equals the
forward, generate runs, the native and official mamba_ssm checkpoint round trips are exact (transformers refuses
it clearly), an official config.json written by hand loads, and
`mambakit train --arch mamba3` trains."""
from __future__ import annotations

import json

import pytest
import torch

from mambakit import CheckpointError, MambaConfig, MambaLMHeadModel
from mambakit.cli.main import main
from mambakit.models.io import from_pretrained, load_checkpoint, save_checkpoint, save_pretrained
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=100, ssm_cfg={"layer": "mamba3", "d_state": 16, "headdim": 16})
    return MambaLMHeadModel(cfg).eval()


def test_config_stores_the_registry_name(model):
    assert model.config.mixer_layer == "Mamba3"
    assert type(model.backbone.layers[0].mixer).__name__ == "Mamba3"


def test_steps_after_a_prefill_equal_the_forward(model):
    ids = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(3)
        model(ids[:, :15], cache=cache)
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(15, 24)], 1)
    assert rel_err(stepped, full[:, 15:]) < 1e-5
    out = model.generate(ids[:, :4], max_new_tokens=6, temperature=0)
    assert out.shape == (3, 10)


@pytest.mark.parametrize("headdim", [8, 16, 32, 64])
def test_float64_prefill_in_pieces_then_steps_equal_one_forward(headdim):
    torch.manual_seed(headdim)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"layer": "Mamba3", "d_state": 8,
                                                                     "headdim": headdim, "chunk_size": 4})
    m = MambaLMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 50, (5, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.allocate_cache(5, dtype=torch.float64)
        pieces = [m(ids[:, :6], cache=cache).logits, m(ids[:, 6:13], cache=cache).logits]
        pieces += [m.step(ids[:, t], cache)[:, None] for t in range(13, 19)]
    assert cache.states[0].ssm.dtype == torch.float64
    assert rel_err(torch.cat(pieces, 1), full) < 1e-12


def test_greedy_generate_equals_the_argmax_loop_and_left_padding(model):
    prompts = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(6))
    out = model.generate(prompts, max_new_tokens=5, temperature=0)
    tokens = prompts
    with torch.no_grad():
        for _ in range(5):  # no cache: the whole sequence through the forward each time
            tokens = torch.cat((tokens, model(tokens).logits[:, -1, :100].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, tokens)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), prompts[:1, :4]), 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    batch = torch.cat((padded, prompts[1:2]))
    both = model.generate(batch, max_new_tokens=4, temperature=0,
                          attention_mask=torch.cat((mask, torch.ones_like(mask))))
    assert torch.equal(both[0, 7:], model.generate(prompts[:1, :4], max_new_tokens=4, temperature=0)[0, 4:])
    assert torch.equal(both[1], model.generate(prompts[1:2], max_new_tokens=4, temperature=0)[0])


def test_native_round_trip_and_clear_refusals(model, tmp_path):
    ids = torch.randint(0, 100, (2, 10))
    save_checkpoint(model, tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "native")(ids).logits, model(ids).logits)
    with pytest.raises(CheckpointError, match="Mamba3"):
        save_pretrained(model, tmp_path / "hf", format="hf")


OFFICIAL_MAMBA3_NAMES = ("in_proj.weight", "dt_bias", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "D",
                         "out_proj.weight")


def _perturbed(ssm_cfg, seed=3):
    torch.manual_seed(seed)
    m = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=60, ssm_cfg=ssm_cfg)).eval()
    with torch.no_grad():  # biases and norms away from their init, so that a mis-wired tensor shows
        for name, p in m.named_parameters():
            if name.endswith(("_bias", ".D", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("ssm_cfg", [{"layer": "Mamba3", "d_state": 16, "headdim": 16},
                                     {"layer": "mamba3", "d_state": 10, "headdim": 8, "rope_fraction": 1.0,
                                      "ngroups": 2, "is_outproj_norm": True, "A_floor": 1e-3}])
def test_mamba_ssm_round_trip(ssm_cfg, tmp_path):
    model = _perturbed(ssm_cfg)
    path = save_pretrained(model, tmp_path / "ssm", format="mamba_ssm")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "pytorch_model.bin"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba3" and "A_activation" not in cfg["ssm_cfg"]
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    names = OFFICIAL_MAMBA3_NAMES + (("norm.weight",) if ssm_cfg.get("is_outproj_norm") else ())
    assert {k.split("mixer.", 1)[1] for k in sd if ".mixer." in k} == set(names)
    mixer = model.backbone.layers[0].mixer
    assert sd["backbone.layers.0.mixer.B_bias"].shape == (mixer.nheads, 1, mixer.d_state)  # (H, R=1, N)
    assert {"backbone.embedding.weight", "lm_head.weight"} <= set(sd)
    loaded = from_pretrained(path)
    assert loaded.pretrained_source["format"] == "mamba_ssm" and loaded.config.ssm_cfg == model.config.ssm_cfg
    ids = torch.randint(0, 60, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_official_mamba3_checkpoint_written_by_hand(tmp_path):
    """As the official LM writes it: init-only and absorbed ssm_cfg keys, no A_activation (heavy-tail A)."""
    model = _perturbed({"layer": "Mamba3", "d_state": 16, "headdim": 16, "is_outproj_norm": True})
    d = tmp_path / "official"
    d.mkdir()
    ssm_cfg = {"layer": "Mamba3", "d_state": 16, "headdim": 16, "expand": 2, "ngroups": 1, "rope_fraction": 0.5,
               "is_outproj_norm": True, "is_mimo": False, "mimo_rank": 4, "fuse_pregate_headwise_norm": True,
               "dropout": 0.0, "chunk_size": 64, "dt_min": 0.001, "dt_max": 0.1}
    (d / "config.json").write_text(json.dumps(dict(
        d_model=32, d_intermediate=0, n_layer=2, vocab_size=60, ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, d / "pytorch_model.bin")
    loaded = from_pretrained(d)
    assert loaded.backbone.layers[1].mixer.A_activation == "heavy_tail"
    ids = torch.randint(0, 60, (3, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 1e-6


def test_softplus_mamba3_is_not_written_as_the_official_model(tmp_path):
    model = _perturbed({"layer": "Mamba3", "d_state": 16, "headdim": 16, "A_activation": "softplus"})
    with pytest.raises(CheckpointError, match="A_activation='softplus'"):
        save_pretrained(model, tmp_path / "ssm", format="mamba_ssm")
    assert not (tmp_path / "ssm").exists()


def test_train_arch_mamba3(tmp_path, capsys):
    rc = main(["train", "--arch", "mamba3", "--steps", "2", "--d-model", "32", "--seq-len", "32", "--batch-size", "2",
               "--out", str(tmp_path / "run"), "--no-progress", "--sample-tokens", "0", "--eval-interval", "2",
               "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoint").config.mixer_layer == "Mamba3"


def test_mimo_lm_native_round_trip(tmp_path):  # the official MIMO layout: test_lm_mamba3_mimo_official.py
    model = _perturbed({"layer": "Mamba3", "d_state": 8, "headdim": 16, "is_mimo": True, "mimo_rank": 2})
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(6))
    save_checkpoint(model, tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "native")(ids).logits, model(ids).logits)
