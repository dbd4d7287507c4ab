"""Issue 21, class 6: a checkpoint whose weights hold NaN or infinities is refused at load, naming the tensors,
unless the caller opts in; a config whose norm_epsilon is negative, zero or not a number is refused."""
from __future__ import annotations

import json

import pytest
import torch

from mambakit import MambaConfig, MambaKitError, MambaLMHeadModel
from mambakit.cli import main
from mambakit.errors import CheckpointError
from mambakit.models.io import from_pretrained, load_checkpoint, save_checkpoint
from tests.cli.conftest import error_line
from tests.reliability.helpers import tiny_model

A_LOG = "backbone.layers.0.mixer.A_log"


@pytest.fixture
def nan_checkpoint(tmp_path):
    model = tiny_model(0)
    with torch.no_grad():
        model.backbone.layers[0].mixer.A_log[0, :2] = float("nan")
        model.backbone.norm_f.weight[3] = float("inf")
    save_checkpoint(model, tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize("load", [load_checkpoint, from_pretrained, MambaLMHeadModel.from_pretrained])
def test_non_finite_weights_are_refused_by_name(nan_checkpoint, load):
    with pytest.raises(CheckpointError) as info:
        load(nan_checkpoint)
    message = str(info.value)
    assert f"{A_LOG} (2 of" in message and "backbone.norm_f.weight (1 of" in message
    assert "allow_non_finite=True" in message and "embedding" not in message


def test_non_finite_weights_load_when_allowed(nan_checkpoint):
    model = load_checkpoint(nan_checkpoint, allow_non_finite=True)
    assert torch.isnan(model.backbone.layers[0].mixer.A_log).sum() == 2
    assert from_pretrained(nan_checkpoint, allow_non_finite=True).backbone.norm_f.weight.isinf().sum() == 1


def test_transformers_names_in_the_message(tmp_path):
    model = tiny_model(0)
    with torch.no_grad():
        model.backbone.embedding.weight[5, 0] = float("nan")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"backbone\.embeddings\.weight \(1 of"):
        from_pretrained(tmp_path / "hf")


def test_generate_on_nan_weights_is_one_error_line(nan_checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(nan_checkpoint), "--prompt", "ab", "--max-new-tokens", "2"]) == 2
    assert "NaN or infinite" in error_line(capsys)


@pytest.mark.parametrize("eps", [-1e-5, 0, 0.0, float("nan"), float("inf"), "1e-5", None, True])
def test_norm_epsilon_must_be_a_positive_number(eps):
    with pytest.raises(MambaKitError, match=r"norm_epsilon must be a positive finite number"):
        MambaConfig(d_model=16, n_layer=1, norm_epsilon=eps)


@pytest.mark.parametrize("field, value", [("norm_epsilon", -1e-5), ("norm_epsilon", "small"), ("ssm_cfg", None),
                                          ("attn_cfg", []), ("attn_layer_idx", {"0": 1})])
def test_invalid_config_json_is_refused(tmp_path, field, value):
    save_checkpoint(tiny_model(0), tmp_path / "ck")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "ck" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(tmp_path / "ck")
