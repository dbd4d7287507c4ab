"""Tests of the native checkpoints (mambakit.models.io.native, through the old path mambakit.models.checkpoint):
round trip, tied weights, optimizer state, atomic saves, clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mambakit.errors import CheckpointError
from mambakit.models.checkpoint import (
    load_checkpoint,
    load_config,
    load_optimizer_state,
    load_trainer_state,
    save_checkpoint,
)
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel


def tiny_config(**overrides) -> MambaConfig:
    kwargs = dict(d_model=16, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba1", "d_state": 4})
    kwargs.update(overrides)
    return MambaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MambaLMHeadModel(tiny_config(**overrides))


IDS = torch.tensor([[3, 100, 7, 255, 0, 42, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_same_logits_and_retied(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_checkpoint(model, tmp_path / "ck")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "mambakit.json", "model.safetensors"]
    assert MambaConfig.load_json(path / "config.json") == model.config
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "backbone.embedding.weight" in keys
    loaded = load_checkpoint(path)
    assert not loaded.training
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert load_config(path) == model.config
    assert leftovers(tmp_path) == []
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_untied_lm_head_is_stored(tmp_path: Path) -> None:
    model = tiny_model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    save_checkpoint(model, tmp_path / "ck")
    assert "lm_head.weight" in load_file(str(tmp_path / "ck" / "model.safetensors"))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.lm_head.weight is not loaded.backbone.embedding.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_optimizer_and_trainer_state_resume(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(IDS).logits.square().mean().backward()
        opt.step()
    state = {"step": 2, "seed": 0, "args": {"lr": 1e-2}}
    save_checkpoint(model, tmp_path / "ck", optimizer=opt, trainer_state=state)
    assert load_trainer_state(tmp_path / "ck") == state

    loaded = load_checkpoint(tmp_path / "ck")
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(load_optimizer_state(tmp_path / "ck"))
    for m, o in ((model, opt), (loaded, opt2)):  # one more identical step on both
        m.train()
        o.zero_grad()
        m(IDS).logits.square().mean().backward()
        o.step()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_without_optional_files(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    assert load_optimizer_state(tmp_path / "ck") is None
    assert load_trainer_state(tmp_path / "ck") is None


def test_overwrite_replaces_and_cleans_up(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(0), tmp_path / "ck", trainer_state={"step": 1})
    new = tiny_model(1)
    save_checkpoint(new, tmp_path / "ck")
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ck")), logits(new), rtol=0, atol=0)
    assert load_trainer_state(tmp_path / "ck") is None  # no file of the old checkpoint survives
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tiny_model(0)
    save_checkpoint(old, tmp_path / "ck", trainer_state={"step": 5})

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a half-written file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(1), tmp_path / "ck", trainer_state={"step": 6})
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ck")), logits(old), rtol=0, atol=0)
    assert load_trainer_state(tmp_path / "ck") == {"step": 5}


def test_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_save_file(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_restores_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tiny_model(0)
    save_checkpoint(old, tmp_path / "ck")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # (1: tmp -> new) the old checkpoint has been moved away; moving the new one in fails
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tiny_model(1), tmp_path / "ck")
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ck")), logits(old), rtol=0, atol=0)


def test_interrupted_swap_is_recovered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model()
    save_checkpoint(model, tmp_path / "ck")
    os.rename(tmp_path / "ck", tmp_path / ".ck.old-1234abcd")  # as if killed between the two renames
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ck")), logits(model), rtol=0, atol=0)
    assert [r.getMessage() for r in caplog.records if ".ck.old-1234abcd" in r.getMessage()]
    assert leftovers(tmp_path) == []


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "invalid config.json"), ("[1, 2]", "invalid config.json"),
     ('{"d_model": 16, "colour": "red"}', "colour"), ('{"d_model": -4}', "d_model")],
)
def test_invalid_config(tmp_path: Path, content: str, message: str) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_weights(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_all_mismatches_listed_in_one_message(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(weights))
    state["backbone.extra.weight"] = torch.zeros(2)
    del state["backbone.norm_f.weight"]
    save_file(state, str(weights))
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["d_model"] = 24  # every shape that depends on d_model now disagrees
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ck")
    msg = str(info.value)
    assert "backbone.extra.weight" in msg and "backbone.norm_f.weight" in msg
    assert "backbone.embedding.weight: shape (256, 16) in the file, (256, 24) expected" in msg
    assert msg.count("expected by config.json") >= 3


def test_save_onto_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ck").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_checkpoint(tiny_model(), tmp_path / "ck")
