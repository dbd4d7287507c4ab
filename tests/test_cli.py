"""Tests of the ``mambakit`` command line, run in-process through `mambakit.cli.main`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambakit.cli import main

pytest.importorskip("mambakit.models.lm")

TINY = ["--steps", "4", "--d-model", "16", "--n-layer", "1", "--d-state", "4", "--seq-len", "16",
        "--batch-size", "2", "--eval-interval", "2", "--eval-batches", "1", "--sample-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(f"for i in range({n}):\n    print(i)\n" for n in range(500)))
    return path


@pytest.fixture(scope="module")
def run_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    return out


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The single line written to stderr, checked to be an 'error: ...' line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_train_writes_checkpoint_and_summary(run_dir: Path) -> None:
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.05  # 4 steps from ln(256): the loss falls


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


def test_resume_continues(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    assert "sample:\ndef " in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(out), "--steps", "6", "--no-progress", "--sample-tokens", "0"]) == 0
    assert "resumed from" in capsys.readouterr().out
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["args"]["data"] == str(corpus)


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "mambakit", "train", "--steps", "0"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: argument --steps") and "Traceback" not in proc.stderr


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--help"]) == 0
    assert "--d-model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["fly"], "invalid choice"),
        (["train", "--steps", "0"], "--steps: must be a positive integer"),
        (["train", "--d-model", "-8"], "--d-model: must be a positive integer"),
        (["train", "--batch-size", "two"], "--batch-size: must be a positive integer"),
        (["train", "--seq-len", "0"], "--seq-len"),
        (["train", "--n-layer", "0"], "--n-layer"),
        (["train", "--d-state", "0"], "--d-state"),
        (["train", "--lr", "0"], "--lr: must be a positive number"),
        (["train", "--lr", "nan"], "--lr: must be a positive number"),
        (["train", "--eval-interval", "0"], "--eval-interval"),
        (["train", "--arch", "mamba3"], "invalid choice"),
        (["train", "--data", "/no/such/file.txt"], "does not exist"),
        (["train", "--device", "tpu"], "unknown device"),
        (["generate", "--prompt", "x"], "--checkpoint"),
        (["generate", "--checkpoint", "/no/such/dir", "--prompt", "x"], "does not exist"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_bad_data_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "is empty" in error_line(capsys)
    (tmp_path / "emptydir").mkdir()
    assert main(["train", "--data", str(tmp_path / "emptydir"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "is empty" in error_line(capsys)
    short = tmp_path / "short.txt"
    short.write_text("a = 1\n" * 20)
    assert main(["train", "--data", str(short), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "validation split" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_unavailable_exit_2(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--device", "cuda", *TINY]) == 2
    assert "no CUDA device" in error_line(capsys)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--device", "cuda"]) == 2
    assert "no CUDA device" in error_line(capsys)


def test_resume_errors_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--resume", "--out", str(tmp_path / "fresh"), "--no-progress"]) == 2
    assert "--resume" in error_line(capsys)
    assert main(["train", "--resume", "--out", str(run_dir), "--d-model", "64", "--no-progress"]) == 2
    assert "does not match" in error_line(capsys)


def test_generate_prompt_errors_exit_2(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = str(run_dir / "checkpoint")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", ""]) == 2
    assert "must not be empty" in error_line(capsys)
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "x" * 50, "--max-prompt-tokens", "10"]) == 2
    assert "--max-prompt-tokens 10" in error_line(capsys)


def test_broken_checkpoints_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

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


def test_unwritable_out_exit_2(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--data", str(corpus), "--out", str(blocker / "sub"), *TINY]) == 2
    error_line(capsys)


def test_tasks_and_nd_subcommands_are_wired(capsys):
    from mambakit.cli import main

    assert main(["tasks", "bogus-task"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["tasks", "mamba-nd-digits", "--help"]) == 0
    assert main(["explain", "--help"]) == 0
