"""The old import paths keep working, the LM model imports nothing of the I/O package, and its from_pretrained /
save_pretrained methods (attached by mambakit.models.io) work."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

import mambakit.models.io as io
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel

OLD_NAMES = {
    "mambakit.models.checkpoint": {
        "CONFIG_NAME": "names.CONFIG_NAME", "WEIGHTS_NAME": "names.SAFETENSORS_NAME", "META_NAME": "names.META_NAME",
        "OPTIMIZER_NAME": "names.OPTIMIZER_NAME", "TRAINER_STATE_NAME": "names.TRAINER_STATE_NAME",
        "TIED_KEY": "names.LM_HEAD_KEY", "EMBEDDING_KEY": "names.EMBEDDING_KEY",
        "FORMAT_VERSION": "native.FORMAT_VERSION",
        "model_state_for_saving": "native.model_state_for_saving", "save_checkpoint": "native.save_checkpoint",
        "load_config": "native.load_config", "load_checkpoint": "native.load_checkpoint",
        "load_optimizer_state": "native.load_optimizer_state", "load_trainer_state": "native.load_trainer_state"},
    "mambakit.models.pretrained": {
        "from_pretrained": "formats.from_pretrained", "save_pretrained": "formats.save_pretrained",
        "detect_format": "formats.detect_format", "read_weights": "weights.read_weights",
        "config_from_hf": "transformers.config_from_hf", "config_to_hf": "transformers.config_to_hf",
        "config_from_mamba_ssm": "mamba_ssm.config_from_mamba_ssm",
        "config_to_mamba_ssm": "mamba_ssm.config_to_mamba_ssm",
        "CONFIG_NAME": "names.CONFIG_NAME", "SAFETENSORS_NAME": "names.SAFETENSORS_NAME",
        "SAFETENSORS_INDEX_NAME": "names.SAFETENSORS_INDEX_NAME", "BIN_NAME": "names.BIN_NAME",
        "BIN_INDEX_NAME": "names.BIN_INDEX_NAME", "NATIVE_META_NAME": "names.META_NAME",
        "EMBEDDING_KEY": "names.EMBEDDING_KEY", "HF_EMBEDDING_KEY": "names.HF_EMBEDDING_KEY",
        "LM_HEAD_KEY": "names.LM_HEAD_KEY", "HF_MODEL_TYPES": "transformers.HF_MODEL_TYPES",
        "HF_ARCHITECTURES": "transformers.HF_ARCHITECTURES", "HF_RELATED_TYPES": "transformers.HF_RELATED_TYPES",
        "OFFICIAL_NORM_EPS": "mamba_ssm.OFFICIAL_NORM_EPS"},
}


@pytest.mark.parametrize("old", list(OLD_NAMES))
def test_old_paths_re_export_the_same_objects(old):
    module = importlib.import_module(old)
    for name, new in OLD_NAMES[old].items():
        where, attr = new.split(".")
        assert getattr(module, name) is getattr(importlib.import_module(f"mambakit.models.io.{where}"), attr), name
    assert set(module.__all__) == set(OLD_NAMES[old])


def test_public_names_of_the_package():
    for name in io.__all__:
        assert callable(getattr(io, name)), name


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_lm_model_imports_no_checkpoint_io():
    root = Path(importlib.import_module("mambakit").__file__).parent
    lm = _imports(root / "models" / "lm.py")
    assert not {m for m in lm if m.startswith(("mambakit.models.io", "mambakit.models.checkpoint",
                                                "mambakit.models.pretrained", "safetensors"))}
    for module in sorted((root / "models" / "io").glob("*.py")):  # and the package never imports the old paths
        assert not {m for m in _imports(module) if m.startswith(("mambakit.models.checkpoint",
                                                                 "mambakit.models.pretrained"))}, module.name


def test_model_methods_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, ssm_cfg={"d_state": 4})).eval()
    assert model.save_pretrained(tmp_path / "hf") is None
    assert io.detect_format(tmp_path / "hf") == "hf"
    loaded = MambaLMHeadModel.from_pretrained(tmp_path / "hf", dtype="float64")
    assert isinstance(loaded, MambaLMHeadModel) and loaded.lm_head.weight.dtype == torch.float64
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert MambaLMHeadModel.from_pretrained.__doc__ and MambaLMHeadModel.save_pretrained.__doc__
