"""Mamba-3 through the LM: built from ssm_cfg={"layer": "Mamba3"} (any accepted spelling), decoding equals the
forward, generate runs, the native checkpoint round trip is exact, the other formats refuse it clearly, and
`mambakit train --arch mamba3` trains."""
from __future__ import annotations

import pytest
import torch

from mambakit import CheckpointError, MambaConfig, MambaLMHeadModel
from mambakit.cli.main import main
from mambakit.models.io import load_checkpoint, save_checkpoint, save_pretrained
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


def test_native_round_trip_and_clear_refusals(model, tmp_path):
    ids = torch.randint(0, 100, (2, 10))
    save_checkpoint(model, tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "native")(ids).logits, model(ids).logits)
    for fmt in ("hf", "mamba_ssm"):
        with pytest.raises(CheckpointError, match="Mamba3"):
            save_pretrained(model, tmp_path / fmt, format=fmt)


def test_train_arch_mamba3(tmp_path, capsys):
    rc = main(["train", "--arch", "mamba3", "--steps", "2", "--d-model", "32", "--seq-len", "32", "--batch-size", "2",
               "--out", str(tmp_path / "run"), "--no-progress", "--sample-tokens", "0", "--eval-interval", "2",
               "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoint").config.mixer_layer == "Mamba3"
