"""``mambakit explain``: pictures and the top source tokens, its errors, and every checkpoint format generate reads."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mambakit.cli import main
from mambakit.cli.explain import add_explain_parser, explain_main
from mambakit.errors import MambaKitError
from mambakit.models.checkpoint import save_checkpoint
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.models.pretrained import detect_format, save_pretrained

pytest.importorskip("matplotlib")  # an optional third-party dependency (mambakit[plot])


@pytest.fixture(scope="module")
def model() -> MambaLMHeadModel:
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 4}))


@pytest.fixture(scope="module")
def checkpoint(model: MambaLMHeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "checkpoint")


def test_explain_command_writes_pictures_and_prints_top_tokens(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mambakit")
    add_explain_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    ns = parser.parse_args(["explain", "--checkpoint", str(checkpoint), "--prompt", "hello, world", "--layer", "1",
                            "--out", str(out), "--device", "cpu"])
    assert ns.func(ns) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attribution.png", "layer_01.png", "relevance.png",
                                                     "rollout.png"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prediction after the last token 'd': '")  # both tokens quoted, repr-style
    assert lines[1].startswith("top-5 source tokens")
    ranked = lines[2:7]
    assert [line.split()[0] for line in ranked] == ["1.", "2.", "3.", "4.", "5."]
    positions = [int(line.split()[2]) for line in ranked]
    prompt = "hello, world"
    assert all(f"position {p:>2d}  {repr(prompt[p]):<8} " in line for line, p in zip(ranked, positions)), ranked
    assert len(set(positions)) == 5 and all(0 <= p < 11 for p in positions)
    assert lines[-1] == f"wrote 4 pictures to {out}"


def test_explain_command_errors(checkpoint, tmp_path):
    base = ["--out", str(tmp_path), "--device", "cpu"]
    with pytest.raises(MambaKitError, match="does not exist"):
        explain_main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "hi", *base])
    with pytest.raises(MambaKitError, match="--prompt must not be empty"):
        explain_main(["--checkpoint", str(checkpoint), "--prompt", "", *base])
    with pytest.raises(MambaKitError, match=r"--layer must lie in \[0, 2\)"):
        explain_main(["--checkpoint", str(checkpoint), "--prompt", "hi", "--layer", "2", *base])
    with pytest.raises(MambaKitError, match="max-prompt-tokens"):
        explain_main(["--checkpoint", str(checkpoint), "--prompt", "hello", "--max-prompt-tokens", "3", *base])
    with pytest.raises(MambaKitError, match="mambakit explain: argument --layer: must be an integer"):
        explain_main(["--checkpoint", str(checkpoint), "--prompt", "hi", "--layer", "one", *base])


@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_explain_reads_every_format_generate_reads(fmt, model, checkpoint, tmp_path, capsys):
    """The same weights saved as transformers or mamba_ssm folders explain exactly as the native checkpoint does, and
    generate the same greedy text."""
    other = save_pretrained(model, tmp_path / fmt, format=fmt)
    assert detect_format(other) == fmt
    outputs = {}
    for name, folder in (("native", checkpoint), (fmt, other)):
        argv = ["--checkpoint", str(folder), "--prompt", "hello, world", "--out", str(tmp_path / f"out_{name}"),
                "--device", "cpu"]
        assert main(["explain", *argv]) == 0
        explained = capsys.readouterr().out.splitlines()[:-1]  # the last line names the output folder
        assert main(["generate", "--checkpoint", str(folder), "--prompt", "hello", "--max-new-tokens", "6",
                     "--temperature", "0", "--device", "cpu"]) == 0
        outputs[name] = (explained, capsys.readouterr().out)
    assert outputs[fmt] == outputs["native"]
    assert (tmp_path / f"out_{fmt}" / "rollout.png").is_file()
