"""mambakit.models.io.weights: safetensors (single, sharded) and .bin, whole or only their headers."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from mambakit.errors import CheckpointError
from mambakit.models.io.weights import TensorInfo, WeightFiles, find_weights, read_weights, write_safetensors

STATE = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16)}


def shard(folder, parts):
    """Write parts ({file: [keys]}) and their index."""
    folder.mkdir(exist_ok=True)
    for f, keys in parts.items():
        write_safetensors({k: STATE[k] for k in keys}, folder / f)
    weight_map = {k: f for f, keys in parts.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_headers_without_reading_the_data(tmp_path, monkeypatch):
    write_safetensors(STATE, tmp_path / "model.safetensors")
    weights = find_weights(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(safetensors.torch, "load_file", no_loading)
    assert weights.headers() == {k: TensorInfo.of(t) for k, t in STATE.items()}
    monkeypatch.undo()
    stored, source = read_weights(tmp_path)
    assert source == "model.safetensors" and all(torch.equal(stored[k], STATE[k]) for k in STATE)


def test_sharded_headers_and_tensors(tmp_path):
    shard(tmp_path, {"s1.safetensors": ["a"], "s2.safetensors": ["b", "c"]})
    weights = find_weights(tmp_path)
    assert weights.source == "model.safetensors.index.json"
    assert weights.headers() == {k: TensorInfo.of(t) for k, t in STATE.items()}
    assert sorted(weights.tensors()) == ["a", "b", "c"]


def test_sharded_inconsistencies_are_listed(tmp_path):
    shard(tmp_path, {"s1.safetensors": ["a", "b"], "s2.safetensors": ["b", "c"]})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["d"] = "s2.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"2 problems: s2.safetensors lacks .*\[d\]; tensor 'b' appears in more"):
        find_weights(tmp_path).headers()
    index["weight_map"]["e"] = "s3.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard files that are not in the folder: \['s3.safetensors'\]"):
        find_weights(tmp_path).tensors()


def test_bin_is_read_once_and_preference_order(tmp_path):
    torch.save(STATE, tmp_path / "pytorch_model.bin")
    weights = find_weights(tmp_path)
    assert weights.source == "pytorch_model.bin" and not weights.safetensors
    assert weights.headers() == {k: TensorInfo.of(t) for k, t in STATE.items()}
    assert weights.tensors() is weights.tensors()  # read once, kept
    write_safetensors(STATE, tmp_path / "model.safetensors")
    assert find_weights(tmp_path).source == "model.safetensors"


def test_unreadable_and_absent_weights(tmp_path):
    with pytest.raises(CheckpointError, match="holds no weights"):
        find_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00garbage")
    for read in (WeightFiles.headers, WeightFiles.tensors):
        with pytest.raises(CheckpointError, match="cannot read model.safetensors in"):
            read(find_weights(tmp_path))
