"""mambakit.models.io.state: the one check of stored tensors against a config, made from the safetensors headers
before anything is allocated (issue 21 item 1), for the native, transformers and mamba_ssm formats."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mambakit.errors import CheckpointError
from mambakit.models.config import MambaConfig
from mambakit.models.io import from_pretrained, load_checkpoint, save_checkpoint, save_pretrained
from mambakit.models.io.state import mismatches
from mambakit.models.io.weights import TensorInfo
from mambakit.models.lm import MambaLMHeadModel

HUGE = 10_000_000  # d_model of a config that would need ~10 GB for its embedding alone
LIMIT = 10_000_000  # elements: far more than the tiny models here, far less than the huge configs


class LargeAllocation(BaseException):
    """Raised by the guard; a BaseException so that no `except Exception` in the code under test hides it."""


class RefuseLargeAllocations(TorchFunctionMode):
    """Stops any torch factory call that would create a tensor of more than LIMIT elements on a real (non-meta)
    device, before it runs: proof that a huge config is refused without being allocated."""

    FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            size = args[0] if args and isinstance(args[0], (list, tuple)) else args
            device = kwargs.get("device")
            real = device is None or torch.device(device).type != "meta"
            if real and all(isinstance(s, int) for s in size) and math.prod(size) > LIMIT:
                raise LargeAllocation(f"torch.{func.__name__}{tuple(size)} on {device or 'the default device'}")
        return func(*args, **kwargs)


def tiny(layer: str = "Mamba1", **overrides) -> MambaLMHeadModel:
    torch.manual_seed(0)
    ssm = {"layer": layer, "d_state": 4}
    if layer == "Mamba2":
        ssm.update(headdim=8, chunk_size=8)
    kwargs = dict(d_model=16, n_layer=2, vocab_size=64, ssm_cfg=ssm)
    kwargs.update(overrides)
    return MambaLMHeadModel(MambaConfig(**kwargs))


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def refused_fast(load, folder: Path) -> str:
    start = time.perf_counter()
    with RefuseLargeAllocations(), pytest.raises(CheckpointError) as info:
        load(folder)
    assert time.perf_counter() - start < 5.0
    return str(info.value)


def test_guard_sees_a_real_allocation():
    with pytest.raises(LargeAllocation, match=r"torch.empty\(64, 10000000\)"), RefuseLargeAllocations():
        torch.nn.Embedding(64, HUGE)
    with RefuseLargeAllocations():
        torch.nn.Embedding(64, HUGE, device="meta")


@pytest.mark.parametrize("load", [load_checkpoint, from_pretrained], ids=["load_checkpoint", "from_pretrained"])
def test_native_huge_config_fails_before_allocating(tmp_path, load):
    save_checkpoint(tiny(), tmp_path / "ck")
    edit_config(tmp_path / "ck", d_model=HUGE)
    msg = refused_fast(load, tmp_path / "ck")
    assert "do not match its config.json" in msg and "problems" in msg
    assert f"backbone.embedding.weight: shape (64, 16) in the file, (64, {HUGE}) expected by config.json" in msg


def test_transformers_huge_config_fails_before_allocating(tmp_path):
    save_pretrained(tiny(), tmp_path / "hf", format="hf")
    edit_config(tmp_path / "hf", hidden_size=HUGE, intermediate_size=None)
    msg = refused_fast(from_pretrained, tmp_path / "hf")
    assert f"backbone.embeddings.weight: shape (64, 16) in the file, (64, {HUGE}) expected" in msg  # file's names


def test_transformers_sharded_huge_config_fails_before_allocating(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                                                 num_hidden_layers=2))
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    edit_config(tmp_path / "hf", hidden_size=HUGE, intermediate_size=None)
    msg = refused_fast(from_pretrained, tmp_path / "hf")
    assert "(model.safetensors.index.json)" in msg and f"(64, {HUGE}) expected" in msg


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_mamba_ssm_huge_config_fails_before_allocating(tmp_path, layer):
    save_pretrained(tiny(layer), tmp_path / "ssm", format="mamba_ssm")
    edit_config(tmp_path / "ssm", d_model=HUGE)
    msg = refused_fast(from_pretrained, tmp_path / "ssm")
    assert ("(pytorch_model.bin)" in msg
            and f"backbone.embedding.weight: shape (64, 16) in the file, (64, {HUGE})" in msg)


def test_huge_n_layer_fails_before_building_the_blocks(tmp_path):
    save_checkpoint(tiny(), tmp_path / "ck")
    edit_config(tmp_path / "ck", n_layer=HUGE)
    msg = refused_fast(load_checkpoint, tmp_path / "ck")
    assert f"n_layer={HUGE} but the file holds tensors of 2 layer(s): backbone.layers.2 to backbone.layers.{HUGE - 1}" \
        in msg


def test_a_huge_vocabulary_names_the_embedding_and_the_head(tmp_path):
    save_checkpoint(tiny(tie_embeddings=False), tmp_path / "ck")
    edit_config(tmp_path / "ck", vocab_size=HUGE)
    msg = refused_fast(load_checkpoint, tmp_path / "ck")
    assert "2 problems" in msg and "backbone.embedding.weight: shape (64, 16)" in msg and "lm_head.weight: shape" in msg


def test_report_is_one_line_and_complete():
    expected = {"a.weight": torch.empty(2, 3, device="meta"), "b.weight": torch.empty(4, device="meta"),
                "lm_head.weight": torch.empty(5, device="meta"), "c": torch.empty(1, device="meta")}
    stored = {"a.weight": TensorInfo((3, 2), torch.float32), "x": TensorInfo((1,), torch.float32),
              "c": TensorInfo((1,), torch.int64)}
    problems = mismatches(stored, expected, tied=True, file_name=lambda k: "F:" + k)
    assert problems == ["missing tensors (1): [F:b.weight]",  # lm_head is optional when tied
                        "unexpected tensors (not used by this config) (1): [F:x]",
                        "F:a.weight: shape (3, 2) in the file, (2, 3) expected by config.json",
                        "F:c: dtype torch.int64 in the file, a floating dtype expected"]
    assert "\n" not in str(CheckpointError.listing("where", problems))


@pytest.mark.parametrize("overrides", [
    dict(layer="Mamba2"), dict(layer="S4"), dict(d_intermediate=32),
    dict(attn_layer_idx=[1], attn_cfg={"num_heads": 2}),
    dict(tie_embeddings=False)], ids=["mamba2", "s4", "mlp", "attention", "untied"])
def test_native_round_trip_of_every_block_kind(tmp_path, overrides):
    """The meta-device build + assignment gives back exactly the saved model, for every mixer and block option."""
    model = tiny(**overrides).eval()
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == loaded.config.tie_embeddings
    nwd = lambda m: sorted(n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False))  # noqa: E731
    assert nwd(loaded) == nwd(model)


def test_loaded_weights_do_not_change_with_the_file(tmp_path):
    """safetensors maps the file; the loaded model holds copies, so rewriting the file in place cannot alter it."""
    model = tiny().eval()
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")  # length prefix + JSON header; the tensor data follows
    with open(weights, "r+b") as f:  # the same inode, its tensor data zeroed in place (as `cp` over it would)
        f.write(data[:header] + bytes(len(data) - header))
    for (name, p), (_, q) in zip(loaded.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", "torch.float16", "auto", torch.bfloat16])
def test_load_checkpoint_takes_dtype_names_like_from_pretrained(tmp_path, dtype):
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32))
    save_checkpoint(model, tmp_path / "ck")
    expect = {"auto": torch.float32, "torch.float16": torch.float16}.get(dtype, torch.bfloat16)
    a = load_checkpoint(tmp_path / "ck", dtype=dtype)
    b = from_pretrained(tmp_path / "ck", dtype=dtype)
    assert a.backbone.embedding.weight.dtype == b.backbone.embedding.weight.dtype == expect
    from mambakit.errors import MambaKitError

    with pytest.raises(MambaKitError, match="dtype must be"):
        load_checkpoint(tmp_path / "ck", dtype="int8")
