"""`mambakit generate --remamba-*`: the flags, the adapter file, the errors; adapter save/load round trip."""
from pathlib import Path

import pytest
import torch

from mambakit.cli import main
from mambakit.errors import CheckpointError
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.remamba import ReMambaConfig, ReMambaLM
from mambakit.remamba.io import load_remamba, save_adapter


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("remamba") / "ckpt"
    base = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 4}))
    base.save_pretrained(folder)
    lm = ReMambaLM(base)
    with torch.no_grad():
        lm.adapter.b[0].fill_(0.5)
    save_adapter(lm, folder)
    return folder


def test_adapter_round_trip(checkpoint):
    base = MambaLMHeadModel.from_pretrained(checkpoint)
    lm = load_remamba(base, checkpoint)
    assert float(lm.adapter.b[0][0].detach()) == 0.5
    ids = torch.randint(0, 256, (1, 30))
    out = lm.generate(ids, 4, remamba=ReMambaConfig(p=0.5, rho=0.3), temperature=0)
    assert out.shape == (1, 34)
    with pytest.raises(CheckpointError, match="no ReMamba adapter"):
        load_remamba(base, checkpoint / "missing")


def test_generate_with_remamba_flags(checkpoint, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "a long enough prompt " * 3,
            "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    assert main(args + ["--remamba-p", "0.5", "--remamba-rho", "0.2"]) == 0
    assert capsys.readouterr().out.startswith("a long enough prompt")


@pytest.mark.parametrize("flag,value", [("--remamba-p", "1.5"), ("--remamba-rho", "0"), ("--remamba-s", "1")])
def test_bad_remamba_values_name_the_flag(checkpoint, capsys, flag, value):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "xyz", "--device", "cpu", flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and value in err


def test_missing_adapter_is_an_error(checkpoint, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "xyz", "--device", "cpu", "--remamba-p", "0.5",
            "--remamba-adapter", str(tmp_path)]
    assert main(args) == 2
    assert "no ReMamba adapter" in capsys.readouterr().err
