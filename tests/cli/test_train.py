"""``mambakit train``, run in-process through `mambakit.cli.main`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mambakit.cli import main
from tests.cli.conftest import TINY, error_line


def test_train_writes_checkpoint_and_summary(run_dir: Path) -> None:
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.05  # 4 steps from ln(256): the loss falls


def test_resume_continues(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    assert "sample:\ndef " in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(out), "--steps", "6", "--no-progress", "--sample-tokens", "0"]) == 0
    assert "resumed from" in capsys.readouterr().out
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["args"]["data"] == str(corpus)


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


def test_unwritable_out_exit_2(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--data", str(corpus), "--out", str(blocker / "sub"), *TINY]) == 2
    error_line(capsys)


def test_cuda_graph_needs_cuda_exit_2(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--device", "cpu", "--cuda-graph",
                 *TINY]) == 2
    assert "--cuda-graph needs a CUDA device" in error_line(capsys)
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--device", "cpu", "--cuda-graph",
                 "--grad-accum", "2", *TINY]) == 2
    assert "--cuda-graph" in error_line(capsys)


@pytest.mark.gpu
def test_cuda_graph_training_matches_eager(corpus: Path, tmp_path: Path) -> None:
    import json

    losses = {}
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        out = tmp_path / name
        assert main(["train", "--data", str(corpus), "--out", str(out), "--device", "cuda", "--bf16", *extra,
                     *TINY]) == 0
        losses[name] = json.loads((out / "summary.json").read_text())
    assert losses["graph"]["final_val_loss"] == pytest.approx(losses["eager"]["final_val_loss"], rel=2e-2)
    assert losses["graph"]["final_train_loss"] == pytest.approx(losses["eager"]["final_train_loss"], rel=2e-2)
