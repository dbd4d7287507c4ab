"""``mambakit train --init-from FOLDER``: fine-tuning tiny random transformers checkpoints (Mamba-1 and a Nemotron-H
hybrid) on a small text folder with the folder's own tokenizer, fully and with LoRA; the written folder read back by
transformers and by mambakit with the same logits, and by ``mambakit generate``; conflicting options refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mambakit.cli import main  # noqa: E402
from mambakit.models.io import from_pretrained  # noqa: E402
from tests.cli.conftest import bpe_tokenizer_json, error_line  # noqa: E402
from tests.cli.conftest import bpe_tokenizer_json  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 120
FAST = ["--steps", "8", "--seq-len", "24", "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2",
        "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("my_texts")
    lines = [f"the cat number {n} sat on the mat and the dog ran {n % 7} times.\n" for n in range(300)]
    (folder / "a.txt").write_text("".join(lines[:150]))
    (folder / "b.txt").write_text("".join(lines[150:]))
    return folder


@pytest.fixture(scope="module")
def tokenizer_json(texts, tmp_path_factory) -> Path:
    return bpe_tokenizer_json(sorted(texts.iterdir()), VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _save(model: torch.nn.Module, folder: Path, tokenizer_json: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


@pytest.fixture(scope="module")
def mamba_folder(tokenizer_json, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16,
                                                                   num_hidden_layers=2, state_size=4))
    return _save(model, tmp_path_factory.mktemp("mamba") / "hf", tokenizer_json)


@pytest.fixture(scope="module")
def nemotron_folder(tokenizer_json, tmp_path_factory) -> Path:
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip("this transformers has no Nemotron-H")
    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=8, intermediate_size=24, ssm_state_size=4, mamba_num_heads=4,
                                       mamba_head_dim=8, n_groups=1, chunk_size=8,
                                       layers_block_type=["linear_attention", "full_attention", "mlp"])
    return _save(transformers.NemotronHForCausalLM(cfg), tmp_path_factory.mktemp("nemotron") / "hf", tokenizer_json)


def _check_output(out: Path, source: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.1
    ckpt = out / "checkpoint"
    assert (ckpt / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    back = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        assert rel_err(from_pretrained(ckpt)(ids).logits[..., :VOCAB], back(ids).logits) <= 1e-5
    return summary


def test_full_finetune_of_a_mamba_checkpoint(mamba_folder, texts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--init-from", str(mamba_folder), "--data", str(texts), "--out", str(out), *FAST,
                 "--sample-tokens", "5", "--sample-prompt", "the cat"]) == 0
    printed = capsys.readouterr().out
    assert "full fine-tuning" in printed and "sample:\nthe cat" in printed
    summary = _check_output(out, mamba_folder)
    assert summary["n_trained"] == summary["n_params"]
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the dog", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the dog")
    # a second run into the same --out is refused, then allowed with --overwrite
    assert main(["train", "--init-from", str(mamba_folder), "--data", str(texts), "--out", str(out), *FAST]) == 2
    assert "already holds a checkpoint" in error_line(capsys)


def test_lora_finetune_of_a_hybrid_changes_only_the_mamba_projections(nemotron_folder, texts, tmp_path):
    out = tmp_path / "out"
    assert main(["train", "--init-from", str(nemotron_folder), "--data", str(texts), "--out", str(out), *FAST,
                 "--lora-rank", "4"]) == 0
    summary = _check_output(out, nemotron_folder)
    assert 0 < summary["n_trained"] < summary["n_params"] / 4
    before, after = from_pretrained(nemotron_folder).state_dict(), from_pretrained(out / "checkpoint").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.out_proj.weight"}


def test_finetune_of_a_byte_level_mambakit_run(run_dir, corpus, tmp_path, capsys):
    """A run of `mambakit train` (native format, no tokenizer.json: bytes) fine-tunes from its --out folder."""
    out = tmp_path / "tuned"
    assert main(["train", "--init-from", str(run_dir), "--data", str(corpus), "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert json.loads((out / "checkpoint" / "config.json").read_text())["model_type"] == "mamba"
    assert not (out / "checkpoint" / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "for i", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("for i")


@pytest.mark.parametrize("extra, text", [
    (["--d-model", "32"], "--d-model cannot be combined with --init-from"),
    (["--arch", "mamba2", "--resume"], "--arch, --resume cannot be combined with --init-from"),
    (["--batch-size", "3", "--grad-accum", "2"], "must be a multiple of --grad-accum"),
    (["--seq-len", "5000"], "fewer than --seq-len + 1"),
])
def test_conflicting_or_bad_options_are_one_error_line(mamba_folder, texts, tmp_path, capsys, extra, text):
    args = ["train", "--init-from", str(mamba_folder), "--data", str(texts), "--out", str(tmp_path / "o"),
            "--steps", "2", "--no-progress", *extra]
    assert main(args) == 2
    assert text in error_line(capsys)


def test_lora_needs_init_from_and_a_large_vocabulary_needs_a_tokenizer(mamba_folder, texts, tmp_path, capsys):
    assert main(["train", "--lora-rank", "4", "--out", str(tmp_path / "o")]) == 2
    assert "--lora-rank needs --init-from" in error_line(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((mamba_folder / name).read_bytes())
    raw = json.loads((bare / "config.json").read_text())
    raw["vocab_size"] = 1000
    (bare / "config.json").write_text(json.dumps(raw))
    assert main(["train", "--init-from", str(bare), "--data", str(texts), "--out", str(tmp_path / "o")]) == 2
    assert "no tokenizer.json" in error_line(capsys)
    assert main(["train", "--init-from", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in error_line(capsys)
