"""mambakit.compat.mamba_ssm.utils.hf: the official loaders on local folders (mamba_ssm's pytorch_model.bin and
safetensors), dtype and device, the official usage (MambaConfig(**load_config_hf), load_state_dict), and the error
for a name that is not a folder with and without huggingface_hub."""
from __future__ import annotations

import sys

import pytest
import torch

from mambakit.compat.mamba_ssm.models.config_mamba import MambaConfig
from mambakit.compat.mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.compat.mamba_ssm.utils.hf import load_config_hf, load_state_dict_hf
from mambakit.errors import MambaKitError
from mambakit.models.io import save_pretrained


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=30, ssm_cfg={"d_state": 4}))
    folder = save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "m", format="mamba_ssm")
    return model, folder


def test_official_usage_rebuilds_the_model(official_folder):
    model, folder = official_folder
    assert (folder / "pytorch_model.bin").is_file()
    config = load_config_hf(str(folder))
    assert isinstance(config, dict) and config["d_model"] == 16
    copy = MambaLMHeadModel(MambaConfig(**config))
    copy.load_state_dict(load_state_dict_hf(str(folder)))
    ids = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_dtype_and_device_and_safetensors(official_folder, tmp_path):
    _, folder = official_folder
    state = load_state_dict_hf(folder, device="cpu", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in state.values())
    ref = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert state.keys() == ref.keys()
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ref.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    got = load_state_dict_hf(tmp_path)
    assert all(torch.equal(got[k], ref[k]) for k in got) and "lm_head.weight" not in got


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(MambaKitError, match="config.json"):
        load_config_hf(tmp_path)
    with pytest.raises(MambaKitError, match="no weights"):
        load_state_dict_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MambaKitError, match="cannot read"):
        load_config_hf(tmp_path)


def test_a_hub_name_without_huggingface_hub_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(MambaKitError, match="does not download"):
        load_config_hf("state-spaces/mamba-130m")
    with pytest.raises(MambaKitError, match="does not download"):
        load_state_dict_hf("state-spaces/mamba-130m")


def test_a_hub_name_goes_through_huggingface_hub(monkeypatch, official_folder):
    hub = pytest.importorskip("huggingface_hub")
    _, folder = official_folder
    asked = []

    def snapshot(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    assert load_config_hf("someone/model")["d_model"] == 16
    assert asked[0][0] == "someone/model" and "config.json" in asked[0][1]

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(MambaKitError, match="could not fetch it: OSError: no network"):
        load_state_dict_hf("someone/model")
