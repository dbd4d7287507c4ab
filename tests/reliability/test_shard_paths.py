"""Issue 21, class 9: the shard names of a sharded checkpoint's index must stay inside the folder: absolute paths,
'..' and links that leave it are refused before any file is opened."""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import save_file

from mambakit.errors import CheckpointError
from mambakit.models.io import from_pretrained, read_weights
from tests.reliability.helpers import logits, tiny_model


def sharded(tmp_path, names):
    """A transformers folder whose weights are split over the shard files `names` (created outside when needed)."""
    model = tiny_model(0)
    model.save_pretrained(tmp_path / "hf")
    folder = tmp_path / "hf"
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::len(names)]}
        path = os.path.normpath(folder / name)  # where the name points (sub/../.. needs no folder sub)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(part, str(path))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model, folder


def test_shards_inside_the_folder_load(tmp_path):
    model, folder = sharded(tmp_path, ["a.safetensors", "sub/b.safetensors"])
    assert (logits(from_pretrained(folder)) == logits(model)).all()


@pytest.mark.parametrize("bad", ["ABS", "../outside.safetensors", "sub/../../outside.safetensors", "LINK"])
def test_shards_leaving_the_folder_are_refused(tmp_path, bad):
    if bad == "ABS":
        bad = str(tmp_path / "elsewhere" / "abs.safetensors")
    if bad == "LINK":
        model, folder = sharded(tmp_path, ["a.safetensors", "b.safetensors"])
        os.makedirs(tmp_path / "elsewhere", exist_ok=True)
        os.replace(folder / "b.safetensors", tmp_path / "elsewhere" / "b.safetensors")
        os.symlink(tmp_path / "elsewhere" / "b.safetensors", folder / "b.safetensors")
        bad = "b.safetensors"
    else:
        model, folder = sharded(tmp_path, ["a.safetensors", bad])
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as info:
        from_pretrained(folder)
    assert bad in str(info.value)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_weights(folder)
