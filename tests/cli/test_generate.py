"""``mambakit generate``, run in-process through `mambakit.cli.main`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mambakit.cli import main
from tests.cli.conftest import error_line


def test_generate_prints_prompt_and_continuation(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--checkpoint", str(run_dir / "checkpoint"), "--prompt", "for i", "--max-new-tokens", "12",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("for i") and len(first.encode()) >= len("for i") + 1
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic
    # the training output folder is accepted in place of its checkpoint/ subfolder
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--seed", "1", "--top-k", "5",
                 "--top-p", "0.9", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("x")


def test_generate_prompt_errors_exit_2(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = str(run_dir / "checkpoint")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", ""]) == 2
    assert "must not be empty" in error_line(capsys)
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "x" * 50, "--max-prompt-tokens", "10"]) == 2
    assert "--max-prompt-tokens 10" in error_line(capsys)


def test_broken_checkpoints_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "ck"
    shutil.copytree(run_dir / "checkpoint", broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text("{oops")
    assert main(["generate", "--checkpoint", str(broken), "--prompt", "x"]) == 2
    assert "config.json" in error_line(capsys)

    config["n_layer"] = 3  # weights hold one layer
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--checkpoint", str(broken), "--prompt", "x"]) == 2
    line = error_line(capsys)
    assert "do not match" in line and "backbone.layers.2" in line

    (broken / "model.safetensors").unlink()
    assert main(["generate", "--checkpoint", str(broken), "--prompt", "x"]) == 2
    assert "no model.safetensors" in error_line(capsys)



def test_a_missing_local_run_folder_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: `generate --checkpoint runs/nope` beside a runs/ folder is a local path that does not exist: one
    error line saying so, no Hugging Face download instructions, no Python function name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["generate", "--checkpoint", "runs/nope", "--prompt", "x"]) == 2
    line = error_line(capsys)
    assert "'runs/nope' does not exist" in line
    assert "download" not in line and "from_pretrained" not in line and "Hub" not in line
