"""Issue 21, class 1: sizes implied by `mambakit train` flags or a checkpoint's config are estimated and refused
before anything is allocated when they exceed the machine (the estimate is a lower bound: it never refuses a run
that fits), and the SSD chunk is capped at the sequence length."""
from __future__ import annotations

import time

import pytest
import torch

from mambakit import MambaConfig, MambaKitError, MambaLMHeadModel
from mambakit.cli import main
from mambakit.models import memory
from mambakit.models.io import load_checkpoint, save_checkpoint
from mambakit.models.memory import available_bytes, check_fits, format_bytes, parameter_count, training_bytes
from mambakit.ops.ssd import mamba_chunk_scan_combined
from tests.cli.conftest import TINY, error_line
from tests.reliability.helpers import tiny_model

CONFIGS = [
    dict(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"d_state": 4}),
    dict(d_model=48, n_layer=3, vocab_size=100, ssm_cfg={"d_state": 8, "expand": 3}, tie_embeddings=False),
    dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8}),
    dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"layer": "Mamba3", "d_state": 8, "headdim": 8}),
    dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"layer": "S4"}),
    dict(d_model=32, n_layer=3, vocab_size=70, attn_layer_idx=[1], attn_cfg={"num_heads": 4}, d_intermediate=24),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_parameter_count_is_a_lower_bound_of_the_right_size(kwargs):
    config = MambaConfig(**kwargs)
    real = sum(p.numel() for p in MambaLMHeadModel(config).parameters())
    assert real / 5 <= parameter_count(config) <= real  # S4's (d_inner x d_state) tensors are not counted


def test_training_bytes_grow_with_every_size():
    config = MambaConfig(d_model=64, n_layer=2)
    base = training_bytes(config, 4, 128)
    assert base >= 16 * parameter_count(config)
    assert training_bytes(config, 8, 128) > base and training_bytes(config, 4, 256) > base
    assert training_bytes(MambaConfig(d_model=64, n_layer=4), 4, 128) > base
    assert training_bytes(config, 4, 128, bf16=True) < base
    assert training_bytes(config, 4, 128, shards=4) < base
    assert training_bytes(config, 4, 128, fused_loss=True) == base  # the 512 tokens fit in one chunk
    big = MambaConfig(d_model=64, n_layer=4, vocab_size=2 ** 17)  # 4096 tokens in chunks of 512: 1/8 of the logits
    logits = 32 * 128 * 2 ** 17 * 4
    assert training_bytes(big, 32, 128) - training_bytes(big, 32, 128, fused_loss=True) == logits * 7 // 8


def test_check_fits_with_fake_available_memory():
    check_fits(10, "cpu", "x", available=10)
    check_fits(10**30, "meta", "x")  # nothing to measure: no check
    with pytest.raises(MambaKitError, match=r"^loading it needs at least 2.0 GB but cpu has 1.5 GB available; "
                                            r"lower it$"):
        check_fits(2 * 10**9, "cpu", "loading it", hint="lower it", available=1_500_000_000)


def test_available_memory_is_measured():
    free = available_bytes("cpu")
    assert free is None or free > 0
    assert available_bytes("meta") is None
    assert format_bytes(999) == "999 B" and format_bytes(1_234_567) == "1.2 MB" and "EB" in format_bytes(10**22)


@pytest.mark.parametrize("flags", [["--d-model", "10000000"], ["--n-layer", "1000000"],
                                   ["--batch-size", "1000000000"], ["--seq-len", "1000000000"],
                                   ["--d-model", "10000000", "--arch", "mamba2"],
                                   ["--d-model", "100000", "--n-layer", "100000", "--batch-size", "100000"]])
def test_train_with_huge_sizes_is_refused_at_once(tmp_path, corpus, capsys, flags):
    start = time.perf_counter()
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "out"), "--steps", "2", *flags]) == 2
    line = error_line(capsys)
    assert "needs at least" in line and "available" in line and flags[0] in line
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_train_refused_on_a_small_machine(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 1000)  # a machine with 1 kB free
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "out"), *TINY]) == 2
    assert "but cpu has 1.0 kB available" in error_line(capsys)


def test_resume_checks_the_stored_config(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 1000)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--steps", "6", "--no-progress"]) == 2
    assert "d_model 16, n_layer 1" in error_line(capsys)


def test_loading_a_checkpoint_larger_than_memory_is_refused(tmp_path, monkeypatch):
    save_checkpoint(tiny_model(0), tmp_path / "ck")
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 1000)
    with pytest.raises(MambaKitError, match=r"loading .* needs at least .* but cpu has 1.0 kB available"):
        load_checkpoint(tmp_path / "ck")
    monkeypatch.undo()
    load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("chunk_size", [16384, 10**9])
def test_huge_chunk_is_capped_at_the_sequence(chunk_size):
    g = torch.Generator().manual_seed(0)
    kw = dict(x=torch.randn(2, 40, 2, 3, generator=g, dtype=torch.float64),
              dt=torch.rand(2, 40, 2, generator=g, dtype=torch.float64), A=-torch.rand(2, dtype=torch.float64),
              B=torch.randn(2, 40, 1, 4, generator=g, dtype=torch.float64),
              C=torch.randn(2, 40, 1, 4, generator=g, dtype=torch.float64))
    start = time.perf_counter()
    y = mamba_chunk_scan_combined(**kw, chunk_size=chunk_size)
    assert time.perf_counter() - start < 2
    torch.testing.assert_close(y, mamba_chunk_scan_combined(**kw, chunk_size=40), rtol=0, atol=0)
    torch.testing.assert_close(y, mamba_chunk_scan_combined(**kw, chunk_size=1, backend="ref"))
