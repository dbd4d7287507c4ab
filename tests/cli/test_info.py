"""``mambakit info``: the facts of a checkpoint folder in every format, read without loading the model; errors are
one line."""
from __future__ import annotations

import json

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.cli.main import main
from mambakit.models.io import save_checkpoint, save_pretrained


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=100, ssm_cfg={"layer": "Mamba2",
                                                                                        "d_state": 8, "headdim": 16}))
    root = tmp_path_factory.mktemp("info")
    save_checkpoint(model, root / "native")
    save_pretrained(model, root / "hf", format="hf")
    save_pretrained(model, root / "ssm", format="mamba_ssm")
    n = sum(p.numel() for p in model.parameters())
    return root, n


@pytest.mark.parametrize("name,fmt", [("native", "mambakit (native)"), ("hf", "transformers"),
                                      ("ssm", "mamba_ssm")])
def test_info_describes_every_format(folders, name, fmt, capsys):
    root, n_params = folders
    assert main(["info", str(root / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == fmt and info["mixer"] == "Mamba2"
    assert info["d_model"] == 32 and info["n_layer"] == 2 and info["vocab_size"] == 100
    assert info["dtypes"] == ["float32"]
    # the stored tensors: the tied head once (native) or twice (mamba_ssm's .bin); transformers stores the
    # embedding unpadded (100 rows instead of 104)
    expected = {"native": n_params, "hf": n_params - 4 * 32, "ssm": n_params + 104 * 32}[name]
    assert info["stored_parameters"] == expected
    assert info["tokenizer"].startswith("bytes")


def test_info_text_output_and_missing_folder(folders, capsys, tmp_path):
    root, _ = folders
    assert main(["info", str(root / "native")]) == 0
    out = capsys.readouterr().out
    assert "format: mambakit (native)" in out and "can_be_used_for:" in out
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "from_pretrained" not in err[0]
